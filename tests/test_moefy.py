"""MoEfication (issue 25): balanced clustering, routers, the routed MLP, storage round trip, perplexity.

The correctness checks: the balanced clustering on hand-made points (equal sizes, each neuron in
exactly one expert, the obvious groups found); the routed forward with every expert active equals
the dense model bit for bit on every architecture the tiny models cover; with K < E it differs,
and on a trained tiny model its perplexity is finite and no better than the dense one.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models import arch
from adapterhub_c.models.tiny import TINY_ARCHS, build_tiny
from adapterhub_c.variants.build import apply_recipe, check_delta, load_variant_model
from adapterhub_c.variants.moefy import (
    MOE_FILE,
    MoeRouting,
    attach_moe,
    balanced_assign,
    balanced_kmeans,
    detach_moe,
    expert_sizes,
    load_moe,
    moe_to_bytes,
    moefy_model,
    routings,
)
from adapterhub_c.variants.recipe import Recipe

CALIB = "builtin:pydoc"


def _calib(tok, samples=4, seq_len=32):
    from adapterhub_c.variants.calibration import calibration_rows

    return calibration_rows(tok, CALIB, samples, seq_len)


def _ids(tok, n=2, length=24):
    return torch.stack(_calib(tok, n, length))


# ---- balanced clustering -----------------------------------------------------------------------


def test_balanced_kmeans_finds_the_hand_made_groups():
    # 12 neurons in 4 obvious directions (3 each, slightly perturbed), shuffled
    dirs = torch.eye(4)
    g = torch.Generator().manual_seed(1)
    X = torch.cat([dirs[i].repeat(3, 1) + 0.05 * torch.randn(3, 4, generator=g) for i in range(4)])
    perm = torch.randperm(12, generator=g)
    labels = balanced_kmeans(X[perm], 4)
    truth = (torch.arange(12) // 3)[perm]
    assert sorted(torch.bincount(labels).tolist()) == [3, 3, 3, 3]  # equal sizes, every neuron once
    assert labels.numel() == 12 and labels.min() >= 0 and labels.max() == 3
    groups = {frozenset(torch.nonzero(labels == e).flatten().tolist()) for e in range(4)}
    assert groups == {frozenset(torch.nonzero(truth == t).flatten().tolist()) for t in range(4)}


def test_balanced_kmeans_balances_what_plain_kmeans_would_not():
    # 5 neurons point one way, 1 the other: plain k-means makes clusters of 5 and 1
    X = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.97, 0.2], [0.96, -0.2], [0.0, 1.0]])
    labels = balanced_kmeans(X, 2)
    assert torch.bincount(labels).tolist() == [3, 3]
    assert labels[5] == labels[3] or labels[5] == labels[4]  # the odd one joined the farthest of the five
    # greedy balanced assignment on a hand-made similarity
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.9]])
    assert balanced_assign(sim, [2, 2]).tolist() == [0, 0, 1, 1]


def test_expert_sizes_spread_the_remainder_and_refuse_too_many_experts():
    assert expert_sizes(128, 8) == [16] * 8
    assert expert_sizes(10, 4) == [3, 3, 2, 2]
    labels = balanced_kmeans(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), 4)
    assert sorted(torch.bincount(labels).tolist()) == [2, 2, 3, 3]
    with pytest.raises(UsageError, match="5 experts cannot split 4 MLP channels"):
        expert_sizes(4, 5)


# ---- the routed MLP ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def moefied(request):
    model, tok = build_tiny(request.param)
    build = moefy_model(model, 8, 2, "mlp", _calib(tok, 4, 32))
    return model, tok, build


def test_all_experts_active_is_the_dense_model_and_fewer_is_not(moefied):
    model, tok, build = moefied
    ids = _ids(tok)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        attach_moe(model, build.routers, 8)
        full = model(input_ids=ids).logits
        attach_moe(model, build.routers, 2)  # re-attaching replaces the routing
        routed = model(input_ids=ids).logits
        assert len(routings(model)) == len(arch.describe(model).blocks)
        detach_moe(model)
        again = model(input_ids=ids).logits
    assert torch.equal(full, dense) and torch.equal(again, dense)
    assert torch.isfinite(routed).all() and not torch.allclose(routed, dense)


def test_routed_mlp_zeroes_exactly_the_unchosen_experts_channels(moefied):
    model, tok, build = moefied
    mlp = arch.describe(model).blocks[0].mlp
    seen = {}
    out = getattr(mlp.module, mlp.output)
    handle = out.register_forward_hook(lambda m, args, o: seen.update(h=args[0].detach()))
    try:
        attach_moe(model, build.routers, 2)
        with torch.no_grad():
            model(input_ids=_ids(tok, 1, 16))
    finally:
        handle.remove()
        detach_moe(model)
    h = seen["h"].reshape(-1, mlp.intermediate)
    labels = build.routers[mlp.name].labels
    live = torch.stack([(h[:, labels == e] != 0).any(1) for e in range(8)], dim=1)  # [tokens, experts]
    assert (live.sum(1) <= 2).all() and (live.sum(1) >= 1).all()
    assert build.stats["mlp_channels_computed"] == 0.25 and 0.25 < build.stats["mlp_flops_fraction"] < 0.3


def test_peft_lora_on_the_mlp_linears_sees_the_routed_channels_and_trains():
    from peft import LoraConfig, get_peft_model

    model, tok = build_tiny("llama")
    build = moefy_model(model, 8, 2, "mlp", _calib(tok, 4, 32))
    attach_moe(model, build.routers, 2)
    ids = _ids(tok)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, routed, atol=1e-6)  # lora_B = 0
    mlp = arch.describe(peft).blocks[0].mlp
    down = mlp.module.down_proj
    assert type(down).__name__ == "Linear" and hasattr(down, "base_layer")  # PEFT's layer
    routing = routings(peft)["base_model.model.model.layers.0.mlp"]
    assert down._forward_pre_hooks and not down.base_layer._forward_pre_hooks  # the hook moved outward
    assert routing.__dict__["_hosts"]["down_proj"] is down
    # the mask sits before LoRA's branch too: a LoRA on down_proj reads only chosen channels
    seen = {}
    down.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    with torch.no_grad():
        peft(input_ids=ids)
    labels = routing.labels
    x = seen["x"].reshape(-1, labels.numel())
    assert ((x != 0).float() @ torch.nn.functional.one_hot(labels, 8).float() > 0).sum(1).max() <= 2
    # training: gradients reach the LoRA weights, not the router (buffers, no parameters)
    assert not list(routing.parameters())
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft.named_parameters() if p.requires_grad)
    assert {n for n, p in peft.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)


def test_deepcopy_keeps_working_routing():
    model, tok = build_tiny("gpt2")
    build = moefy_model(model, 4, 1, "similarity", _calib(tok, 4, 32))
    attach_moe(model, build.routers, 1)
    twin = copy.deepcopy(model)
    ids = _ids(tok)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(a, b)
    assert all(isinstance(r, MoeRouting) for r in routings(twin).values())
    assert next(iter(routings(twin).values())) is not next(iter(routings(model).values()))


def test_server_wrappers_keep_the_routing():
    from adapterhub_c.serve.layers import Router, wrap_linears

    model, tok = build_tiny("llama")
    build = moefy_model(model, 8, 2, "mlp", _calib(tok, 4, 32))
    attach_moe(model, build.routers, 2)
    ids = _ids(tok)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        wrap_linears(model, Router())
        assert torch.equal(model(input_ids=ids).logits, routed)  # no adapter: the same numbers


# ---- recipe, store, load ----------------------------------------------------------------------


def test_recipe_fields_only_in_moefy_recipes():
    old = Recipe(quant="nf4")
    assert "moefy" not in old.canonical_json() and "experts" not in old.to_dict()
    r = Recipe(moefy=True, experts=8, active=2, calib=CALIB)
    assert r.moe_router == "mlp" and r.stores_weights and r.describe() == "moe 2/8 experts"
    assert Recipe.from_json(r.canonical_json()) == r and Recipe.from_json(r.canonical_json()).digest() == r.digest()
    assert Recipe(moefy=True, experts=8, active=2, calib=CALIB, moe_router="SIMILARITY").describe() == \
        "moe 2/8 experts (similarity)"
    q = Recipe(quant="nf4", moefy=True, experts=8, active=2, calib=CALIB)
    assert q.describe() == "nf4, moe 2/8 experts" and q.digest() != r.digest()


@pytest.mark.parametrize("kwargs, message", [
    (dict(moefy=True, experts=8, active=2), "needs calibration data"),
    (dict(moefy=True, experts=8, calib=CALIB), "moefy needs active"),
    (dict(moefy=True, active=2, calib=CALIB), "moefy needs experts"),
    (dict(moefy=True, experts=8, active=9, calib=CALIB), "active must be at most experts (8), got 9"),
    (dict(moefy=True, experts=1, active=1, calib=CALIB), "experts must be between 2 and 32767"),
    (dict(moefy=True, experts=8, active=0, calib=CALIB), "active must be a positive integer"),
    (dict(moefy=True, experts=8, active=2, calib=CALIB, moe_router="hash"), "unknown moe_router"),
    (dict(quant="nf4", experts=8), "experts applies only to MoEfication"),
])
def test_recipe_refuses(kwargs, message):
    with pytest.raises(UsageError) as info:
        Recipe(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("model_type, recipe", [
    ("llama", dict(moefy=True, experts=8, active=2)),
    ("phi3", dict(moefy=True, experts=6, active=3, moe_router="similarity")),  # 128 = 6·21 + 2
    ("gpt2", dict(quant="gptq", bits=4, moefy=True, experts=4, active=1)),
    ("llama", dict(prune="ffn-channels", sparsity=0.25, moefy=True, experts=4, active=2)),
])
def test_store_and_load_round_trip(tmp_path, model_type, recipe):
    model, tok = build_tiny(model_type)
    model.save_pretrained(tmp_path / "v" / "base")
    r = Recipe(calib=CALIB, **recipe)
    build = apply_recipe(model, r, _calib(tok, 4, 32))
    assert build.moe is not None and build.stats.moe["experts"] == r.experts
    check_delta(build, tmp_path / "v" / "base")  # MoEfication changes no weight
    build.save_delta(tmp_path / "v")
    routers, meta = load_moe(tmp_path / "v" / MOE_FILE)
    assert set(routers) == set(build.moe.routers) and meta["active"] == str(r.active)
    for name, w in routers.items():
        assert torch.equal(w.labels, build.moe.routers[name].labels)
        assert (w.mix is None) == (r.moe_router == "similarity")
    ids = _ids(tok)
    loaded = load_variant_model(tmp_path / "v")
    in_memory = load_variant_model(build)
    assert set(routings(loaded)) == set(build.moe.routers)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)


def test_experts_beyond_the_mlp_width_and_corrupt_files_are_refused(tmp_path):
    model, tok = build_tiny("llama")
    with pytest.raises(UsageError, match="200 experts exceed the 128 intermediate channels of model.layers.0.mlp"):
        apply_recipe(model, Recipe(moefy=True, experts=200, active=2, calib=CALIB), _calib(tok, 2, 16))
    build = moefy_model(model, 8, 2, "mlp", _calib(tok, 2, 16))
    (tmp_path / MOE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(IntegrityError, match="unreadable"):
        load_moe(tmp_path / MOE_FILE)
    (tmp_path / MOE_FILE).write_bytes(moe_to_bytes(build))
    other, _ = build_tiny("gpt2")
    with pytest.raises(IntegrityError, match="do not match the model's MLPs"):
        attach_moe(other, load_moe(tmp_path / MOE_FILE)[0], 2)


# ---- perplexity -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny Llama trained 200 steps on builtin:pydoc train (seeded): a random model's perplexity is
    the vocabulary size whatever its MLPs compute."""
    from variantflow import trained_tiny_llama

    return trained_tiny_llama(200)


def test_perplexity_routed_is_finite_and_no_better_than_dense(trained_tiny):
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import perplexity

    base, tok = trained_tiny
    texts = load_dataset(CALIB, "test").as_texts()

    def ppl(m):
        return perplexity(m, tok, texts, max_length=128, stride=128, max_tokens=4096)["perplexity"]

    dense = ppl(base)
    model = copy.deepcopy(base)
    results = {}
    for router in ("mlp", "similarity"):
        build = moefy_model(model, 8, 2, router, _calib(tok, 16, 128))
        for k in (8, 4, 2):
            attach_moe(model, build.routers, k)
            results[(router, k)] = ppl(model)
        results[(router, "captured")] = build.stats["captured"][router]
        detach_moe(model)
    print("dense", dense, results)
    for router in ("mlp", "similarity"):
        assert results[(router, 8)] == dense
        assert math.isfinite(results[(router, 2)]) and results[(router, 2)] >= dense
        assert results[(router, 4)] >= dense
    # the trained router keeps more of the activation mass than the nearest centroid, and it shows
    assert results[("mlp", "captured")] > results[("similarity", "captured")]
    assert results[("mlp", 2)] <= results[("similarity", 2)]
