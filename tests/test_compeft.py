"""ComPEFT sparsify + ternarize: exact top-k counts, values ±alpha·std, scopes, variants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.packing import compress_tensors, decode_tensors, kept_at_density, prune_tensors, topk_indices


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"b.lora_A.weight": torch.randn(8, 50, generator=g),
            "a.lora_B.weight": (0.01 * torch.randn(70, 8, generator=g)).to(torch.bfloat16),
            "c.bias": torch.randn(33, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("k", [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
def test_global_topk_count_exact_and_values(k):
    ts = _tensors()
    out = compress_tensors(ts, k, alpha=3.0)
    flat = torch.cat([ts[n].double().reshape(-1) for n in sorted(ts)])
    n = flat.numel()
    assert sum(t.nnz for t in out.values()) == int(np.floor(k * n + 0.5))
    scale = float(np.float32(3.0 * flat.std(unbiased=True).item()))
    dense = decode_tensors(out)
    for name, t in out.items():
        assert t.scale == scale and dense[name].dtype == ts[name].dtype and dense[name].shape == ts[name].shape
        vals = dense[name].double().reshape(-1)
        src = ts[name].double().reshape(-1)
        nz = vals != 0
        assert torch.equal(vals[nz].abs(), torch.full_like(vals[nz], float(torch.tensor(scale).to(ts[name].dtype))))
        assert torch.equal(torch.sign(vals[nz]), torch.sign(src[nz]))
    # the kept entries are the largest in magnitude
    kept = torch.cat([(dense[nm] != 0).reshape(-1) for nm in sorted(ts)])
    if 0 < kept.sum() < n:
        assert flat.abs()[kept].min() >= flat.abs()[~kept].max()


def test_tensor_scope_per_tensor_count_and_std():
    ts = _tensors(1)
    out = compress_tensors(ts, 0.2, alpha=2.0, scope="tensor")
    for name, t in out.items():
        src = ts[name].double()
        assert t.nnz == kept_at_density(src.numel(), density=0.2)
        assert t.scale == float(np.float32(2.0 * src.std().item()))


def test_ties_keep_exactly_k_lowest_index_first():
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, -1.0])
    out = compress_tensors({"x": x}, 0.5)  # round(3) = 3 of five tied |1| entries
    assert out["x"].indices.tolist() == [0, 1, 2]
    assert out["x"].negative.tolist() == [False, True, False]
    assert topk_indices(np.array([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]
    # global ties run over tensors in sorted-name order
    out = compress_tensors({"b": torch.ones(3), "a": torch.ones(3)}, 0.5)
    assert out["a"].nnz == 3 and out["b"].nnz == 0


def test_zeros_are_never_signed():
    out = compress_tensors({"x": torch.tensor([0.0, 0.0, 3.0, 0.0])}, 1.0)
    assert out["x"].indices.tolist() == [2]


def test_stc_scale_is_mean_abs_of_kept():
    ts = _tensors(2)
    out = compress_tensors(ts, 0.1, alpha=7.0, method="stc")
    flat = torch.cat([ts[n].double().reshape(-1) for n in sorted(ts)])
    top = flat.abs().sort(descending=True).values[: kept_at_density(flat.numel(), density=0.1)]
    assert all(t.scale == float(np.float32(top.mean().item())) for t in out.values())


def test_prune_only_keeps_original_values():
    ts = _tensors(3)
    pruned = prune_tensors(ts, 0.2)
    ternary = compress_tensors(ts, 0.2)
    for name in ts:
        mask = pruned[name] != 0
        assert pruned[name].dtype == ts[name].dtype
        assert torch.equal(pruned[name][mask], ts[name][mask])
        assert mask.reshape(-1).nonzero().reshape(-1).tolist() == ternary[name].indices.tolist()


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_density_outside_range_is_usage_error(bad):
    with pytest.raises(UsageError):
        compress_tensors(_tensors(), bad)


def test_other_bad_input():
    with pytest.raises(UsageError):
        compress_tensors(_tensors(), 0.1, scope="layer")
    with pytest.raises(UsageError):
        compress_tensors(_tensors(), 0.1, alpha=0)
    with pytest.raises(UsageError):
        compress_tensors({"i": torch.arange(4)}, 0.5)
    with pytest.raises(UsageError):
        compress_tensors({"x": torch.tensor([1.0, float("inf")])}, 0.5)


def _reference_kept(x: torch.Tensor, K: float) -> int:
    """How many entries the ComPEFT reference (``topk_values_mask``) keeps: |x| >= kthvalue(n - int(n·K))."""
    n = x.numel()
    kth = x.abs().reshape(1, -1).kthvalue(n - int(n * K), dim=1).values
    return int((x.abs() >= kth).sum())


@pytest.mark.parametrize("n,k", [(100, 0.1), (1000, 0.05), (37, 0.2), (50, 0.01)])
def test_kept_count_is_round_kn_not_the_references_int_kn_plus_one(n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    ours = compress_tensors({"t": x}, k, scope="tensor")["t"].nnz
    assert ours == kept_at_density(n, density=k) == int(k * n + 0.5)
    assert _reference_kept(x, k) == int(k * n) + 1  # distinct magnitudes: no ties
    tied = torch.ones(n)  # every magnitude tied: the reference keeps all, we keep round(k·n)
    assert compress_tensors({"t": tied}, k, scope="tensor")["t"].nnz == kept_at_density(n, density=k)
    assert _reference_kept(tied, k) == n


def test_kept_at_density_rounds_half_up_and_names_its_rate():
    assert kept_at_density(5, density=0.5) == 3
    assert kept_at_density(10, density=0.25) == 3  # 2.5
    assert kept_at_density(7, density=1.0) == 7
    with pytest.raises(TypeError):
        kept_at_density(0.2, 10)  # the rate is keyword-only: the old (density, n) order cannot slip through
