from __future__ import annotations

import re

import torch

from adapterhub_c.errors import UsageError

_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")


def resolve_device(device: str | None) -> torch.device:
    """'auto' / None → cuda when available else cpu; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps asked for, but no MPS device is available")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)
