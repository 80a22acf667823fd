"""The formats ``adapt export`` writes."""
from __future__ import annotations

EXPORT_FORMATS = ("hf", "compressed-tensors", "gguf")

__all__ = ["EXPORT_FORMATS"]
