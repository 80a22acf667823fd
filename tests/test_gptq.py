"""GPTQ and SparseGPT variants (issue 25): recipes, what is stored, the round trip, bad input, quality.

The layer-level agreement with the IST-DASLab reference code is in test_gptq_fidelity.py.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from adapterhub_c.errors import AdaptWarning, UsageError
from adapterhub_c.models import arch
from adapterhub_c.models.tiny import build_tiny
from adapterhub_c.variants.build import apply_recipe, check_delta, delta_state
from adapterhub_c.variants.gptq import QuantSpec, codes_of, gptq_layer, grid_params
from adapterhub_c.variants.hessian import inverse_cholesky
from adapterhub_c.variants.packed import COMPRESSED_FILE, load_compressed, pack_codes, unpack_codes
from adapterhub_c.variants.recipe import Recipe

CALIB = "builtin:pydoc"


def _calib(tok, samples=4, seq_len=32):
    from adapterhub_c.variants.calibration import calibration_rows

    return calibration_rows(tok, CALIB, samples, seq_len)


# ---- recipes -------------------------------------------------------------------------------


def test_recipe_fields_and_old_digests():
    old = Recipe(quant="nf4", prune="wanda", sparsity=0.5, calib=CALIB)
    assert "bits" not in old.to_dict() and "act_order" not in old.canonical_json()  # earlier digests unchanged
    r = Recipe(quant="gptq", calib=CALIB)
    assert (r.bits, r.group_size, r.act_order, r.sym) == (4, None, False, False)
    assert Recipe.from_json(r.canonical_json()) == r and Recipe.from_json(r.canonical_json()).digest() == r.digest()
    assert r.describe() == "gptq 4-bit" and r.bnb_quant == "none" and r.stores_weights
    j = Recipe(quant="gptq", bits=3, group_size=64, sym=True, prune="sparsegpt", sparsity=0.625, calib=CALIB)
    assert j.describe() == "gptq 3-bit g64 sym, sparsegpt 62.5%"
    assert Recipe(prune="sparsegpt:2:4", quant="nf4", calib=CALIB).sparsity == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant="gptq", bits=5, calib=CALIB), "bits must be one of 2, 3, 4, 8"),
    (dict(quant="gptq"), "gptq needs calibration data"),
    (dict(prune="sparsegpt", sparsity=0.5), "sparsegpt needs calibration data"),
    (dict(prune="sparsegpt", sparsity=0.0, calib=CALIB), "sparsity in (0, 1)"),
    (dict(quant="nf4", group_size=128), "group_size applies only to gptq"),
    (dict(quant="gptq", prune="wanda", sparsity=0.5, calib=CALIB), "combines only with sparsegpt"),
    (dict(quant="gptq", act_order=True, prune="sparsegpt", sparsity=0.5, calib=CALIB), "act_order"),
    (dict(quant="gptq", group_size=0, calib=CALIB), "group_size must be a positive integer"),
])
def test_recipe_refuses(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe(**kwargs)


# ---- storage pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37, 11), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(37, 11), codes)


def test_non_positive_definite_hessian_is_retried_with_a_warning():
    H = torch.zeros(8, 8)
    H[0, 0] = 1.0
    H[1, 1], H[1, 2], H[2, 1], H[2, 2] = 1.0, 10.0, 10.0, 1.0  # indefinite: 1% dampening is not enough
    W = torch.randn(4, 8)
    with pytest.warns(AdaptWarning, match="not positive definite"):
        res = gptq_layer(W, H, QuantSpec(bits=4), layer="L0")
    assert torch.isfinite(res.Q).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_cholesky(torch.eye(8) * 2, torch.randn(4, 8))  # a good Hessian: no warning


def test_group_size_must_divide_the_inputs_naming_the_layer():
    model, tok = build_tiny("llama")
    with pytest.raises(UsageError, match=r"group size 48 does not divide the 64 inputs of model\.layers\.0\."):
        apply_recipe(model, Recipe(quant="gptq", group_size=48, calib=CALIB), _calib(tok))


# ---- build → store → load ---------------------------------------------------------------------

RECIPES = {
    "gptq4": dict(quant="gptq", calib=CALIB),
    "gptq3-g32-act-sym": dict(quant="gptq", bits=3, group_size=32, act_order=True, sym=True, calib=CALIB),
    "gptq2": dict(quant="gptq", bits=2, calib=CALIB),
    "gptq8-g64": dict(quant="gptq", bits=8, group_size=64, calib=CALIB),
    "sparsegpt50": dict(prune="sparsegpt", sparsity=0.5, calib=CALIB),
    "sparsegpt2:4": dict(prune="sparsegpt:2:4", calib=CALIB),
    "joint": dict(quant="gptq", prune="sparsegpt", sparsity=0.5, calib=CALIB),
}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("label", list(RECIPES))
def test_build_store_load_round_trip(label, model_type, tmp_path):
    """Base + compressed.safetensors is bit for bit the built model; stored bytes are what the format says."""
    model, tok = build_tiny(model_type)
    base_dir = tmp_path / "variant" / "base"
    model.save_pretrained(base_dir)
    recipe = Recipe(**RECIPES[label])
    build = apply_recipe(model, recipe, _calib(tok), storage_dtype=torch.float32)
    check_delta(build, base_dir)  # refuses unless base + stored weights reproduce the build
    build.save_delta(tmp_path / "variant")
    stored = load_compressed(tmp_path / "variant" / COMPRESSED_FILE)
    linears = arch.describe(model).linears()
    assert set(stored) == {f"{n}.weight" for n in linears}
    state = delta_state(tmp_path / "variant")
    for name, t in build.state_dict.items():
        assert torch.equal(state[name].to(t.dtype), t), name
    dense = sum(info.in_features * info.out_features for info in linears.values())
    own = sum(w.nbytes for w in stored.values())
    assert own == build.stats.stored_bytes
    _check_sizes(recipe, own, dense, linears)


def _check_sizes(recipe: Recipe, own: int, dense: int, linears) -> None:
    fp16 = 2 * dense
    rows = sum(i.out_features for i in linears.values())
    if recipe.quant == "gptq" and recipe.prune == "none":
        groups = sum(i.out_features * (i.in_features // (recipe.group_size or i.in_features)) for i in linears.values())
        perm = 4 * sum(i.in_features for i in linears.values()) if recipe.act_order else 0
        codes = sum(math.ceil(i.in_features * i.out_features * recipe.bits / 8) for i in linears.values())
        assert own == codes + 3 * groups + perm  # bits/16 of fp16, + an fp16 scale and a uint8 zero per group
        assert codes <= fp16 * recipe.bits / 16 + len(linears)
    elif recipe.quant == "none":  # mask (1 bit) + kept values (16 bits)
        assert own <= dense / 8 + len(linears) + 2 * dense * (1 - recipe.sparsity) * 1.01 + 2 * rows
    else:  # joint: mask + kept codes + scales
        assert own <= dense / 8 + dense * (1 - recipe.sparsity) * recipe.bits / 8 * 1.02 + 3 * rows + 2 * len(linears)


def test_ffn_shapes_and_bf16_base_storage(tmp_path):
    """A bf16 base: kept values are stored in bf16 and Ŵ is computed in it."""
    model, tok = build_tiny("qwen2")
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "v" / "base")
    build = apply_recipe(model.float(), Recipe(prune="sparsegpt", sparsity=0.5, calib=CALIB), _calib(tok),
                         storage_dtype=torch.bfloat16)
    check_delta(build, tmp_path / "v" / "base")
    assert all(w.values.dtype == torch.bfloat16 for w in build.compressed.values())


# ---- quality: better than the naive method at the same size (acceptance 1) ---------------------


@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny Llama trained 300 steps on builtin:pydoc train (seeded), so that compression errors show in
    its perplexity (a random model's perplexity is the vocabulary size whatever its weights)."""
    from variantflow import trained_tiny_llama

    return trained_tiny_llama(300)


