"""Where media bytes may come from: `data:` URIs always; local files and URLs only when the operator allows them.

`MediaPolicy.load(source, kind, where)` turns a reference (data URI, http(s) URL, `file://` URI or path) into a local
file the processor's own decoders read (`media_conan`: soundfile/PyAV/pypdfium2; PIL for images), so the server
decodes media exactly as `SentenceTransformer.encode` does for a file path. Every refusal is a `RequestError` that
names the offending item (`where`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import mimetypes
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

MEDIA_KINDS = ("image", "audio", "video", "document")
# Extra MIME -> suffix pairs that Python's mimetypes table lacks or spells differently.
_SUFFIXES = {
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3", "audio/mp3": ".mp3",
    "audio/flac": ".flac", "audio/x-flac": ".flac", "audio/ogg": ".ogg", "audio/webm": ".webm", "audio/mp4": ".m4a",
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "image/gif": ".gif",
    "application/pdf": ".pdf",
}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),(?P<payload>.*)$", re.S)


class RequestError(Exception):
    """A client error: HTTP `status`, OpenAI error `code`, and `param` naming the request field or item."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def kind_of_mime(mime: str | None) -> str | None:
    """'image' | 'audio' | 'video' | 'document' (PDF) for a MIME type, else None."""
    if not mime:
        return None
    if mime == "application/pdf":
        return "document"
    major = mime.split("/", 1)[0]
    return major if major in ("image", "audio", "video") else None


def suffix_for(mime: str | None, fallback: str = "") -> str:
    if not mime:
        return fallback
    return _SUFFIXES.get(mime) or mimetypes.guess_extension(mime) or fallback


