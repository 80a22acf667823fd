"""Recipes (validation, canonical JSON), apply_recipe statistics and sizes, storing and loading."""
from __future__ import annotations

import json
import math
import warnings

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from adapterhub_c.errors import UsageError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.variants import Recipe, apply_recipe, load_variant_model, target_linears

warnings.filterwarnings("ignore", message="MatMul8bitLt")

# tiny Llama: 14 projection weights (73,728), embeddings + LM head (2 x 259 x 64), norms (320)
TARGETS, OTHERS = 73728, 2 * 259 * 64 + 320


def calib(n: int = 4, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 259, (length,), generator=g) for _ in range(n)]


# ---- recipes ------------------------------------------------------------------------

BAD = [
    dict(prune="magnitude", sparsity=1.0),
    dict(prune="magnitude", sparsity=-0.1),
    dict(prune="magnitude", sparsity=float("nan")),
    dict(prune="magnitude", sparsity="0.5"),
    dict(prune="magnitude"),  # no sparsity
    dict(prune="2:4", sparsity=0.3),
    dict(quant="int4"),
    dict(prune="random", sparsity=0.5),
    dict(prune="wanda", sparsity=0.5),  # no calibration data
    dict(quant="int8", double_quant=True),
    dict(prune="magnitude", sparsity=0.5, prune_granularity="column"),
    dict(prune="2:4", prune_granularity="row"),
    dict(sparsity=0.5),  # sparsity without a method
    dict(prune="magnitude", sparsity=0.5, calib="builtin:pydoc"),  # calib would be ignored
    dict(prune="ffn-channels", sparsity=0.25, include_embeddings=True),
    dict(prune="wanda", sparsity=0.5, calib="builtin:pydoc", calib_samples=0),
]


