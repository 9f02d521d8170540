"""The modality names every stage, data file and report uses (docs/ARCHITECTURE.md)."""

from __future__ import annotations

MODALITIES = ("text", "image", "video", "document", "audio")
# Rehearsal's sampling groups, in the order its sampler draws them (text last: the anchor every specialist kept).
MODALITY_GROUPS = ("image", "video", "document", "audio", "text")
