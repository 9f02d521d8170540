"""Serving Conan-embedding-v3: the OpenAI-compatible embedding server (`python -m serving.server`) with its request
parsing (`serving.requests`), media policy (`serving.media`) and dynamic batcher (`serving.batching`), and the corpus
index (`python -m serving.index build | search`, used by the Gradio demo in `demo/`)."""
