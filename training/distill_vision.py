"""Entry point `python -m training.distill_vision`: distil EfficientNet-Lite0 into the small vision tower (the code lives in `training.base.distill_vision`)."""

from training.base.distill_vision import main

if __name__ == "__main__":
    raise SystemExit(main())
