"""Entry point `python -m training.coma`: CoMa compressed pre-training (the code lives in `training.coma.stage`)."""

from training.coma.stage import main

if __name__ == "__main__":
    raise SystemExit(main())
