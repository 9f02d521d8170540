"""Stage R: Projector Recovery (`recover`), drift diagnosis (`drift`) and training-free re-alignment (`realign`)."""
