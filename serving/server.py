"""OpenAI-compatible multimodal embedding server for Conan-embedding-v3 models.

    python -m serving.server --model runs/tiny --port 8000
    curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json' -d '{"input": ["a red square"]}'

Built on FastAPI + uvicorn (the maintained ASGI stack most Python model servers use; LitServe's OpenAI embedding spec
accepts text only and runs the model in separate worker processes, while this server needs its own request forms and
one in-process model that encodes through `SentenceTransformer.encode`, so server vectors equal library vectors).
Metrics use `prometheus_client`.

Endpoints: `POST /v1/embeddings` (forms in `serving.requests`), `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus text: batch-size histogram, request latency, queue depth). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 bad input (naming the item), 401 missing/wrong API key,
403 a local path or URL the operator did not allow, 404 unknown model, 413 body/media/item limits, 503 queue full,
504 request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import DynamicBatcher, QueueFullError
from .media import MediaPolicy, RequestError
from .requests import finish, materialize, parse_request

logger = logging.getLogger("serving.server")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServerSettings:
    """Operator settings (the CLI flags of the same names)."""

    served_model_name: str
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 60.0
    max_body_bytes: int = 64 * 2**20
    max_items: int = 256
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)


class Metrics:
    """Prometheus collectors in a private registry (one per app, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram("conan_batch_size", "Inputs per model batch (dynamic batching).",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.latency = Histogram("conan_request_latency_seconds", "POST /v1/embeddings latency.",
                                 registry=self.registry)
        self.requests = Counter("conan_requests", "POST /v1/embeddings requests by HTTP status.", ["status"],
                                registry=self.registry)
        self.embeddings = Counter("conan_embeddings", "Embeddings returned.", registry=self.registry)
        self.queued = Gauge("conan_queue_inputs", "Inputs waiting for a batch.", registry=self.registry)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 503: "server_overloaded",
            504: "timeout"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def sentence_transformer_encoder(model: Any):
    """`(items, prompt) -> ((n, dim) float32, n input lengths)`: `SentenceTransformer.encode`, the library path users
    call, with `output_value=None` so each item's features come back with its vector: the input length is the sum of
    the item's `attention_mask` (the processor's `input_ids` without padding), counted from the batch the model ran,
    never tokenized again. The vectors are the same tensors `encode` returns by default (`sentence_embedding`,
    after the model's `truncate_dim`)."""

    import torch

    def encode(items: list[Any], prompt: str | None) -> tuple[np.ndarray, list[int]]:
        outputs = model.encode(items, prompt=prompt, batch_size=len(items), output_value=None,
                               show_progress_bar=False)
        vectors = torch.stack([o["sentence_embedding"] for o in outputs]).float().cpu().numpy()  # one transfer
        return vectors, torch.stack([o["attention_mask"].sum() for o in outputs]).tolist()

    return encode


def create_app(model: Any, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving a loaded `SentenceTransformer` Conan model (`model[0]` is `ConanEmbedder`)."""
    processor = model[0].processor
    prompts = dict(getattr(model, "prompts", {}) or {})
    embedding_dim = model.get_embedding_dimension()
    metrics = Metrics()
    batcher = DynamicBatcher(
        sentence_transformer_encoder(model), settings.max_batch_size, settings.max_wait_ms / 1000.0,
        settings.max_queue, on_batch=metrics.batch_size.observe,
    )
    metrics.queued.set_function(lambda: batcher.queued)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="Conan-embedding-v3 server", version="1", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), None, None)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}", None, "internal_error")

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send `Authorization: Bearer <key>`).", None,
                               "invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise RequestError(413, f"the request body has {declared} bytes; the limit is {settings.max_body_bytes}.",
                               None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise RequestError(413, f"the request body exceeds the {settings.max_body_bytes}-byte limit.", None,
                                   "body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from error

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await embed(request, start + settings.request_timeout_s)
            status = 200
            return response
        except RequestError as error:
            status = error.status
            raise
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.perf_counter() - start)

    async def embed(request: Request, deadline: float) -> JSONResponse:
        check_key(request)
        body = await read_json(request)
        parsed = parse_request(body, prompts, embedding_dim, settings.max_items)
        if parsed.model is not None and parsed.model != settings.served_model_name:
            raise RequestError(404, f"model {parsed.model!r} is not served here; this server serves "
                                    f"{settings.served_model_name!r}.", "model", "model_not_found")

        def decode_all() -> list[dict[str, Any]]:
            return [materialize(spec, settings.media, processor) for spec in parsed.items]

        futures: list = []
        try:
            if any(spec.media for spec in parsed.items):  # media decoding runs off the event loop
                items = await asyncio.wait_for(run_in_threadpool(decode_all), deadline - time.perf_counter())
            else:
                items = decode_all()
            try:
                futures = batcher.submit(items, parsed.prompt)
            except QueueFullError as error:
                raise RequestError(503, str(error), None, "queue_full") from error
            encoded = await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), deadline - time.perf_counter()
            )
        except (asyncio.TimeoutError, TimeoutError) as error:
            for future in futures:
                future.cancel()
            raise RequestError(504, f"the request took longer than {settings.request_timeout_s:g} s.", None,
                               "timeout") from error
        out = finish(np.stack([e.vector for e in encoded]), parsed.dimensions)
        metrics.embeddings.inc(len(out))
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if parsed.encoding_format == "base64"
             else v.tolist()}
            for i, v in enumerate(out)
        ]
        # OpenAI reports the tokens of the input the model consumed: each item's whole model input (instruction,
        # chat template, media placeholders, compression tokens), as the batcher measured it.
        tokens = sum(e.input_tokens for e in encoded)
        return JSONResponse({"object": "list", "data": data, "model": settings.served_model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "conan-embedding-v3",
            "embedding_dimension": embedding_dim, "modalities": ["text", "image", "document", "video", "audio"],
            "prompts": sorted(prompts),
        }]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if not batcher.is_alive():
            return JSONResponse({"status": "error", "detail": "the model worker thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "queued_inputs": batcher.queued})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def load_model(path: str, device: str, dtype: str):
    import torch
    from sentence_transformers import SentenceTransformer

    model_kwargs = {} if dtype == "float32" else {"dtype": getattr(torch, dtype)}
    return SentenceTransformer(path, trust_remote_code=True, device=device, model_kwargs=model_kwargs)


def limit_image_pixels(max_pixels: int) -> None:
    """Make PIL refuse images over `max_pixels` (process-wide: PIL's own decompression-bomb check, raised to an
    error from its first threshold); the processor reports the refusal as a bad input."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Conan repo folder (or Hub id) loadable by SentenceTransformer")
    p.add_argument("--served-model-name", help="the `model` id clients send (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=32, help="most inputs per model batch (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up, in ms")
    p.add_argument("--max-queue", type=int, default=1024, help="most queued inputs; beyond it requests get 503")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request before 504")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="largest request body (413 beyond)")
    p.add_argument("--max-media-bytes", type=int, default=20 * 2**20, help="largest media item (413 beyond)")
    p.add_argument("--max-items", type=int, default=256, help="most inputs per request (413 beyond)")
    p.add_argument("--max-image-pixels", type=int, default=64 * 2**20,
                   help="largest decoded image (width x height) before resizing; larger images are refused (400), "
                        "which guards against decompression bombs")
    p.add_argument("--allowed-media-dir", action="append", default=[],
                   help="a folder whose files requests may name by path (repeatable); default: no local file reads")
    p.add_argument("--allow-url-fetch", action="store_true", help="fetch http(s) media URLs (off by default)")
    p.add_argument("--api-key", default=os.environ.get("CONAN_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $CONAN_API_KEY, else no key)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        logger.warning("listening on %s without an API key: anyone who can reach the port can use the model.",
                       args.host)
    settings = ServerSettings(
        served_model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes, max_items=args.max_items,
        api_key=args.api_key,
        media=MediaPolicy(tuple(args.allowed_media_dir), args.allow_url_fetch, args.max_media_bytes),
    )
    limit_image_pixels(args.max_image_pixels)
    model = load_model(args.model, args.device, args.dtype)
    model.encode(["warm-up"], show_progress_bar=False)
    app = create_app(model, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
