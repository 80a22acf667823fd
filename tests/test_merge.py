"""Merging LoRA adapters: every check is made on ΔW = scale·B·A, never on the factors."""
from __future__ import annotations

import math

import pytest
import torch

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.merging import make_spec, merge_adapters, merge_config_yaml, parse_merge_config
from adapterhub_c.merging.rules import module_seed

BASE = "builtin:tiny-llama"
TINY_SHAPES = {  # module -> (out, in) in the tiny Llama
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.1.self_attn.q_proj": (64, 64),
    "model.layers.1.mlp.down_proj": (64, 128),
}
SMALL_SHAPES = {"m.a.q_proj": (7, 5), "m.b.v_proj": (4, 6)}


def make_adapter(seed: int, r: int = 4, alpha: float = 8, shapes=SMALL_SHAPES, base=BASE,
                 ranks: dict | None = None, **config) -> LoraAdapter:
    """A random LoRA (B non-zero); ``ranks`` gives per-module ranks (recorded as rank_pattern)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in shapes.items():
        rm = (ranks or {}).get(module, r)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rm, in_f, generator=g)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_f, rm, generator=g) * 0.5
    cfg = dict(peft_type="LORA", r=r, lora_alpha=alpha, base_model_name_or_path=base,
               target_modules=sorted({m.rsplit(".", 1)[-1] for m in shapes}), task_type="CAUSAL_LM",
               rank_pattern={m.rsplit(".", 1)[-1]: v for m, v in (ranks or {}).items()})
    cfg.update(config)
    return LoraAdapter(cfg, tensors)


def scale_of(cfg: dict, module: str) -> float:
    """Written out here (not lora_scale) so the test does not trust the code under test."""
    short = module.rsplit(".", 1)[-1]
    r = cfg.get("rank_pattern", {}).get(short, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(short, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def true_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for key, A in adapter.tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            B = adapter.tensors[key.replace("lora_A", "lora_B")]
            out[module] = scale_of(adapter.config, module) * (B.double() @ A.double())
    return out


def merged_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """ΔW of a merged adapter as read back through its config (patterns included)."""
    return {m: layer.scale * (layer.B.double() @ layer.A.double()) for m, layer in adapter.layers().items()}


def assert_close(a, b, tol=1e-4):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# ---- task arithmetic ---------------------------------------------------------------

def test_task_arithmetic_exact_rank_equals_weighted_sum_of_true_deltas(tmp_path):
    ads = [make_adapter(1, r=4, alpha=8),
           make_adapter(2, r=2, alpha=3, use_rslora=True),
           make_adapter(3, r=6, alpha=4, ranks={"m.b.v_proj": 3}, alpha_pattern={"v_proj": 9})]
    weights = [0.7, -1.3, 0.4]
    res = merge_adapters(ads, "task-arithmetic", weights=weights)
    want = {m: sum(w * true_deltas(a)[m] for w, a in zip(weights, ads, strict=False)) for m in SMALL_SHAPES}
    layers = res.adapter.layers()
    assert layers["m.a.q_proj"].rank == 4 + 2 + 6 and layers["m.b.v_proj"].rank == 4 + 2 + 3
    for m, got in merged_deltas(res.adapter).items():
        assert_close(got, want[m])
    # the per-module scale survives a trip through a PEFT folder (rank/alpha patterns)
    back = LoraAdapter.from_folder(res.adapter.to_folder(tmp_path / "merged"))
    for m, got in merged_deltas(back).items():
        assert_close(got, want[m])


def test_task_arithmetic_truncated_rank_is_best_approximation():
    ads = [make_adapter(s, r=3, shapes=TINY_SHAPES) for s in range(4)]
    weights = [1.0, -0.5, 0.8, 0.3]
    full = {m: sum(w * true_deltas(a)[m] for w, a in zip(weights, ads, strict=False)) for m in TINY_SHAPES}
    R = 5
    res = merge_adapters(ads, weights=weights, rank=R)
    for m, got in merged_deltas(res.adapter).items():
        s = torch.linalg.svdvals(full[m])
        optimal = s[R:].pow(2).sum().sqrt()
        err = torch.linalg.matrix_norm(full[m] - got)
        assert res.adapter.layers()[m].rank == R
        assert err <= optimal * (1 + 1e-4) + 1e-6


def test_rank_above_exact_pads_and_keeps_delta():
    ads = [make_adapter(1, r=2), make_adapter(2, r=2)]
    res = merge_adapters(ads, rank=9)
    want = {m: true_deltas(ads[0])[m] + true_deltas(ads[1])[m] for m in SMALL_SHAPES}
    for m, layer in res.adapter.layers().items():
        assert layer.rank == 9
        assert_close(layer.scale * layer.B.double() @ layer.A.double(), want[m])


def test_modules_missing_in_some_inputs_count_as_zero():
    a = make_adapter(1)
    b = make_adapter(2, shapes={"m.a.q_proj": (7, 5)})
    res = merge_adapters([a, b], weights=[2.0, 1.0])
    got = merged_deltas(res.adapter)
    assert_close(got["m.b.v_proj"], 2.0 * true_deltas(a)["m.b.v_proj"])
    assert_close(got["m.a.q_proj"], 2.0 * true_deltas(a)["m.a.q_proj"] + true_deltas(b)["m.a.q_proj"])


# ---- plain PEFT agrees ----------------------------------------------------------------

def _peft_deltas(folder) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    base, _ = build_tiny_llama()
    model = PeftModel.from_pretrained(base, str(folder))
    out = {}
    for module in TINY_SHAPES:
        layer = model.base_model.model.get_submodule(module)
        out[module] = layer.get_delta_weight("default").double()
    return out


def test_merged_adapters_load_in_plain_peft_with_the_same_delta(tmp_path):
    ads = [make_adapter(1, r=4, alpha=16, shapes=TINY_SHAPES, use_rslora=True),
           make_adapter(2, r=8, alpha=8, shapes=TINY_SHAPES, ranks={"model.layers.0.self_attn.v_proj": 2})]
    for method, kw in [("task-arithmetic", {}), ("ties", {"density": 0.3})]:
        res = merge_adapters(ads, method, weights=[1.0, -0.6], **kw)
        want = merged_deltas(res.adapter)
        if method == "task-arithmetic":  # ranks differ per module, so patterns are written
            assert res.adapter.config["rank_pattern"]
        got = _peft_deltas(res.adapter.to_folder(tmp_path / method))
        for m in TINY_SHAPES:
            assert_close(got[m], want[m])


def test_delta_space_ties_matches_peft_ties_svd_and_factors_match_peft(tmp_path):
    """Our ``peft`` convention reproduces PEFT's own merges (ΔW compared)."""
    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    ads = [make_adapter(s, r=4, alpha=8, shapes=TINY_SHAPES) for s in (1, 2, 3)]
    weights = [1.0, -0.7, 0.5]
    base, _ = build_tiny_llama()
    model = None
    for i, a in enumerate(ads):
        folder = a.to_folder(tmp_path / f"in{i}")
        if model is None:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name="a0")
        else:
            model.load_adapter(str(folder), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(3)]
    cases = [
        ("p_ties_svd", dict(combination_type="ties_svd", density=0.4, svd_rank=64),
         dict(method="ties", density=0.4, rank=64)),
        ("p_ties_freq", dict(combination_type="ties_svd", density=0.4, svd_rank=64,
                             majority_sign_method="frequency"),
         dict(method="ties", density=0.4, rank=64, majority="frequency")),
        ("p_linear", dict(combination_type="linear"), dict(method="task-arithmetic", space="factors")),
        ("p_ties", dict(combination_type="ties", density=0.5),
         dict(method="ties", density=0.5, space="factors")),
    ]
    for name, peft_kw, our_kw in cases:
        model.add_weighted_adapter(names, weights, name, **peft_kw)
        ours = merged_deltas(merge_adapters(ads, weights=weights, **our_kw).adapter)
        for m in TINY_SHAPES:
            layer = model.base_model.model.get_submodule(m)
            if m.endswith("v_proj") and peft_kw.get("svd_rank"):
                continue  # 32×64: PEFT slices a full_matrices SVD; rank 64 > 32 pads differently
            assert_close(layer.get_delta_weight(name).double(), ours[m], tol=1e-4), (name, m)


