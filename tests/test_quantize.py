"""bitsandbytes quantization of variants on CPU: layer types, dequantized twins, sizes, zeros, PEFT."""
from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.variants import Recipe, apply_recipe, dequantize_linear, load_variant_model, sizes, target_linears
from adapterhub_c.variants.quantize import quantized_storage_bits

warnings.filterwarnings("ignore", message="MatMul8bitLt")

FORMATS = [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def variant(recipe: Recipe, calib=None):
    base, _ = build_tiny_llama()
    build = apply_recipe(base, recipe, calib)
    return base, build, load_variant_model(build)


@pytest.fixture(scope="module")
def loaded():
    """One loaded variant per quant format (dense base), shared by the tests below."""
    out = {}
    for quant, dq in FORMATS:
        base, build, model = variant(Recipe(quant=quant, double_quant=dq))
        out[(quant, dq)] = (base, model)
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}{'-dq' if f[1] else ''}" if isinstance(f, tuple) else str(f))
def test_quantized_linears_are_bnb_layers_close_to_their_dequantized_twin(loaded, fmt):
    quant, dq = fmt
    base, model = loaded[fmt]
    cls = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    originals = target_linears(base)
    for name, lin in target_linears(model).items():
        assert isinstance(lin, cls), name
        if quant != "int8":
            assert lin.weight.quant_state.quant_type == quant
            assert lin.weight.quant_state.nested is dq
        w_orig = originals[name].weight.detach()
        w_deq = dequantize_linear(lin)
        assert w_deq.shape == w_orig.shape
        # quantization error bounded by the format's step (absmax relative)
        rel = (w_deq - w_orig).abs().max() / w_orig.abs().max()
        assert rel < (0.01 if quant == "int8" else 0.2), (name, rel)
        x = torch.randn(3, lin.in_features)
        with torch.no_grad():
            y = lin(x)
            ref = nn.functional.linear(x, w_deq)
        # 4-bit: matmul on the dequantized weight in fp32, exact up to float rounding;
        # int8 (LLM.int8): the input is int8-quantized too, so only close
        tol = 0.05 if quant == "int8" else 1e-5
        assert (y - ref).abs().max() <= tol * ref.abs().max() + 1e-6, name
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert type(model.model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_bits_formula_matches_what_bnb_holds(fmt):
    quant, dq = fmt
    _, _, model = variant(Recipe(quant=quant, double_quant=dq))
    for lin in target_linears(model).values():
        numel = lin.in_features * lin.out_features
        assert sizes.quantized_tensor_bits(numel, lin.in_features, quant, dq) == quantized_storage_bits(lin)
    if not dq:  # 64x64 weight: int8 has one fp32 scale per 64-wide row, 4-bit one per block of 64
        assert sizes.bits_per_weight(4096, 64, quant) == {"int8": 8.5, "nf4": 4.5, "fp4": 4.5}[quant]
    else:  # large tensor: 4 + 8/64 + 32/(64*256), plus one fp32 offset per tensor
        bpw = sizes.bits_per_weight(64 * 256 * 16, 4096, quant, True)
        assert bpw == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / (64 * 256 * 16), abs=1e-9)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_pruned_zeros_survive_quantization_exactly(fmt):
    quant, dq = fmt
    base, build, model = variant(Recipe(quant=quant, double_quant=dq, prune="magnitude", sparsity=0.5))
    pruned = target_linears(base)
    for name, lin in target_linears(model).items():
        zero = pruned[name].weight == 0
        assert zero.float().mean() == 0.5
        w_deq = dequantize_linear(lin)
        # every format has an exact zero code (int8: 0·scale; nf4/fp4: a 0 level in the table)
        assert (w_deq[zero] == 0).all(), name


def test_include_lm_head_quantizes_the_head():
    _, _, model = variant(Recipe(quant="nf4", include_lm_head=True))
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_lora_attaches_to_quantized_variant_and_trains_on_cpu(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import bnb as lora_bnb

    _, build, model = variant(Recipe(quant="nf4", double_quant=True, prune="2:4"))
    assert model.is_quantized
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    attn = peft_model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, lora_bnb.Linear4bit) and isinstance(attn.v_proj, lora_bnb.Linear4bit)
    ids = torch.randint(3, 259, (2, 16))
    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # B = 0: A's is 0
    # LoRA B starts at zero: give it a value, save, and re-attach with PeftModel.from_pretrained
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "lora")
    fresh = load_variant_model(build)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_int8_lora_forward_backward():
    from peft import LoraConfig, get_peft_model

    _, _, model = variant(Recipe(quant="int8", prune="magnitude", sparsity=0.3))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 259, (1, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    # B starts at exactly zero, so ∂L/∂A = 0 there; B itself must get a non-zero gradient in every layer
    b_grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(b_grads) == len(grads) and all(g is not None and g.abs().sum() > 0 for g in b_grads.values())
    # one SGD step moves B off zero; then A receives gradients through the int8 layers too
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p -= 0.5 * p.grad
    assert all(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.zero_grad()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_training_after_an_eval_forward_still_gets_gradients():
    """Regression: bnb's CPU bf16 repack (on AVX512-BF16 CPUs) cut every gradient after one eval forward."""
    from peft import LoraConfig, get_peft_model

    _, _, model = variant(Recipe(quant="nf4"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 259, (2, 10))
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=ids)
    peft_model.train()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_cpu_bf16_kernel_opt_in_keeps_dequantization_readable():
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bnb never repacks here")
    base, _ = build_tiny_llama()
    build = apply_recipe(base, Recipe(quant="nf4", double_quant=True))
    model = load_variant_model(build, cpu_bf16_kernel=True)
    lin = model.model.layers[0].mlp.up_proj
    before = dequantize_linear(lin)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 259, (1, 8)))
    assert lin.weight.quant_state.packing_format_for_cpu  # repacked in place
    after = dequantize_linear(lin)
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-3)  # absmax now bf16


def test_int8_forward_does_not_log_the_per_call_cast_notice(loaded, caplog):
    """bnb logs 'inputs will be cast' on every int8 float32 forward; we drop that one record only."""
    import logging

    _, model = loaded[("int8", False)]
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    # the CLI raises the 'bitsandbytes' logger to ERROR for its users; set this one explicitly
    with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 259, (1, 8)))
        bnb_logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "x")
        bnb_logger.warning("another bnb warning")
    messages = [r.getMessage() for r in caplog.records if r.name == bnb_logger.name]
    assert messages == ["another bnb warning"]
