"""Cross-modal search demo (Gradio): point it at a folder of images, audio clips, short videos and PDFs, then query
it by text, image or audio.

    python -m demo.app --model DIR --gallery FOLDER [--cache-dir DIR] [--host 127.0.0.1] [--port 7860]

On first launch the gallery is embedded through `serving.index` (the same index code as the CLI: one vector per
file, one per PDF page, FAISS inner product) with a progress bar in the page, and cached under `--cache-dir`; later
launches reuse the cached shards and re-embed only what changed. Results show the top-k with cosine scores and a
preview of each item (the image, the PDF page, a video's first frame, an audio clip's waveform, a text's first lines).

Text queries use the model's `query` prompt (`encode_query`); image and audio queries are "find items like this one",
encoded with the `document` prompt like the gallery (symmetric item-to-item search; switchable in the page).
This module is not part of the Hub package: the root model files import nothing from here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from serving.index import CorpusIndex, build_index, encode_queries, load_model
from training.common import hub_code

PREVIEW_SIZE = (256, 256)
DEFAULT_K = 8


def default_cache_dir(gallery: str | os.PathLike) -> Path:
    """`$XDG_CACHE_HOME/conan-embedding-v3/demo/<sha1 of the gallery's absolute path>` (~/.cache by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conan-embedding-v3" / "demo"
    return base / hashlib.sha1(str(Path(gallery).resolve()).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ previews
def _card(text: str, background: str = "#f3f4f6") -> Image.Image:
    image = Image.new("RGB", PREVIEW_SIZE, background)
    draw = ImageDraw.Draw(image)
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) > 30:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    lines.append(line)
    draw.multiline_text((10, 10), "\n".join(lines[:14]), fill="#111827", spacing=4)
    return image


def _waveform(path: str) -> Image.Image:
    samples, rate = hub_code.load("media_conan").load_audio_file(path)
    width, height = PREVIEW_SIZE
    image = Image.new("RGB", PREVIEW_SIZE, "#eef2ff")
    draw = ImageDraw.Draw(image)
    columns = np.array_split(np.abs(samples), width) if len(samples) >= width else [np.abs(samples)] * width
    peak = max(float(np.abs(samples).max()), 1e-6)
    for x, column in enumerate(columns):
        half = (float(column.max()) if column.size else 0.0) / peak * (height / 2 - 20)
        draw.line([(x, height / 2 - half), (x, height / 2 + half)], fill="#4f46e5")
    draw.text((8, height - 18), f"audio {len(samples) / rate:.1f} s", fill="#111827")
    return image


def _first_frame(path: str) -> Image.Image:
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0))
        return frame.to_image().convert("RGB")


def preview(record: dict[str, Any]) -> Image.Image:
    """A thumbnail (at most PREVIEW_SIZE) for a record of `serving.corpus`; a text card when decoding fails."""
    kind, path = record["kind"], record.get("path")
    try:
        if kind == "image":
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        elif kind == "pdf":
            image = hub_code.load("media_conan").render_pdf_page(path, record["page"], 1.0)
        elif kind == "video":
            image = _first_frame(path)
        elif kind == "audio":
            return _waveform(path)
        else:
            return _card(record["input"].get("text") or record["id"])
    except Exception as error:  # a preview must never break the result list
        return _card(f"{record['id']}: no preview ({error})", "#fee2e2")
    image.thumbnail(PREVIEW_SIZE)
    return image


# ------------------------------------------------------------------------------------------------ search state
class GallerySearch:
    """The loaded model and the gallery's index; `ensure_index` builds (or resumes) it once, thread-safely."""

    def __init__(self, model: str, gallery: str, cache_dir: str | None = None, batch_size: int = 8):
        self.model_path = model
        self.encoder = load_model(model, device="cpu")
        self.batch_size = batch_size
        self._cache_override = cache_dir
        self._lock = threading.Lock()
        self.index: CorpusIndex | None = None
        self.gallery = ""
        self.set_gallery(gallery)

    def set_gallery(self, gallery: str) -> None:
        folder = Path(gallery).expanduser()
        if not folder.is_dir():
            raise ValueError(f"Gallery folder {gallery!r} does not exist or is not a folder.")
        with self._lock:
            if str(folder.resolve()) != self.gallery:
                self.gallery = str(folder.resolve())
                self.index = None

    @property
    def cache_dir(self) -> Path:
        if self._cache_override:
            return Path(self._cache_override) / hashlib.sha1(self.gallery.encode()).hexdigest()[:16]
        return default_cache_dir(self.gallery)

    def ensure_index(self) -> CorpusIndex:
        """Embed the gallery (tqdm progress; resumes from cached shards) the first time, then reuse it."""
        with self._lock:
            if self.index is None:
                build_index(self.model_path, self.gallery, self.cache_dir, batch_size=self.batch_size,
                            shard_size=64, overwrite=True, skip_errors=True, encoder=self.encoder)
                self.index = CorpusIndex.load(self.cache_dir)
            return self.index

    def reindex(self) -> CorpusIndex:
        with self._lock:
            self.index = None
        return self.ensure_index()

    def status(self) -> str:
        index = self.ensure_index()
        kinds: dict[str, int] = {}
        for record in index.records:
            kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        failed = index.manifest["errors"]
        return (f"**Indexed {len(index)} items** from `{self.gallery}` ({summary})"
                + (f"; {failed} file(s) could not be decoded and were left out" if failed else "")
                + f". Cache: `{self.cache_dir}`")

    def search(self, query: Any, k: int, prompt_name: str) -> tuple[list[tuple[Image.Image, str]], list[list[Any]]]:
        """(gallery previews with captions, table rows [rank, score, kind, id]) of the top-k items for `query`."""
        index = self.ensure_index()
        vector = encode_queries(self.encoder, [query], prompt_name)
        hits = index.search(vector, int(k))[0]
        previews = [(preview(hit.record), f"#{hit.rank} · {hit.score:.3f} · {hit.id}") for hit in hits]
        rows = [[hit.rank, round(hit.score, 4), hit.record["kind"], hit.id] for hit in hits]
        return previews, rows


