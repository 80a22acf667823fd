"""``--convention mergekit`` against mergekit 0.1.5's own results (issue 20, items 9 and 10).

mergekit is not a test dependency (it pins transformers, peft, datasets, …):
tests/fixtures/make_mergekit_fixtures.py ran its merge methods (``ties``, ``dare_ties``,
``dare_linear``) and its ``sparsify`` once on seeded tensors — random ones, ones full of
exact magnitude ties, tiny densities, an input whose L1 norm is below mergekit's eps and
an input with every entry dropped — and stored the results in
tests/fixtures/mergekit_0_1_5.safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.ties_cpu import drop_excess_ties, ties_merge, trim_thresholds
from adapterhub_c.kernels.topk import mergekit_topk_mask
from adapterhub_c.merging import make_spec, merge_adapters, merge_config_yaml, parse_merge_config
from adapterhub_c.merging.rules import dare, elect_and_merge, merge_dense, trim_magnitude

FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_0_1_5.safetensors"
MODULE, SEED = "model.layers.0.self_attn.q_proj", 7  # as in make_mergekit_fixtures.py
METHODS = {"ties": "ties", "dare_ties": "dare-ties", "dare_linear": "dare-linear"}


def _case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), "pt") as f:
        meta = json.loads(f.metadata()["cases"])[name]
        stored = f.keys()
        tensors = {k.split("/", 1)[1]: f.get_tensor(k) for k in stored if k.startswith(name + "/")}
    return meta, tensors


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-6)


def _adapters(tau: torch.Tensor) -> list[LoraAdapter]:
    """LoRAs whose ΔW is exactly τ_i: A = I, B = τ_i, scale alpha/r = 1."""
    cols = tau.shape[-1]
    cfg = {"peft_type": "LORA", "r": cols, "lora_alpha": cols, "target_modules": ["q_proj"],
           "task_type": "CAUSAL_LM", "base_model_name_or_path": "x"}
    return [LoraAdapter(dict(cfg), {f"{PREFIX}{MODULE}.lora_A.weight": torch.eye(cols),
                                    f"{PREFIX}{MODULE}.lora_B.weight": t.clone()}) for t in tau]


def _merged_delta(tau: torch.Tensor, method: str, density: float, weights, **kw) -> torch.Tensor:
    """ΔW of ``merge_adapters`` in delta space on CPU (the fused numba kernels for TIES)."""
    res = merge_adapters(_adapters(tau), method, weights=weights, density=density, convention="mergekit",
                         seed=SEED, rank=tau.shape[1], svd="exact", **kw)
    layer = res.adapter.layers()[MODULE]
    return layer.scale * (layer.B.double() @ layer.A.double())


# ---- TIES (item 10) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ties-random", "ties-tiny-density", "ties-high-density"])
def test_ties_equals_mergekit(name):
    meta, t = _case(name)
    tau, w, d = t["tau"], t["weights"], meta["density"]
    _close(trim_magnitude(tau, d, "mergekit"), t["trimmed"])
    _close(merge_dense(tau, w, "ties", d, "total", "mergekit"), t["merged"])
    _close(_merged_delta(tau, "ties", d, w.tolist()), t["merged"])


def test_ties_keeps_at_least_one_entry_under_mergekit_and_none_under_peft():
    meta, t = _case("ties-tiny-density")
    tau, d = t["tau"], meta["density"]
    assert int(d * tau[0].numel()) == 0
    assert ((t["trimmed"] != 0).sum((1, 2)) == 1).all()
    assert ((trim_magnitude(tau, d, "mergekit") != 0).sum((1, 2)) == 1).all()
    assert not trim_magnitude(tau, d, "peft").any()


@pytest.mark.parametrize("name", ["ties-tied", "ties-tied-large"])
def test_ties_at_a_magnitude_tie_keeps_the_entries_mergekit_keeps(name):
    meta, t = _case(name)
    tau, w, d = t["tau"], t["weights"], meta["density"]
    k = int(d * tau[0].numel())
    ours = trim_magnitude(tau, d, "mergekit")
    theirs = t["trimmed"]
    assert ((theirs != 0).sum((1, 2)) == k).all()
    thr = tau.abs().flatten(1).kthvalue(tau[0].numel() - k + 1).values
    assert ((tau.abs().flatten(1) >= thr[:, None]).sum(1) > k).all()  # the case has ties to cut at the threshold
    assert torch.equal(ours, theirs)  # the same entries, tied ones included (mergekit's argsort order)
    _close(elect_and_merge(ours, w, "total", "mergekit"), t["merged"])
    # the fused CPU path cuts the same ties, and gives mergekit's merge
    _close(_merged_delta(tau, "ties", d, w.tolist()), t["merged"])
    # the peft convention keeps every tied entry
    peft = trim_magnitude(tau, d, "peft")
    assert ((peft != 0).sum((1, 2)) > k).all()


def test_drop_excess_ties_cuts_the_kernel_trim_to_k():
    tau = torch.tensor([[[2.0, 1.0, 1.0, 1.0, 0.5, 1.0]], [[3.0, 2.0, 1.0, 0.0, 0.0, 0.0]]])
    thr = trim_thresholds(tau, 0.5, "mergekit")  # k = 3
    assert thr.tolist() == [1.0, 1.0]
    cut = drop_excess_ties(tau, thr, 0.5)
    assert (cut[0] != 0).sum() == 3 and cut[0, 0, 0] == 2.0 and cut[0, 0, 4] == 0  # k = 3: the 2 and two tied 1s
    assert torch.equal(cut[0] != 0, mergekit_topk_mask(tau[0], 3)) and torch.equal(cut[1], tau[1])
    no_ties = tau[1:]
    assert drop_excess_ties(no_ties, thr[1:], 0.5) is no_ties  # nothing to cut: no copy
    assert trim_thresholds(tau, 0.01, "mergekit").tolist() == [2.0, 3.0]  # k = max(1, 0)
    assert torch.isinf(trim_thresholds(tau, 0.01, "peft")).all()
    w = torch.tensor([1.0, 0.5])
    _close(ties_merge(cut, thr, w, "total", "mergekit"),
           elect_and_merge(trim_magnitude(tau, 0.5, "mergekit"), w, "total", "mergekit"))


# ---- DARE (item 9) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dare-ties", "dare-ties-small-norm", "dare-ties-tiny-density", "dare-linear"])
def test_dare_l1_rescale_equals_mergekit(name):
    meta, t = _case(name)
    tau, w, d, keep = t["tau"], t["weights"], meta["density"], t["mask"]
    _close(dare(tau, keep, d, "l1"), t["trimmed"])
    method = METHODS[meta["method"]]
    _close(merge_dense(tau, w, method, d, "total", "mergekit", keep=keep, rescale="l1"), t["merged"])


@pytest.mark.parametrize("name", ["dare-ties", "dare-linear"])
def test_dare_merge_adapters_under_mergekit_equals_mergekit(name):
    meta, t = _case(name)  # the fixture's masks are our own draws for MODULE and SEED
    got = _merged_delta(t["tau"], METHODS[meta["method"]], meta["density"], t["weights"].tolist())
    _close(got, t["merged"])
    old = _merged_delta(t["tau"], METHODS[meta["method"]], meta["density"], t["weights"].tolist(),
                        rescale="inverse-p")
    assert (old - t["merged"].double()).abs().max() > 1e-3  # 1/p is another rule, kept as a choice


def test_rescale_is_chosen_recorded_and_replayed():
    assert make_spec(2, "dare-ties", density=0.3, convention="mergekit").rescale == "l1"
    assert make_spec(2, "dare-linear", density=0.3).rescale == "inverse-p"
    spec = make_spec(2, "dare-ties", density=0.3, convention="mergekit", rescale="inverse-p")
    assert spec.rescale == "inverse-p"
    assert make_spec(2, "ties", density=0.3).rescale is None
    with pytest.raises(UsageError, match="rescale applies"):
        make_spec(2, "ties", density=0.3, rescale="l1")
    with pytest.raises(UsageError, match="rescale"):
        make_spec(2, "dare-ties", density=0.3, rescale="l2")
    text = merge_config_yaml(spec, ["a", "b"])
    assert "rescale: inverse-p" in text and parse_merge_config(text)[0] == spec
    l1 = make_spec(2, "dare-linear", density=0.3, convention="mergekit")
    assert parse_merge_config(merge_config_yaml(l1, ["a", "b"]))[0].rescale == "l1"
    # configs written before the option rescaled DARE by 1/p, whatever the convention
    legacy = text.replace("rescale: inverse-p\n", "")
    assert "rescale" not in legacy and parse_merge_config(legacy)[0].rescale == "inverse-p"
    assert "rescale" not in merge_config_yaml(make_spec(2, "ties", density=0.3), ["a", "b"])
