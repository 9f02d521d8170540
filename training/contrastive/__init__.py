"""Shared layer 1: JSONL pair data, samplers, InfoNCE, GradCache and the one training loop. Imports only `common`."""