# ------------------------------------------------------------------------------------------------ UI
def build_app(search: GallerySearch, k: int = DEFAULT_K, gallery_editable: bool = True):
    """The Gradio Blocks app over `search` (not launched). `gallery_editable=False` pins the gallery folder (for a
    page served beyond localhost: visitors must not be able to index arbitrary folders of the server)."""
    import gradio as gr

    def use_gallery(gallery: str) -> None:
        if not gallery_editable and str(Path(gallery).expanduser().resolve()) != search.gallery:
            raise gr.Error("This demo serves one fixed gallery (started with --host beyond localhost).")
        try:
            search.set_gallery(gallery)
        except ValueError as error:
            raise gr.Error(str(error)) from error

    def index_now(gallery: str, progress=gr.Progress(track_tqdm=True)):
        use_gallery(gallery)
        return search.status()  # builds the index on first use (tqdm -> the page's progress bar)

    def reindex(gallery: str, progress=gr.Progress(track_tqdm=True)):
        use_gallery(gallery)
        search.reindex()  # re-walks the folder: new/changed files are embedded, cached shards reused
        return search.status()

    def run(query: Any, top_k: int, prompt_name: str, what: str, progress=gr.Progress(track_tqdm=True)):
        if query is None or (isinstance(query, str) and not query.strip()):
            raise gr.Error(f"Give a {what} query first.")
        try:
            return search.search(query, top_k, prompt_name)
        except (ValueError, TypeError) as error:
            raise gr.Error(f"The {what} query could not be embedded: {error}") from error

    with gr.Blocks(title="Conan-embedding-v3 cross-modal search") as app:
        gr.Markdown(
            "# Conan-embedding-v3 · cross-modal search\n"
            "One embedding space for text, images, audio, video and document pages. Query the gallery by text, "
            "image or audio; the top-k items come back with their cosine scores."
        )
        with gr.Row():
            gallery_box = gr.Textbox(value=search.gallery, label="Gallery folder", scale=4, elem_id="gallery-dir",
                                     interactive=gallery_editable)
            index_button = gr.Button("Re-index", scale=1, elem_id="reindex")
        status = gr.Markdown("Indexing the gallery…", elem_id="index-status")
        with gr.Row():
            top_k = gr.Slider(1, 50, value=k, step=1, label="top-k", elem_id="top-k")
            media_prompt = gr.Radio(
                ["document", "query"], value="document", label="prompt for image/audio queries",
                info="document: items like this one; query: the model's retrieval-query instruction",
            )
        with gr.Tabs():
            with gr.Tab("Text", id="text"):
                text_query = gr.Textbox(label="Text query", placeholder="a red square", elem_id="query-text")
                text_button = gr.Button("Search", variant="primary", elem_id="search-text")
            with gr.Tab("Image", id="image"):
                image_query = gr.Image(type="filepath", label="Image query", elem_id="query-image", height=240)
                image_button = gr.Button("Search", variant="primary", elem_id="search-image")
            with gr.Tab("Audio", id="audio"):
                audio_query = gr.Audio(type="filepath", label="Audio query", elem_id="query-audio")
                audio_button = gr.Button("Search", variant="primary", elem_id="search-audio")
        results = gr.Gallery(label="Top-k results", columns=4, height="auto", object_fit="contain",
                             elem_id="results-gallery")
        table = gr.Dataframe(headers=["rank", "score", "kind", "id"], label="Scores", interactive=False,
                             elem_id="results-table")

        app.load(index_now, inputs=gallery_box, outputs=status)
        index_button.click(reindex, inputs=gallery_box, outputs=status)
        gallery_box.submit(index_now, inputs=gallery_box, outputs=status)
        text_query.submit(lambda q, n, p: run(q, n, "query", "text"), [text_query, top_k, media_prompt],
                          [results, table])
        text_button.click(lambda q, n, p: run(q, n, "query", "text"), [text_query, top_k, media_prompt],
                          [results, table])
        image_button.click(lambda q, n, p: run(q, n, p, "image"), [image_query, top_k, media_prompt], [results, table])
        audio_button.click(lambda q, n, p: run(q, n, p, "audio"), [audio_query, top_k, media_prompt], [results, table])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Conan model folder or Hub id")
    parser.add_argument("--gallery", required=True, help="folder of images/audio/videos/PDFs/text files")
    parser.add_argument("--cache-dir", help="where the gallery index is cached (default ~/.cache/conan-embedding-v3/demo)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="default top-k")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--editable-gallery", action="store_true",
                        help="let visitors change the gallery folder even when --host is not localhost")
    args = parser.parse_args(argv)
    search = GallerySearch(args.model, args.gallery, args.cache_dir, args.batch_size)
    editable = args.host in ("127.0.0.1", "localhost", "::1") or args.editable_gallery
    build_app(search, args.k, gallery_editable=editable).queue().launch(
        server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
