"""Entry point `python -m training.recover`: Projector Recovery (stage R) (the code lives in `training.recovery.recover`)."""

from training.recovery.recover import main

if __name__ == "__main__":
    raise SystemExit(main())