def _rtn(model, bits: int = 4):
    """Round-to-nearest on the same per-row grid (the reference's ``--nearest``): GPTQ without its updates."""
    spec = QuantSpec(bits=bits)
    for info in arch.describe(model).linears().values():
        W = arch.weight_out_in(info.module).detach().float()
        scale, zero = (t[:, None] for t in grid_params(W, spec))
        with torch.no_grad():
            info.module.weight.copy_(arch.to_weight_layout(scale * (codes_of(W, scale, zero, spec.maxq) - zero),
                                                           info.module))
    return model


def test_perplexity_gptq_beats_rtn_and_sparsegpt_beats_magnitude(trained_tiny):
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import perplexity

    base, tok = trained_tiny
    texts = load_dataset(CALIB, "test").as_texts()

    def ppl(m):
        return perplexity(m, tok, texts, max_length=128, stride=128, max_tokens=8192)["perplexity"]

    def built(**recipe):
        m = copy.deepcopy(base)
        r = Recipe(**recipe)
        apply_recipe(m, r, _calib(tok, 32, 128) if r.uses_calibration else None)
        return m

    b = ppl(base)
    gptq, rtn = ppl(built(quant="gptq", bits=4, calib=CALIB)), ppl(_rtn(copy.deepcopy(base)))
    sgpt, mag = ppl(built(prune="sparsegpt", sparsity=0.5, calib=CALIB)), ppl(built(prune="magnitude", sparsity=0.5))
    assert abs(gptq - b) < abs(rtn - b), (b, gptq, rtn)
    assert abs(sgpt - b) < abs(mag - b), (b, sgpt, mag)
