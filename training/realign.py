"""Entry point `python -m training.realign`: training-free projector re-alignment (the code lives in `training.recovery.realign`)."""

from training.recovery.realign import main

if __name__ == "__main__":
    raise SystemExit(main())
