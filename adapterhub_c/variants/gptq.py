"""GPTQ (Frantar et al., 2023) on one layer: the algorithm of IST-DASLab's ``gptq``, on CPU.

``gptq_layer(W, H, spec)`` quantizes the [out, in] weight W column by column with the
inverse Hessian of the layer's inputs (hessian.py: 1% dampening, lazy blocks of 128), as
``GPTQ.fasterquant`` does with ``quant.Quantizer(perchannel=True, mse=False)``:
- min/max grid per output row (asymmetric by default, ``sym`` for the symmetric one), found
  on the whole weight, or with ``group_size`` on each group of that many input columns when
  the sweep reaches it (on the weight as updated so far, as the reference does);
- ``act_order``: columns in order of decreasing H_jj (groups are then consecutive in that
  order, the reference's non-static groups; the permutation is stored).
It returns the dequantized weight Q and what a variant stores of it: integer codes, the
per-row-and-group scales and zero points, the permutation (gptq storage in packed.py).

One deliberate difference, on by default in variants: ``scale_dtype=torch.float16`` rounds
each scale to the fp16 it is stored in *before* the codes are chosen, so the stored codes ×
stored scales are exactly the Q whose error the sweep compensated. With
``scale_dtype=torch.float32`` the result is the reference's, checked against fixtures made by
its own code (tests/fixtures/make_gptq_fixtures.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.variants.hessian import BLOCKSIZE, PERCDAMP, inverse_cholesky, obs_sweep

FP16_TINY = 2.0**-24  # the smallest positive fp16: a scale never rounds to 0


@dataclass(frozen=True)
class QuantSpec:
    """How GPTQ quantizes: bits, group size (None: one group per row), act-order, symmetric grid."""

    bits: int = 4
    group_size: int | None = None
    act_order: bool = False
    sym: bool = False
    scale_dtype: torch.dtype = torch.float16
    blocksize: int = BLOCKSIZE
    percdamp: float = PERCDAMP

    @property
    def maxq(self) -> int:
        """The largest code, 2^bits − 1."""
        return 2**self.bits - 1


def check_group_size(spec: QuantSpec, in_features: int, layer: str) -> None:
    """UsageError unless the group size divides the layer's inputs (naming the layer)."""
    g = spec.group_size
    if g is not None and in_features % g:
        raise UsageError(f"group size {g} does not divide the {in_features} inputs of {layer}")


def grid_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [rows, cols]: the reference's ``Quantizer.find_params(x, weight=True)``."""
    tmp = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if spec.sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat] = -1
    xmax[flat] = +1
    scale = (xmax - xmin) / spec.maxq
    if spec.scale_dtype != torch.float32:
        scale = scale.to(spec.scale_dtype).float().clamp_min(FP16_TINY)
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) of w on the grid: clamp(round(w / scale) + zero, 0, maxq)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


class Grid:
    """The quantization grid of every column during a sweep; records codes, scales and zeros."""

    def __init__(self, W: torch.Tensor, spec: QuantSpec):
        self.spec = spec
        rows, cols = W.shape
        self.group = spec.group_size or cols
        groups = cols // self.group
        self.scales = torch.zeros(rows, groups, device=W.device)
        self.zeros = torch.zeros(rows, groups, device=W.device)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        if spec.group_size is None:
            self._set(0, *grid_params(W, spec))

    def _set(self, g: int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scales[:, g], self.zeros[:, g] = scale, zero

    def quantize(self, j: int, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Column j's dequantized values; a new group's grid is found on W[:, j:j+group] first."""
        g = j // self.group
        if self.spec.group_size is not None and j % self.group == 0:
            self._set(g, *grid_params(W[:, j:j + self.group], self.spec))
        scale, zero = self.scales[:, g], self.zeros[:, g]
        q = codes_of(w, scale, zero, self.spec.maxq)
        self.codes[:, j] = q.to(torch.uint8)
        return scale * (q - zero)


@dataclass
class GptqResult:
    """Q (float32 [out, in], original column order) and its stored form (codes in sweep order)."""

    Q: torch.Tensor
    codes: torch.Tensor  # uint8 [out, in], columns in the order of `perm` (identity without act-order)
    scales: torch.Tensor  # float32 [out, groups] (values of `spec.scale_dtype`)
    zeros: torch.Tensor  # float32 [out, groups], integers in [0, maxq]
    perm: torch.Tensor | None  # int64 [in]: sweep position k holds original column perm[k]


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H_jj (the reference's ``torch.argsort(torch.diag(H), descending=True)``)."""
    return torch.argsort(torch.diag(H), descending=True)


def gptq_layer(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, layer: str = "a layer") -> GptqResult:
    """Quantize W [out, in] with the inputs' Hessian H [in, in] (H is consumed); see the module docstring."""
    check_group_size(spec, W.shape[1], layer)
    W = W.detach().float().clone()
    grid = Grid(W, spec) if spec.group_size is None else None  # per-row grid: on W before dead columns go
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if spec.act_order:
        perm = act_order_perm(H)
        W, H = W[:, perm], H[perm][:, perm]
    grid = grid or Grid(W, spec)
    Hinv = inverse_cholesky(H, W, spec.percdamp, layer)
    Q = obs_sweep(W, Hinv, grid.quantize, spec.blocksize)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GptqResult(Q, grid.codes, grid.scales, grid.zeros, perm)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               perm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [out, in] of stored codes (sweep order), scales and zeros [out, groups] (+ permutation)."""
    cols = codes.shape[1]
    gidx = torch.arange(cols, device=codes.device) // (cols // scales.shape[1])
    Q = scales.float()[:, gidx] * (codes.float() - zeros.float()[:, gidx])
    if perm is not None:
        Q = Q[:, torch.argsort(perm.long())]
    return Q