# ---- TIES and DARE against a loop reference ----------------------------------------

def _ref_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    order = sorted(range(x.numel()), key=lambda j: -abs(x.flatten()[j].item()))
    out = torch.zeros_like(x).flatten()
    for j in order[:k]:
        out[j] = x.flatten()[j]
    return out.view_as(x)


def _ref_elect_merge(taus, weights, majority, convention):
    """Entry by entry, as the papers and the two libraries describe it."""
    shape = taus[0].shape
    out = torch.zeros(shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]):
        idx = tuple(idx.tolist())
        vals = [t[idx].item() for t in taus]
        voters = vals if convention == "peft" else [w * v for w, v in zip(weights, vals, strict=False)]
        if majority == "total":
            score = sum(voters)
        else:
            score = sum((v > 0) - (v < 0) for v in voters)
        elected = 1 if score >= 0 else -1
        agree = [i for i, v in enumerate(voters) if v != 0 and (v > 0) == (elected > 0)]
        num = sum(weights[i] * vals[i] for i in agree)
        if convention == "peft":
            den = max(len(agree), 1)
        else:
            den = sum(weights[i] for i in agree) or 1.0
        out[idx] = num / den
    return out


def _ref_dare(tau, module, seed, density, n_index, n, rescale="inverse-p"):
    """inverse-p: kept entries / density; l1: kept entries · ‖τ‖₁/‖kept‖₁ (mergekit's rule)."""
    g = torch.Generator().manual_seed(module_seed(seed, module))
    keep = torch.rand(n, *tau.shape, generator=g) < density
    out = tau.clone()
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in tau.shape]):
        idx = tuple(idx.tolist())
        out[idx] = tau[idx] / density if keep[(n_index,) + idx] else 0.0
    if rescale == "l1":
        kept = out * density
        out = kept * (tau.abs().sum() / kept.abs().sum())
    return out


