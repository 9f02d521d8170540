"""Serving the model: the HTTP embeddings server, the corpus index and their helpers."""
