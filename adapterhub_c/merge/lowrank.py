"""Re-factorising merged updates into LoRA factors (batched over modules of one shape).

Every routine returns the best rank-R approximation (Eckart–Young) split evenly:
B = U·√S, A = √S·Vᵀ, to be used with scale 1 (alpha = r). Ranks above what the
update holds are padded with zero columns/rows so every module gets exactly R.

Routines, and why:

- :func:`truncate_lowrank_sum` — for ΔW = B_cat @ A_cat given as factors (task
  arithmetic): QR of B_cat and of A_catᵀ, then an SVD of the small K×K core
  (K = Σ r_i). Exact, and never forms the dense [out, in] matrix.
- :func:`truncate_dense` — for dense merges (TIES, DARE): eigendecomposition of the
  Gram matrix on the smaller side (M·Mᵀ or Mᵀ·M), in float64, then a projection.
  Measured on 30 stacked 576×1536 matrices on 2 CPU cores: 1.4 s against 4.2 s for
  ``torch.linalg.svd(full_matrices=False)`` and 4.7 s for PEFT's per-matrix
  ``full_matrices=True`` SVD. float64 matters: a float32 Gram squares the condition
  number and picked wrong directions (21 % above the optimal error on a spectrum
  spanning 1e-6), float64 stays within 1e-7 of optimal. ``torch.svd_lowrank`` is
  faster still but only approximately optimal, so it is not used.
"""
from __future__ import annotations

import torch


def _pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = A.shape[-2]
    if k == rank:
        return B, A
    if k > rank:
        return B[..., :rank].contiguous(), A[..., :rank, :].contiguous()
    B = torch.nn.functional.pad(B, (0, rank - k))
    A = torch.nn.functional.pad(A, (0, 0, 0, rank - k))
    return B, A


def truncate_dense(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of dense M [C, out, in]: (B [C, out, R], A [C, R, in])."""
    dtype = M.dtype
    out_f, in_f = M.shape[-2:]
    k = min(rank, out_f, in_f)
    Md = M.to(torch.float64)
    if out_f <= in_f:
        _, U = torch.linalg.eigh(Md @ Md.mT)          # ascending eigenvalues
        U = U[..., -k:].flip(-1)                       # top-k left singular vectors
        P = U.mT @ Md                                  # = S·Vᵀ, rows of norm s_i
        s = P.norm(dim=-1)
        root = s.sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        B = U * root.unsqueeze(-2)
        A = P / safe.unsqueeze(-1)
    else:
        _, V = torch.linalg.eigh(Md.mT @ Md)
        V = V[..., -k:].flip(-1)                       # top-k right singular vectors
        Q = Md @ V                                     # = U·S, columns of norm s_i
        s = Q.norm(dim=-2)
        root = s.sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        B = Q / safe.unsqueeze(-2)
        A = V.mT * root.unsqueeze(-1)
    return _pad(B.to(dtype), A.to(dtype), rank)


def truncate_lowrank_sum(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of B @ A (B [C, out, K], A [C, K, in]) without forming it."""
    dtype = B.dtype
    K = B.shape[-1]
    if rank >= K:
        return _pad(B, A, rank)
    Bd, Ad = B.to(torch.float64), A.to(torch.float64)
    Qb, Rb = torch.linalg.qr(Bd)                       # [C, out, k1], [C, k1, K]
    Qa, Ra = torch.linalg.qr(Ad.mT)                    # [C, in, k2], [C, k2, K]
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    k = min(rank, S.shape[-1])
    root = S[..., :k].sqrt()
    B_out = (Qb @ Uc[..., :k]) * root.unsqueeze(-2)
    A_out = root.unsqueeze(-1) * (Vhc[..., :k, :] @ Qa.mT)
    return _pad(B_out.to(dtype), A_out.to(dtype), rank)
