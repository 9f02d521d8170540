"""The embedding server as a real process on 127.0.0.1, driven by the `openai` client and raw HTTP (httpx).

Every vector the server returns is compared with `SentenceTransformer.encode` on the same inputs (files on disk).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_fading_mp4

for _module in ("fastapi", "uvicorn", "openai", "httpx", "prometheus_client"):
    pytest.importorskip(_module, reason=f"the server tests need `{_module}` (pip install -r requirements-serving.txt)")

import httpx  # noqa: E402
import openai  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
MODEL_NAME = "tiny-conan"
ATOL = 1e-5
RNG = np.random.default_rng(7)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Small media files of every kind the processor reads, in the folder the server may read from."""
    import soundfile

    folder = tmp_path_factory.mktemp("media")
    image = Image.fromarray(RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    files = {"png": folder / "photo.png", "big_png": folder / "big.png", "wav": folder / "speech.wav",
             "mp4": folder / "clip.mp4", "pdf": folder / "manual.pdf", "page": folder / "page.png",
             "nan_wav": folder / "nan.wav"}
    image.save(files["png"])
    Image.new("RGB", (200, 200)).save(files["big_png"])  # 40000 pixels > the server's --max-image-pixels 10000
    Image.fromarray(RNG.integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(files["page"])
    image.save(files["pdf"], save_all=True, append_images=[image.rotate(90, expand=True)])
    soundfile.write(files["wav"], (RNG.standard_normal(8000 * 2) * 0.1).astype(np.float32), 8000)
    soundfile.write(files["nan_wav"], np.full(1600, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    write_fading_mp4(files["mp4"], n_frames=6, step=40)
    return files


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def server(tiny_repo, media, tmp_path_factory):
    """`python -m serving.server` on a free loopback port, with an API key and one allowed media folder."""
    from serving.launch import running_server

    args = ["--served-model-name", MODEL_NAME, "--api-key", API_KEY, "--allowed-media-dir", str(media["png"].parent),
            "--max-batch-size", "16", "--max-wait-ms", "50", "--max-body-bytes", str(8 * 2**20),
            "--max-media-bytes", str(2 * 2**20), "--max-image-pixels", "10000", "--log-level", "warning"]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        with running_server(tiny_repo, args, log_path=log_path, threads=1) as base:
            yield base
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as session:
        yield session


def post(http, body) -> np.ndarray:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert [d["index"] for d in payload["data"]] == list(range(len(payload["data"])))
    return np.array([d["embedding"] for d in payload["data"]], dtype=np.float32)


def assert_healthy(http) -> None:
    response = http.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------- equality
def test_openai_client_text_float_and_base64(client, tiny_st):
    texts = ["a cat on a mat", "the quarterly report"]
    want = tiny_st.encode(texts)
    floats = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    assert floats.model == MODEL_NAME and floats.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), want, atol=ATOL, rtol=0)
    default = client.embeddings.create(model=MODEL_NAME, input=texts[0])  # the client asks for base64 and decodes it
    np.testing.assert_allclose(np.array(default.data[0].embedding), want[0], atol=ATOL, rtol=0)


def test_every_modality_as_data_uris_matches_encode(client, tiny_st, media):
    inputs = [
        "a fading clip",
        data_uri(media["png"], "image/png"),
        data_uri(media["wav"], "audio/wav"),
        data_uri(media["mp4"], "video/mp4"),
        data_uri(media["pdf"], "application/pdf"),
        data_uri(media["page"], "image/png"),
    ]
    modality = ["text", "image", "audio", "video", "document", "document"]
    got = client.embeddings.create(model=MODEL_NAME, input=inputs, encoding_format="float",
                                   extra_body={"modality": modality})
    want = tiny_st.encode(["a fading clip", str(media["png"]), str(media["wav"]), str(media["mp4"]),
                           str(media["pdf"]), {"document": str(media["page"])}])
    got = np.array([d.embedding for d in got.data])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.abs(got[1] - got[5]).max() > 1e-3  # the two images are different inputs


def test_data_uri_modality_from_mime_type(http, tiny_st, media):
    got = post(http, {"input": [data_uri(media["png"], "image/png"), data_uri(media["wav"], "audio/x-wav")]})
    np.testing.assert_allclose(got, tiny_st.encode([str(media["png"]), str(media["wav"])]), atol=ATOL, rtol=0)


def test_vllm_messages_form(http, tiny_st, media):
    wav_b64 = base64.b64encode(media["wav"].read_bytes()).decode()
    body = {"model": MODEL_NAME, "messages": [
        {"role": "system", "content": "Find the matching clip."},
        {"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_uri(media["mp4"], "video/mp4")}},
            {"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}},
            {"type": "text", "text": "a fading clip"},
        ]},
    ]}
    got = post(http, body)
    want = tiny_st.encode([{"text": "a fading clip", "video": str(media["mp4"]), "audio": str(media["wav"])}],
                          prompt="Find the matching clip.")
    assert got.shape == (1, want.shape[1])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    image_only = post(http, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(media["png"], "image/png")}}]}]})
    np.testing.assert_allclose(image_only, tiny_st.encode([str(media["png"])]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("input_type", ["query", "document"])
def test_batched_mixed_inputs_form_with_prompts(http, tiny_st, media, input_type):
    body = {"input_type": input_type, "inputs": [
        {"content": [{"type": "text", "text": "a red square"}]},
        {"content": [{"type": "image_url", "image_url": {"url": data_uri(media["png"], "image/png")}}]},
        {"content": [{"type": "document_url", "document_url": {"url": data_uri(media["pdf"], "application/pdf"),
                                                              "page": 1}}]},
        {"content": [{"type": "audio_url", "audio_url": {"url": data_uri(media["wav"], "audio/wav")}}]},
        {"content": [{"type": "text", "text": "what is in the picture?"},
                     {"type": "image_url", "image_url": {"url": data_uri(media["png"], "image/png")}}]},
    ]}
    want = tiny_st.encode(
        ["a red square", str(media["png"]), {"document": str(media["pdf"]), "page": 1}, str(media["wav"]),
         {"text": "what is in the picture?", "image": str(media["png"])}],
        prompt=tiny_st.prompts[input_type],
    )
    np.testing.assert_allclose(post(http, body), want, atol=ATOL, rtol=0)


def test_instruction_field(http, tiny_st):
    got = post(http, {"input": ["a red square"], "instruction": "Retrieve shapes."})
    np.testing.assert_allclose(got, tiny_st.encode(["a red square"], prompt="Retrieve shapes."), atol=ATOL, rtol=0)


def _input_tokens(processor, inputs: list, prompt: str | None) -> list[int]:
    """Each input's model input length: the processor's input_ids without padding, one input at a time."""
    return [int(processor.prepare([x], instruction=prompt)["attention_mask"].sum()) for x in inputs]


@pytest.mark.parametrize("extra, prompt_key", [({}, None), ({"input_type": "query"}, "query"),
                                               ({"instruction": "Retrieve shapes."}, "Retrieve shapes.")])
def test_usage_counts_the_model_input_tokens_of_text(http, tiny_st, extra, prompt_key):
    """OpenAI's usage.prompt_tokens: the tokens the model consumed, i.e. instruction + chat template + text."""
    texts = ["a red square", "the quarterly report of a small company"]
    prompt = tiny_st.prompts.get(prompt_key, prompt_key)
    response = http.post("/v1/embeddings", json={"input": texts, **extra})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    want = _input_tokens(tiny_st[0].processor, [{"text": t} for t in texts], prompt)
    assert usage == {"prompt_tokens": sum(want), "total_tokens": sum(want)}
    bare = sum(len(tiny_st.tokenizer(t)["input_ids"]) for t in texts)
    assert usage["prompt_tokens"] > bare  # the old count, the user's text alone, left the template out


def test_usage_counts_image_tokens(http, tiny_st, media):
    processor = tiny_st[0].processor
    image = Image.open(media["png"])
    response = http.post("/v1/embeddings", json={"input": [data_uri(media["png"], "image/png")]})
    assert response.status_code == 200, response.text
    tokens = response.json()["usage"]["prompt_tokens"]
    batch = processor.prepare([image])
    image_tokens = int((batch["input_ids"] == tiny_st[0].model.config.image_token_id).sum())
    assert image_tokens > 0 and tokens == int(batch["attention_mask"].sum()) > image_tokens


def test_dimensions_and_base64(http, tiny_st, media):
    inputs = ["a red square", data_uri(media["png"], "image/png")]
    response = http.post("/v1/embeddings", json={"input": inputs, "dimensions": 16, "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in response.json()["data"]])
    want = tiny_st.encode(["a red square", str(media["png"])], truncate_dim=16, normalize_embeddings=True)
    assert got.shape == (2, 16)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_allowed_local_path(http, tiny_st, media):
    got = post(http, {"input": [str(media["png"]), f"file://{media['wav']}"], "modality": ["image", "audio"]})
    np.testing.assert_allclose(got, tiny_st.encode([str(media["png"]), str(media["wav"])]), atol=ATOL, rtol=0)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert_healthy(http)


# ---------------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize(
    "body, code",
    [
        ({"input": ["http://127.0.0.1:9/cat.png"], "modality": "image"}, "url_fetch_disabled"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "url_fetch_disabled"),
        ({"input": [str(REPO_ROOT / "README.md")], "modality": "document"}, "path_not_allowed"),
        ({"input": ["file:///etc/hostname"], "modality": "image"}, "path_not_allowed"),
    ],
)
def test_disallowed_url_and_path_refused(http, body, code):
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == code and re.search(r"input\[0\]|messages\[0\]\.content\[0\]", error["message"])
    assert_healthy(http)


def test_path_traversal_refused(http, media):
    sneaky = f"{media['png'].parent}/../../../../../../etc/hostname"
    response = http.post("/v1/embeddings", json={"input": [sneaky], "modality": "image"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "path_not_allowed"


def test_api_key_enforced(server):
    assert httpx.post(f"{server}/v1/embeddings", json={"input": "x"}).status_code == 401
    wrong = httpx.post(f"{server}/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong_client = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
        wrong_client.embeddings.create(model=MODEL_NAME, input="x")
    assert httpx.get(f"{server}/health").status_code == 200  # health and metrics need no key


# ---------------------------------------------------------------------------------------------------- bad inputs
def _bad_cases(media: dict[str, Path]) -> list[tuple[dict, int, str]]:
    """(body, status, text the error message must hold)."""
    junk = base64.b64encode(b"this is not media at all" * 4).decode()
    return [
        ({"input": []}, 400, "input"),
        ({"input": ["fine", ""]}, 400, "input[1]"),
        ({"input": ["fine", 5]}, 400, "input[1]"),
        ({"input": [[1, 2, 3]]}, 400, "input[0]"),
        ({"input": ["a", f"data:image/png;base64,{junk}"]}, 400, "input[1]"),
        ({"input": [f"data:audio/wav;base64,{junk}"]}, 400, "input[0]"),
        ({"input": [f"data:video/mp4;base64,{junk}"]}, 400, "input[0]"),
        ({"input": [f"data:application/pdf;base64,{junk}"]}, 400, "input[0]"),
        ({"input": [data_uri(media["nan_wav"], "audio/wav")]}, 400, "input[0]"),
        ({"input": ["data:image/png;base64,@@@not-base64@@@"]}, 400, "input[0]"),
        ({"input": ["ok", data_uri(media["big_png"], "image/png")]}, 400, "input[1]"),
        ({"input": ["data:image/png;base64,"]}, 400, "input[0]"),
        ({"input": [f"data:text/plain;base64,{junk}"]}, 400, "input[0]"),
        ({"input": [data_uri(media["png"], "image/png")], "modality": "audio"}, 400, "input[0]"),
        ({"input": ["a", "b"], "modality": ["text"]}, 400, "modality"),
        ({"input": ["a"], "modality": "smell"}, 400, "modality"),
        ({"inputs": [{"content": [{"type": "document_url", "document_url": {
            "url": data_uri(media["pdf"], "application/pdf"), "page": 7}}]}]}, 400, "inputs[0].content[0]"),
        ({"inputs": [{"content": []}]}, 400, "inputs[0].content"),
        ({"inputs": [{"content": [{"type": "hologram", "hologram": {}}]}]}, 400, "inputs[0].content[0]"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(media["png"], "image/png")}},
            {"type": "image_url", "image_url": {"url": data_uri(media["page"], "image/png")}}]}]}, 400,
         "messages[0].content[1]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"input": ["a"], "messages": [{"role": "user", "content": "b"}]}, 400, "exactly one"),
        ({"input": ["a"], "dimensions": 0}, 400, "dimensions"),
        ({"input": ["a"], "dimensions": 10**6}, 400, "dimensions"),
        ({"input": ["a"], "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": ["a"], "input_type": "classification"}, 400, "input_type"),
        ({"input": ["a"], "model": "gpt-4"}, 404, "gpt-4"),
        ({"input": ["a", "x" * 10, data_uri(media["wav"], "audio/wav") + "A" * (3 * 2**20)]}, 413, "input[2]"),
    ]


def test_each_bad_input_is_a_4xx_naming_the_item(http, media):
    for body, status, named in _bad_cases(media):
        response = http.post("/v1/embeddings", json=body)
        assert response.status_code == status, (body if len(str(body)) < 300 else named, response.text)
        error = response.json()["error"]
        assert named in error["message"], (named, error)
        assert error["type"] and "param" in error
    assert_healthy(http)
    np.testing.assert_allclose(np.linalg.norm(post(http, {"input": ["still serving"]})), 1.0, atol=1e-5)


def test_bad_bodies(http):
    not_json = http.post("/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    huge = http.post("/v1/embeddings", json={"input": ["x" * (9 * 2**20)]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert http.get("/v1/nothing-here").status_code == 404
    assert_healthy(http)


# ---------------------------------------------------------------------------------------------------- batching
def test_50_concurrent_mixed_requests_are_batched(http, tiny_st, media):
    before = _batch_histogram(http)
    kinds = [
        ("a red square", "a red square"),
        (data_uri(media["png"], "image/png"), str(media["png"])),
        (data_uri(media["wav"], "audio/wav"), str(media["wav"])),
        (data_uri(media["mp4"], "video/mp4"), str(media["mp4"])),
        (data_uri(media["pdf"], "application/pdf"), str(media["pdf"])),
    ]
    want = tiny_st.encode([ref for _, ref in kinds])
    requests = [(i, f"text number {i}" if i % 5 == 0 else kinds[i % 5][0]) for i in range(50)]
    want_text = dict(zip(range(0, 50, 5), tiny_st.encode([f"text number {i}" for i in range(0, 50, 5)])))

    def call(job):
        index, payload = job
        response = http.post("/v1/embeddings", json={"input": [payload]})
        return index, response.status_code, response

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(call, requests))
    for index, status, response in results:
        assert status == 200, response.text
        vector = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(vector, want_text[index] if index % 5 == 0 else want[index % 5], atol=ATOL, rtol=0)
    after = _batch_histogram(http)
    batches = after["count"] - before["count"]
    inputs = after["sum"] - before["sum"]
    assert inputs == 50
    assert batches < 50, f"50 concurrent inputs ran in {batches} batches: no dynamic batching"
    assert after["le_1"] - before["le_1"] < batches  # at least one batch held more than one input


def _batch_histogram(http) -> dict[str, float]:
    text = http.get("/metrics").text
    values = {}
    for name, key in (("conan_batch_size_count", "count"), ("conan_batch_size_sum", "sum"),
                      ('conan_batch_size_bucket{le="1.0"}', "le_1")):
        match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        assert match, f"{name} missing from /metrics:\n{text[:2000]}"
        values[key] = float(match.group(1))
    return values


# ---------------------------------------------------------------------------------------------------- README
def test_readme_serving_commands(server, monkeypatch):
    """The README's Serving section as a newcomer pastes it: flags parse, curl lines and the Python block work."""
    from serving.server import build_parser
    from tests.test_readme import readme_section

    section = readme_section("Serving")[0]
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    start = [line for line in bash.splitlines() if "-m serving.server" in line]
    assert start, "the Serving section shows no server command"
    for line in start:
        words = shlex.split(line.split("&")[0].split("#")[0])
        build_parser().parse_args(words[words.index("serving.server") + 1 :])
    monkeypatch.setenv("CONAN_API_KEY", API_KEY)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the Serving section shows no Python client example"
    for block in blocks:
        exec(compile(block.replace("http://127.0.0.1:8000", server), "README.md#Serving", "exec"), {})
    curls = [line for line in bash.splitlines() if line.startswith("curl ")]
    assert len(curls) >= 3
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl) to run the README's curl lines")
    env = {"PATH": "/usr/bin:/bin", "CONAN_API_KEY": API_KEY}
    for line in curls:
        result = subprocess.run(["bash", "-c", line.replace("http://127.0.0.1:8000", server)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply.get("status") == "ok" or len(reply["data"]) >= 1, reply
