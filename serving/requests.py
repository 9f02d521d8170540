"""Request bodies of `POST /v1/embeddings` -> inputs for `SentenceTransformer.encode`.

Three input forms (exactly one per request), each item becoming one embedding:

- OpenAI: `"input": str | [str, ...]`. A string is text, unless it is a `data:` URI (its MIME type gives the
  modality) or a `modality` hint (Infinity / NVIDIA NIM style: one value for the request, or a list aligned with
  `input`) says `image` | `audio` | `video` | `document`, in which case it is a data URI, URL or allowed path.
- vLLM chat: `"messages": [{"role": "system" | "user", "content": str | [part, ...]}]` -> one embedding. A system
  message is the instruction.
- Cohere-style batch: `"inputs": [{"content": [part, ...]}, ...]` -> one embedding per entry.

Content parts: `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url"}}`, `video_url`, `audio_url`
(same shape), `{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}`, and this server's
`{"type": "document_url", "document_url": {"url", "page"?}}` for a PDF page (0-based) or a page image. One item holds
text plus at most one image, one document page, one video and one audio clip (what `ConanProcessor` embeds together).

Other fields: `model`, `dimensions` (Matryoshka truncation, re-normalised; Cohere's `output_dimension` too),
`encoding_format` `float` | `base64` (little-endian float32), `input_type` `query` | `document` (also `search_query`,
`search_document`, `passage`) selecting the model's prompts, or `instruction` (a free-form system instruction; not both).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .media import MEDIA_KINDS, MediaPolicy, RequestError, decode_base64

INPUT_TYPES = {"query": "query", "search_query": "query", "document": "document", "search_document": "document",
               "passage": "document"}
URL_PARTS = {"image_url": "image", "video_url": "video", "audio_url": "audio", "document_url": "document"}
ENCODING_FORMATS = ("float", "base64")


@dataclass
class MediaRef:
    """A reference to one media item: `source` (data URI, URL or path), `kind` (None = from the MIME type)."""

    source: str
    kind: str | None
    where: str
    page: int | None = None


@dataclass
class ItemSpec:
    """One embedding's content as sent: text and media references, and `where` it sits in the request."""

    where: str
    text: str | None = None
    media: list[MediaRef] = field(default_factory=list)


@dataclass
class EmbeddingRequest:
    items: list[ItemSpec]
    prompt: str | None
    dimensions: int | None
    encoding_format: str
    model: str | None


def _fail(where: str, message: str, status: int = 400) -> RequestError:
    return RequestError(status, f"{where}: {message}", where)


