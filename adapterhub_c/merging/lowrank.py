"""Re-factorising merged updates into LoRA factors (batched over modules of one shape).

Every routine returns a rank-R approximation split evenly: B = U·√S, A = √S·Vᵀ, to be
used with scale 1 (alpha = r). Ranks above what the update holds are padded with zero
columns/rows so every module gets exactly R. Two routines, chosen by ``svd``:

- ``exact``: the best rank-R approximation (Eckart–Young) from a full decomposition.
  Dense merges (TIES, DARE): eigendecomposition of the float64 Gram matrix on the
  smaller side. Task arithmetic (ΔW = B_cat·A_cat as factors): QR of B_cat and A_catᵀ and
  an SVD of the small K×K core (K = Σ r_i), never forming the dense matrix. float64
  matters for the Gram: a float32 Gram squares the condition number and picked wrong
  directions (21% above the optimal error on a spectrum spanning 1e-6).
- ``randomized`` (default): randomized subspace iteration with Rayleigh–Ritz (Halko,
  Martinsson & Tropp 2011, Alg. 4.4: orthonormalised after every product, else steep
  spectra lose their small directions), block R + 16, iterated until one more iteration
  lowers the residual ‖M − M_R‖²_F by less than ``TOL`` (1e-4) of itself. The costly
  products run in the input precision; the small b×b Gram matrices, their eigen- and
  Cholesky decompositions in float64. The start block comes from a fixed seed, so a
  merge is reproducible bit for bit. On the TIES merges of the zoo's SmolLM2 LoRAs it
  stops after 5–6 iterations within 3e-5 (squared Frobenius residual, relative) of the
  Eckart–Young optimum, and makes whole TIES merges about 4x faster than the exact routine
  (``benchmarks/merge.py``; the full decomposition is O(n³), an iteration O(n²·R)).
  Where the block covers the whole space (small matrices, K ≤ R + 16) the exact routine
  runs: it is then cheap. ``torch.svd_lowrank`` does the same iteration for a fixed
  number of steps, with no convergence test, so it is not used.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from adapterhub_c.options.merge import SVD_ROUTINES  # noqa: F401 - the routines this module offers, named once

OVERSAMPLE = 16
TOL = 1e-4
MAX_ITER = 50
SEED = 0

Apply = Callable[[torch.Tensor], torch.Tensor]


def _pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = A.shape[-2]
    if k == rank:
        return B, A
    if k > rank:
        return B[..., :rank].contiguous(), A[..., :rank, :].contiguous()
    B = torch.nn.functional.pad(B, (0, rank - k))
    A = torch.nn.functional.pad(A, (0, 0, 0, rank - k))
    return B, A


def truncate_dense(M: torch.Tensor, rank: int, svd: str = "randomized") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of dense M [C, out, in]: (B [C, out, R], A [C, R, in])."""
    out_f, in_f = M.shape[-2:]
    k = min(rank, out_f, in_f)
    if svd == "exact" or k + OVERSAMPLE >= min(out_f, in_f):
        return truncate_dense_exact(M, rank)
    fro2 = torch.linalg.vector_norm(M, dim=(-2, -1)).double().pow(2)  # one pass, no float64 copy of M
    B, A = _randomized(lambda X: M @ X, lambda Y: M.mT @ Y, in_f, fro2, k, M.dtype, M.device, M.shape[0])
    return _pad(B, A, rank)


