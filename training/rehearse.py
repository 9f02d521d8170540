"""Entry point `python -m training.rehearse`: balanced rehearsal (stage B) (the code lives in `training.rehearsal.rehearse`)."""

from training.rehearsal.rehearse import main

if __name__ == "__main__":
    raise SystemExit(main())
