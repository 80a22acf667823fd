"""Fused in-place ``W += scale · T`` from bitmask planes.

Where T = 0, W is left untouched (bit for bit, -0.0 included); elsewhere the result is
``dtype(float32(W) + float32(T) * float32(scale))``, one rounding to W's dtype.
"""
from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.layout import FLOAT_DTYPES, check_planes, unpack_bits, use_triton


def _check_target(w: torch.Tensor) -> None:
    if w.dtype not in FLOAT_DTYPES:
        raise UsageError(f"target must be float16, bfloat16 or float32, got {w.dtype}")
    if not w.is_contiguous():
        raise UsageError("target tensor must be contiguous")


def bitmask_add_ref(w: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference twin of :func:`bitmask_add_` in plain torch; modifies and returns ``w``."""
    flat = w.view(-1)
    t = unpack_bits(pos, flat.numel()) - unpack_bits(neg, flat.numel())
    s = torch.tensor(scale, dtype=torch.float32, device=w.device)
    new = (flat.to(torch.float32) + t.to(torch.float32) * s).to(w.dtype)
    flat.copy_(torch.where(t != 0, new, flat))
    return w


def bitmask_add_(w: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float,
                 *, impl: str = "auto") -> torch.Tensor:
    """Add ``scale · (pos - neg)`` to ``w`` in place (any shape, row-major); returns ``w``."""
    _check_target(w)
    check_planes(pos, neg, w.numel())
    if pos.device != w.device:
        raise UsageError("planes and target are on different devices")
    if not use_triton(impl, w, pos, neg):
        return bitmask_add_ref(w, pos, neg, scale)
    from adapterhub_c.kernels.add_triton import add_launch

    add_launch(w.view(-1), pos, neg, w.numel(), float(scale))
    return w
