"""The whole flow from the CLI on six tiny architectures (issue 16, acceptance 1).

For each of llama, qwen2, gemma2, phi3, gpt2 (Conv1D, fan_in_fan_out), gpt_neox (fused
query_key_value): a tiny random model is published to the local Hub and added with
``adapt base add``, then train → variant (nf4 + wanda 50%, 2:4, ffn-channels) → convert
(inherit onto nf4+wanda; inherit + recover + distill onto ffn-channels) → pack → unpack →
merge (TIES) → push → pull. Every LoRA result is loaded in plain PEFT and its ΔW compared
with PEFT's own ``get_delta_weight`` to 1e-6 relative (transposed for Conv1D).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adapterhub_c.hub.client import push_folder

sys.path.insert(0, str(Path(__file__).parent))

SIX = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox")
EVAL = ("--max-eval-examples", "1", "--max-eval-tokens", "32")
DATA = "builtin:task/uppercase"


def publish_tiny_base(hub, model_type: str, folder: Path, repo: str) -> str:
    """Save the tiny ``model_type`` model (+ tokenizer) to ``folder`` and push it as ``repo``."""
    from adapterhub_c.models.tiny import build_tiny

    model, tokenizer = build_tiny(model_type)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    push_folder(folder, repo, token=hub.token, endpoint=hub.endpoint)
    return repo


def ok(r, *keys):
    assert r.code == 0, (r.code, r.out, r.err[-3000:])
    return r.json()


def peft_delta_check(peft_model, adapter, rel: float = 1e-6) -> int:
    """Every LoRA layer's ΔW: ours (scale·B·A, transposed for Conv1D) vs PEFT's get_delta_weight."""
    from peft.tuners.lora import LoraLayer

    from adapterhub_c.models.arch import fan_in_fan_out

    ours = adapter.layers()
    n = 0
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        bare = name.removeprefix("base_model.model.")
        delta = ours[bare].delta(torch.float64)
        if fan_in_fan_out(mod.get_base_layer()):
            delta = delta.T
        theirs = mod.get_delta_weight("default").double()
        assert theirs.shape == delta.shape, bare
        err = (theirs - delta).norm() / theirs.norm().clamp_min(1e-30)
        assert err <= rel, (bare, float(err))
        n += 1
    assert n == len(ours) and n > 0
    return n


def peft_on(model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder)).eval()


@pytest.mark.parametrize("model_type", SIX)
def test_whole_flow_from_the_cli(model_type, cli, reg, hf, tmp_path):
    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.stack import load_stack, resolve_stack
    from adapterhub_c.runtime.variants import load_variant

    base = publish_tiny_base(hf, model_type, tmp_path / "model", f"alice/tiny-{model_type}")
    r = cli("base", "add", base)
    assert r.code == 0, r.err
    # train: default targets are the attention linears of this architecture
    trained = ok(cli("train", base, "--data", DATA, "--steps", "2", "--batch-size", "2", "--seq-len", "48",
                     "--name", "lora", *EVAL, "--json"))
    assert trained["artifact"] == "lora"
    # three variants
    variants = {"q": ["--quant", "nf4", "--prune", "wanda", "--sparsity", "0.5", "--calib", "builtin:pydoc",
                      "--calib-samples", "2", "--calib-seq-len", "32"],
                "s24": ["--prune", "2:4"], "ffn": ["--prune", "ffn-channels", "--sparsity", "0.25"]}
    for name, args in variants.items():
        ok(cli("variant", "create", base, *args, "--eval-tokens", "0", "--name", name, "--json"))
        # stored as what differs from the base (masks / kept channels), on every architecture
        assert ok(cli("variant", "show", name, "--json"))["storage"] == "delta", name
    # convert: inheritance only onto nf4 + wanda, the full CA-LoRA onto ffn-channels
    ok(cli("convert", "lora", "--variant", "q", "--name", "conv-q", *EVAL, "--json"))
    conv = ok(cli("convert", "lora", "--variant", "ffn", "--data", DATA, "--steps", "1", "--batch-size", "2",
                  "--seq-len", "48", "--recover-rank", "4", "--name", "conv-ffn", *EVAL, "--json"))
    assert conv["recover"] and conv["distill"]
    # pack → unpack, merge (TIES) the trained LoRA with the pack of its conversion
    ok(cli("pack", "create", "conv-q", "--density", "0.5", "--name", "pack-q", "--json"))
    unpacked = tmp_path / "unpacked"
    ok(cli("unpack", "pack-q", "--out", str(unpacked), "--json"))
    ok(cli("pack", "create", "conv-ffn", "--density", "0.5", "--name", "pack-ffn", "--json"))
    ok(cli("merge", "lora", "pack-q", "--method", "ties", "--density", "0.5", "--name", "merged",
           "--device", "cpu", "--json"))
    # push → pull
    ok(cli("push", "merged", f"alice/merged-{model_type}", "--token", hf.token, "--json"))
    ok(cli("pull", f"alice/merged-{model_type}", "--name", "back", "--json"))

    row = lambda n: reg.get(n, "artifact")  # noqa: E731
    base_row = reg.get(base, "base")
    for name in ("lora", "conv-q", "merged", "back"):
        folder = reg.materialize(row(name))
        model, _ = load_base_model(reg, base_row)
        peft_delta_check(peft_on(model, folder), LoraAdapter.from_folder(folder))
    assert (reg.materialize(row("back")) / "adapter_model.safetensors").read_bytes() == \
        (reg.materialize(row("merged")) / "adapter_model.safetensors").read_bytes()
    # the unpacked pack and the converted LoRA part on the ffn variant: PEFT holds them too
    model, _ = load_base_model(reg, base_row)
    peft_delta_check(peft_on(model, unpacked), LoraAdapter.from_folder(unpacked))
    folder = reg.materialize(row("conv-ffn"))
    peft_delta_check(peft_on(load_variant(reg, "ffn"), folder), LoraAdapter.from_folder(folder))
    assert (folder / "recovery.safetensors").is_file()
    # our loader and plain PEFT agree on the pulled adapter
    ids = torch.tensor([[1, 5, 9, 12, 40, 77]])
    ours, _ = load_stack(reg, resolve_stack(reg, "back"))
    model, _ = load_base_model(reg, base_row)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_on(model, reg.materialize(row("back")))(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    # eval on every variant with the converted adapters, and a pack holding recovery, from the CLI
    for args in (("conv-q",), ("conv-ffn",), ("pack-ffn",), ("lora", "--variant", "s24")):
        ok(cli("eval", *args, "--data", DATA, "--max-examples", "1", "--max-tokens", "32", "--json"))
