"""The whole flow on GPTQ and SparseGPT variants of the tiny base (issue 25, acceptance 2).

For each new variant kind: create (stored as a delta: compressed.safetensors over the base's
shared blobs, a fraction of the fp16 base) → load (Ŵ as built) → convert with inherit + recover +
distill, and with ``--recover lowrank`` (zero data) → pack → serve (an OpenAI-shaped completion
with the converted adapter and with the pack on the variant).
"""
from __future__ import annotations

import json
import urllib.request

import pytest
import torch

TASK = "builtin:task/reverse-words"
FAST = dict(steps=2, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=200, max_eval_examples=2)
CAL = dict(calib_samples=4, calib_seq_len=64, eval_tokens=0)
KINDS = {
    "gptq4": dict(quant="gptq", bits=4),
    "gptq3-g32-act": dict(quant="gptq", bits=3, group_size=32, act_order=True),
    "sparsegpt50": dict(prune="sparsegpt", sparsity=0.5),
    "gptq4+sparsegpt50": dict(quant="gptq", prune="sparsegpt", sparsity=0.5),
    "nf4+sparsegpt2:4": dict(quant="nf4", prune="sparsegpt:2:4"),
}
TOKEN = "t0ken-25"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.training import train_adapter

    reg = Registry(home=tmp_path_factory.mktemp("gptq_flow_home"))
    add_builtin_base(reg, "builtin:tiny-llama")
    train_adapter(reg, "builtin:tiny-llama", TASK, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"],
                  name="src", baseline=False, **FAST)
    yield reg
    reg.close()


def _complete(server, model: str) -> str:
    body = json.dumps({"model": model, "prompt": "Reverse the words: a b\nAnswer:", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{server.base_url}/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    assert out["model"] == model and out["choices"][0]["text"] is not None
    return out["choices"][0]["text"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_whole_flow_on_the_new_variant_kinds(world, kind):
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.serve.server import BackgroundServer, ServeOptions
    from adapterhub_c.variants.packed import COMPRESSED_FILE
    from adapterhub_c.workflows.packs import pack_artifact
    from adapterhub_c.workflows.training import convert_adapter
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
    # convert: CA-LoRA (inherit + recover + distill) and the zero-data compensated LoRA
    conv, report = convert_adapter(reg, "src", row.name, data=TASK, recover_rank=2, name=f"conv-{row.name}",
                                   reference_rows=False, **FAST)
    assert report["recover"] and report["distill"] and report["inherit"]
    low, low_report = convert_adapter(reg, "src", row.name, recover="lowrank", recover_rank=2, calib_samples=2,
                                      calib_seq_len=32, name=f"low-{row.name}", reference_rows=False,
                                      max_eval_tokens=100, max_eval_examples=1)
    assert low_report["recover_method"] == "lowrank" and low.kind == "lora"
    pack_artifact(reg, conv.name, density=0.5, alpha=1.0, name=f"pack-{row.name}")
    with BackgroundServer(reg, row.name, ServeOptions(all=True, token=TOKEN)) as server:
        for model_name in (conv.name, low.name, f"pack-{row.name}"):
            _complete(server, model_name)


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
