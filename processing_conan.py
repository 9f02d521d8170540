# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""ConanProcessor: turns text, images, document pages, videos, audio and mixtures of them into model inputs.

Two entry points:
- `processor(text=[...], images=[...], videos=[...], audio=[...])`, the Hugging Face convention: every
  `<|image_pad|>`, `<|video_pad|>`, `<|audio_pad|>` in the text stands for the next item of that modality and is
  expanded to the number of tokens the model produces for it.
- `processor.prepare(inputs, instruction=...)`, what `encode` uses: each input is a str, a PIL image or a dict
  (see `prepare`), rendered with the chat template, so one call handles any mix of modalities.

Per backbone family (`backbone_family`): images go through the backbone's own image processor (patch 14 and CLIP
mean/std for Qwen2-VL / Qwen2.5-VL, patch 16 and mean/std 0.5 for Qwen3-VL); video patches are made with numpy in the
same layout as the family's video processor (which needs torchvision, with no CPU build here), with the image
processor's mean/std; Qwen3-VL videos get one `<t seconds>` timestamp per temporal patch, Qwen2.5-VL videos get
`second_per_grid_ts`. Frames given as arrays are taken as sampled at `video_fps`.

Per audio family (`audio_family`): audio is resampled to 16 kHz; Whisper cuts it into 30 s windows of 80/128-bin
log-mel features (at most `audio_max_windows`); Qwen3-Omni takes one whole clip per row (its extractor's 128 mel bins,
10 ms hop, no 30 s cut) up to `audio_max_windows` x 30 s. Longer audio is cut there with a logged warning — never
silently.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.processing_utils import ProcessorMixin

from .configuration_conan import (
    MM_TOKEN_TYPES,
    SAMPLING_RATE,
    WHISPER_WINDOW_FRAMES,
    audio_tokens_for_frames,
    omni_audio_tokens_for_frames,
)
from .media_conan import (
    check_image_size,
    count_pdf_pages,
    frame_to_uint8,
    image_to_rgb,
    load_audio_file,
    load_video_file,
    media_kind_of_path,
    open_image_file,
    pcm_to_float32,
    render_pdf_page,
    resample_audio,
)

logger = logging.getLogger(__name__)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
INPUT_KEYS = ("text", "image", "document", "page", "video", "audio")
DEFAULT_INSTRUCTION = "Represent the user's input."


def build_chat_template(audio_token: str = "<|audio_pad|>", audio_start_token: str | None = None,
                        audio_end_token: str | None = None) -> str:
    """The Jinja form of the chat layout `ConanProcessor.render_segments` writes in Python (the one place it is
    defined; the processor uses it when built without a `chat_template`): one `<|im_start|>role ... <|im_end|>` turn
    per message, media placeholders (`<|vision_start|><|image_pad|><|vision_end|>`, the video one, the audio token
    between its start/end tokens) before the text, and `<|im_start|>assistant\n<|endoftext|>` as the generation
    prompt, whose last hidden state is the embedding."""
    audio = (audio_start_token or "") + audio_token + (audio_end_token or "")
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif item['type'] == 'audio' %}" + audio +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<|endoftext|>{% endif %}"
    )


PDF_RENDER_HEADROOM = 2  # render PDF pages at up to 2x document_max_pixels, then resize down (A4 at 144 dpi fits)


@dataclass
class ParsedInput:
    """One user input split by modality (what the chat template renders)."""

    text: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    video: list[np.ndarray] | None = None
    audio: np.ndarray | None = None


class ConanProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: the backbone's `Qwen2VLImageProcessor` (Qwen2/2.5-VL: patch 14, CLIP normalisation; Qwen3-VL:
            patch 16, mean/std 0.5; merge 2).
        tokenizer: a Qwen tokenizer holding `<|image_pad|>`, `<|video_pad|>` and the audio tokens.
        feature_extractor: a `WhisperFeatureExtractor` (16 kHz; 80 or 128 mel bins, 10 ms hop).
        chat_template: Jinja template; `prepare` renders the same layout in Python. Default (None):
            `build_chat_template` for this processor's audio tokens.
        image_min_pixels / image_max_pixels: resize bounds for photos (pixels after resizing to multiples of
            patch x merge: 28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL).
        document_min_pixels / document_max_pixels: the higher-resolution preset for page images and PDF pages.
        pdf_render_scale: PDF points -> pixels scale before the document resize (2.0 = 144 dpi).
        video_fps: frames per second sampled from a video file (default 2).
        video_max_frames: at most this many frames per video (uniformly spread; default 64).
        video_min_pixels / video_max_pixels: per-frame resize bounds.
        audio_max_windows: at most this many x 30 s of audio per input (Whisper: 30 s windows; Qwen3-Omni: one clip);
            longer audio is cut with a warning.
        audio_downsample: must equal the model config's `audio_downsample` (Whisper 2 -> 25 tokens/s; Omni 1).
        backbone_family: `"qwen2_vl"` (default, older repos), `"qwen2_5_vl"` or `"qwen3_vl"`.
        audio_family: `"whisper"` (default, older repos) or `"qwen3_omni"`.
        audio_token / audio_start_token / audio_end_token: the audio placeholder and the tokens around it. Repos
            built now use the paper's `<|audio_start|><|AUDIO|>...<|audio_end|>`; older ones `<|audio_pad|>` alone.
        audio_n_window: the Qwen3-Omni encoder's `n_window` (its token-count arithmetic).
        max_length: at most this many tokens per input (None: the tokenizer's `model_max_length` when it is a real
            limit, else none; sentence-transformers' `max_seq_length` overrides it). Only the user's text (then the
            instruction) is truncated, from its end; media placeholder runs are never cut, and an input whose media
            and template tokens alone exceed the limit raises a ValueError.
        default_instruction: the system instruction when none is given.
        compression_tokens: the CoMa compression tokens (`<|ctoken_pad_0|>` ... `<|ctoken_pad_{k-1}|>`) of a repo whose
            config has `embedding_pooling="compression_mean"` (None: none, the `last_token` layout). Every row then
            ends with these k tokens, after the rendered input and its template suffix, attention mask 1; they are
            never truncated (the text is cut instead, so `max_length` still holds). Saved in processor_config.json,
            so `AutoProcessor.from_pretrained(repo)` appends them; `training.build_base --compression-tokens K` sets
            them. Source: CoMa (arXiv 2511.08480), released code Trustworthy-Information-Access/CoMa.
    """

    valid_processor_kwargs = None  # the HF per-modality kwargs machinery is not used: `__call__` is explicit

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        feature_extractor=None,
        chat_template: str | None = None,
        image_min_pixels: int = 4 * 28 * 28,
        image_max_pixels: int = 1280 * 28 * 28,
        document_min_pixels: int = 256 * 28 * 28,
        document_max_pixels: int = 1280 * 28 * 28,
        pdf_render_scale: float = 2.0,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        video_min_pixels: int = 4 * 28 * 28,
        video_max_pixels: int = 128 * 28 * 28,
        audio_max_windows: int = 4,
        audio_downsample: int = 2,
        default_instruction: str = DEFAULT_INSTRUCTION,
        max_length: int | None = None,
        backbone_family: str = "qwen2_vl",
        audio_family: str = "whisper",
        audio_token: str = "<|audio_pad|>",
        audio_start_token: str | None = None,
        audio_end_token: str | None = None,
        audio_n_window: int = 50,
        compression_tokens: list[str] | None = None,
        **kwargs,
    ):
        if backbone_family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            raise ValueError(f"backbone_family={backbone_family!r}; expected 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl'.")
        if audio_family not in ("whisper", "qwen3_omni"):
            raise ValueError(f"audio_family={audio_family!r}; expected 'whisper' or 'qwen3_omni'.")
        self.backbone_family = backbone_family
        self.audio_family = audio_family
        self.audio_start_token = audio_start_token
        self.audio_end_token = audio_end_token
        self.audio_n_window = audio_n_window
        self.image_min_pixels = image_min_pixels
        self.image_max_pixels = image_max_pixels
        self.document_min_pixels = document_min_pixels
        self.document_max_pixels = document_max_pixels
        self.pdf_render_scale = pdf_render_scale
        self.video_fps = video_fps
        self.video_max_frames = video_max_frames
        self.video_min_pixels = video_min_pixels
        self.video_max_pixels = video_max_pixels
        self.audio_max_windows = audio_max_windows
        self.audio_downsample = audio_downsample
        self.default_instruction = default_instruction
        self.max_length = max_length
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.audio_token = audio_token
        if chat_template is None:
            chat_template = build_chat_template(audio_token, audio_start_token, audio_end_token)
        super().__init__(image_processor, tokenizer, feature_extractor, chat_template=chat_template)
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token)
        self.audio_token_id = self._token_id(self.audio_token)
        if compression_tokens is not None and (isinstance(compression_tokens, str) or not compression_tokens):
            raise ValueError(f"compression_tokens={compression_tokens!r}; expected None or a non-empty list of token "
                             "strings such as ['<|ctoken_pad_0|>', ...].")
        self.compression_tokens = list(compression_tokens) if compression_tokens else None
        self.compression_token_ids = [self._token_id(t) for t in self.compression_tokens or ()]
        if len(set(self.compression_token_ids)) != len(self.compression_token_ids):
            raise ValueError(f"compression_tokens {self.compression_tokens} map to repeated ids "
                             f"{self.compression_token_ids}; expected distinct special tokens.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # This class *is* the repo's remote code, already trusted; without this the tokenizer's auto_map entry
        # would ask again on stdin.
        kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token!r} token; build the repo with training.build_base.")
        return int(token_id)

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def _patch(self) -> tuple[int, int, int]:
        ip = self.image_processor
        return ip.patch_size, ip.merge_size, ip.temporal_patch_size

    def _resize(self, image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
        patch, merge, _ = self._patch
        height, width = smart_resize(
            image.height, image.width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels
        )
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=Image.Resampling.BICUBIC)

    # ------------------------------------------------------------------------------------------------ modalities
    def process_images(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Images already resized to their preset (photo or document) -> Qwen2-VL patches and grids."""
        out = self.image_processor(images=images, do_resize=False, return_tensors="np")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def process_videos(self, videos: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Frames (RGB uint8 HxWx3) -> Qwen2-VL video patches, the layout Qwen2VLVideoProcessor produces."""
        patch, merge, temporal = self._patch
        all_patches, grids = [], []
        for frames in videos:
            first = Image.fromarray(frames[0])
            resized = [self._resize(Image.fromarray(f), self.video_min_pixels, self.video_max_pixels) for f in frames]
            if any(r.size != resized[0].size for r in resized):
                raise ValueError(f"video frames must share one size; the first frame is {first.size}.")
            clip = np.stack([np.asarray(r, dtype=np.float32) / 255.0 for r in resized])  # T,H,W,C
            clip = (clip - self._mean_std[0]) / self._mean_std[1]
            clip = clip.transpose(0, 3, 1, 2)  # T,C,H,W
            if clip.shape[0] % temporal:
                pad = np.repeat(clip[-1:], temporal - clip.shape[0] % temporal, axis=0)
                clip = np.concatenate([clip, pad])
            t, c, h, w = clip.shape
            gt, gh, gw = t // temporal, h // patch, w // patch
            patches = clip.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
            patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            all_patches.append(patches.reshape(gt * gh * gw, c * temporal * patch * patch))
            grids.append([gt, gh, gw])
        return {
            "pixel_values_videos": np.concatenate(all_patches).astype(np.float32),
            "video_grid_thw": np.array(grids, dtype=np.int64),
        }

    @property
    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """The image processor's normalisation (CLIP for Qwen2/2.5-VL, 0.5/0.5 for Qwen3-VL), also used for video."""
        ip = self.image_processor
        mean = np.asarray(getattr(ip, "image_mean", None) or CLIP_MEAN, dtype=np.float32)
        std = np.asarray(getattr(ip, "image_std", None) or CLIP_STD, dtype=np.float32)
        return mean, std

    def video_expansion(self, grid_thw: np.ndarray) -> str:
        """Qwen3-VL's layout of one video: `<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` per temporal
        patch, `t` the mean time of its frames (frames taken as sampled at `video_fps`, as Qwen3VLProcessor does)."""
        gt, gh, gw = (int(v) for v in grid_thw)
        _, merge, temporal = self._patch
        per_frame = self.video_token * (gh * gw // merge**2)
        pieces = []
        for t in range(gt):
            seconds = (t * temporal + (temporal - 1) / 2) / self.video_fps
            pieces.append(f"<{seconds:.1f} seconds><|vision_start|>{per_frame}<|vision_end|>")
        return "".join(pieces)

    def audio_windows(self, samples: np.ndarray) -> list[np.ndarray]:
        """Cut 16 kHz audio into 30 s windows, at most `audio_max_windows` (the rest is dropped with a warning)."""
        window = self.feature_extractor.n_samples
        windows = [samples[start : start + window] for start in range(0, len(samples), window)]
        if len(windows) > self.audio_max_windows:
            logger.warning(
                "Audio of %.1f s is longer than audio_max_windows=%d x 30 s; only the first %d s are embedded.",
                len(samples) / SAMPLING_RATE, self.audio_max_windows, self.audio_max_windows * 30,
            )
            windows = windows[: self.audio_max_windows]
        return windows

    def process_audio(self, audios: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
        """16 kHz mono arrays -> log-mel features and the token count of each input.

        Whisper: one row per 30 s window, padded to 3000 frames. Qwen3-Omni: one row per clip (at most
        `audio_max_windows` x 30 s, cut with a warning), right-padded with zeros to the longest clip of the batch.
        `audio_feature_lengths` holds each row's real frames.
        """
        if self.audio_family == "qwen3_omni":
            return self._process_audio_omni(audios)
        rows, lengths, tokens_per_audio = [], [], []
        for samples in audios:
            n_tokens = 0
            for window in self.audio_windows(samples):
                feats = self.feature_extractor(
                    window, sampling_rate=SAMPLING_RATE, padding="max_length", return_attention_mask=True,
                    return_tensors="np",
                )
                mel_frames = int(feats["attention_mask"][0].sum())
                rows.append(feats["input_features"][0])
                lengths.append(mel_frames)
                n_tokens += audio_tokens_for_frames(mel_frames, self.audio_downsample)
            tokens_per_audio.append(n_tokens)
        features = np.stack(rows).astype(np.float32)
        assert features.shape[-1] == WHISPER_WINDOW_FRAMES
        return {"input_features": features, "audio_feature_lengths": np.array(lengths, dtype=np.int64)}, tokens_per_audio

    def _process_audio_omni(self, audios: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
        max_samples = self.audio_max_windows * 30 * SAMPLING_RATE
        rows, lengths, tokens_per_audio = [], [], []
        for samples in audios:
            if len(samples) > max_samples:
                logger.warning(
                    "Audio of %.1f s is longer than audio_max_windows=%d x 30 s; only the first %d s are embedded.",
                    len(samples) / SAMPLING_RATE, self.audio_max_windows, self.audio_max_windows * 30,
                )
                samples = samples[:max_samples]
            feats = self.feature_extractor(
                samples, sampling_rate=SAMPLING_RATE, padding="longest", truncation=False,
                return_attention_mask=True, return_tensors="np",
            )
            mel_frames = max(int(feats["attention_mask"][0].sum()), 1)
            rows.append(feats["input_features"][0][:, :mel_frames])
            lengths.append(mel_frames)
            tokens_per_audio.append(omni_audio_tokens_for_frames(mel_frames, self.audio_n_window, self.audio_downsample))
        features = np.zeros((len(rows), rows[0].shape[0], max(lengths)), dtype=np.float32)
        for i, row in enumerate(rows):
            features[i, :, : row.shape[1]] = row
        return {"input_features": features, "audio_feature_lengths": np.array(lengths, dtype=np.int64)}, tokens_per_audio

    # ------------------------------------------------------------------------------------------------ HF __call__
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: list | None = None,
        videos: list | None = None,
        audio: list | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        document_images: list[bool] | None = None,
        max_length: int | None = None,
        input_names: list[str] | None = None,
        sampling_rate: int | None = None,
        add_compression_tokens: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text`, expanding each placeholder for the matching image/video/audio item (in order).

        `images`: PIL images; `videos`: lists of RGB frames or (T,H,W,C) uint8 arrays; `audio`: 1-D float or
        integer-PCM arrays at `sampling_rate` (default 16 kHz; resampled like `prepare`), `{"array", "sampling_rate"}`
        dicts or audio file paths, validated as in `prepare` (errors name `audio[i]`). `document_images[i]` selects
        the document resolution preset.
        A row of `text` may also be a list of `(text, literal)` segments (what `prepare` builds): placeholders are
        expanded only in non-literal segments, and literal segments are tokenised with special-token strings as
        plain text. With `compression_tokens` set, each row ends with them (`add_compression_tokens=False` leaves them
        out: for callers that lay out [input | compression | question | answer] rows themselves, e.g. CoMa stage 1).
        """
        if text is None:
            raise ValueError("ConanProcessor needs `text` holding the placeholders; use `prepare` for raw inputs.")
        rows = [[(t, False)] if isinstance(t, str) else list(t) for t in ([text] if isinstance(text, str) else text)]
        data: dict[str, Any] = {}
        expansions: dict[str, list[int]] = {}
        if images:
            docs = document_images or [False] * len(images)
            images = [self._load_image(im, f"images[{i}]") for i, im in enumerate(images)]  # paths, checks, RGB
            resized = [
                self._resize(
                    im,
                    self.document_min_pixels if doc else self.image_min_pixels,
                    self.document_max_pixels if doc else self.image_max_pixels,
                )
                for im, doc in zip(images, docs)
            ]
            data.update(self.process_images(resized))
            expansions[self.image_token] = [int(g.prod()) // self._patch[1] ** 2 for g in data["image_grid_thw"]]
        if videos:
            data.update(self.process_videos([self._load_video(v, f"videos[{i}]") for i, v in enumerate(videos)]))
            if self.backbone_family != "qwen3_vl":
                expansions[self.video_token] = [int(g.prod()) // self._patch[1] ** 2 for g in data["video_grid_thw"]]
            if self.backbone_family == "qwen2_5_vl":
                temporal = self._patch[2]
                data["second_per_grid_ts"] = np.full(len(videos), temporal / self.video_fps, dtype=np.float32)
        if audio:
            rate = SAMPLING_RATE if sampling_rate is None else sampling_rate
            arrays = [self._load_audio(a if isinstance(a, (dict, str, os.PathLike)) else
                                       {"array": a, "sampling_rate": rate}, f"audio[{i}]")
                      for i, a in enumerate(audio)]
            audio_data, expansions[self.audio_token] = self.process_audio(arrays)
            data.update(audio_data)
        if self.backbone_family == "qwen3_vl":
            rows = self._expand_timestamped_videos(rows, data.get("video_grid_thw", ()))
        rows = [[(seg if literal else self._expand_placeholders(seg, expansions), literal) for seg, literal in row]
                for row in rows]
        if any(counts for counts in expansions.values()):
            raise ValueError(
                "More media items than placeholders in the text: "
                + ", ".join(f"{len(v)} unused for {k}" for k, v in expansions.items() if v)
            )
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        encoded = self.tokenizer.pad(
            {"input_ids": self._tokenize_segments(rows, self.effective_max_length(max_length), input_names,
                                                  add_compression_tokens)}, padding=padding,
            return_tensors="np", **kwargs
        )
        input_ids = encoded["input_ids"]
        mm_types = np.full_like(input_ids, MM_TOKEN_TYPES["text"])
        mm_types[input_ids == self.image_token_id] = MM_TOKEN_TYPES["image"]
        mm_types[input_ids == self.video_token_id] = MM_TOKEN_TYPES["video"]
        mm_types[input_ids == self.audio_token_id] = MM_TOKEN_TYPES["audio"]
        data.update(input_ids=input_ids, attention_mask=encoded["attention_mask"], mm_token_type_ids=mm_types)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------- literal user text
    def effective_max_length(self, max_length: int | None = None) -> int | None:
        """The token limit in force: the argument, else `self.max_length`, else a real `tokenizer.model_max_length`."""
        for limit in (max_length, self.max_length, getattr(self.tokenizer, "model_max_length", None)):
            if limit is not None and 0 < int(limit) < 10**9:  # transformers' "no limit" sentinel is ~1e30
                return int(limit)
        return None

    def _tokenize_segments(
        self, rows: list[list[tuple[str, bool]]], max_length: int | None = None, names: list[str] | None = None,
        add_compression_tokens: bool = True,
    ) -> list[list[int]]:
        """Token ids per row: template segments parse special tokens, literal segments (user text, instructions)
        are tokenised with `split_special_tokens=True`, so `<|image_pad|>` or `<|im_end|>` typed by a user stays text.
        The compression tokens (if any) end each row as a fixed segment. With `max_length`, rows are cut to fit by
        `_truncate_literal`."""
        pieces: list[list[list[int]]] = [[[] for _ in row] for row in rows]
        for literal in (False, True):
            where = [(r, i) for r, row in enumerate(rows) for i, (seg, lit) in enumerate(row) if seg and lit == literal]
            if where:
                encoded = self.tokenizer([rows[r][i][0] for r, i in where], add_special_tokens=False,
                                         split_special_tokens=literal)["input_ids"]
                for (r, i), seg_ids in zip(where, encoded):
                    pieces[r][i] = list(seg_ids)
        literals = [[lit for _, lit in row] for row in rows]
        if add_compression_tokens and self.compression_token_ids:
            for row_pieces, literal in zip(pieces, literals):
                row_pieces.append(list(self.compression_token_ids))
                literal.append(False)
        if max_length is not None:
            pieces = [self._truncate_literal(row, literal, max_length, names[r] if names else f"inputs[{r}]")
                      for r, (row, literal) in enumerate(zip(pieces, literals))]
        return [[t for seg_ids in row for t in seg_ids] for row in pieces]

    @staticmethod
    def _truncate_literal(pieces: list[list[int]], literal: list[bool], max_length: int, where: str) -> list[list[int]]:
        """Cut literal segments from the end (the user's text first, then the instruction) so the row fits in
        `max_length`; template, media and compression tokens are never cut."""
        total = sum(len(p) for p in pieces)
        if total <= max_length:
            return pieces
        fixed = sum(len(p) for p, lit in zip(pieces, literal) if not lit)
        if fixed > max_length:
            raise ValueError(
                f"{where}: its media and template tokens alone are {fixed}, more than max_length={max_length}; "
                "use fewer or smaller media (image_max_pixels, video_max_frames, video_max_pixels, audio_max_windows) "
                "or raise max_length (at most the model's max_position_embeddings)."
            )
        excess, out = total - max_length, [list(p) for p in pieces]
        for i in reversed(range(len(out))):
            if literal[i] and excess > 0:
                cut = min(excess, len(out[i]))
                out[i], excess = out[i][: len(out[i]) - cut], excess - cut
        logger.warning("%s has %d tokens, more than max_length=%d: its text was truncated.", where, total, max_length)
        return out

    def _expand_timestamped_videos(
        self, rows: list[list[tuple[str, bool]]], grids: np.ndarray
    ) -> list[list[tuple[str, bool]]]:
        """Qwen3-VL: each `[<|vision_start|>]<|video_pad|>[<|vision_end|>]` of a template (non-literal) segment
        becomes `video_expansion` of the next video, in order."""
        pending = [self.video_expansion(g) for g in grids]
        pattern = re.compile(r"(?:<\|vision_start\|>)?" + re.escape(self.video_token) + r"(?:<\|vision_end\|>)?")

        def replace(_match: re.Match) -> str:
            if not pending:
                raise ValueError(f"The text holds more {self.video_token} placeholders than items were given.")
            return pending.pop(0)

        rows = [[(seg if literal else pattern.sub(replace, seg), literal) for seg, literal in row] for row in rows]
        if pending:
            raise ValueError(f"More media items than placeholders in the text: {len(pending)} unused for {self.video_token}")
        return rows

    def _expand_placeholders(self, text: str, expansions: dict[str, list[int]]) -> str:
        tokens = (self.image_token, self.audio_token) if self.backbone_family == "qwen3_vl" else (
            self.image_token, self.video_token, self.audio_token)
        for token in tokens:
            counts = expansions.get(token, [])
            pieces = text.split(token)
            if len(pieces) - 1 > len(counts):
                raise ValueError(f"The text holds more {token} placeholders than items were given.")
            out = [pieces[0]]
            for piece in pieces[1:]:
                out.append(token * counts.pop(0))
                out.append(piece)
            text = "".join(out)
        return text

    # ------------------------------------------------------------------------------------------------ raw inputs
    def prepare(
        self,
        inputs: list[Any],
        instruction: str | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        input_names: list[str] | None = None,
        add_compression_tokens: bool = True,
    ) -> BatchFeature:
        """Model inputs for a batch of raw inputs, each becoming one embedding.

        Each input is one of: a str (text, or the path of an existing image/audio/video/PDF file); a PIL image; a
        dict with keys from `text`, `image`, `document`, `page`, `video`, `audio` (any mixture, e.g. an image with a
        question or a video with its soundtrack). `audio` is `{"array": 1-D floats, "sampling_rate": int}` or a file;
        `video` is a (T,H,W,C) uint8 array, a list of frames, or a file; `document` is a page image or a PDF path
        (`page` picks the 0-based page, default 0; `pdf_page_inputs` expands a whole PDF). `instruction` is the system
        prompt (sentence-transformers passes its prompt here); `max_length` overrides `self.max_length`. Errors name
        `inputs[i]`, or `input_names[i]` where given (sentence-transformers reorders inputs, so it passes quotes).
        Rows end with the compression tokens when the processor has them (`add_compression_tokens`, see `__call__`).
        """
        if isinstance(inputs, (str, dict, Image.Image)):
            inputs = [inputs]
        parsed = [self.parse_input(raw, index, input_names[index] if input_names else None)
                  for index, raw in enumerate(inputs)]
        return self.prepare_parsed(parsed, [instruction] * len(parsed), padding_side, return_tensors, max_length,
                                   input_names, add_compression_tokens)

    def prepare_parsed(
        self,
        parsed: list[tuple[ParsedInput, list[bool]]],
        instructions: list[str | None],
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        input_names: list[str] | None = None,
        add_compression_tokens: bool = True,
    ) -> BatchFeature:
        """Model inputs for already-validated inputs (`parse_input` results), one instruction per row."""
        texts, images, is_doc, videos, audios = [], [], [], [], []
        for (item, doc_flags), instruction in zip(parsed, instructions):
            texts.append(self.render_segments(item, instruction))
            images.extend(item.images)
            is_doc.extend(doc_flags)
            if item.video is not None:
                videos.append(item.video)
            if item.audio is not None:
                audios.append(item.audio)
        return self(
            text=texts, images=images or None, videos=videos or None, audio=audios or None,
            document_images=is_doc, padding_side=padding_side, return_tensors=return_tensors, max_length=max_length,
            input_names=input_names, add_compression_tokens=add_compression_tokens,
        )

    def render_segments(self, parsed: ParsedInput, instruction: str | None = None) -> list[tuple[str, bool]]:
        """The chat layout as (text, literal) segments: the instruction and the user's text are literal (tokenised as
        plain text, never as special tokens); the template and media placeholders around them are not."""
        media = "".join("<|vision_start|>" + self.image_token + "<|vision_end|>" for _ in parsed.images)
        if parsed.video is not None:
            media += "<|vision_start|>" + self.video_token + "<|vision_end|>"
        if parsed.audio is not None:
            media += (self.audio_start_token or "") + self.audio_token + (self.audio_end_token or "")
        system = instruction if instruction else self.default_instruction
        return [
            ("<|im_start|>system\n", False), (system, True), ("<|im_end|>\n<|im_start|>user\n" + media, False),
            (parsed.text or "", True), ("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>", False),
        ]

    def render(self, parsed: ParsedInput, instruction: str | None = None) -> str:
        """The chat layout (same as `chat_template`): system instruction, user turn with media then text."""
        return "".join(segment for segment, _ in self.render_segments(parsed, instruction))

    def parse_input(self, raw: Any, index: int, name: str | None = None) -> tuple[ParsedInput, list[bool]]:
        """Validate one raw input; errors name `inputs[index]` (or `name`) and what was expected."""
        where = name or f"inputs[{index}]"
        if raw is None:
            raise TypeError(f"{where} is None; expected a str, a PIL image or a dict with keys {INPUT_KEYS}.")
        if isinstance(raw, os.PathLike):  # a Path is always a file reference, never text
            path = os.fspath(raw)
            kind = media_kind_of_path(path)
            if kind is None:
                raise ValueError(f"{where} is the path {path!r}, which has no image/audio/video/PDF extension; pass "
                                 "text as a str, or the file as {'image' | 'audio' | 'video' | 'document': path}.")
            raw = {"document" if kind == "pdf" else kind: path}
        elif isinstance(raw, str):
            kind = media_kind_of_path(raw)
            if kind is not None and not os.path.isfile(raw):
                if not any(char.isspace() for char in raw.strip()):
                    # Documented: a str is text unless it names an existing media file. A typo'd path would be
                    # embedded silently as the text of the path, so say so.
                    quoted = where if repr(raw) in where else f"{where} {raw!r}"  # describe_input may quote it
                    logger.warning("%s looks like a media file path but no such file exists; it is embedded as text.",
                                   quoted)
                kind = None
            if kind is None:
                return ParsedInput(text=self._check_text(raw, where)), []
            raw = {"document" if kind == "pdf" else kind: raw}
        elif isinstance(raw, Image.Image):
            raw = {"image": raw}
        elif isinstance(raw, np.ndarray) and raw.ndim == 4:
            raw = {"video": raw}
        if not isinstance(raw, dict):
            raise TypeError(
                f"{where} has type {type(raw).__name__}; expected a str, a PIL image, a (T,H,W,C) video array or a dict "
                f"with keys {INPUT_KEYS} (audio goes in as {{'audio': {{'array': ..., 'sampling_rate': ...}}}})."
            )
        if "role" in raw and "content" in raw:
            raise TypeError(
                f"{where} is a chat message (role/content); expected a plain input such as "
                "{'text': ..., 'image': ...}. Use `instruction=` (or a sentence-transformers prompt) for the system turn."
            )
        if "array" in raw and "sampling_rate" in raw:
            raw = {"audio": raw}
        unknown = sorted(set(raw) - set(INPUT_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; expected keys among {INPUT_KEYS}.")
        if not any(raw.get(k) is not None for k in ("text", "image", "document", "video", "audio")):
            raise ValueError(f"{where} is a dict without content; expected at least one of text/image/document/video/audio.")
        parsed, doc_flags = ParsedInput(), []
        if raw.get("text") is not None:
            parsed.text = self._check_text(raw["text"], f"{where}['text']")
        if raw.get("image") is not None:
            parsed.images.append(self._load_image(raw["image"], f"{where}['image']"))
            doc_flags.append(False)
        if raw.get("document") is not None:
            parsed.images.append(self._load_document(raw["document"], raw.get("page"), f"{where}['document']"))
            doc_flags.append(True)
        elif raw.get("page") is not None:
            raise ValueError(f"{where} has 'page' but no 'document'.")
        if raw.get("video") is not None:
            parsed.video = self._load_video(raw["video"], f"{where}['video']")
        if raw.get("audio") is not None:
            parsed.audio = self._load_audio(raw["audio"], f"{where}['audio']")
        return parsed, doc_flags

    @staticmethod
    def _check_text(text: Any, where: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{where} has type {type(text).__name__}; expected a str.")
        if not text.strip():
            raise ValueError(f"{where} is an empty string; expected non-empty text.")
        return text

    @staticmethod
    def _load_image(image: Any, where: str) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise ValueError(f"{where}: image file {path!r} does not exist.")
            image = open_image_file(path, where)  # EXIF orientation applied; PIL images passed in are kept as given
        if not isinstance(image, Image.Image):
            raise TypeError(f"{where} has type {type(image).__name__}; expected a PIL image or an image path.")
        check_image_size(image.width, image.height, where)
        return image_to_rgb(image, where)

    def _load_document(self, document: Any, page: Any, where: str) -> Image.Image:
        if isinstance(document, (str, os.PathLike)) and media_kind_of_path(os.fspath(document)) == "pdf":
            if page is not None and (not isinstance(page, (int, np.integer)) or isinstance(page, bool)):
                raise TypeError(f"{where}: page must be an int (0-based), got {page!r}.")
            try:
                return render_pdf_page(os.fspath(document), int(page or 0), self.pdf_render_scale,
                                       max_pixels=PDF_RENDER_HEADROOM * self.document_max_pixels)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        if page is not None:
            raise ValueError(f"{where}: 'page' applies to PDF files only.")
        return self._load_image(document, where)

    def _load_video(self, video: Any, where: str) -> list[np.ndarray]:
        if hasattr(video, "detach"):  # a torch tensor of (T, H, W, 3) frames
            video = video.detach().cpu().numpy()
        if isinstance(video, (str, os.PathLike)):
            try:
                frames = load_video_file(os.fspath(video), self.video_fps, self.video_max_frames)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        elif isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(f"{where} has shape {video.shape}; expected (T, H, W, 3) RGB frames.")
            frames = list(video)
        elif isinstance(video, (list, tuple)):
            frames = [np.asarray(to_rgb(f)) if isinstance(f, Image.Image) else np.asarray(f) for f in video]
        else:
            raise TypeError(f"{where} has type {type(video).__name__}; expected a (T,H,W,3) array, frames or a path.")
        if len(frames) == 0:
            raise ValueError(f"{where} has 0 frames; expected at least one frame.")
        for i, frame in enumerate(frames):
            if frame.ndim != 3 or frame.shape[-1] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
                raise ValueError(f"{where} frame {i} has shape {frame.shape}; expected non-empty (H, W, 3) RGB.")
        check_image_size(frames[0].shape[1], frames[0].shape[0], f"{where} frame 0")
        self._check_frame_sizes(frames, where)
        if len(frames) > self.video_max_frames:
            picks = np.linspace(0, len(frames) - 1, self.video_max_frames).round().astype(int)
            frames = [frames[i] for i in picks]
        return [frame_to_uint8(f, f"{where} frame {i}") for i, f in enumerate(frames)]

    def _check_frame_sizes(self, frames: list[np.ndarray], where: str) -> None:
        """Frames must resize to one size (what `process_videos` stacks); the error names the input and frame."""
        patch, merge, _ = self._patch
        sizes = [smart_resize(f.shape[0], f.shape[1], factor=patch * merge, min_pixels=self.video_min_pixels,
                              max_pixels=self.video_max_pixels) for f in frames]
        for i, size in enumerate(sizes):
            if size != sizes[0]:
                raise ValueError(
                    f"{where} frame {i} is {frames[i].shape[1]}x{frames[i].shape[0]} pixels and frame 0 is "
                    f"{frames[0].shape[1]}x{frames[0].shape[0]}; the frames of one video must share one size."
                )

    @staticmethod
    def _load_audio(audio: Any, where: str) -> np.ndarray:
        if isinstance(audio, (str, os.PathLike)):
            try:
                samples, rate = load_audio_file(os.fspath(audio))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        elif isinstance(audio, dict):
            missing = {"array", "sampling_rate"} - set(audio)
            if missing:
                raise ValueError(f"{where} lacks {sorted(missing)}; expected {{'array': ..., 'sampling_rate': ...}}.")
            samples, rate = audio["array"], audio["sampling_rate"]
            if hasattr(samples, "detach"):
                samples = samples.detach().cpu().numpy()
            samples = pcm_to_float32(samples, f"{where}['array']")
            if samples.ndim == 2 and 1 in samples.shape:
                samples = samples.reshape(-1)
            if samples.ndim != 1:
                raise ValueError(f"{where}['array'] has shape {samples.shape}; expected a 1-D (mono) array.")
        else:
            raise TypeError(
                f"{where} has type {type(audio).__name__}; expected {{'array': 1-D array, 'sampling_rate': int}} or an "
                "audio file path (a bare array has no sampling rate)."
            )
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"{where}: sampling_rate must be a positive int, got {rate!r}.")
        if samples.size == 0:
            raise ValueError(f"{where} has 0 samples; expected non-empty audio.")
        if not np.all(np.isfinite(samples)):
            raise ValueError(f"{where} contains NaN or infinite samples.")
        return resample_audio(samples, int(rate), SAMPLING_RATE).astype(np.float32)

    @staticmethod
    def pdf_page_inputs(path: str, text: str | None = None) -> list[dict[str, Any]]:
        """One input dict per page of a PDF (encode them together to get one embedding per page)."""
        return [{"document": path, "page": p, **({"text": text} if text else {})} for p in range(count_pdf_pages(path))]

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "input_features", "audio_feature_lengths",
        ]


def describe_input(raw: Any) -> str:
    """A short quote of one caller input for error messages, where a position would mislead (sentence-transformers
    sorts inputs by length before they reach the processor): `input 'some text'`, `input {'audio': 'a.wav'}`."""

    def short(value: Any) -> str:
        if isinstance(value, str):
            return repr(value if len(value) <= 40 else value[:37] + "...")
        if isinstance(value, Image.Image):
            return f"<PIL {value.mode} image {value.width}x{value.height}>"
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return f"<{type(value).__name__} {value.dtype} {tuple(value.shape)}>"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{key!r}: {short(item)}" for key, item in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return f"<{type(value).__name__} of {len(value)}>"
        return repr(value)[:40]

    return f"input {short(raw)}"


def to_rgb(image: Image.Image) -> Image.Image:
    return image_to_rgb(image)  # media_conan: accepted PIL modes and their conversion


__all__ = ["ConanProcessor"]
