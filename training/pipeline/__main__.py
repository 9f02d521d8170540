"""Entry point `python -m training.pipeline`: the end-to-end decouple -> fuse -> recover job (the code lives in `training.pipeline.runner`)."""

from training.pipeline.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
