"""The Hessian machinery GPTQ and SparseGPT share (Frantar et al.; IST-DASLab ``gptq`` / ``sparsegpt``).

For one linear layer with weight W [out, in] and calibration inputs X (tokens × in), the
layer-wise reconstruction loss ||WX − ŴX||² has the Hessian H = 2 X Xᵀ / n (n: the number
of calibration sequences, as the reference code counts them). Both methods walk the
columns of W left to right; each column is compressed (quantized, pruned or both) and its
error (w − q) / [H⁻¹]_jj is spread over the columns not yet done through the row j of the
upper Cholesky factor of H⁻¹ — the optimal brain surgeon update. Columns are processed in
blocks of ``blocksize`` ("lazy batch updates"): inside a block the update is applied
column by column, to the rest of the matrix once per block.

- :class:`HessianAccumulator` is the reference ``add_batch``: H ← H·n/(n+b) + 2/(n+b)·XXᵀ.
- :func:`inverse_cholesky` is the reference preparation — dead inputs (H_jj = 0) get
  H_jj = 1 and a zero weight column, 1% of the mean diagonal is added as dampening, then
  chol(H)⁻¹ → chol(H⁻¹, upper) — except that a Hessian which is still not positive
  definite is retried with ten times the dampening (an :class:`AdaptWarning` says so)
  instead of failing or producing NaN weights.
- :func:`obs_sweep` is the column loop of ``GPTQ.fasterquant`` / ``SparseGPT.fasterprune``;
  a ``column`` callback decides what each column becomes and a ``block`` callback sees
  each block first (SparseGPT chooses its mask there).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Protocol

import torch

from adapterhub_c.errors import AdaptError, AdaptWarning

PERCDAMP = 0.01  # the reference's default: 1% of the mean diagonal
BLOCKSIZE = 128  # the reference's lazy-update block
DAMP_RETRIES = 4  # ×10 each: 1%, 10%, 100%, 1000%, 10000% of the mean diagonal


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over calibration inputs, accumulated as the reference's ``add_batch`` does."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, inp: torch.Tensor) -> None:
        """Add a batch of inputs: [batch, tokens, in] (n counts the batch) or [tokens, in] (one sample)."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.matmul(x.t())


def inverse_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float = PERCDAMP,
                     layer: str = "a layer") -> torch.Tensor:
    """The upper Cholesky factor of (H + damp·I)⁻¹; zeroes W's dead columns in place (H is consumed).

    ``damp`` = ``percdamp`` × mean(diag H). When H + damp·I is not positive definite (or its
    inverse is not finite) the dampening is multiplied by 10, up to :data:`DAMP_RETRIES`
    times, with a warning naming ``layer``; AdaptError when even that fails.
    """
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(DAMP_RETRIES + 1):
        frac = percdamp * 10**attempt
        hinv = _damped_inverse_cholesky(H, frac * mean_diag)
        if hinv is not None:
            if attempt:
                warnings.warn(f"the Hessian of {layer} is not positive definite with {percdamp:.0%} dampening; "
                              f"used {frac:.0%} of its mean diagonal", AdaptWarning, stacklevel=3)
            return hinv
    raise AdaptError(f"the Hessian of {layer} is not positive definite even with {frac:.0%} dampening "
                     "(calibration inputs are degenerate or not finite)")


def _damped_inverse_cholesky(H: torch.Tensor, damp: torch.Tensor) -> torch.Tensor | None:
    """chol(chol⁻¹(H + damp·I), upper), or None when a factorisation fails or the result is not finite."""
    if not torch.isfinite(damp) or not torch.isfinite(H).all():
        return None
    Hd = H.clone()
    diag = torch.arange(H.shape[0], device=H.device)
    Hd[diag, diag] += damp
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info):
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) or not torch.isfinite(U).all():
        return None
    return U


class Column(Protocol):
    """What a column becomes: ``column(j, w, W) -> q`` (j: absolute index, w: the updated column)."""

    def __call__(self, j: int, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor: ...


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, column: Column, blocksize: int = BLOCKSIZE,
              block: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
              write_back: bool = False) -> torch.Tensor:
    """The reference's column loop with lazy block updates; returns Q (same shape as W, float32).

    ``column(j, w, W)`` returns the compressed column j (w: column j after all updates so far;
    W: the outer matrix, whose current block is as it was when the block began — the
    reference finds group parameters there). ``block(i1, W1, Hinv1)`` is called at the start
    of each block (W1: the block's columns, Hinv1 its diagonal block of Hinv). With
    ``write_back`` (SparseGPT) each finished block is written into W, as the reference does.
    """
    Q = torch.zeros_like(W)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if block is not None:
            block(i1, W1, Hinv1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = column(i1 + i, w, W)
            Q[:, i1 + i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        if write_back:
            W[:, i1:i2] = Q[:, i1:i2]
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q
