"""The whole flow on MoEfied variants of the tiny base (issue 25, MoEfication's acceptance).

For each new kind — "M" alone, "Q+M" (nf4 at load + MoE) and GPTQ + MoE: create (stored as a delta:
moe.safetensors over the base's shared blobs, a small fraction of the fp16 base; idempotent) →
load (routed MLPs) → convert with inherit + recover + distill, and with ``--recover lowrank`` →
pack → serve (an OpenAI-shaped completion with the converted adapter, the low-rank one and the pack).
The CLI refuses bad input in one line with exit 2 and registers nothing.
"""
from __future__ import annotations

import json
import math

import pytest
from variantflow import BASE, convert_pack_serve, train_source

CAL = dict(calib_samples=4, calib_seq_len=64)
KINDS = {
    "moe8k2": dict(moefy=True, experts=8, active=2),
    "nf4+moe8k4-sim": dict(quant="nf4", moefy=True, experts=8, active=4, moe_router="similarity"),
    "gptq4+moe4k1": dict(quant="gptq", bits=4, moefy=True, experts=4, active=1),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.bases import add_builtin_base

    reg = Registry(home=tmp_path_factory.mktemp("moe_flow_home"))
    add_builtin_base(reg, BASE)
    train_source(reg)
    yield reg
    reg.close()


@pytest.mark.parametrize("kind", list(KINDS))
def test_whole_flow_on_moefied_variants(world, kind):
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.variants.moefy import MOE_FILE, routings
    from adapterhub_c.workflows.variants import create_variant, list_variants, show_variant

    reg = world
    name = kind.replace("+", "-")
    row, created = create_variant(reg, "builtin:tiny-llama", name=name, eval_tokens=600, **KINDS[kind], **CAL)
    assert created and MOE_FILE in row.files
    again, created_again = create_variant(reg, "builtin:tiny-llama", eval_tokens=600, **KINDS[kind], **CAL)
    assert again.id == row.id and not created_again  # idempotent
    shown = show_variant(reg, row.name)
    assert shown["storage"] == "delta" and shown["shares_base_weights"]
    moe = shown["moe"]
    experts, active = KINDS[kind]["experts"], KINDS[kind]["active"]
    assert (moe["experts"], moe["active"]) == (experts, active) and moe["mlp_channels_computed"] == active / experts
    assert active / experts < moe["mlp_flops_fraction"] < 1 and set(moe["captured"]) == {"mlp", "similarity"}
    assert math.isfinite(shown["perplexity"]) and shown["base_perplexity"]
    if "gptq" not in kind:
        assert shown["stored_ratio"] < 0.1  # partition + routers: tiny beside the base
    assert row.name in {v["name"] for v in list_variants(reg)}
    model = load_variant(reg, row.name)
    assert len(routings(model)) == 2
    convert_pack_serve(reg, row.name)


@pytest.mark.parametrize("args, message", [
    (["--moefy", "--experts", "8", "--active", "2", "--calib", "none"], "MoEfication (moefy) needs calibration data"),
    (["--moefy", "--experts", "200", "--active", "2"],
     "200 experts exceed the 128 intermediate channels of model.layers.0.mlp"),
    (["--moefy", "--experts", "8", "--active", "9"], "active must be at most experts (8), got 9"),
    (["--moefy", "--experts", "8"], "moefy needs active"),
    (["--quant", "nf4", "--experts", "8"], "experts applies only to MoEfication"),
    (["--moefy", "--experts", "8", "--active", "2", "--moe-router", "hash"], "hash"),
])
def test_cli_bad_input_is_one_line_and_exit_2(cli, tiny_base, args, message):
    r = cli("variant", "create", "builtin:tiny-llama", *args, "--eval-tokens", "0", "--calib-samples", "2",
            "--calib-seq-len", "32")
    assert r.code == 2, (r.code, r.out, r.err)
    assert message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert json.loads(cli("variant", "ls", "--json").out) == []


def test_cli_creates_and_shows_a_moe_variant(cli, tiny_base):
    args = ["variant", "create", "builtin:tiny-llama", "--moefy", "--experts", "8", "--active", "2",
            "--eval-tokens", "0", "--calib-samples", "2", "--calib-seq-len", "32", "--json"]
    r = cli(*args)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["created"] and out["recipe"] == "moe 2/8 experts" and out["storage"] == "delta"
    assert out["recipe_json"]["experts"] == 8 and out["name"] == "tiny-llama-moe8k2"
    assert out["moe"]["mlp_channels_computed"] == 0.25
    assert json.loads(cli(*args).out)["created"] is False  # the same recipe is the same variant
    shown = json.loads(cli("variant", "show", "tiny-llama-moe8k2", "--json").out)
    assert shown["moe"]["experts"] == 8


def test_api_creates_a_moe_variant_with_options(tmp_path):
    import adapterhub_c as api
    from adapterhub_c.options.variant import VariantOptions

    reg = api.open_registry(home=tmp_path)
    api.add_base("builtin:tiny-llama", registry=reg)
    opts = VariantOptions(moefy=True, experts=4, active=2, calib_samples=2, calib_seq_len=32, eval_tokens=0)
    row = api.create_variant("builtin:tiny-llama", opts, registry=reg)
    assert row.created and row.name == "tiny-llama-moe4k2" and row.report["moe"]["active"] == 2
