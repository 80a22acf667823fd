"""LoRA flavours found on the Hub (issue 16): one folder of each pulled from the local Hub.

modules_to_save, embedding LoRA, lora_bias, keys with ``.default.`` or without
``base_model.model.``, ``base_model_name_or_path`` null or naming a ``-bnb-4bit`` copy
(``--base``), shapes matching another base (nearest base named), Kohya files (refused).
Eval through our loader equals the PEFT model the folder was saved from, to 1e-5.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_c.hub.client import push_folder
from adapterhub_c.models.tiny import build_tiny

sys.path.insert(0, str(Path(__file__).parent))

TINY = "builtin:tiny-llama"
IDS = torch.tensor([[1, 5, 9, 12, 40, 77, 3, 200]])
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


_n = iter(range(10**6))


def publish(hub, folder: Path, stem: str) -> str:
    repo = f"alice/{stem}-{next(_n)}"
    push_folder(folder, repo, token=hub.token, endpoint=hub.endpoint)
    return repo


def flavour(folder: Path, seed: int = 0, model_type: str = "llama", base: str | None = TINY, **lora):
    """Save a PEFT LoRA of the tiny model with these LoraConfig options; returns (peft model, folder)."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:  # a retrained head: not the base's
                with torch.no_grad():
                    p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["base_model_name_or_path"] = base
    (folder / CONFIG).write_text(json.dumps(cfg))
    return peft_model.eval(), folder


def ok(r):
    assert r.code == 0, (r.code, r.out, r.err[-3000:])
    return r.json()


def one_line_error(r, *needles):
    assert r.code == 2, (r.code, r.out, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def same_logits(reg, name: str, peft_model) -> None:
    from peft import PeftModel

    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.stack import load_stack, resolve_stack

    ours, _ = load_stack(reg, resolve_stack(reg, name))
    base, _ = load_base_model(reg, reg.get(TINY, "base"))
    stored = PeftModel.from_pretrained(base, str(reg.materialize(reg.get(name, "artifact")))).eval()
    with torch.no_grad():
        want = peft_model(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored(IDS).logits, want, rtol=1e-5, atol=1e-5)


LLAMA_QV = ["q_proj", "v_proj"]
FLAVOURS = {
    "modules_to_save": dict(target_modules=LLAMA_QV, modules_to_save=["lm_head"]),
    "embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "lora_bias": dict(target_modules=LLAMA_QV, lora_bias=True),
}


@pytest.mark.parametrize("kind", sorted(FLAVOURS))
def test_pull_flavour_and_eval_equals_peft(kind, cli, reg, tiny_base, hf, tmp_path):
    peft_model, folder = flavour(tmp_path / kind, **FLAVOURS[kind])
    ok(cli("pull", publish(hf, folder, kind), "--name", kind, "--json"))
    same_logits(reg, kind, peft_model)
    ok(cli("eval", kind, "--data", "builtin:task/uppercase", "--max-examples", "1", "--json"))


@pytest.mark.parametrize("rename", ["default", "no-prefix"])
def test_keys_with_adapter_name_or_without_prefix_are_renamed(rename, cli, reg, tiny_base, hf, tmp_path):
    peft_model, folder = flavour(tmp_path / rename, target_modules=LLAMA_QV)
    tensors = load_file(str(folder / WEIGHTS))
    if rename == "default":
        odd = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
               for k, v in tensors.items()}
    else:
        odd = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    save_file(odd, str(folder / WEIGHTS))
    ok(cli("pull", publish(hf, folder, rename), "--name", rename, "--json"))
    art = reg.get(rename, "artifact")
    assert art.config["renamed_keys"] == len(tensors)
    assert set(load_file(str(reg.materialize(art) / WEIGHTS))) == set(tensors)  # as PEFT saves them
    same_logits(reg, rename, peft_model)


def test_base_null_or_a_quantized_copy_attaches_with_base(cli, reg, tiny_base, hf, tmp_path):
    peft_model, folder = flavour(tmp_path / "null", base=None, target_modules=LLAMA_QV)
    repo = publish(hf, folder, "null")
    one_line_error(cli("pull", repo), "does not name its base", "--base", "fits every module")
    pulled = ok(cli("pull", repo, "--base", TINY, "--name", "null", "--json"))
    assert pulled["base"] == TINY and not pulled["base_reference_only"]
    assert reg.get("null", "artifact").config["attached_to"] == {"base": TINY, "declared_base": None}
    same_logits(reg, "null", peft_model)

    _, folder = flavour(tmp_path / "bnb", base="unsloth/tiny-llama-bnb-4bit", target_modules=LLAMA_QV)
    repo = publish(hf, folder, "bnb")
    one_line_error(cli("pull", repo), "quantized copy", "--base")
    one_line_error(cli("pull", repo, "--base", "nope"), "unknown base")
    ok(cli("pull", repo, "--base", TINY, "--name", "bnb", "--json"))
    assert sorted(b["name"] for b in cli("ls", "bases", "--json").json()) == [TINY]  # no reference rows


