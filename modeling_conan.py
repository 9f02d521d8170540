# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""Conan-embedding-v3: one embedding space for text, images, videos, document pages and audio.

Architecture (composition of transformers' own classes, no copies of their code):
- backbone: `Qwen3VLModel` (the paper's Qwen3-VL-8B), `Qwen2_5_VLModel` or `Qwen2VLModel`, with its own vision path
  for images and videos (Qwen3-VL DeepStack and timestamped videos, Qwen2.5-VL window attention and
  `second_per_grid_ts` included);
- audio encoder: `Qwen3OmniMoeAudioEncoder` (the paper's: Qwen3-Omni-30B-A3B's audio tower) or `WhisperEncoder`,
  whose tokens are optionally average-pooled and mapped by a two-layer MLP projector
  (`audio_dim -> projector_intermediate_size -> hidden`) onto the audio placeholder embeddings;
- pooling of the backbone's final-norm hidden states, L2-normalised: the last real token (`last_token`, default) or
  the mean over the compression tokens the processor appends (`compression_mean`, CoMa; see `ConanConfig`).
Audio placeholders are text positions for M-RoPE (1-D, consecutive), which is also how Qwen3-Omni's own
`get_rope_index` places audio that is not interleaved with video.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen2_5_VLModel, Qwen2VLModel, Qwen3VLModel
from transformers.activations import ACT2FN
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import ModelOutput

from .configuration_conan import MM_TOKEN_TYPES, WHISPER_WINDOW_FRAMES, ConanConfig, omni_audio_tokens_for_frames

logger = logging.getLogger(__name__)
BACKBONE_MODELS = {"qwen3_vl": Qwen3VLModel, "qwen2_5_vl": Qwen2_5_VLModel, "qwen2_vl": Qwen2VLModel}
AUDIO_ENCODERS = {"qwen3_omni": Qwen3OmniMoeAudioEncoder, "whisper": WhisperEncoder}


@dataclass
class ConanModelOutput(ModelOutput):
    """Output of `ConanModel.forward`.

    Args:
        embeddings: `(batch, hidden)` L2-normalised embeddings (`config.embedding_pooling` of the final hidden states:
            the last real token's, or the mean over the compression tokens').
        last_hidden_state: `(batch, seq, hidden)` final-norm hidden states of the backbone.
        pooler_output: the same tensor as `embeddings` (sentence-transformers and mteb look for this name).
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


class ConanAudioProjector(nn.Module):
    """Two-layer MLP `audio_dim -> intermediate_size -> hidden_size` from audio-encoder tokens into the backbone's
    token-embedding space (the module Projector Recovery retrains). `intermediate_size=None` means `hidden_size`."""

    def __init__(self, audio_dim: int, hidden_size: int, act: str = "gelu", intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or hidden_size
        self.fc1 = nn.Linear(audio_dim, intermediate_size)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, audio_frames: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(audio_frames)))


class ConanPreTrainedModel(PreTrainedModel):
    config_class = ConanConfig
    config: ConanConfig
    base_model_prefix = "conan"
    input_modalities = ("text", "image", "video", "audio")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock",
        "Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "Qwen3OmniMoeAudioEncoderLayer", "WhisperEncoderLayer",
    ]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ConanAudioProjector):
            # Small init keeps fresh audio tokens near the scale of text-token embeddings.
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for linear in (module.fc1, module.fc2):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                nn.init.zeros_(linear.bias)
        else:
            super()._init_weights(module)


# ---------------------------------------------------------------------------------------------- drift fingerprint
# A fingerprint stores ~2048 sampled backbone values (fp32, with each value's dtype) plus a digest of tensor names and
# shapes. Two loads of the same weights in fp32, bf16 or fp16 differ only by rounding, which is at most one unit in
# the last place of the coarser dtype, so `backbone_matches` compares the samples within that tolerance: the same
# verdict for every load dtype (a hash of rounded values cannot be dtype-free: fp32->bf16 and fp32->fp16->bf16
# differ on ~6% of values). Fusion changes almost every element, so some samples move by more than that.
FINGERPRINT_FORMAT = "conan-fp2"
FINGERPRINT_SAMPLES = 2048
_SAMPLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _backbone_samples(
    model: nn.Module, prefix: str, total: int, per_tensor: int | None = None
) -> tuple[str, int, torch.Tensor, torch.Tensor]:
    """(digest of names/shapes, samples per tensor, sampled values as fp32, dtype code of each value) of the tensors
    under `prefix`: `per_tensor` (default about `total` over all floating tensors) evenly spaced values of each."""
    items = [(name, t) for name, t in sorted(model.state_dict().items()) if name.startswith(prefix)]
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(f"{name}|{tuple(tensor.shape)}|{int(tensor.is_floating_point())}|".encode())
    floats = [t for _, t in items if t.is_floating_point() and t.numel()]
    per_tensor = per_tensor or max(1, total // max(1, len(floats)))
    values, codes = [], []
    for tensor in floats:
        flat = tensor.detach().reshape(-1)
        # fp32 linspace rounds the last index up past the end for tensors over 2**24 elements: clamp it.
        index = torch.linspace(0, flat.numel() - 1, min(per_tensor, flat.numel())).round().long()
        index = index.clamp_(max=flat.numel() - 1)
        values.append(flat[index.to(flat.device)].cpu().float())
        code = _SAMPLE_DTYPES.index(tensor.dtype) if tensor.dtype in _SAMPLE_DTYPES else 0
        codes.append(torch.full((index.numel(),), code, dtype=torch.uint8))
    if not values:
        return digest.hexdigest()[:32], per_tensor, torch.zeros(0), torch.zeros(0, dtype=torch.uint8)
    return digest.hexdigest()[:32], per_tensor, torch.cat(values), torch.cat(codes)


def backbone_fingerprint(model: nn.Module, prefix: str = "backbone.", sample: int = FINGERPRINT_SAMPLES) -> str:
    """Identity of a backbone, for the Projector Drift check: `conan-fp2:<names/shapes digest>:<per tensor>:<samples>`.

    The samples (about `sample` values spread over every floating tensor, base64 of zlib-compressed fp32 values and
    their dtype codes) are compared by `backbone_matches` within the rounding of their dtype, so the record written
    after calibrating in bf16 matches fp32, bf16 and fp16 loads of the same weights. Deterministic for one dtype.
    """
    digest, per_tensor, values, codes = _backbone_samples(model, prefix, sample)
    payload = zlib.compress(values.numpy().astype("<f4").tobytes() + codes.numpy().tobytes(), 9)
    return f"{FINGERPRINT_FORMAT}:{digest}:{per_tensor}:{base64.b64encode(payload).decode()}"


def _spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at each value (as fp64): the most a rounding to `dtype` moves it."""
    rounded = values.to(dtype).abs()
    return (torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded).double()


def backbone_matches(expected: str, model: nn.Module, prefix: str = "backbone.") -> bool:
    """Whether `model`'s backbone is the one `expected` (a `backbone_fingerprint`) was taken from, whatever dtype
    either was loaded in. Records of the earlier format (a 64-hex sha256 of bf16-rounded values) are still read:
    they are compared exactly, which can flag a false drift for fp16 loads (re-run training.recover to upgrade)."""
    if not expected.startswith(FINGERPRINT_FORMAT + ":"):
        return _legacy_backbone_fingerprint(model, prefix) == expected
    _, digest, per_tensor, encoded = expected.split(":", 3)
    raw = zlib.decompress(base64.b64decode(encoded))
    n = len(raw) // 5
    stored = torch.frombuffer(bytearray(raw[: 4 * n]), dtype=torch.float32).double()
    stored_codes = torch.frombuffer(bytearray(raw[4 * n :]), dtype=torch.uint8)
    actual_digest, _, values, codes = _backbone_samples(model, prefix, n, int(per_tensor))
    if actual_digest != digest or values.numel() != n:
        return False
    tolerance = torch.zeros(n, dtype=torch.float64)
    for code, dtype in enumerate(_SAMPLE_DTYPES):
        for mask, at in ((stored_codes == code, stored), (codes == code, values.double())):
            if mask.any():
                tolerance[mask] = torch.maximum(tolerance[mask], _spacing(at[mask], dtype))
    close = (values.double() - stored).abs() <= tolerance
    return bool((close | (values.double() == stored)).all())


def _legacy_backbone_fingerprint(model: nn.Module, prefix: str = "backbone.", sample: int = 4096) -> str:
    """The first fingerprint format (kept to read older configs): sha256 of names/shapes and bf16-rounded samples."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(prefix):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        values = flat[::step][:sample].cpu()
        if values.is_floating_point():
            values = values.to(torch.bfloat16)
        digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ConanModel(ConanPreTrainedModel):
    """Omni-modal embedding model. `forward` returns L2-normalised embeddings in `ConanModelOutput.embeddings`."""

    def __init__(self, config: ConanConfig):
        super().__init__(config)
        # Sub-models follow the dtype this model is built in (from_pretrained's `dtype`), not the `dtype` their
        # upstream sub-configs carry (e.g. bfloat16 in Qwen3-VL's config.json), which `_from_config` would apply.
        dtype = torch.get_default_dtype()
        self.backbone = BACKBONE_MODELS[config.backbone_model_type]._from_config(config.backbone_config, dtype=dtype)
        self.audio_encoder = AUDIO_ENCODERS[config.audio_family]._from_config(config.audio_config, dtype=dtype)
        self.audio_projector = ConanAudioProjector(
            config.audio_dim, config.text_config.hidden_size, config.projector_hidden_act,
            config.projector_intermediate_size,
        )
        self.audio_frames_hook = None  # optional, set by training code: see encode_audio_frames
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.check_projector_calibration()
        return model

    def check_projector_calibration(self) -> bool:
        """False (and a warning) when the audio projector was calibrated on a different backbone: Projector Drift."""
        expected = self.config.projector_calibration_hash
        if not expected or any(p.device.type == "meta" for p in self.backbone.parameters()):
            return True
        if backbone_matches(expected, self):
            return True
        logger.warning(
            "Projector Drift: audio_projector was calibrated on another backbone than this one (its fingerprint "
            "differs beyond %s rounding); audio embeddings will be degraded. Run `python -m training.recover` to "
            "recalibrate the projector.", self.dtype,
        )
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------------- audio path
    def encode_audio_frames(
        self, input_features: torch.Tensor, audio_feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Audio encoder + average pooling: one row of features -> `(rows, tokens, audio_dim)`, zero-padded.

        Whisper: `input_features` is `(windows, mel, 3000)` (30 s windows) and every row gives `ceil(1500/k)` tokens.
        Qwen3-Omni: `input_features` is `(clips, mel, frames)`, right-padded; `audio_feature_lengths` (required) gives
        each clip's real frames, and a clip gives `config.audio_token_count(length)` tokens (no length limit).

        This is the frozen part of the audio path. Training code may precompute it (`forward(audio_frames=...)`) or
        set `self.audio_frames_hook`, a callable `(model, input_features, audio_feature_lengths) -> frames` used
        instead of `run_audio_encoder` when lengths are known (the training side's on-disk frame cache,
        `training/common/audio_cache.py`); it must return what `run_audio_encoder` returns for each row's real tokens.
        """
        omni = self.config.audio_family == "qwen3_omni"
        if omni and audio_feature_lengths is None:
            raise ValueError("audio_feature_lengths is required for the Qwen3-Omni audio encoder (frames per clip).")
        if not omni and input_features.shape[-1] != WHISPER_WINDOW_FRAMES:
            raise ValueError(
                f"input_features must hold {WHISPER_WINDOW_FRAMES} mel frames per window (30 s), got shape "
                f"{tuple(input_features.shape)}; use ConanProcessor to pad audio."
            )
        if self.audio_frames_hook is not None and audio_feature_lengths is not None:
            return self.audio_frames_hook(self, input_features, audio_feature_lengths)
        return self.run_audio_encoder(input_features, audio_feature_lengths)

    def audio_encoder_dtype(self) -> torch.dtype:
        return next(self.audio_encoder.parameters()).dtype

    def run_audio_encoder(
        self, input_features: torch.Tensor, audio_feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The frozen audio encoder + average pooling by `config.audio_downsample`: `(rows, tokens, audio_dim)`."""
        features = input_features.to(self.audio_encoder_dtype())
        k = self.config.audio_downsample
        if self.config.audio_family == "whisper":
            frames = self.audio_encoder(features).last_hidden_state
            if k > 1:
                frames = F.avg_pool1d(frames.transpose(1, 2), kernel_size=k, stride=k, ceil_mode=True).transpose(1, 2)
            return frames
        # Qwen3-Omni: the encoder takes the clips packed along time, (mel, sum of frames), with per-clip lengths,
        # and returns their tokens packed the same way.
        lengths = audio_feature_lengths.to(input_features.device).long()
        packed = torch.cat([row[:, :n] for row, n in zip(features, lengths.tolist())], dim=1)
        tokens = self.audio_encoder(packed, feature_lens=lengths).last_hidden_state
        n_window = self.config.audio_config.n_window
        per_clip = [omni_audio_tokens_for_frames(n, n_window) for n in lengths.tolist()]  # before pooling
        if sum(per_clip) != tokens.shape[0]:
            raise RuntimeError(f"Qwen3-Omni audio encoder gave {tokens.shape[0]} tokens, expected {sum(per_clip)}.")
        clips = list(tokens.split(per_clip))
        if k > 1:
            clips = [
                F.avg_pool1d(c.T.unsqueeze(0), kernel_size=k, stride=k, ceil_mode=True)[0].T for c in clips
            ]
        return nn.utils.rnn.pad_sequence(clips, batch_first=True)

    def project_audio(self, audio_frames: torch.Tensor, audio_feature_lengths: torch.Tensor) -> torch.Tensor:
        """Project pooled tokens and keep only each row's real tokens, concatenated in row order."""
        projected = self.audio_projector(audio_frames.to(self.audio_projector.fc1.weight.dtype))
        pieces = []
        for row, mel_frames in enumerate(audio_feature_lengths.tolist()):
            n_tokens = self.config.audio_token_count(mel_frames)
            pieces.append(projected[row, :n_tokens])
        return torch.cat(pieces, dim=0)

    def _scatter_audio(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, audio_tokens: torch.Tensor
    ) -> torch.Tensor:
        audio_mask = (input_ids == self.config.audio_token_id).unsqueeze(-1)
        n_placeholders = int(audio_mask.sum())
        if n_placeholders != audio_tokens.shape[0]:
            raise ValueError(
                f"Audio features and audio placeholder tokens do not match: {n_placeholders} placeholders in input_ids but "
                f"{audio_tokens.shape[0]} audio tokens from the encoder. Build inputs with ConanProcessor."
            )
        audio_mask = audio_mask.expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(audio_mask, audio_tokens.to(inputs_embeds.dtype))

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        audio_frames: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ConanModelOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, seq)` or `(batch, 1, seq, seq)`, *optional*):
            2-D (the processor's): 1 for real tokens, 0 for padding; the backbone then builds its causal mask.
            4-D: a custom mask used as-is by every attention layer, as transformers models take one
            (`masking_utils._preprocess_mask_arguments` returns a 4-D mask unchanged), e.g. CoMa's compression mask
            (`training/contrastive/compression.py`). Bool (True = may attend) or float in the additive form (0 where
            allowed, a large negative value such as `torch.finfo(dtype).min` where not); bool masks are turned into
            the additive form for eager attention. It must include the causal part. Needs `padding_mask`, and the
            backbone's eager or SDPA attention (flash attention takes 2-D padding masks only).
        padding_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*):
            With a 4-D `attention_mask` only, and then required: 1 for real tokens, 0 for padding. M-RoPE positions
            and pooling read it, so they are what the 2-D path gives for the same padding. (A 4-D mask does not say
            which tokens are padding: CoMa's, like most, lets a padding query attend to itself.)
        input_features (`torch.FloatTensor` of shape `(rows, num_mel_bins, frames)`):
            Log-mel features in the order the audio placeholders appear. Whisper: one row per 30 s window (frames =
            3000). Qwen3-Omni: one row per clip, right-padded to the longest clip.
        audio_feature_lengths (`torch.LongTensor` of shape `(rows,)`):
            Real (unpadded) mel frames per row; decides how many audio tokens each row contributes.
        audio_frames (`torch.FloatTensor` of shape `(rows, tokens, audio_dim)`, *optional*):
            Precomputed `encode_audio_frames(input_features)` (the frozen encoder's output), instead of input_features.
        second_per_grid_ts (`torch.FloatTensor` of shape `(videos,)`, *optional*):
            Qwen2.5-VL only: seconds per temporal patch of each video (temporal M-RoPE spacing).
        """
        _warn_past_max_positions(input_ids, self.config)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        # `attention_mask` from here on is the 2-D padding mask (positions, pooling); the backbone gets `layer_mask`.
        layer_mask, attention_mask = self._attention_masks(
            input_ids, attention_mask, padding_mask, inputs_embeds.dtype)

        has_audio = input_features is not None or audio_frames is not None
        if has_audio:
            if audio_feature_lengths is None:
                raise ValueError("audio_feature_lengths is required with input_features/audio_frames.")
            if audio_frames is None:
                audio_frames = self.encode_audio_frames(input_features, audio_feature_lengths)
            inputs_embeds = self._scatter_audio(
                input_ids, inputs_embeds, self.project_audio(audio_frames, audio_feature_lengths)
            )
        elif (input_ids == self.config.audio_token_id).any():
            raise ValueError("input_ids hold audio placeholder tokens but no input_features were given.")

        if mm_token_type_ids is None:
            mm_token_type_ids = self._token_types_from_ids(input_ids)
        # Audio placeholders are text positions for M-RoPE (the backbone knows only 0/1/2).
        mm_token_type_ids = mm_token_type_ids.masked_fill(
            mm_token_type_ids == MM_TOKEN_TYPES["audio"], MM_TOKEN_TYPES["text"])
        # Explicit position ids (the family's own get_rope_index) make left and right padding give the same result,
        # avoid the backbone's cached `rope_deltas` state, and are the only way Qwen3-VL gets M-RoPE from
        # inputs_embeds.
        family_kwargs = {}
        if self.config.backbone_model_type == "qwen2_5_vl" and second_per_grid_ts is not None:
            family_kwargs["second_per_grid_ts"] = second_per_grid_ts
        position_ids, _ = self.backbone.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            **family_kwargs,
        )
        if self.config.backbone_model_type == "qwen3_vl":
            # Qwen3VLModel takes exactly one of input_ids / inputs_embeds; from inputs_embeds it finds the image and
            # video placeholders by their (untouched) embeddings, so DeepStack still gets its positions.
            ids_kwargs = {}
        else:
            ids_kwargs = {"input_ids": input_ids}
        outputs = self.backbone(
            **ids_kwargs,
            inputs_embeds=inputs_embeds,
            attention_mask=layer_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            **family_kwargs,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # already after the backbone's final norm
        embeddings = F.normalize(self.pool(hidden, input_ids, attention_mask).float(), p=2, dim=-1)
        return ConanModelOutput(embeddings=embeddings, last_hidden_state=hidden, pooler_output=embeddings)

    def _attention_masks(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, padding_mask: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask for the backbone's attention layers, 2-D padding mask) from forward's `attention_mask` and
        `padding_mask` (see `forward`). Raises ValueError naming the bad input."""
        batch, length = input_ids.shape
        if attention_mask is None or attention_mask.dim() == 2:
            if padding_mask is not None:
                raise ValueError(
                    "padding_mask is only used with a 4-D attention_mask (batch, 1, seq, seq); with a 2-D "
                    "attention_mask pass the padding there and leave padding_mask out.")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            elif tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = "
                                 f"{(batch, length)} like input_ids, or 4-D (batch, 1, seq, seq)")
            return attention_mask, attention_mask
        if attention_mask.dim() != 4 or tuple(attention_mask.shape) != (batch, 1, length, length):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = {(batch, length)} "
                             f"or 4-D (batch, 1, seq, seq) = {(batch, 1, length, length)} for input_ids "
                             f"{(batch, length)}")
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise ValueError(f"a 4-D attention_mask must be bool (True = may attend) or float (additive: 0 = may "
                             f"attend), got {attention_mask.dtype}")
        if padding_mask is None or tuple(padding_mask.shape) != (batch, length):
            got = None if padding_mask is None else tuple(padding_mask.shape)
            raise ValueError(f"a 4-D attention_mask needs padding_mask (batch, seq) = {(batch, length)} (1 = real "
                             f"token, 0 = padding) for positions and pooling, got {got}")
        implementation = self.backbone.language_model.config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"a 4-D attention_mask needs eager or sdpa attention; the backbone uses "
                             f"{implementation!r}, whose masks are 2-D (load with attn_implementation='sdpa')")
        if attention_mask.dtype == torch.bool:
            if implementation == "sdpa":  # SDPA takes bool masks (transformers' own sdpa masks are bool)
                return attention_mask, padding_mask
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            return additive.masked_fill(~attention_mask, torch.finfo(dtype).min), padding_mask
        # additive: in the activations' dtype, -inf clamped to the dtype's minimum (as transformers' eager masks)
        return attention_mask.to(dtype).clamp_min(torch.finfo(dtype).min), padding_mask

    def pool(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(batch, seq, hidden)` final-norm hidden states -> `(batch, hidden)` by `config.embedding_pooling`
        (not normalised)."""
        if self.config.embedding_pooling == "compression_mean":
            return compression_mean_pool(hidden_states, input_ids, attention_mask, self.config.compression_token_ids)
        return last_token_pool(hidden_states, attention_mask)

    def _token_types_from_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.full_like(input_ids, MM_TOKEN_TYPES["text"])
        types[input_ids == self.config.image_token_id] = MM_TOKEN_TYPES["image"]
        types[input_ids == self.config.video_token_id] = MM_TOKEN_TYPES["video"]
        return types


def _warn_past_max_positions(input_ids: torch.Tensor, config: ConanConfig) -> None:
    """A sequence longer than the backbone's positions still runs (RoPE extrapolates) but embeds poorly: say so."""
    limit = getattr(config.text_config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[-1] > limit:
        logger.warning(
            "input_ids hold %d tokens, more than max_position_embeddings=%d; build inputs with ConanProcessor "
            "(max_length) or sentence-transformers (max_seq_length), which truncate the text.", input_ids.shape[-1],
            limit,
        )


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token, for left or right padding alike."""
    seq_len = attention_mask.shape[1]
    last_index = seq_len - 1 - attention_mask.flip(dims=[1]).long().argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_index]


def masked_mean_pool(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden_states` `(batch, seq, hidden)` over the positions where `positions` `(batch, seq)` is true ->
    `(batch, hidden)` in the input dtype (summed in float32). Every row must select at least one position (callers
    check and name what is missing). The one masked mean behind `compression_mean_pool` and the training side's
    `training.contrastive.compression.compression_mean`."""
    weights = positions.to(torch.float32)
    pooled = torch.einsum("bl,blh->bh", weights, hidden_states.float()) / weights.sum(dim=1, keepdim=True)
    return pooled.to(hidden_states.dtype)


def compression_mean_pool(
    hidden_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    compression_token_ids: list[int],
) -> torch.Tensor:
    """CoMa pooling: the mean of each row's final-norm hidden states over its real positions holding one of
    `compression_token_ids` (`<|ctoken_pad_i|>`, appended by `ConanProcessor`) -> `(batch, hidden)`, not normalised.

    Source: CoMa (arXiv 2511.08480), released code Trustworthy-Information-Access/CoMa (stage 2 mean-pools the
    compression tokens' last hidden states). Left or right padding alike (padding positions are excluded by
    `attention_mask`, `(batch, seq)`, 1 = real; None = no padding).

    Raises:
        ValueError: shapes disagree, `compression_token_ids` is empty, or a row holds no compression token (inputs
            not built by `ConanProcessor`, or built with `add_compression_tokens=False`).
    """
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != input_ids.shape:
        raise ValueError(f"compression_mean_pool: hidden_states {tuple(hidden_states.shape)} must be (batch, seq, "
                         f"hidden) with (batch, seq) = input_ids {tuple(input_ids.shape)}")
    if not compression_token_ids:
        raise ValueError("compression_mean_pool: compression_token_ids is empty; expected the <|ctoken_pad_i|> ids "
                         "(config.compression_token_ids)")
    ids = torch.as_tensor(list(compression_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.isin(input_ids, ids)
    if attention_mask is not None:
        positions &= attention_mask.bool()
    missing = (~positions.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"compression_mean_pool: rows {missing} hold none of the compression tokens {list(compression_token_ids)} "
            "(embedding_pooling='compression_mean'); build inputs with ConanProcessor, which appends them after "
            "each input."
        )
    return masked_mean_pool(hidden_states, positions)


__all__ = [
    "ConanModel", "ConanPreTrainedModel", "ConanModelOutput", "ConanAudioProjector", "backbone_fingerprint",
    "backbone_matches", "compression_mean_pool", "last_token_pool", "masked_mean_pool",
]