@pytest.mark.parametrize("convention", ["peft", "mergekit"])
@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear"])
def test_ties_and_dare_match_loop_reference(method, majority, convention):
    if method == "dare-linear" and (majority, convention) != ("total", "peft"):
        pytest.skip("no sign election in dare-linear")
    ads = [make_adapter(s, r=3) for s in (11, 12, 13, 14)]
    weights = [0.9, -0.4, 1.3, 0.6]
    density, seed = 0.45, 7
    res = merge_adapters(ads, method, weights=weights, density=density, majority=majority,
                         convention=convention, seed=seed, rank=7)  # rank ≥ min(out, in): no truncation
    got = merged_deltas(res.adapter)
    for m in SMALL_SHAPES:
        taus = [true_deltas(a)[m] for a in ads]
        if method == "ties":
            taus = [_ref_trim(t, density) for t in taus]
        else:
            rescale = "l1" if convention == "mergekit" else "inverse-p"  # the default of each convention
            taus = [_ref_dare(t, m, seed, density, i, len(ads), rescale) for i, t in enumerate(taus)]
        if method == "dare-linear":
            want = sum(w * t for w, t in zip(weights, taus, strict=False))
        else:
            want = _ref_elect_merge(taus, weights, majority, convention)
        assert_close(got[m], want)


def test_conventions_agree_with_unit_weights_and_differ_otherwise():
    ads = [make_adapter(s) for s in (1, 2, 3)]
    kw = dict(density=0.5, rank=7)
    d = lambda **k: merged_deltas(merge_adapters(ads, "ties", **kw, **k).adapter)  # noqa: E731
    p, mk = d(convention="peft"), d(convention="mergekit")
    for m in SMALL_SHAPES:
        assert_close(p[m], mk[m])
    p, mk = d(convention="peft", weights=[0.5] * 3), d(convention="mergekit", weights=[0.5] * 3)
    for m in SMALL_SHAPES:  # a common λ scales the PEFT (paper) result and cancels in mergekit's
        assert_close(p[m], 0.5 * mk[m])


def test_dare_is_reproducible_with_a_seed():
    ads = [make_adapter(s) for s in (1, 2)]
    run = lambda seed: merged_deltas(merge_adapters(ads, "dare-linear", density=0.3, seed=seed).adapter)  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    for m in SMALL_SHAPES:
        assert torch.equal(a[m], b[m])
        assert not torch.allclose(a[m], c[m])
    # a module's mask does not depend on which other modules are merged
    only_q = [make_adapter(s, shapes={"m.a.q_proj": (7, 5)}) for s in (1, 2)]
    d = merged_deltas(merge_adapters(only_q, "dare-linear", density=0.3, seed=5).adapter)
    assert torch.equal(d["m.a.q_proj"], a["m.a.q_proj"])


@pytest.mark.parametrize("svd,tol", [("exact", 1e-9), ("randomized", 1e-4)])
def test_dense_truncation_error_is_eckart_young(svd, tol):
    ads = [make_adapter(s, r=4, shapes=TINY_SHAPES) for s in range(3)]
    full = merged_deltas(merge_adapters(ads, "ties", density=0.3, rank=128).adapter)
    R = 4
    cut = merge_adapters(ads, "ties", density=0.3, rank=R, svd=svd).adapter
    for m, got in merged_deltas(cut).items():
        s = torch.linalg.svdvals(full[m])
        optimal = s[R:].pow(2).sum().sqrt()
        assert torch.linalg.matrix_norm(full[m] - got) <= optimal * (1 + tol) + 1e-6
        layer = cut.layers()[m]
        # the split is balanced: B = U·√S and A = √S·Vᵀ have equal column/row norms
        assert torch.allclose(layer.B.norm(dim=0), layer.A.norm(dim=1), rtol=1e-3, atol=1e-5)


def test_default_rank_is_largest_input_rank_for_dense_methods():
    ads = [make_adapter(1, r=2), make_adapter(2, r=5)]
    res = merge_adapters(ads, "ties", density=0.5)
    assert {layer.rank for layer in res.adapter.layers().values()} == {5}


# ---- bad input ---------------------------------------------------------------------

