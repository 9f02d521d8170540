"""Entry point `python -m training.specialist`: train one modality specialist (stage S) (the code lives in `training.specialist.decouple`)."""

from training.specialist.decouple import main

if __name__ == "__main__":
    raise SystemExit(main())
