"""Serving Conan-embedding-v3: the OpenAI-compatible embedding server (`python -m serving.server`), its request
parsing (`serving.requests`), media policy (`serving.media`) and dynamic batcher (`serving.batching`)."""
