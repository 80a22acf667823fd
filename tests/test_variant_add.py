"""adapt variant add (issue 25): pre-quantized checkpoints of a registered base as variants.

Tiny pre-quantized checkpoints of the tiny base, written by the formats' own libraries:

- ``write_compressed_tensors``: the ``compressed-tensors`` library applies a quantization
  scheme to the tiny Llama, the scales / zero points come from its ``calculate_qparams``
  on each weight's min / max (what llm-compressor's min-max observer does, without
  llm-compressor, which does not install beside our pins), ``ModelCompressor`` compresses
  the state dict (pack-quantized for int weights with 16-bit activations, int-quantized
  for W8A8) and writes the ``quantization_config``.
- ``write_bnb``: transformers quantizes with bitsandbytes on CPU and ``save_pretrained``
  writes the pre-quantized 4-bit / 8-bit checkpoint (the ``…-bnb-4bit`` repos).
- ``write_gptq``: a GPTQ variant built by our own GPTQ (variants/gptq.py), its stored codes,
  scales and zeros converted to the AutoGPTQ ``qweight / qzeros / scales / g_idx`` layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_model():
    """The built-in tiny base's model and tokenizer (the same weights, bit for bit)."""
    from adapterhub_c.models.tiny import build_tiny_llama

    model, tok = build_tiny_llama()
    return model.eval(), tok


def write_compressed_tensors(dest: Path, bits: int = 4, sym: bool = False, strategy: str = "group",
                             group_size: int = 32, act_bits: int | None = None, model=None) -> Path:
    """A compressed-tensors checkpoint of the tiny base (or of ``model``) written by the library."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model, tok = (model, None) if model is not None else tiny_model()
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                               group_size=group_size if strategy == "group" else None)
    acts = None if act_bits is None else QuantizationArgs(num_bits=act_bits, type="int", symmetric=True,
                                                          strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        w = module.weight.detach()
        if strategy == "group":
            w = w.reshape(w.shape[0], -1, group_size)
            lo, hi = w.amin(-1), w.amax(-1)
        else:
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale, zero = calculate_qparams(lo, hi, module.quantization_scheme.weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dest)
    compressor.update_config(str(dest))
    if tok is not None:
        tok.save_pretrained(dest)
    return dest


def write_bnb(dest: Path, tmp: Path, quant: str = "nf4") -> Path:
    """A bitsandbytes pre-quantized checkpoint of the tiny base, as transformers saves it on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tok = tiny_model()
    model.save_pretrained(tmp / "dense")
    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp / "dense", quantization_config=config, device_map={"": "cpu"},
                                             dtype=torch.float32)
    q.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def transformers_logits(folder: Path, ids: torch.Tensor, dequantize: bool = False) -> torch.Tensor:
    """Logits of plain ``AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`` (bnb's CPU bf16
    repack off, the 4-bit path adapt computes with, as tests/test_export.py does). ``dequantize``:
    compressed-tensors decompressed on load (transformers 5.25 with compressed-tensors 0.20.1 cannot
    load asymmetric pack-quantized zero points compressed: "size mismatch" [8, 2] vs [64, 2])."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if dequantize:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model(ids).logits


def write_gptq(dest: Path, reg, variant: str, v1: bool = True) -> Path:
    """The GPTQ variant ``variant`` (built by our GPTQ) as an AutoGPTQ-layout checkpoint."""
    from safetensors.torch import save_file

    from adapterhub_c.formats.gptq import pack_gptq
    from adapterhub_c.runtime.variants import materialize_variant
    from adapterhub_c.variants.build import BASE_DIR, read_state
    from adapterhub_c.variants.packed import COMPRESSED_FILE, load_compressed

    row = reg.get(variant, "variant")
    folder = materialize_variant(reg, row)
    recipe = json.loads(row.recipe)
    state = read_state(folder / BASE_DIR)
    for name, w in load_compressed(folder / COMPRESSED_FILE).items():
        out_f, in_f = w.shape
        codes = w.codes.reshape(w.shape)
        group = recipe.get("group_size") or in_f
        sweep_group = torch.arange(in_f) // group
        if w.perm is not None:  # sweep position k holds column perm[k]: back to the original order
            perm = w.perm.long()
            orig = torch.empty_like(codes)
            orig[:, perm] = codes
            codes, g_idx = orig, torch.empty(in_f, dtype=torch.int64)
            g_idx[perm] = sweep_group
        else:
            g_idx = sweep_group
        module = name[: -len(".weight")]
        del state[name]
        for part, t in pack_gptq(codes, w.scales, w.zeros, g_idx, w.bits, v1=v1).items():
            state[f"{module}.{part}"] = t
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / BASE_DIR / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": recipe["bits"], "group_size":
                                     recipe.get("group_size") or -1, "desc_act": recipe["act_order"],
                                     "sym": recipe["sym"], "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


# ---- tests ---------------------------------------------------------------------------------

import pytest  # noqa: E402

BASE = "builtin:tiny-llama"
IDS = torch.arange(3, 35).view(2, 16)
CT_SCHEMES = {  # name: write_compressed_tensors keywords
    "w4a16-g32-asym": dict(bits=4, sym=False, strategy="group", group_size=32),
    "w4a16-g32-sym": dict(bits=4, sym=True, strategy="group", group_size=32),
    "w8a16-channel": dict(bits=8, sym=True, strategy="channel"),
    "w8a8-channel": dict(bits=8, sym=True, strategy="channel", act_bits=8),
}


def _variant_logits(reg, name: str) -> torch.Tensor:
    from adapterhub_c.runtime.variants import load_variant

    with torch.no_grad():
        return load_variant(reg, name)(IDS).logits


def _same_weights(reg, name: str, ckpt: Path) -> None:
    """The variant's Ŵ is what transformers + compressed-tensors decompress, bit for bit."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from adapterhub_c.runtime.variants import load_variant

    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(dequantize=True))
    mine = load_variant(reg, name).state_dict()
    theirs = ref.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _nothing_registered(cli) -> None:
    assert json.loads(cli("variant", "ls", "--json").out) == []


