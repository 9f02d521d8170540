"""The server app in-process (httpx ASGI transport) for what needs a slow model or a local web server: the
per-request timeout (504), the bounded queue (503) and `--allow-url-fetch` against a loopback HTTP server."""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
import time

import numpy as np
import pytest
from PIL import Image

for _module in ("fastapi", "httpx", "prometheus_client"):
    pytest.importorskip(_module, reason=f"the server tests need `{_module}` (pip install -r requirements-serving.txt)")

import httpx  # noqa: E402

from serving.media import MediaPolicy  # noqa: E402
from serving.server import ServerSettings, create_app  # noqa: E402


class SlowModel:
    """The tiny SentenceTransformer with `delay_s` added to every encode call."""

    def __init__(self, model, delay_s: float):
        self.model, self.delay_s, self.prompts = model, delay_s, model.prompts

    def __getitem__(self, index):
        return self.model[index]

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()

    def encode(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return self.model.encode(*args, **kwargs)


async def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in bodies))


def test_request_timeout_is_504_and_the_server_recovers(tiny_st):
    model, settings = SlowModel(tiny_st, 1.0), ServerSettings("tiny", request_timeout_s=0.3)
    app = create_app(model, settings)
    try:
        (slow,) = asyncio.run(_post_all(app, [{"input": ["too slow"]}]))
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        model.delay_s, settings.request_timeout_s = 0.0, 60.0
        (ok,) = asyncio.run(_post_all(app, [{"input": ["fine"]}]))
        assert ok.status_code == 200, ok.text
        np.testing.assert_allclose(ok.json()["data"][0]["embedding"], tiny_st.encode(["fine"])[0], atol=1e-5, rtol=0)
    finally:
        app.state.batcher.close()


def test_full_queue_is_503(tiny_st):
    app = create_app(SlowModel(tiny_st, 0.5), ServerSettings("tiny", max_batch_size=1, max_wait_ms=0, max_queue=2))
    try:
        responses = asyncio.run(_post_all(app, [{"input": [f"text {i}"]} for i in range(6)]))
    finally:
        app.state.batcher.close()
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503).json()["error"]
    assert refused["code"] == "queue_full" and "at most 2" in refused["message"]


def test_url_fetch_when_allowed(tiny_st, tmp_path):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    image.save(tmp_path / "cat.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}"
    app = create_app(tiny_st, ServerSettings("tiny", media=MediaPolicy(allow_url_fetch=True, max_media_bytes=10**6)))
    try:
        ok, missing = asyncio.run(_post_all(app, [
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{url}/cat.png"}}]}]},
            {"input": [f"{url}/dog.png"], "modality": "image"},
        ]))
    finally:
        app.state.batcher.close()
        web.shutdown()
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["data"][0]["embedding"], tiny_st.encode([image])[0], atol=1e-5, rtol=0)
    assert missing.status_code == 400 and "input[0]" in missing.json()["error"]["message"]
    assert "404" in missing.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- soundtracks
def _mp4_with_soundtrack(path) -> str:
    """A 1 s, 64x48 H.264 clip with a 440 Hz AAC track (PyAV); returns it as a video/mp4 data URI."""
    import base64

    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=4)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, dtype=np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
        samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        samples.sample_rate = 16000
        container.mux(audio.encode(samples))
        container.mux(audio.encode())
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_audio_part_may_be_a_videos_soundtrack(tiny_st, tmp_path):
    """The processor reads the audio track of a video file as audio (README: "the audio track of .mov/.mp4/.mkv"),
    so "a video + its soundtrack" can be sent as the same video/* data URI in a video part and an audio part."""
    from serving.requests import materialize, parse_request

    uri = _mp4_with_soundtrack(tmp_path / "clip.mp4")
    path = str(tmp_path / "clip.mp4")
    processor = tiny_st[0].processor
    bodies = [
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                                   {"type": "audio_url", "audio_url": {"url": uri}}]}]},
        {"input": [uri], "modality": "audio"},
    ]
    wants = [{"video": path, "audio": path}, {"audio": path}]
    for body, want in zip(bodies, wants):
        request = parse_request(body, tiny_st.prompts, tiny_st.get_embedding_dimension(), 16)
        item = materialize(request.items[0], MediaPolicy(), processor)
        np.testing.assert_allclose(tiny_st.encode([item]), tiny_st.encode([want]), atol=1e-5, rtol=0)


def test_decode_error_param_names_the_part(tiny_st, tmp_path):
    """A media part that fails to decode names the part in `param` (as in the message), not the whole request."""
    import base64

    from serving.media import RequestError
    from serving.requests import materialize, parse_request

    Image.new("RGB", (40, 40), "red").save(tmp_path / "page.pdf")  # a 1-page PDF
    uri = "data:application/pdf;base64," + base64.b64encode((tmp_path / "page.pdf").read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "page eight"},
        {"type": "document_url", "document_url": {"url": uri, "page": 7}}]}]}
    request = parse_request(body, tiny_st.prompts, tiny_st.get_embedding_dimension(), 16)
    with pytest.raises(RequestError, match=r"messages\[0\].content\[1\]: PDF file <document data> has 1 pages") as raised:
        materialize(request.items[0], MediaPolicy(), tiny_st[0].processor)
    assert raised.value.param == "messages[0].content[1]"


def test_instruction_and_input_type_together_are_refused():
    """`instruction` replaces the prompt `input_type` selects: a request with both used to drop `input_type` silently."""
    from serving.media import RequestError
    from serving.requests import parse_request

    prompts = {"query": "Q", "document": "D"}
    with pytest.raises(RequestError, match=r"input_type: 'query' selects a prompt.*give one") as raised:
        parse_request({"input": "a", "instruction": "Find it.", "input_type": "query"}, prompts, 8, 4)
    assert raised.value.status == 400 and raised.value.param == "input_type"
    with pytest.raises(RequestError, match=r"input_type: 'document' selects a prompt"):
        parse_request({"messages": [{"role": "system", "content": "Find it."}, {"role": "user", "content": "a"}],
                       "input_type": "document"}, prompts, 8, 4)
    assert parse_request({"input": "a", "instruction": "Find it."}, prompts, 8, 4).prompt == "Find it."
    assert parse_request({"input": "a", "input_type": "query"}, prompts, 8, 4).prompt == "Q"