def truncate_lowrank_sum(B: torch.Tensor, A: torch.Tensor, rank: int,
                         svd: str = "randomized") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of B @ A (B [C, out, K], A [C, K, in]) without forming it."""
    K = B.shape[-1]
    if rank >= K:
        return _pad(B, A, rank)
    out_f, in_f = B.shape[-2], A.shape[-1]
    k = min(rank, out_f, in_f)
    if svd == "exact" or k + OVERSAMPLE >= min(K, out_f, in_f):
        return truncate_lowrank_sum_exact(B, A, rank)
    # ‖BA‖² = tr(BᵀB·AAᵀ); float32 is enough for the stopping test it scales
    fro2 = ((B.mT @ B) * (A @ A.mT)).sum((-2, -1)).double()
    Bo, Ao = _randomized(lambda X: B @ (A @ X), lambda Y: A.mT @ (B.mT @ Y), in_f, fro2, k,
                         B.dtype, B.device, B.shape[0])
    return _pad(Bo, Ao, rank)


def _randomized(apply: Apply, apply_t: Apply, n: int, fro2: torch.Tensor, k: int, dtype: torch.dtype,
                device: torch.device, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subspace iteration for the top-k singular triplets of an operator M [C, m, n]
    given by ``apply`` (X ↦ M·X) and ``apply_t`` (Y ↦ Mᵀ·Y); ``fro2`` = ‖M‖²_F per module.
    The callers send only k + OVERSAMPLE < min(m, n) here (else the exact routine runs)."""
    b = k + OVERSAMPLE
    X = _start_block(n, b).to(device=device, dtype=dtype).expand(C, n, b)
    floor = fro2 * 1e-12
    previous = None
    for iteration in range(MAX_ITER):
        Y = apply(X)                                    # [C, m, b]; M ≈ Y·Xᵀ on span(X)
        Yd = Y.double()
        lam, V = torch.linalg.eigh(Yd.mT @ Yd)          # Ritz values σ², ascending
        captured = lam[..., -k:].sum(-1)
        residual = (fro2 - captured).clamp(min=0)
        if previous is not None and bool(((captured - previous) <= TOL * residual + floor).all()):
            break
        if bool((residual <= floor).all()) or iteration == MAX_ITER - 1:
            break
        previous = captured
        # orthonormalise after each product (Halko et al.): applying Mᵀ to Y itself would
        # square the condition number and lose the small directions of steep spectra
        Q = _orthonormal_from_eigh(Yd, lam, V).to(dtype)
        X = _orthonormal(apply_t(Q), dtype)
    lam_k, V_k = lam[..., -k:].flip(-1).clamp(min=0), V[..., -k:].flip(-1)
    quarter = lam_k.sqrt().sqrt()                       # √σ
    safe = torch.where(quarter > 0, quarter, torch.ones_like(quarter))
    B = (Yd @ V_k) / safe.unsqueeze(-2)                 # U·√σ  (Y·V_k = U·σ)
    A = ((X.double() @ V_k) * quarter.unsqueeze(-2)).mT  # √σ·Vᵀ
    return B.to(dtype), A.to(dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _start_block(n: int, b: int) -> torch.Tensor:
    """The seeded Gaussian start block [n, b], orthonormalised (float64, CPU; cached)."""
    g = torch.Generator().manual_seed(SEED)
    return _orthonormal(torch.randn(n, b, generator=g, dtype=torch.float64), torch.float64)


def _orthonormal_from_eigh(Y: torch.Tensor, lam: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Y·V·Λ^-½ (orthonormal columns spanning Y) from the eigendecomposition of YᵀY;
    numerically null directions (below 1e-12 of the largest eigenvalue) become zero columns."""
    keep = lam > lam[..., -1:].clamp(min=0) * 1e-12
    inv = torch.where(keep, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
    return Y @ (V * inv.unsqueeze(-2)).to(Y.dtype)


def _orthonormal(Z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An orthonormal basis of the columns of Z [C, n, b]: Cholesky QR in float64, a second
    pass where the first may have lost orthogonality (CholeskyQR2), Householder QR where
    the Gram matrix is numerically singular."""
    Q = Z.double()
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        if not bool((info == 0).all()):
            return torch.linalg.qr(Z.double())[0].to(dtype)
        Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT  # Z·L⁻ᵀ
        d = torch.diagonal(L, dim1=-2, dim2=-1)
        if bool((d.amax(-1) <= 1e3 * d.amin(-1)).all()):  # κ ≲ 1e3: one pass is orthogonal to ~1e-10
            break
    return Q.to(dtype)


def truncate_dense_exact(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of dense M [C, out, in] (float64 Gram eigendecomposition)."""
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


def truncate_lowrank_sum_exact(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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
