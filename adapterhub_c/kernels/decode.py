"""Bitmask planes → dense ``scale · T`` (fp16, bf16 or fp32).

Both paths compute ``(float32(T) * float32(scale))`` and round once to the output dtype
(round-to-nearest-even), so they agree bit for bit.
"""
from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.layout import FLOAT_DTYPES, check_planes, unpack_bits, use_triton


def bitmask_decode_ref(pos: torch.Tensor, neg: torch.Tensor, numel: int, scale: float,
                       dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reference twin of :func:`bitmask_decode` in plain torch."""
    t = unpack_bits(pos, numel) - unpack_bits(neg, numel)
    return (t.to(torch.float32) * torch.tensor(scale, dtype=torch.float32, device=pos.device)).to(dtype)


def bitmask_decode(pos: torch.Tensor, neg: torch.Tensor, numel: int, scale: float,
                   dtype: torch.dtype = torch.float16, *, impl: str = "auto") -> torch.Tensor:
    """Dense flat tensor of ``numel`` elements, ``scale · (pos - neg)``, on the planes' device."""
    check_planes(pos, neg, numel)
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"decode dtype must be float16, bfloat16 or float32, got {dtype}")
    if not use_triton(impl, pos, neg):
        return bitmask_decode_ref(pos, neg, numel, scale, dtype)
    from adapterhub_c.kernels.decode_triton import decode_launch

    out = torch.empty(numel, dtype=dtype, device=pos.device)
    decode_launch(pos, neg, out, numel, float(scale))
    return out