def parse_request(body: Any, prompts: dict[str, str], embedding_dim: int, max_items: int) -> EmbeddingRequest:
    """Validate a decoded JSON body; errors name the field or item (`input[2]`, `messages[0].content[1]`, ...)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body is a JSON {type(body).__name__}; expected a JSON object.")
    forms = [name for name in ("input", "messages", "inputs") if body.get(name) is not None]
    if len(forms) != 1:
        raise RequestError(400, "give exactly one of `input` (OpenAI), `messages` (vLLM chat) or `inputs` "
                                f"(batched content parts); got {forms or 'none'}.", "input")
    instruction = body.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise _fail("instruction", "expected a non-empty string.")
    if forms == ["input"]:
        items = _parse_openai_input(body["input"], body.get("modality"))
    elif forms == ["messages"]:
        item, system = _parse_messages(body["messages"])
        if system is not None and instruction is not None:
            raise _fail("messages", "holds a system message and the request also has `instruction`; give one.")
        instruction = instruction or system
        items = [item]
    else:
        items = _parse_inputs(body["inputs"])
    if instruction is not None and body.get("input_type") is not None:
        raise _fail("input_type", f"{body['input_type']!r} selects a prompt, and the request also has an instruction "
                                  "(`instruction` or a system message), which replaces it; give one.")
    if len(items) > max_items:
        raise RequestError(413, f"the request holds {len(items)} inputs; this server takes at most {max_items} per "
                                "request.", forms[0], "too_many_inputs")
    return EmbeddingRequest(
        items=items,
        prompt=instruction if instruction is not None else _prompt(body.get("input_type"), prompts),
        dimensions=_dimensions(body, embedding_dim),
        encoding_format=_encoding_format(body.get("encoding_format")),
        model=body.get("model"),
    )


def _prompt(input_type: Any, prompts: dict[str, str]) -> str | None:
    if input_type is None:
        return None
    if input_type not in INPUT_TYPES:
        raise _fail("input_type", f"{input_type!r} is not one of {sorted(INPUT_TYPES)}.")
    name = INPUT_TYPES[input_type]
    if name not in prompts:
        raise _fail("input_type", f"the model declares no {name!r} prompt (its prompts: {sorted(prompts)}).")
    return prompts[name]


def _dimensions(body: dict, embedding_dim: int) -> int | None:
    name = "dimensions" if body.get("dimensions") is not None else "output_dimension"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= embedding_dim:
        raise _fail(name, f"{value!r} is not an int in [1, {embedding_dim}] (the model's embedding size).")
    return value


def _encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ENCODING_FORMATS:
        raise _fail("encoding_format", f"{value!r} is not one of {list(ENCODING_FORMATS)}.")
    return value


def _parse_openai_input(raw: Any, modality: Any) -> list[ItemSpec]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _fail("input", "expected a string or a non-empty list of strings.")
    if isinstance(modality, list):
        if len(modality) != len(raw):
            raise _fail("modality", f"holds {len(modality)} values for {len(raw)} inputs; expected one per input "
                                    "(or one string for all).")
        hints = modality
    else:
        hints = [modality] * len(raw)
    items = []
    for index, (value, hint) in enumerate(zip(raw, hints)):
        where = f"input[{index}]"
        if not isinstance(value, str):
            raise _fail(where, f"has type {type(value).__name__}; expected a string (text, or a data: URI / URL / path "
                               "of an image, audio clip, video or document; token-id inputs are not supported).")
        if hint is not None and hint not in ("text", *MEDIA_KINDS):
            raise _fail(f"modality[{index}]" if isinstance(modality, list) else "modality",
                        f"{hint!r} is not one of {['text', *MEDIA_KINDS]}.")
        if hint == "text" or (hint is None and not value.startswith("data:")):
            items.append(ItemSpec(where, text=_text(value, where)))
        else:
            items.append(ItemSpec(where, media=[MediaRef(value, hint, where)]))
    return items


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{value!r} is not non-empty text.")
    return value


def _parse_messages(messages: Any) -> tuple[ItemSpec, str | None]:
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "expected a non-empty list of {role, content} messages.")
    item, system = ItemSpec("messages"), None
    texts: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or "content" not in message:
            raise _fail(where, "expected an object with `role` and `content`.")
        role = message.get("role", "user")
        if role == "system":
            parts = _content_parts(message["content"], f"{where}.content")
            if any(part.media for part in parts) or len(parts) != 1:
                raise _fail(where, "a system message must hold text only (it becomes the instruction).")
            system = parts[0].text
            continue
        if role not in ("user", "assistant"):
            raise _fail(f"{where}.role", f"{role!r} is not one of ['system', 'user', 'assistant'].")
        _merge(item, texts, _content_parts(message["content"], f"{where}.content"))
    if texts:
        item.text = "\n".join(texts)
    if item.text is None and not item.media:
        raise _fail("messages", "holds no text or media to embed.")
    return item, system


def _parse_inputs(inputs: Any) -> list[ItemSpec]:
    if not isinstance(inputs, list) or not inputs:
        raise _fail("inputs", "expected a non-empty list of {content: [parts]} objects.")
    items = []
    for index, entry in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(entry, dict) or "content" not in entry:
            raise _fail(where, "expected an object with `content` (a list of content parts).")
        item, texts = ItemSpec(where), []
        _merge(item, texts, _content_parts(entry["content"], f"{where}.content"))
        item.text = "\n".join(texts) if texts else None
        if item.text is None and not item.media:
            raise _fail(where, "holds no text or media to embed.")
        items.append(item)
    return items


def _merge(item: ItemSpec, texts: list[str], parts: list[ItemSpec]) -> None:
    for part in parts:
        if part.text is not None:
            texts.append(part.text)
        item.media.extend(part.media)


def _content_parts(content: Any, where: str) -> list[ItemSpec]:
    """Each part as an ItemSpec holding either its text or its one media reference."""
    if isinstance(content, str):
        return [ItemSpec(where, text=_text(content, where))]
    if not isinstance(content, list) or not content:
        raise _fail(where, "expected a string or a non-empty list of content parts.")
    return [_content_part(part, f"{where}[{index}]") for index, part in enumerate(content)]


def _content_part(part: Any, where: str) -> ItemSpec:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return ItemSpec(where, text=_text(part.get("text"), f"{where}.text"))
    if kind in URL_PARTS:
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise _fail(where, f"expected {{'type': '{kind}', '{kind}': {{'url': ...}}}} with a data: URI, URL or "
                               "path.")
        page = ref.get("page") if isinstance(ref, dict) else None
        bad_page = kind != "document_url" or isinstance(page, bool) or not isinstance(page, int) or page < 0
        if page is not None and bad_page:
            raise _fail(f"{where}.page", f"{page!r}: `page` is a 0-based int of a document_url part.")
        return ItemSpec(where, media=[MediaRef(url, URL_PARTS[kind], where, page)])
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise _fail(where, "expected {'type': 'input_audio', 'input_audio': {'data': base64, 'format': 'wav'}}.")
        fmt = audio.get("format") or "wav"
        if not isinstance(fmt, str) or not fmt.isalnum():
            raise _fail(f"{where}.input_audio.format", f"{fmt!r} is not an audio format name such as 'wav' or 'mp3'.")
        return ItemSpec(where, media=[MediaRef(f"data:audio/{fmt.lower()};base64,{audio['data']}", "audio", where)])
    expected = ", ".join(map(repr, ["text", "input_audio", *URL_PARTS]))
    raise _fail(where, f"has type {kind!r}; expected one of [{expected}].")


# ---------------------------------------------------------------------------------------------------- decoding
def materialize(spec: ItemSpec, policy: MediaPolicy, processor: Any) -> dict[str, Any]:
    """Decode and validate one item with `processor.parse_input`; returns the equivalent in-memory input dict.

    The returned dict (`text`, `image`/`document` PIL images, `video` frames, `audio` 16 kHz array) re-parses to
    exactly the same model inputs, so `SentenceTransformer.encode` on it equals `encode` on the original files.
    Raises `RequestError` (400 or 403/413 from the media policy) naming `spec.where` or the part at fault.
    """
    raw: dict[str, Any] = {}
    names: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for ref in spec.media:
            media = stack.enter_context(policy.load(ref.source, ref.kind, ref.where))
            if media.kind in raw:
                raise _fail(ref.where, f"a second {media.kind}; one input holds at most one image, one document page, "
                                       "one video and one audio clip (send several items for several embeddings).")
            raw[media.kind] = media.path
            if media.temporary:  # name the request's data, not the server's temporary file
                names[media.path] = f"<{media.kind} data>"
            if ref.page is not None:
                raw["page"] = ref.page
            names[f"inputs[0]['{media.kind}']"] = ref.where
        if spec.text is not None:
            raw["text"] = spec.text
        try:
            parsed, doc_flags = processor.parse_input(raw, 0)
        except (ValueError, TypeError, OSError) as error:
            message = str(error)
            # `param` names the part at fault when the processor's message names one (`inputs[0]['audio']`)
            param = next((new for old, new in names.items() if old.startswith("inputs[0]") and old in message),
                         spec.where)
            for old, new in sorted(names.items(), key=lambda kv: -len(kv[0])):
                message = message.replace(repr(old), new).replace(old, new)
            message = message.replace("inputs[0]", spec.where)
            message = message if spec.where in message else f"{spec.where}: {message}"
            raise RequestError(400, message, param) from error
    item: dict[str, Any] = {}
    if parsed.text is not None:
        item["text"] = parsed.text
    for image, is_document in zip(parsed.images, doc_flags):
        item["document" if is_document else "image"] = image
    if parsed.video is not None:
        item["video"] = parsed.video
    if parsed.audio is not None:
        item["audio"] = {"array": parsed.audio, "sampling_rate": processor.feature_extractor.sampling_rate}
    return item


def finish(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation to `dimensions` and L2 re-normalisation (what `encode(truncate_dim=...,
    normalize_embeddings=True)` does); float32 (n, dimensions)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dimensions is None:
        return vectors
    vectors = vectors[:, :dimensions]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
