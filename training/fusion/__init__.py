"""Decoupled Specialist Fusion: streaming task-vector fusion of modality specialists (Conan-embedding-v3, arXiv 2606.09331; stage F in docs/ARCHITECTURE.md).

Modules, one job each: `config` (all knobs), `st_io` (safetensors headers, reads, streaming writer), `lora` (peft
adapters → exact ΔW), `plan` (key policies and validation from headers), `tensor_ctx` (per-tensor row access),
`methods/` (merge operators with paper/mergekit semantics: one module per operator family and a name registry),
`engine` (thread pool, atomic output, manifest), `cli` (`python -m training.fuse`).
"""

from .config import ConfigError, FusionConfig, ModelSpec, load_config
from .engine import fuse
from .plan import PlanError
from .st_io import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "FusionConfig", "ModelSpec", "PlanError", "fuse", "load_config"]
