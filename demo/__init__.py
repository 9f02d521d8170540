"""Browser demos of the model (not part of the Hub package)."""
