"""Shared layer 0: repo I/O, atomic writes, the Hub-code loader, splits, the audio frame cache. Imports no stage."""
