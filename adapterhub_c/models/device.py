from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError


def resolve_device(device: str | None) -> torch.device:
    """'auto' / None → cuda when available else cpu; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)
