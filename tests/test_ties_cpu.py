"""The fused CPU TIES kernels (numba) against their torch twins in merging.rules."""
from __future__ import annotations

import pytest
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.ties_cpu import kth_largest_abs, ties_merge, trim_thresholds
from adapterhub_c.merging.rules import elect_and_merge, merge_dense, trim_magnitude


def _kth_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    n = x.shape[1]
    return torch.kthvalue(x.abs(), n - k + 1, dim=1).values


@pytest.mark.parametrize("n", [1, 2, 7, 35, 1000, 40_000, 333_333])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_abs_equals_kthvalue(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g, dtype=dtype)
    x[1, ::3] = 0.0                                   # zeros
    x[2] = torch.randint(-5, 6, (n,), generator=g).to(dtype)  # heavy ties
    for k in sorted({1, max(1, n // 10), max(1, n // 2), max(1, n - 1), n}):
        assert torch.equal(kth_largest_abs(x, k), _kth_ref(x, k)), (n, k)


def test_kth_largest_abs_is_exact_when_the_sample_misleads():
    """Every sampled position is tiny and the rest large: the bracket misses, the
    fallback (a full partition) still gives the exact value."""
    n = 200_000
    step = max(1, n // 16384)
    x = torch.rand(1, n, generator=torch.Generator().manual_seed(0)) + 10.0
    x[0, ::step] = torch.rand(len(range(0, n, step))) * 1e-3
    for k in (1, n // 3, n // 2, n - 5):
        assert torch.equal(kth_largest_abs(x, k), _kth_ref(x, k))


def test_trim_thresholds_keep_what_trim_magnitude_keeps():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(4, 96, 80, generator=g)
    tau[0, :10] = 0.0
    for density in (0.01, 0.2, 0.5, 0.93, 1.0):
        thr = trim_thresholds(tau, density)
        kept = torch.where((tau.abs() >= thr.view(-1, 1, 1)) & (tau != 0), tau, torch.zeros(()))
        assert torch.equal(kept, trim_magnitude(tau, density)), density
    assert torch.isinf(trim_thresholds(tau, 1e-6)).all()  # k = 0: nothing kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_merge_equals_the_torch_twin(majority, convention, dtype):
    g = torch.Generator().manual_seed(len(majority) * 10 + len(convention))
    n, rows, cols = 5, 64, 96
    tau = torch.randn(n, rows, cols, generator=g, dtype=dtype)
    tau[1, :5] = -tau[0, :5]          # exact cancellations: the vote is 0 and elects +
    tau[2, 10:20] = 0.0               # zeros neither vote nor agree
    weights = torch.tensor([0.9, -0.4, 1.3, 0.0, 0.6], dtype=dtype)  # negative and zero weights
    for density in (0.3, 0.5, 1.0):
        thr = trim_thresholds(tau, density)
        got = ties_merge(tau, thr, weights, majority, convention)
        want = merge_dense(tau, weights, "ties", density, majority, convention)
        assert got.dtype == dtype and got.shape == (rows, cols)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # threshold 0 keeps every non-zero entry: the DARE-TIES use
    got = ties_merge(tau, torch.zeros(n, dtype=dtype), weights, majority, convention)
    torch.testing.assert_close(got, elect_and_merge(tau, weights, majority, convention), rtol=1e-6, atol=1e-7)


def test_ties_merge_refuses_bad_arguments():
    tau = torch.randn(2, 4, 4)
    with pytest.raises(UsageError, match="one threshold"):
        ties_merge(tau, torch.zeros(3), torch.ones(2))
    with pytest.raises(UsageError, match="majority"):
        ties_merge(tau, torch.zeros(2), torch.ones(2), majority="vote")
    with pytest.raises(UsageError, match="float32"):
        ties_merge(tau.half(), torch.zeros(2), torch.ones(2))
    with pytest.raises(UsageError, match="k must be"):
        kth_largest_abs(tau.reshape(2, -1), 0)
