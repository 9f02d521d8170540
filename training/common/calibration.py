"""The projector-calibration record: which backbone the audio projector was trained on (docs/ARCHITECTURE.md).

`config.projector_calibration_hash` holds `modeling_conan.backbone_fingerprint` of that backbone (conan-fp2: names,
shapes and ~2048 sampled values, compared within dtype rounding by `backbone_matches`, so fp32/bf16/fp16 loads agree); `projector_calibration.json` next to the weights
adds exact sha256 hashes. Written by the audio specialist, Projector Recovery, re-alignment and rehearsal.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from training.common import hub_code

CALIBRATION_FILE = "projector_calibration.json"
CALIBRATION_FORMAT = "conan-projector-calibration/1"
PROJECTOR_PREFIX = "audio_projector."

backbone_fingerprint = hub_code.load("modeling_conan").backbone_fingerprint
backbone_matches = hub_code.load("modeling_conan").backbone_matches


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def full_hash(model: torch.nn.Module, prefix: str = "backbone.") -> str:
    """sha256 over every byte of the tensors under `prefix` (the exact record; slower than the fingerprint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(prefix):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def calibrate(model: torch.nn.Module, calibrated_on: str, method: str) -> dict[str, Any]:
    """Stamp `model.config.projector_calibration_hash` with the current backbone and return the JSON record.

    `calibrated_on`: the model folder the projector was fitted on; `method`: how (e.g. "projector_recovery").
    """
    fingerprint = backbone_fingerprint(model)
    model.config.projector_calibration_hash = fingerprint
    return {
        "format": CALIBRATION_FORMAT,
        "backbone_fingerprint": fingerprint,
        "backbone_sha256": full_hash(model),
        "projector_sha256": full_hash(model, PROJECTOR_PREFIX),
        "calibrated_on": str(calibrated_on),
        "method": method,
        "fingerprint_rule": "modeling_conan.backbone_fingerprint (conan-fp2: sha256 of backbone.* names/shapes + "
                            "~2048 sampled values, compared within dtype rounding by backbone_matches)",
    }