def decode_base64(payload: str, where: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64 -> bytes, refusing payloads over `max_bytes` before decoding them."""
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestError(413, f"{where} holds about {len(payload) * 3 // 4} bytes of media; the limit is "
                                f"{max_bytes}.", where, "media_too_large")
    try:
        cleaned = re.sub(r"\s+", "", payload)
        altchars = b"-_" if ("-" in cleaned or "_" in cleaned) else None
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"{where} is not valid base64: {error}", where) from error


@dataclass
class MediaFile:
    """A local file holding one media item; `kind` is taken from the hint or the MIME type."""

    path: str
    kind: str
    temporary: bool = False


@dataclass
class MediaPolicy:
    """Operator settings for media references.

    Args:
        allowed_media_dirs: folders whose files (after resolving symlinks and `..`) requests may name; none = no
            local file reads.
        allow_url_fetch: fetch http(s) URLs (with `url_timeout_s` and the size limit); off by default.
        max_media_bytes: largest media item (decoded data URI, fetched body or local file), in bytes.
    """

    allowed_media_dirs: tuple[str, ...] = ()
    allow_url_fetch: bool = False
    max_media_bytes: int = 20 * 2**20
    url_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.allowed_media_dirs = tuple(os.path.realpath(d) for d in self.allowed_media_dirs)
        for folder in self.allowed_media_dirs:
            if not os.path.isdir(folder):
                raise ValueError(f"--allowed-media-dir {folder!r} is not a folder.")

    @contextlib.contextmanager
    def load(self, source: str, kind: str | None, where: str) -> Iterator[MediaFile]:
        """A local file for `source` (removed afterwards when it was a temporary copy); `kind` may be None for
        data URIs and URLs (the MIME type decides)."""
        if not isinstance(source, str) or not source:
            raise RequestError(400, f"{where} must be a non-empty string (a data: URI, URL or allowed path).", where)
        if source.startswith("data:"):
            mime, data = self._parse_data_uri(source, where)
            with self._temporary(data, self._kind(kind, mime, where), mime, where) as media:
                yield media
            return
        scheme = urlparse(source).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_url_fetch:
                raise RequestError(403, f"{where} is a URL, and this server does not fetch URLs (start it with "
                                        "--allow-url-fetch); send the media as a data: URI instead.", where,
                                   "url_fetch_disabled")
            mime, data = self._fetch(source, where)
            with self._temporary(data, self._kind(kind, mime, where), mime, where, suffix_hint=source) as media:
                yield media
            return
        if scheme == "file":
            source = unquote(urlparse(source).path)
        elif scheme and len(scheme) > 1:  # "c:" is a Windows drive, not a scheme
            raise RequestError(400, f"{where} has the unsupported scheme {scheme!r}; expected data:, http(s):, file: "
                                    "or a path.", where)
        yield MediaFile(self._local_path(source, where), self._kind(kind, mimetypes.guess_type(source)[0], where))

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _kind(hint: str | None, mime: str | None, where: str) -> str:
        from_mime = kind_of_mime(mime)
        if hint is None:
            if from_mime is None:
                raise RequestError(400, f"{where} has MIME type {mime!r}, which names no modality; give a `modality` "
                                        f"hint ({'/'.join(MEDIA_KINDS)}) or an image/audio/video/PDF MIME type.", where)
            return from_mime
        if hint == "image" and from_mime == "document":  # a PDF sent as image_url: embed its page as a document
            return from_mime
        if hint == "audio" and from_mime == "video":  # a video's soundtrack: the processor decodes its audio track
            return hint
        if from_mime is not None and from_mime != hint and not (hint == "document" and from_mime == "image"):
            raise RequestError(400, f"{where} is {mime!r} but was sent as {hint!r}.", where)
        return hint

    def _parse_data_uri(self, uri: str, where: str) -> tuple[str | None, bytes]:
        match = _DATA_URI.match(uri)
        if match is None:
            raise RequestError(400, f"{where} is not a valid data: URI (expected data:<mime>;base64,<payload>).", where)
        mime = match["mime"].lower() if match["mime"] else None
        if ";base64" not in match["params"].lower():
            raise RequestError(400, f"{where}: only base64 data: URIs are accepted for media.", where)
        return mime, decode_base64(match["payload"], where, self.max_media_bytes)

    def _fetch(self, url: str, where: str) -> tuple[str | None, bytes]:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.url_timeout_s, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise RequestError(400, f"{where}: fetching {url!r} gave HTTP {response.status_code}.", where)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_media_bytes:
                        raise RequestError(413, f"{where}: {url!r} is larger than the {self.max_media_bytes}-byte "
                                                "media limit.", where, "media_too_large")
                    chunks.append(chunk)
                mime = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
        except httpx.HTTPError as error:
            raise RequestError(400, f"{where}: fetching {url!r} failed: {error}", where) from error
        if mime in (None, "application/octet-stream"):
            mime = mimetypes.guess_type(urlparse(url).path)[0]
        return mime, b"".join(chunks)

    def _local_path(self, path: str, where: str) -> str:
        if not self.allowed_media_dirs:
            raise RequestError(403, f"{where} names a local file, and this server reads no local files (start it "
                                    "with --allowed-media-dir DIR); send the media as a data: URI instead.", where,
                               "local_files_disabled")
        resolved = os.path.realpath(path)
        if not any(os.path.commonpath([resolved, folder]) == folder for folder in self.allowed_media_dirs):
            raise RequestError(403, f"{where}: {path!r} is outside the allowed media folder(s).", where,
                               "path_not_allowed")
        if not os.path.isfile(resolved):
            raise RequestError(400, f"{where}: {path!r} is not a file.", where)
        if os.path.getsize(resolved) > self.max_media_bytes:
            raise RequestError(413, f"{where}: {path!r} is larger than the {self.max_media_bytes}-byte media limit.",
                               where, "media_too_large")
        return resolved

    @contextlib.contextmanager
    def _temporary(
        self, data: bytes, kind: str, mime: str | None, where: str, suffix_hint: str = ""
    ) -> Iterator[MediaFile]:
        if not data:
            raise RequestError(400, f"{where} holds 0 bytes of media.", where)
        if len(data) > self.max_media_bytes:
            raise RequestError(413, f"{where} holds {len(data)} bytes of media; the limit is {self.max_media_bytes}.",
                               where, "media_too_large")
        # The processor tells PDFs from page images by the file suffix.
        suffix = suffix_for(mime, os.path.splitext(urlparse(suffix_hint).path)[1] or ".bin")
        with tempfile.TemporaryDirectory(prefix="conan-serve-") as folder:
            path = os.path.join(folder, "media" + suffix)
            with open(path, "wb") as handle:
                handle.write(data)
            yield MediaFile(path, kind, temporary=True)
