"""Entry point `python -m training.distill_text`: distil a sentence embedder into the small backbone (the code lives in `training.base.distill_text`)."""

from training.base.distill_text import main

if __name__ == "__main__":
    raise SystemExit(main())
