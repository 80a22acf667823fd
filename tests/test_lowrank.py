"""Re-factorising merged updates: the randomized routine against the Eckart–Young optimum."""
from __future__ import annotations

import pytest
import torch

from adapterhub_c.merging.lowrank import (
    truncate_dense,
    truncate_dense_exact,
    truncate_lowrank_sum,
    truncate_lowrank_sum_exact,
)
from adapterhub_c.merging.rules import merge_dense


def _ties_like(C: int, m: int, n: int, seed: int) -> torch.Tensor:
    """TIES merges of three random rank-8 updates: a slowly decaying tail, as real merges have."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1.5, 8)
    B = torch.randn(3, C, m, 8, generator=g) * decay
    A = torch.randn(3, C, 8, n, generator=g)
    return merge_dense(B @ A, torch.ones(3), "ties", 0.4, "total", "peft")


def _excess(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor, rank: int) -> torch.Tensor:
    """‖M − BA‖²_F / ‖M − M_r‖²_F − 1 per matrix (0 = the optimum)."""
    Md = M.double()
    s = torch.linalg.svdvals(Md)
    optimal = s[..., rank:].pow(2).sum(-1)
    got = (Md - B.double() @ A.double()).pow(2).sum((-2, -1))
    return got / optimal - 1


@pytest.mark.parametrize("shape", [(120, 200), (200, 120), (64, 300)])
def test_randomized_dense_truncation_is_within_tolerance_of_optimal(shape):
    M = _ties_like(3, *shape, seed=sum(shape))
    for rank in (4, 12):
        B, A = truncate_dense(M, rank)
        assert B.shape == (3, shape[0], rank) and A.shape == (3, rank, shape[1])
        excess = _excess(M, B, A, rank)
        assert (excess < 1e-4).all() and (excess > -1e-9).all(), excess
        Be, Ae = truncate_dense(M, rank, svd="exact")
        assert (_excess(M, Be, Ae, rank).abs() < 1e-8).all()
        # the split is balanced: B = U·√S, A = √S·Vᵀ
        torch.testing.assert_close(B.norm(dim=-2), A.norm(dim=-1), rtol=1e-4, atol=1e-6)


def test_randomized_truncation_is_deterministic_and_keeps_the_dtype():
    M = _ties_like(2, 100, 150, seed=3)
    a, b = truncate_dense(M, 6), truncate_dense(M.clone(), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    B, A = truncate_dense(M.double(), 6)
    assert B.dtype == A.dtype == torch.float64
    assert (_excess(M.double(), B, A, 6) < 1e-4).all()


def test_rank_deficient_and_zero_matrices():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(2, 90, 3, generator=g) @ torch.randn(2, 3, 110, generator=g)   # rank 3 < R
    M = torch.cat([low, torch.zeros(1, 90, 110)])
    B, A = truncate_dense(M, 8)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    torch.testing.assert_close(B @ A, M, rtol=1e-4, atol=1e-5)
    assert B[2].abs().max() == 0 and A[2].abs().max() == 0


def test_small_matrices_use_the_exact_routine():
    M = _ties_like(2, 20, 30, seed=5)          # rank + 16 covers the space: exact
    B, A = truncate_dense(M, 5)
    Be, Ae = truncate_dense_exact(M, 5)
    assert torch.equal(B, Be) and torch.equal(A, Ae)


def test_randomized_lowrank_sum_is_within_tolerance_of_optimal():
    g = torch.Generator().manual_seed(6)
    C, m, n, K = 3, 150, 170, 64
    decay = torch.logspace(0, -2, K)
    B = torch.randn(C, m, K, generator=g) * decay
    A = torch.randn(C, K, n, generator=g)
    B[:, :, 32:40] = B[:, :, :8]               # duplicated inputs: a rank-deficient stack
    A[:, 32:40] = A[:, :8]
    for rank in (4, 16):
        Bo, Ao = truncate_lowrank_sum(B, A, rank)
        assert (_excess(B @ A, Bo, Ao, rank) < 1e-4).all()
        Be, Ae = truncate_lowrank_sum_exact(B, A, rank)
        assert (_excess(B @ A, Be, Ae, rank).abs() < 1e-8).all()
    # rank at or above K: the factors themselves, padded
    Bp, Ap = truncate_lowrank_sum(B, A, K + 3)
    assert Bp.shape[-1] == K + 3 and torch.equal(Bp[..., :K], B) and torch.equal(Ap[..., :K, :], A)


@pytest.mark.parametrize("steep", [3.0, 8.0])
def test_randomized_truncation_on_steep_spectra(steep):
    """Singular values spanning 10^-steep: the iterated blocks are badly conditioned, their
    orthonormalisation must stay accurate (Cholesky QR twice, Householder where it fails)."""
    g = torch.Generator().manual_seed(int(steep))
    m, n = 160, 220
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -steep, m, dtype=torch.float64)
    M = ((U * s) @ V.mT).float()[None]
    for rank in (5, 20):
        B, A = truncate_dense(M, rank)
        assert (_excess(M, B, A, rank) < 1e-4).all()