@pytest.mark.parametrize("scheme", list(CT_SCHEMES))
def test_compressed_tensors_checkpoint_gives_the_logits_transformers_gives(cli, reg, tiny_base, tmp_path, scheme):
    ckpt = write_compressed_tensors(tmp_path / "ckpt", **CT_SCHEMES[scheme])
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    r = cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0", "--name", scheme, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["created"] and out["storage"] == "imported" and out["recipe"].startswith(
        f"compressed-tensors {cfg['format']}")
    assert out["recipe_json"]["origin"]["method"] == "compressed-tensors"
    want = transformers_logits(ckpt, IDS, dequantize=not CT_SCHEMES[scheme]["sym"])
    got = _variant_logits(reg, scheme)
    print(scheme, cfg["format"], "max |Δlogit| vs transformers:", (got - want).abs().max().item())
    if CT_SCHEMES[scheme].get("act_bits"):
        # W8A8: transformers also quantizes the activations per token at run time; a variant computes
        # with Ŵ and unquantized activations (warned at add): the weights agree bit for bit
        assert "activations" in r.err and 0 < (got - want).abs().max().item() < 0.05
        _same_weights(reg, scheme, ckpt)
    else:
        assert torch.equal(got, want)
    # the stored files are the checkpoint's, byte for byte
    row = reg.get(scheme, "variant")
    folder = reg.materialize(row)
    assert (folder / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    bits = out["bits_per_weight"]
    assert bits is not None and CT_SCHEMES[scheme]["bits"] <= bits < CT_SCHEMES[scheme]["bits"] + 2, bits
    assert out["stored_bytes"] == sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())


def test_bnb_4bit_checkpoint_gives_the_logits_transformers_gives(cli, reg, tiny_base, tmp_path):
    ckpt = write_bnb(tmp_path / "tiny-bnb-4bit", tmp_path)
    r = cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["name"] == "tiny-llama-tiny-bnb-4bit" and out["recipe"] == "bitsandbytes nf4"
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.variants.quantize import is_bnb_linear

    model = load_variant(reg, out["name"])
    assert any(is_bnb_linear(m) for m in model.modules())  # bnb layers as stored, not re-quantized
    want = transformers_logits(ckpt, IDS)
    got = _variant_logits(reg, out["name"])
    print("bnb nf4 max |Δlogit| vs transformers:", (got - want).abs().max().item())
    assert torch.equal(got, want)
    assert 4 <= out["bits_per_weight"] < 5