def test_bad_inputs_raise_usage_error():
    a, b = make_adapter(1), make_adapter(2)
    with pytest.raises(UsageError, match="different bases.*'other/base'"):
        merge_adapters([a, make_adapter(2, base="other/base")], names=["x", "y"])
    with pytest.raises(UsageError, match="equal ranks"):
        merge_adapters([a, make_adapter(2, r=3)], space="factors")
    with pytest.raises(UsageError, match="weights"):
        merge_adapters([a, b], weights=[1.0])
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(UsageError, match="density"):
            merge_adapters([a, b], "ties", density=density)
    with pytest.raises(UsageError, match="needs a density"):
        merge_adapters([a, b], "dare-ties")
    with pytest.raises(UsageError, match="density applies"):
        merge_adapters([a, b], density=0.5)
    with pytest.raises(UsageError, match="unknown method"):
        merge_adapters([a, b], "slerp")
    with pytest.raises(UsageError, match="unknown majority"):
        merge_adapters([a, b], "ties", density=0.5, majority="vote")
    with pytest.raises(UsageError, match="rank"):
        merge_adapters([a, b], rank=0)
    with pytest.raises(UsageError, match="rank"):
        merge_adapters([a, b], space="factors", rank=8)
    with pytest.raises(UsageError, match="shape"):
        merge_adapters([a, make_adapter(2, shapes={"m.a.q_proj": (7, 9)})])
    biased = make_adapter(3)
    biased.tensors[f"{PREFIX}m.a.q_proj.lora_B.bias"] = torch.zeros(7)
    with pytest.raises(UsageError, match="bias"):
        merge_adapters([a, biased])
    with pytest.raises(UsageError, match="at least one"):
        merge_adapters([])


def test_pre_elected_signs_apply_to_factor_space_only():
    """``elections`` with space=delta is a UsageError (it once died with NameError: UsageError unimported)."""
    a, b = make_adapter(1), make_adapter(2)
    signs = {m: (torch.ones(4, in_f), torch.ones(out_f, 4)) for m, (out_f, in_f) in SMALL_SHAPES.items()}
    with pytest.raises(UsageError, match="space=factors only"):
        merge_adapters([a, b], "ties", density=0.5, space="delta", elections=signs)
    with pytest.raises(UsageError, match="space=factors only"):
        merge_adapters([a, b], density=None, elections={})
    merged = merge_adapters([a, b], "ties", density=0.5, space="factors", elections=signs)  # where they do apply
    assert set(merged.modules) == set(SMALL_SHAPES)


def test_merge_config_records_the_svd_routine():
    ads = [make_adapter(1, shapes=TINY_SHAPES), make_adapter(2, shapes=TINY_SHAPES)]
    res = merge_adapters(ads, "ties", density=0.5, rank=2)
    assert "svd: randomized" in res.config_yaml
    assert parse_merge_config(res.config_yaml)[0].svd == "randomized"
    # version-1 configs written before the option truncated exactly, and replay so
    old = "\n".join(line for line in res.config_yaml.splitlines() if not line.startswith("svd:"))
    spec, _ = parse_merge_config(old)
    assert spec.svd == "exact"
    again = merge_adapters(ads, spec.method, density=spec.density, rank=spec.rank, svd=spec.svd)
    exact = merge_adapters(ads, "ties", density=0.5, rank=2, svd="exact")
    for k, v in exact.adapter.tensors.items():
        assert torch.equal(again.adapter.tensors[k], v)
    factors = merge_adapters(ads, "ties", density=0.5, space="factors")
    assert "svd" not in factors.config_yaml and parse_merge_config(factors.config_yaml)[0] == factors.spec
    with pytest.raises(UsageError, match="svd routine"):
        merge_adapters(ads, "ties", density=0.5, svd="lanczos")


def test_merge_config_yaml_is_replayable():
    ads = [make_adapter(1), make_adapter(2)]
    res = merge_adapters(ads, "dare-ties", weights=[0.5, 1.5], density=0.4, seed=3, rank=3,
                         majority="frequency", convention="mergekit", names=["math", "code"],
                         digests=["sha256:aa", "sha256:bb"])
    spec, refs = parse_merge_config(res.config_yaml)
    assert spec == res.spec
    assert [(r.name, r.digest) for r in refs] == [("math", "sha256:aa"), ("code", "sha256:bb")]
    again = merge_adapters(ads, spec.method, weights=spec.weights, density=spec.density, seed=spec.seed,
                           rank=spec.rank, majority=spec.majority, convention=spec.convention)
    for m, d in merged_deltas(again.adapter).items():
        assert torch.equal(d, merged_deltas(res.adapter)[m])
    text = merge_config_yaml(make_spec(2), ["x", {"name": "y", "digest": "d"}])
    assert "task-arithmetic" in text and "density" not in text and "seed" not in text
