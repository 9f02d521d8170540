"""A cache of the frozen vision tower's merged visual tokens, one entry per image / page / video.

Where the vision tower and its merger are frozen (the small preset's LLM-only LoRA specialists, their evaluations),
`backbone.visual(pixel_values, grid_thw)` gives the same tokens for the same item at every step, so each item is
encoded once: :meth:`VisualTokenCache.install` replaces the tower's `forward` on that module instance; a call splits
the packed patches per item (by `grid_thw`), looks each item up by a hash of its grid row and patch bytes, runs the
real tower on the misses only and returns the concatenated merged tokens as the tower's `pooler_output`, exactly what
Qwen2-VL / Qwen2.5-VL `get_image_features` / `get_video_features` read. Entries are also keyed by a fingerprint of
the tower's weights (training/common/audio_cache.module_fingerprint), so a different tower never reads stale tokens,
and they live in a process-wide store shared by every model with the same tower (a pipeline evaluates many
specialists and fused models over one frozen tower).

Why our own code: the audio side has the same pattern (training/common/audio_cache.py); transformers has no
feature cache for vision towers. The tower must be frozen: installing raises ValueError when any of its parameters
requires grad (LoRA on the vision scope), and a call raises RuntimeError if that changes later.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from training.common.audio_cache import module_fingerprint

# Backbone families whose get_image_features / get_video_features read only the tower's `pooler_output`
# (Qwen3-VL also reads DeepStack features, which this cache does not keep).
SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
_STORES: dict[str, dict[str, torch.Tensor]] = {}


def vision_tower(model: nn.Module) -> nn.Module:
    """The `backbone.visual` module of a ConanModel. Raises ValueError without one."""
    visual = getattr(getattr(model, "backbone", None), "visual", None)
    if visual is None:
        raise ValueError(f"vision_tower: {type(model).__name__} has no backbone.visual (expected a ConanModel)")
    return visual


class VisualTokenCache:
    """Merged visual tokens per item `(tokens_i, hidden)` of one frozen tower, memoised in memory."""

    def __init__(self, tower: nn.Module, fingerprint: str):
        self.tower, self.fingerprint = tower, fingerprint
        self.store = _STORES.setdefault(fingerprint, {})
        self.hits = self.misses = 0
        self._forward = tower.forward

    @classmethod
    def install(cls, model: nn.Module) -> "VisualTokenCache":
        """Cache the vision tower of the ConanModel `model` in place (a peft wrapper keeps the same tower module, so
        a model unwrapped after apply_lora works too); returns the cache.

        Raises ValueError for a backbone family outside SUPPORTED_FAMILIES or a tower with trainable parameters.
        """
        family = getattr(getattr(model, "config", None), "backbone_model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"VisualTokenCache: backbone family {family!r} is not supported; expected one of "
                             f"{SUPPORTED_FAMILIES} (Qwen3-VL's DeepStack features are not cached)")
        tower = vision_tower(model)
        if isinstance(tower.forward, _CachedForward):
            return tower.forward.cache
        if any(p.requires_grad for p in tower.parameters()):
            raise ValueError("VisualTokenCache: the vision tower has trainable parameters (LoRA on the vision scope?); "
                             "only a frozen tower can be cached")
        fingerprint = module_fingerprint(tower) + f"-m{tower.spatial_merge_size}"
        cache = cls(tower, fingerprint)
        tower.forward = _CachedForward(cache)
        return cache

    @staticmethod
    def _key(grid: torch.Tensor, patches: torch.Tensor) -> str:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(grid.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        digest.update(patches.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        """The tower's forward on packed patches `(sum_i t_i*h_i*w_i, patch_dim)` of items `grid_thw` `(items, 3)`:
        an output whose `pooler_output` is the merged tokens `(sum_i t_i*h_i*w_i / merge**2, hidden)`."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters()):
            raise RuntimeError("VisualTokenCache: the cached vision tower has trainable parameters now; caching "
                               "would drop their gradients")
        sizes = grid_thw.prod(-1).tolist()
        if sum(sizes) != hidden_states.shape[0]:
            raise ValueError(f"VisualTokenCache: grid_thw covers {sum(sizes)} patches, pixel values hold "
                             f"{hidden_states.shape[0]}")
        items = list(torch.split(hidden_states, sizes))
        keys = [self._key(grid_thw[i], items[i]) for i in range(len(items))]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                out = self._forward(torch.cat([items[i] for i in todo]), grid_thw=grid_thw[todo], **kwargs)
            merged = out.pooler_output if hasattr(out, "pooler_output") else out
            merge = self.tower.spatial_merge_size ** 2
            for i, tokens in zip(todo, torch.split(merged, [sizes[i] // merge for i in todo])):
                self.store[keys[i]] = tokens.detach().clone()
        tokens = torch.cat([self.store[k] for k in keys]).to(hidden_states.device)
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=tokens)


class _CachedForward:
    """The bound replacement of `tower.forward` (a callable object, so :meth:`VisualTokenCache.install` can see it)."""

    def __init__(self, cache: VisualTokenCache):
        self.cache = cache

    def __call__(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        return self.cache(hidden_states, grid_thw, **kwargs)