def test_shapes_of_another_base_name_the_nearest(cli, reg, tiny_base, hf, tmp_path):
    from adapterhub_c.workflows.bases import register_base_folder

    model, tok = build_tiny("gpt2")
    model.save_pretrained(tmp_path / "gpt2-base")
    tok.save_pretrained(tmp_path / "gpt2-base")
    register_base_folder(reg, "tiny-gpt2", tmp_path / "gpt2-base", None, None, None, None)
    _, folder = flavour(tmp_path / "g", model_type="gpt2", base=None, target_modules=["c_attn"],
                        fan_in_fan_out=True)
    repo = publish(hf, folder, "gpt2-lora")
    one_line_error(cli("pull", repo, "--base", TINY), "which is not in base 'builtin:tiny-llama'",
                   "base 'tiny-gpt2' fits every module: pull with --base tiny-gpt2")
    ok(cli("pull", repo, "--base", "tiny-gpt2", "--name", "g", "--json"))  # Conv1D [in, out] accepted


def test_kohya_files_are_refused_with_the_reason(cli, reg, tiny_base, hf, tmp_path):
    folder = tmp_path / "kohya"
    folder.mkdir()
    save_file({"lora_unet_layers_0_q_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_layers_0_q_proj.lora_up.weight": torch.zeros(64, 4),
               "lora_unet_layers_0_q_proj.alpha": torch.tensor(4.0)}, str(folder / "kohya.safetensors"))
    one_line_error(cli("pull", publish(hf, folder, "kohya")), "Kohya-style", "refused", "Convert it to a PEFT")
    _, peft_folder = flavour(tmp_path / "kp", target_modules=LLAMA_QV)
    tensors = load_file(str(peft_folder / WEIGHTS))
    save_file({k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in tensors.items()},
              str(peft_folder / WEIGHTS))
    one_line_error(cli("pull", publish(hf, peft_folder, "kohya-cfg")), "Kohya-style")


def test_modules_to_save_through_convert_pack_and_merge(cli, reg, tiny_base, hf, tmp_path):
    cfg = FLAVOURS["modules_to_save"]
    a, fa = flavour(tmp_path / "a", seed=1, **cfg)
    b, fb = flavour(tmp_path / "b", seed=2, **cfg)
    ok(cli("pull", publish(hf, fa, "mts-a"), "--name", "a", "--json"))
    ok(cli("pull", publish(hf, fb, "mts-b"), "--name", "b", "--json"))
    head = "base_model.model.lm_head.weight"
    ta, tb = load_file(str(fa / WEIGHTS))[head], load_file(str(fb / WEIGHTS))[head]
    # convert (inheritance) carries the head
    ok(cli("variant", "create", TINY, "--quant", "nf4", "--eval-tokens", "0", "--name", "q", "--json"))
    ok(cli("convert", "a", "--variant", "q", "--name", "conv", "--max-eval-tokens", "32", "--json"))
    conv = load_file(str(reg.materialize(reg.get("conv", "artifact")) / WEIGHTS))
    assert torch.equal(conv[head], ta)
    # a pack holds it as an fp16 side tensor
    ok(cli("pack", "create", "a", "--density", "0.5", "--name", "pa", "--json"))
    out = tmp_path / "unpacked"
    ok(cli("unpack", "pa", "--out", str(out), "--json"))
    unpacked = load_file(str(out / WEIGHTS))
    assert unpacked[head].dtype == torch.float16 and torch.equal(unpacked[head], ta.half())
    # merge: weighted average of the heads, with a warning
    rep = ok(cli("merge", "a", "b", "--method", "ties", "--density", "0.5", "--weights", "1,3", "--name", "m",
                 "--device", "cpu", "--json"))
    assert any("weighted average" in w for w in rep["warnings"])
    merged = reg.materialize(reg.get("m", "artifact"))
    torch.testing.assert_close(load_file(str(merged / WEIGHTS))[head], (ta + 3 * tb) / 4)
    assert json.loads((merged / CONFIG).read_text())["modules_to_save"] == ["lm_head"]
