"""Bit-plane layout helpers shared by the kernels and their twins.

A plane is a 1-d int32 tensor; bit i of word w is element 32w+i (little-endian words,
as :func:`adapterhub_c.packing.encoding.pack_plane` writes them).
"""
from __future__ import annotations

import numpy as np
import torch

from adapterhub_c.errors import UsageError

IMPLS = ("auto", "triton", "ref")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def n_words(numel: int) -> int:
    """int32 words in one plane of ``numel`` elements."""
    return (numel + 31) // 32


def check_planes(pos: torch.Tensor, neg: torch.Tensor, numel: int) -> None:
    """UsageError unless both planes are 1-d int32 tensors of the right length, same device."""
    for name, p in (("pos", pos), ("neg", neg)):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.int32 or p.ndim != 1:
            raise UsageError(f"{name} plane must be a 1-d int32 tensor")
        if p.numel() != n_words(numel):
            raise UsageError(f"{name} plane has {p.numel()} words, {n_words(numel)} expected for {numel} elements")
    if pos.device != neg.device:
        raise UsageError("pos and neg planes are on different devices")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run (see the package docstring)."""
    if impl not in IMPLS:
        raise UsageError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return all(t.is_cuda for t in tensors)
    return impl == "triton"


def unpack_bits(words: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 words → int32 tensor of 0/1 bits of length ``numel`` (torch, any device)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, then mask: bit 31 is right too
    return bits.reshape(*words.shape[:-1], -1)[..., :numel]


def planes_to_torch(pos: np.ndarray, neg: np.ndarray, device: str | torch.device = "cpu"):
    """numpy planes (as stored in a bitmask pack) → int32 torch tensors on ``device``."""
    return (torch.from_numpy(np.ascontiguousarray(pos, dtype="<i4").astype(np.int32)).to(device),
            torch.from_numpy(np.ascontiguousarray(neg, dtype="<i4").astype(np.int32)).to(device))
