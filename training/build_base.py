"""Entry point `python -m training.build_base`: build a Conan base repo (the code lives in `training.base.build_base`)."""

from training.base.build_base import main

if __name__ == "__main__":
    raise SystemExit(main())
