"""Entry point `python -m training.evaluate`: mteb / MMEB / proxy evaluation (the code lives in `training.evaluation.cli`)."""

from training.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
