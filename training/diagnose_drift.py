"""Entry point `python -m training.diagnose_drift`: projector-drift diagnosis (the code lives in `training.recovery.drift`)."""

from training.recovery.drift import main

if __name__ == "__main__":
    raise SystemExit(main())