@pytest.mark.parametrize("kwargs", BAD, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_bad_recipes_raise_usage_error_with_one_line(kwargs):
    with pytest.raises(UsageError) as info:
        Recipe(**kwargs)
    assert "\n" not in str(info.value) and str(info.value)


def test_defaults_are_filled():
    r = Recipe(prune="2:4")
    assert r.sparsity == 0.5 and r.prune_granularity is None and r.quant == "none"
    r = Recipe(prune="wanda", sparsity=0.5, calib="builtin:pydoc")
    assert r.prune_granularity == "row" and r.calib_samples == 32 and r.calib_seq_len == 128
    assert Recipe().sparsity == 0.0


def test_same_recipe_gives_same_canonical_json_and_digest():
    a = Recipe(prune="wanda", sparsity=0.5, calib="builtin:pydoc", quant="nf4", double_quant=True)
    b = Recipe(calib=" builtin:pydoc", double_quant=True, quant="NF4", sparsity=0.50000000001,
               prune="WANDA", prune_granularity="row")
    assert a.canonical_json() == b.canonical_json() and a.digest() == b.digest()
    assert Recipe(prune="magnitude", sparsity=1 / 3).canonical_json() == \
        Recipe(prune="magnitude", sparsity=0.333333).canonical_json()
    assert Recipe.from_json(a.canonical_json()) == a
    assert Recipe.from_json(json.loads(a.canonical_json())).digest() == a.digest()
    assert Recipe(prune="magnitude", sparsity=0.6).digest() != Recipe(prune="magnitude", sparsity=0.5).digest()
    assert len(a.digest()) == 64


def test_canonical_json_format_is_pinned():
    assert Recipe(quant="nf4", prune="2:4").canonical_json() == (
        '{"calib":null,"calib_samples":32,"calib_seq_len":128,"double_quant":false,'
        '"include_embeddings":false,"include_lm_head":false,"prune":"2:4","prune_granularity":null,'
        '"quant":"nf4","sparsity":0.5,"version":1}'
    )


def test_from_json_refuses_garbage():
    with pytest.raises(UsageError):
        Recipe.from_json("{not json")
    with pytest.raises(UsageError):
        Recipe.from_json('{"quant": "nf4", "bits": 3}')
    with pytest.raises(UsageError):
        Recipe.from_json("[1, 2]")
    with pytest.raises(UsageError):
        Recipe.from_json('{"version": 99}')


# ---- apply_recipe: sparsity, bits, sizes -------------------------------------------

CASES = [
    (Recipe(prune="magnitude", sparsity=0.5), None, 0.5, 32.0),
    (Recipe(prune="magnitude", sparsity=0.3, prune_granularity="layer"), None, None, 32.0),
    (Recipe(quant="nf4", prune="wanda", sparsity=0.6, calib="c"), "calib", None, 4.5),
    (Recipe(quant="int8", prune="2:4"), None, 0.5, None),
    (Recipe(quant="fp4", double_quant=True, prune="2:4", calib="c"), "calib", 0.5, None),
    (Recipe(quant="nf4", prune="ffn-channels", sparsity=0.25), None, 0.25, 4.5),
]


@pytest.mark.parametrize("recipe,use_calib,sparsity,bpw", CASES, ids=lambda x: x.describe() if isinstance(x, Recipe) else None)
def test_apply_recipe_reports_exact_sparsity_and_bits(recipe, use_calib, sparsity, bpw):
    model, _ = build_tiny_llama()
    build = apply_recipe(model, recipe, calib() if use_calib else None)
    s = build.stats
    if recipe.prune == "ffn-channels":
        assert s.target_params_base == 3 * 2 * 128 * 64 and s.target_params_nonzero == 3 * 2 * 96 * 64
        assert s.params_total == s.base_params - 3 * 2 * 32 * 64
    else:
        expected = sum(  # exact per-row (or per-matrix) counts, summed
            lin.weight.shape[0] * round((1 - recipe.sparsity) * lin.weight.shape[1])
            if recipe.prune_granularity != "layer" else round((1 - recipe.sparsity) * lin.weight.numel())
            for lin in target_linears(model).values()
        )
        assert s.target_params_nonzero == expected
    if sparsity is not None:
        assert s.sparsity == sparsity
    else:
        assert abs(s.sparsity - recipe.sparsity) < 1e-2  # per-row rounding; the count is exact above
    if bpw is not None:
        assert s.bits_per_weight == bpw
    if recipe.quant == "int8":  # one fp32 scale per row: in_features 64 or 128
        bits = sum(l.weight.numel() * (8 + 32 / l.in_features) for l in target_linears(model).values())
        assert s.bits_per_weight == pytest.approx(bits / TARGETS)
    if recipe.quant == "fp4":
        assert 4.12 < s.bits_per_weight < 4.15
    assert s.base_params == TARGETS + OTHERS
    assert s.full_copy_bytes == 4 * s.params_total  # what a whole float32 copy would take
    if recipe.prune == "ffn-channels":  # 96 kept channels (int64) per block, no masks
        assert s.stored_bytes == 2 * 96 * 8 and not build.masks
    else:  # one bit per weight of every pruned tensor: 1/32 of the float32 copy of those tensors
        assert s.stored_bytes == TARGETS // 8 and set(build.masks) == {f"{n}.weight" for n in target_linears(model)}
    assert s.stored_bytes < 0.07 * s.base_fp16_bytes
    assert s.ideal_bytes < s.base_fp16_bytes


def test_ideal_size_formula_by_hand():
    model, _ = build_tiny_llama()
    s = apply_recipe(model, Recipe(prune="magnitude", sparsity=0.5)).stats
    # values at 16 bits + a 1-bit position mask (cheaper than 6-bit column indices at 50%)
    assert s.ideal_bytes * 8 == TARGETS // 2 * 16 + TARGETS + OTHERS * 16

    model, _ = build_tiny_llama()
    s = apply_recipe(model, Recipe(quant="nf4", prune="2:4")).stats
    # 4-bit values of the kept half + fp32 absmax per 64 + 2 bits of 2:4 metadata per kept value
    assert s.ideal_bytes * 8 == TARGETS // 2 * 4 + TARGETS // 64 * 32 + TARGETS // 2 * 2 + OTHERS * 16
    held = TARGETS * 4 + TARGETS // 64 * 32 + OTHERS * 32  # bnb 4-bit + float32 rest
    assert s.quantized_bytes * 8 == held

    model, _ = build_tiny_llama()
    s = apply_recipe(model, Recipe(prune="magnitude", sparsity=0.9)).stats
    # at 90% the per-row column indices (6 bits each) beat the mask
    nnz = sum(l.out_features * round(0.1 * l.in_features) for l in target_linears(model).values())
    pos = sum(min(l.weight.numel(), l.out_features * round(0.1 * l.in_features) * math.ceil(math.log2(l.in_features)))
              for l in target_linears(model).values())
    assert s.ideal_bytes * 8 == nnz * 16 + pos + OTHERS * 16


def test_calibration_must_match_the_recipe():
    model, _ = build_tiny_llama()
    with pytest.raises(UsageError):
        apply_recipe(model, Recipe(prune="wanda", sparsity=0.5, calib="c"))
    with pytest.raises(UsageError):
        apply_recipe(model, Recipe(prune="magnitude", sparsity=0.5), calib())


def test_progress_is_reported():
    model, _ = build_tiny_llama()
    seen = []
    apply_recipe(model, Recipe(prune="wanda", sparsity=0.5, calib="c"), calib(),
                 progress=lambda d, c, t: seen.append((d, c, t)))
    assert [c for _, c, _ in seen] == [1, 2] and all(t == 2 for _, _, t in seen)


# ---- storing and loading -----------------------------------------------------------


def test_save_and_load_unquantized_variant_is_exact(tmp_path):
    model, _ = build_tiny_llama()
    build = apply_recipe(model, Recipe(prune="magnitude", sparsity=0.5))
    build.save(tmp_path)
    meta = json.loads((tmp_path / "variant.json").read_text())
    assert Recipe.from_dict(meta["recipe"]) == build.recipe and meta["stats"]["sparsity"] == 0.5
    ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        for source in (tmp_path, build.weights_bytes(), build.state_dict):
            kwargs = {} if source is tmp_path else dict(config=build.config.to_dict(), recipe=build.recipe.canonical_json())
            loaded = load_variant_model(source, **kwargs)
            assert not loaded.training
            assert torch.equal(loaded(ids).logits, expected)


def test_ffn_channel_variant_stores_indices_and_loads_quantized(tmp_path):
    model, _ = build_tiny_llama()
    build = apply_recipe(model, Recipe(quant="nf4", prune="ffn-channels", sparsity=0.25))
    build.save(tmp_path)
    kept = load_file(str(tmp_path / "kept_indices.safetensors"))
    assert set(kept) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for name, idx in kept.items():
        assert torch.equal(idx, build.kept_indices[name])
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 96
    loaded = load_variant_model(tmp_path)
    mlp = loaded.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, bnb.nn.Linear4bit) and mlp.gate_proj.out_features == 96
    assert mlp.down_proj.in_features == 96
    ids = torch.randint(3, 259, (1, 10))
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max()
    assert diff < 0.5  # nf4 error only


def test_tied_weights_are_stored_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    build = apply_recipe(model, Recipe(prune="magnitude", sparsity=0.5))
    assert "lm_head.weight" not in build.state_dict
    loaded = load_variant_model(build)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(UsageError):
        apply_recipe(LlamaForCausalLM(cfg), Recipe(prune="magnitude", sparsity=0.5, include_lm_head=True))


def test_loading_needs_existing_weights_and_a_recipe(tmp_path):
    with pytest.raises(UsageError):
        load_variant_model(tmp_path / "missing", recipe=Recipe())
    model, _ = build_tiny_llama()
    build = apply_recipe(model, Recipe())
    with pytest.raises(UsageError):
        load_variant_model(build.state_dict, config=build.config)
