"""The server on a compression_mean (CoMa) repo: /v1/embeddings equals AutoModel + AutoProcessor (in-process app,
httpx ASGI transport), and its usage counts the compression tokens. Tolerance 1e-5: the server batches dynamically, so rows meet different padding (fp32 CPU)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("fastapi", "httpx", "prometheus_client"):
    pytest.importorskip(_module, reason=f"the server tests need `{_module}` (pip install -r requirements-serving.txt)")

import httpx  # noqa: E402

from serving.server import ServerSettings, create_app, load_model  # noqa: E402
from tests.conftest import COMPRESSION_K  # noqa: E402


async def _post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        return await client.post("/v1/embeddings", json=body)


def test_v1_embeddings_equals_automodel_on_a_compression_repo(tiny_compression_repo,
                                                              tiny_compression_model_and_processor):
    model, processor = tiny_compression_model_and_processor
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    app = create_app(load_model(str(tiny_compression_repo), "cpu", "float32"), ServerSettings("tiny-coma"))
    try:
        response = asyncio.run(_post(app, {"input": ["a cat on a mat", "the quarterly report of a company", uri]}))
    finally:
        app.state.batcher.close()
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    with torch.no_grad():
        want = torch.cat([model(**processor.prepare([x])).embeddings
                          for x in ("a cat on a mat", "the quarterly report of a company", image)]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # usage counts each item's whole model input, the K appended compression tokens included
    lengths = [processor.prepare([x])["attention_mask"].sum().item()
               for x in ("a cat on a mat", "the quarterly report of a company", image)]
    assert response.json()["usage"] == {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}
    assert sum(lengths) - 3 * COMPRESSION_K == sum(
        processor.prepare([x], add_compression_tokens=False)["attention_mask"].sum().item()
        for x in ("a cat on a mat", "the quarterly report of a company", image))