def test_the_same_checkpoint_twice_is_one_variant_from_the_hub_or_a_folder(cli, reg, tiny_base, hf, tmp_path):
    ckpt = write_compressed_tensors(tmp_path / "ckpt")
    repo = "someone/tiny-llama-quantized.w4a16"
    hf.store.create_repo(repo)
    hf.store.commit(repo, message="quantized", add={
        **{p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}, "README.md": b"# a card\n"})
    r = cli("variant", "add", repo, "--base", BASE, "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    first = json.loads(r.out)
    assert first["created"] and first["source"]["repo"] == repo and first["name"] == "tiny-llama-quantized.w4a16"
    assert "README.md" not in reg.get(first["name"], "variant").files
    again = json.loads(cli("variant", "add", repo, "--base", BASE, "--eval-tokens", "0", "--json").out)
    local = json.loads(cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0", "--json").out)
    assert again["id"] == local["id"] == first["id"] and not again["created"] and not local["created"]
    assert len(json.loads(cli("variant", "ls", "--json").out)) == 1
    # --include picks files: without the weights there is nothing to register
    bad = cli("variant", "add", repo, "--base", BASE, "--include", "*.json", "--eval-tokens", "0")
    assert bad.code == 2 and "holds no safetensors weights" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_api_add_variant_measures_perplexity(reg, tiny_base, tmp_path):
    from adapterhub_c import api
    from adapterhub_c.options.variant import VariantAddOptions

    ckpt = write_compressed_tensors(tmp_path / "ckpt", bits=8, sym=True, strategy="channel")
    res = api.add_variant(str(ckpt), BASE, VariantAddOptions(eval_tokens=300), registry=reg)
    assert res.created and res.kind == "variant"
    assert res.report["perplexity"] and res.report["base_perplexity"]
    assert abs(res.report["perplexity"] / res.report["base_perplexity"] - 1) < 0.05  # 8-bit: close to the base
    shown = api.show_variant(res.name, registry=reg)
    assert shown["recipe"] == "compressed-tensors pack-quantized w8a16 sym" and shown["storage"] == "imported"


def _one_line(r, code: int, *needles: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1, r.err
    for n in needles:
        assert n in r.err, r.err


def test_bad_input_is_one_line_naming_what_was_found(cli, tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub_c.models.tiny import tiny_config, tiny_tokenizer

    # a checkpoint of another base (hidden 32 instead of 64)
    cfg = tiny_config(len(tiny_tokenizer())).to_dict()
    cfg.update(hidden_size=32, intermediate_size=64)
    other = write_compressed_tensors(tmp_path / "other", model=LlamaForCausalLM(LlamaConfig(**cfg)).eval())
    _one_line(cli("variant", "add", str(other), "--base", BASE, "--eval-tokens", "0"), 2,
              "hidden_size 32 (base 64)", "not a quantized copy")
    # another architecture
    from adapterhub_c.models.tiny import build_tiny

    gpt2, _ = build_tiny("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    data = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(data))
    _one_line(cli("variant", "add", str(tmp_path / "gpt2"), "--base", BASE, "--eval-tokens", "0"), 2,
              "is a 'gpt2' model", "'llama'")
    # an unknown quantization method, AWQ, and full-precision weights
    ckpt = write_compressed_tensors(tmp_path / "ckpt")
    data = json.loads((ckpt / "config.json").read_text())
    for method, needle in (("hqq", "unknown quantization method 'hqq'"), ("awq", "AWQ checkpoints")):
        (ckpt / "config.json").write_text(json.dumps({**data, "quantization_config": {"quant_method": method}}))
        _one_line(cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0"), 2, needle)
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "quantization_config"}))
    _one_line(cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0"), 2,
              "not a pre-quantized checkpoint")
    _nothing_registered(cli)


def test_a_gptq_checkpoint_is_unpacked_to_our_gptq_variants_weights(cli, reg, tiny_base, tmp_path):
    from adapterhub_c.workflows.variants import create_variant

    for act_order, v1 in ((False, True), (True, False)):
        row, _ = create_variant(reg, BASE, quant="gptq", bits=4, group_size=32, act_order=act_order,
                                calib_samples=4, calib_seq_len=64, eval_tokens=0)
        ckpt = write_gptq(tmp_path / f"gptq-{act_order}", reg, row.name, v1=v1)
        name = f"gptq-ckpt-{act_order}"
        r = cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0", "--name", name, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["recipe"] == "gptq 4-bit g32" + " act-order" * act_order
        got, want = _variant_logits(reg, name), _variant_logits(reg, row.name)
        print("gptq act_order", act_order, "max |Δlogit|:", (got - want).abs().max().item())
        assert torch.equal(got, want)


def test_whole_flow_on_an_imported_checkpoint(reg, tiny_base, tmp_path):
    """convert (inherit + recover + distill and --recover lowrank) → pack → serve on a compressed-tensors
    variant; the converted LoRA stays a plain PEFT folder."""
    from variantflow import convert_pack_serve, train_source

    from adapterhub_c.workflows.imports import add_variant

    row, created = add_variant(reg, str(write_compressed_tensors(tmp_path / "ckpt")), BASE, name="ct4",
                               eval_tokens=0)
    assert created
    train_source(reg)
    conv, low = convert_pack_serve(reg, "ct4")
    assert conv.variant_id == row.id and low.variant_id == row.id
    assert set(reg.get("low-ct4").files) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not any(f.startswith("recovery") for f in reg.get("low-ct4").files)  # a plain PEFT LoRA


def test_export_of_an_imported_variant(cli, reg, tiny_base, tmp_path):
    ckpt = write_compressed_tensors(tmp_path / "ckpt")
    assert cli("variant", "add", str(ckpt), "--base", BASE, "--eval-tokens", "0", "--name", "ct").code == 0
    r = cli("export", "ct", "--out", str(tmp_path / "hf"), "--format", "hf")
    assert r.code == 0, r.err
    assert torch.equal(transformers_logits(tmp_path / "hf", IDS), _variant_logits(reg, "ct"))
    _one_line(cli("export", "ct", "--out", str(tmp_path / "ct-out"), "--format", "compressed-tensors"), 2,
              "exported as hf")
