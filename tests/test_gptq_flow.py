"""The whole flow on GPTQ and SparseGPT variants of the tiny base (issue 25, acceptance 2).

For each new variant kind: create (stored as a delta: compressed.safetensors over the base's
shared blobs, a fraction of the fp16 base) → load (Ŵ as built) → convert with inherit + recover +
distill, and with ``--recover lowrank`` (zero data) → pack → serve (an OpenAI-shaped completion
with the converted adapter and with the pack on the variant).
"""
from __future__ import annotations

import json

import pytest
import torch
from variantflow import BASE, convert_pack_serve, train_source

CAL = dict(calib_samples=4, calib_seq_len=64, eval_tokens=0)
KINDS = {
    "gptq4": dict(quant="gptq", bits=4),
    "gptq3-g32-act": dict(quant="gptq", bits=3, group_size=32, act_order=True),
    "sparsegpt50": dict(prune="sparsegpt", sparsity=0.5),
    "gptq4+sparsegpt50": dict(quant="gptq", prune="sparsegpt", sparsity=0.5),
    "nf4+sparsegpt2:4": dict(quant="nf4", prune="sparsegpt:2:4"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.bases import add_builtin_base

    reg = Registry(home=tmp_path_factory.mktemp("gptq_flow_home"))
    add_builtin_base(reg, BASE)
    train_source(reg)
    yield reg
    reg.close()


@pytest.mark.parametrize("kind", list(KINDS))
def test_whole_flow_on_the_new_variant_kinds(world, kind):
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.variants.packed import COMPRESSED_FILE
    from adapterhub_c.workflows.variants import create_variant, list_variants, show_variant

    reg = world
    row, created = create_variant(reg, "builtin:tiny-llama", name=kind.replace(":", "-").replace("+", "-"),
                                  **KINDS[kind], **CAL)
    assert created and COMPRESSED_FILE in row.files
    again, created_again = create_variant(reg, "builtin:tiny-llama", **KINDS[kind], **CAL)  # idempotent
    assert again.id == row.id and not created_again
    shown = show_variant(reg, row.name)
    assert shown["storage"] == "delta" and shown["shares_base_weights"]
    assert shown["stored_ratio"] < (0.5 if "gptq" in kind else 0.7)  # never a dense copy
    assert row.name in {v["name"] for v in list_variants(reg)}
    model = load_variant(reg, row.name)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.dtype.is_floating_point)
    convert_pack_serve(reg, row.name)  # CA-LoRA and the zero-data compensated LoRA, a pack, served


@pytest.mark.parametrize("args, message", [
    (["--quant", "gptq", "--bits", "5"], "gptq bits must be one of 2, 3, 4, 8, got 5"),
    (["--quant", "gptq", "--group-size", "48"], "group size 48 does not divide the 64 inputs of model.layers.0."),
    (["--quant", "gptq", "--calib", "none"], "gptq needs calibration data"),
    (["--prune", "sparsegpt", "--sparsity", "0.5", "--calib", "none"], "sparsegpt needs calibration data"),
    (["--quant", "nf4", "--bits", "4"], "bits applies only to gptq"),
])
def test_cli_bad_input_is_one_line_and_exit_2(cli, tiny_base, args, message):
    r = cli("variant", "create", "builtin:tiny-llama", *args, "--eval-tokens", "0", "--calib-samples", "2",
            "--calib-seq-len", "32")
    assert r.code == 2, (r.code, r.out, r.err)
    assert message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert json.loads(cli("variant", "ls", "--json").out) == []


def test_cli_creates_and_shows_a_gptq_variant(cli, tiny_base):
    args = ["variant", "create", "builtin:tiny-llama", "--quant", "gptq", "--bits", "3", "--group-size", "32",
            "--sym", "--eval-tokens", "0", "--calib-samples", "2", "--calib-seq-len", "32", "--json"]
    r = cli(*args)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["created"] and out["recipe"] == "gptq 3-bit g32 sym" and out["storage"] == "delta"
    assert out["recipe_json"]["bits"] == 3 and out["name"] == "tiny-llama-gptq3g32-sym"
    assert json.loads(cli(*args).out)["created"] is False  # the same recipe is the same variant
