"""SparseGPT (Frantar & Alistarh, 2023) on one layer: the algorithm of IST-DASLab's ``sparsegpt``, on CPU.

``sparsegpt_layer(W, H, sparsity=…, n=…, m=…, quant=…)`` is ``SparseGPT.fasterprune``:
- unstructured: at the start of every block of 128 columns, the weights with the smallest
  w² / [H⁻¹]_jj² of the block (all rows together: adaptive mask selection) are chosen — the
  reference's threshold, ``sort(scores)[int(numel · sparsity)]``, pruning every score at or
  below it;
- n:m: at every m-th column, the n entries of each row's next m columns with the smallest
  score (on the weights as updated so far);
- the kept weights are updated by the OBS step of the sweep (hessian.obs_sweep), so their
  values change: a variant stores the keep-mask and the kept values (packed.py);
- with ``quant`` (a gptq.QuantSpec), pruning and GPTQ quantization run jointly, as the paper
  and ``opt.py --wbits`` do: every kept column is quantized on a per-row grid found on the
  whole weight before pruning (or per group, as in gptq.py), pruned entries are 0.
Act-order is not combined with pruning (the reference does not either).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.variants.gptq import Grid, QuantSpec, check_group_size
from adapterhub_c.variants.hessian import BLOCKSIZE, PERCDAMP, inverse_cholesky, obs_sweep


@dataclass
class SparseResult:
    """Q (float32 [out, in]), the keep-mask, and with joint quantization the grid that made Q."""

    Q: torch.Tensor
    keep: torch.Tensor  # bool [out, in]
    grid: Grid | None = None


class _Pruner:
    """The pruning half of fasterprune: chooses each block's mask, zeroes pruned entries."""

    def __init__(self, W: torch.Tensor, sparsity: float, n: int, m: int, grid: Grid | None):
        self.prune = torch.zeros(W.shape, dtype=torch.bool, device=W.device)  # True = pruned
        self.sparsity, self.n, self.m, self.grid = sparsity, n, m, grid
        self.block_mask: torch.Tensor | None = None
        self.W1: torch.Tensor | None = None
        self.d: torch.Tensor | None = None
        self.i1 = 0

    def block(self, i1: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        self.i1, self.W1, self.d = i1, W1, torch.diag(Hinv1)
        if self.n:
            self.block_mask = torch.zeros_like(W1, dtype=torch.bool)
            return
        tmp = W1**2 / self.d.reshape((1, -1)) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * self.sparsity)]
        self.block_mask = tmp <= thresh

    def column(self, j: int, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        i = j - self.i1
        if self.n and i % self.m == 0:
            tmp = self.W1[:, i:i + self.m] ** 2 / self.d[i:i + self.m].reshape((1, -1)) ** 2
            self.block_mask.scatter_(1, i + torch.topk(tmp, self.n, dim=1, largest=False)[1], True)
        pruned = self.block_mask[:, i]
        self.prune[:, j] = pruned
        q = w.clone()
        q[pruned] = 0
        return self.grid.quantize(j, q, W) if self.grid is not None else q


def check_sparsity(sparsity: float, n: int, m: int, in_features: int, layer: str) -> None:
    """UsageError for a sparsity outside (0, 1) or an n:m pattern that does not tile the inputs."""
    if n:
        if not 0 < n < m or in_features % m:
            raise UsageError(f"{n}:{m} pruning needs 0 < n < m and m dividing the {in_features} inputs of {layer}")
    elif not 0.0 < sparsity < 1.0:
        raise UsageError(f"sparsegpt needs a sparsity in (0, 1), got {sparsity}")


def sparsegpt_layer(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    quant: QuantSpec | None = None, blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP,
                    layer: str = "a layer") -> SparseResult:
    """Prune W [out, in] (jointly quantize with ``quant``) with the inputs' Hessian H (consumed)."""
    check_sparsity(sparsity, n, m, W.shape[1], layer)
    if quant is not None:
        check_group_size(quant, W.shape[1], layer)
        if quant.act_order:
            raise UsageError("act-order cannot be combined with sparsegpt pruning")
    W = W.detach().float().clone()
    grid = Grid(W, quant) if quant is not None else None  # per-row grid on W before pruning, as the reference
    Hinv = inverse_cholesky(H, W, percdamp, layer)
    pruner = _Pruner(W, sparsity, n, m, grid)
    Q = obs_sweep(W, Hinv, pruner.column, blocksize, block=pruner.block, write_back=True)
    return SparseResult(Q, ~pruner.prune, grid)
