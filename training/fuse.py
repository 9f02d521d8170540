"""Entry point `python -m training.fuse`: fuse specialists (stage F) (the code lives in `training.fusion.cli`)."""

from training.fusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
