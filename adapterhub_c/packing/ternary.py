"""The in-memory ternary tensor: which positions are non-zero, their signs, one scale.

A ternary tensor stands for ``scale · T`` with ``T`` in {-1, 0, +1}: ``indices`` are the
flat (row-major) positions of the non-zeros in increasing order, ``negative[i]`` says
whether position ``indices[i]`` is -1. ``scale`` is a float32-representable number, so a
pack file (which stores it as float32) gives the same tensor back bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16', 'bfloat16', 'float32' or 'float64'."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; unknown names are corrupt data."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise IntegrityError(f"unknown tensor dtype {name!r}") from None


def scale_fits(scale: float, dtype: str) -> bool:
    """Whether a magnitude is finite, not negative, and stays finite as float32 and then in
    ``dtype``: what :meth:`TernaryTensor.to_dense` computes with it."""
    if not (math.isfinite(scale) and scale >= 0):
        return False
    value = torch.tensor(scale, dtype=torch.float64).to(torch.float32).to(dtype_from_name(dtype))
    return bool(torch.isfinite(value))


@dataclass(frozen=True, eq=False)
class TernaryTensor:
    """``scale · T`` with T ternary; see the module docstring for the fields."""

    indices: np.ndarray  # int64, strictly increasing, in [0, numel)
    negative: np.ndarray  # bool, same length as indices
    scale: float
    shape: tuple[int, ...]
    dtype: str  # torch dtype name of the source tensor, e.g. "bfloat16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    def signs(self) -> np.ndarray:
        """The dense ternary pattern T as a flat int8 array of -1/0/+1."""
        t = np.zeros(self.numel, dtype=np.int8)
        t[self.indices] = np.where(self.negative, -1, 1).astype(np.int8)
        return t

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor ``scale · T`` (float32 scale times ±1, cast to ``dtype``)."""
        out = torch.from_numpy(self.signs().astype(np.float32) * np.float32(self.scale))
        return out.reshape(self.shape).to(dtype or dtype_from_name(self.dtype))

    def same_as(self, other: "TernaryTensor") -> bool:
        """Exact equality of every field."""
        return (self.shape == other.shape and self.dtype == other.dtype
                and np.float32(self.scale) == np.float32(other.scale)
                and np.array_equal(self.indices, other.indices)
                and np.array_equal(self.negative, other.negative))


def from_signs(signs: np.ndarray, scale: float, shape, dtype: str) -> TernaryTensor:
    """Build a ternary tensor from a flat array of -1/0/+1."""
    flat = np.asarray(signs).reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    return TernaryTensor(idx, flat[idx] < 0, float(np.float32(scale)), tuple(int(s) for s in shape), dtype)
