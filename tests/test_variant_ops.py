"""Variants in the registry: create (idempotent, refused inputs), load, kept indices, ls, eval/generate, rm."""
from __future__ import annotations

import warnings

import pytest
import torch
from sqlalchemy import select

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.models import BaseModel, Evaluation, Run, Variant
from adapterhub_c.runtime.variants import load_variant, variant_kept_indices
from adapterhub_c.workflows.variants import calibration_ids, create_variant, make_recipe

warnings.filterwarnings("ignore", message="MatMul8bitLt")
FAST = dict(calib_samples=4, calib_seq_len=64, eval_tokens=384)


def _variants(reg):
    with reg.session() as s:
        return s.scalars(select(Variant)).all()


def test_create_is_idempotent_records_run_and_perplexities(reg, tiny_base):
    row, created = create_variant(reg, "builtin:tiny-llama", quant="nf4", prune="wanda", sparsity=0.5, **FAST)
    assert created and row.name == "tiny-llama-nf4-wanda50"
    again, created2 = create_variant(reg, tiny_base.name, quant="nf4", prune="wanda", sparsity=0.5,
                                     name="other-name", **FAST)
    assert not created2 and again.id == row.id and len(_variants(reg)) == 1
    assert row.sparsity == pytest.approx(0.5)
    st = row.stats
    assert st["perplexity"] > 1 and st["base_perplexity"] > 1 and st["eval_tokens"] == 384
    with reg.session() as s:
        evs = s.scalars(select(Evaluation).where(Evaluation.metric == "perplexity")).all()
        assert {(e.variant_id, round(e.value, 6)) for e in evs} == {
            (row.id, round(st["perplexity"], 6)), (None, round(st["base_perplexity"], 6))}
        run = s.get(Run, row.run_id)
        assert run.command == "variant create" and run.status == "succeeded"
    # a second variant reuses the recorded base perplexity (same token count): no new base row
    row2, _ = create_variant(reg, tiny_base.name, prune="magnitude", sparsity=0.5, **FAST)
    assert row2.stats["base_perplexity"] == st["base_perplexity"]
    with reg.session() as s:
        base_evs = s.scalars(select(Evaluation).where(Evaluation.variant_id.is_(None))).all()
        assert len(base_evs) == 1


def test_recipe_defaults_for_calibration():
    assert make_recipe(prune="magnitude", sparsity=0.5).calib is None  # default calib unused, dropped
    assert make_recipe(prune="2:4").calib == "builtin:pydoc"  # activation-aware by default
    assert make_recipe(prune="2:4", calib=None).calib is None
    with pytest.raises(UsageError, match="unused"):
        make_recipe(prune="magnitude", sparsity=0.5, calib="builtin:pydoc")
    with pytest.raises(UsageError, match="compresses nothing"):
        make_recipe()


def test_calibration_ids_shape(reg, tiny_base):
    from adapterhub_c.runtime.bases import load_base_tokenizer

    tok = load_base_tokenizer(reg, tiny_base)
    ids = calibration_ids(tok, make_recipe(prune="wanda", sparsity=0.5, calib_samples=3, calib_seq_len=50))
    assert len(ids) == 3 and all(t.shape == (50,) and t.dtype == torch.long for t in ids)
    assert not torch.equal(ids[0], ids[1])
    assert calibration_ids(tok, make_recipe(quant="nf4")) is None


BAD = [
    ["--prune", "magnitude", "--sparsity", "1.0"],
    ["--prune", "magnitude", "--sparsity", "-0.1"],
    ["--prune", "magnitude"],
    ["--prune", "2:4", "--sparsity", "0.3"],
    ["--quant", "int4"],
    ["--prune", "bogus", "--sparsity", "0.5"],
    ["--quant", "int8", "--double-quant"],
    ["--prune", "wanda", "--sparsity", "0.5", "--calib", "none"],
    ["--prune", "magnitude", "--sparsity", "0.5", "--calib", "builtin:pydoc"],
    ["--prune", "wanda", "--sparsity", "0.5", "--calib", "builtin:nope"],
    ["--quant", "nf4", "--eval-tokens", "-1"],
    [],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a) or "no-recipe")
def test_bad_input_exits_2_and_registers_nothing(cli, tiny_base, reg, args):
    r = cli("variant", "create", "builtin:tiny-llama", *args, "--eval-tokens", "0") if "--eval-tokens" not in args \
        else cli("variant", "create", "builtin:tiny-llama", *args)
    assert r.code == 2, (r.out, r.err)
    assert r.err.strip() and len(r.err.strip().splitlines()) <= 3
    assert cli("variant", "ls", "--json").json() == []


def test_unknown_and_reference_base_refused(cli, reg, tiny_base):
    r = cli("variant", "create", "builtin:tiny-lama", "--quant", "nf4")
    assert r.code == 2 and "unknown" in r.err
    with reg.session() as s:
        s.add(BaseModel(name="someone/ref-only", hub_id="someone/ref-only", files={}))
    r = cli("variant", "create", "someone/ref-only", "--quant", "nf4")
    assert r.code == 2 and "reference" in r.err and len(r.err.strip().splitlines()) == 1
    assert _variants(reg) == []


def _register_opt_base(reg, tmp_path):
    """A tiny OPT (q/k/v projections, but a plain fc1/fc2 MLP) sharing the tiny byte tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    from adapterhub_c.models.tiny import build_tiny_llama
    from adapterhub_c.workflows.bases import register_base_folder

    _, tok = build_tiny_llama()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                    max_position_embeddings=256, word_embed_proj_dim=32)
    torch.manual_seed(0)
    folder = tmp_path / "opt"
    OPTForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return register_base_folder(reg, "tiny-opt", folder, None, None, None, None)[0]


def test_ffn_channels_on_a_plain_mlp(cli, reg, tmp_path):
    _register_opt_base(reg, tmp_path)  # OPT: fc1 → fc2, not gated (models/arch.py pairs them)
    r = cli("variant", "create", "tiny-opt", "--prune", "ffn-channels", "--sparsity", "0.25", "--eval-tokens", "0",
            "--json")
    assert r.code == 0, r.err
    model = load_variant(reg, r.json()["name"])
    assert model.config.ffn_dim == 48 and model.model.decoder.layers[0].fc1.out_features == 48


def test_unpruned_variant_reuses_base_blobs_and_loads_bnb(reg, tiny_base):
    import bitsandbytes as bnb

    before = set(reg.blobs.all_digests())
    row, _ = create_variant(reg, tiny_base.name, quant="nf4", double_quant=True, eval_tokens=0)
    new = set(reg.blobs.all_digests()) - before
    assert row.files["model.safetensors"] == tiny_base.files["model.safetensors"]
    assert row.files["config.json"] == tiny_base.files["config.json"]
    assert new == {row.files["variant.json"]}  # only the recipe/stats file is new: no weight copy
    assert row.stats["shares_base_weights"] and row.stats["own_bytes"] < 4096
    assert row.stats["perplexity"] is None
    model = load_variant(reg, row.name)  # by name
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested
    assert not model.training


def test_pruned_variant_blob_and_kept_indices_round_trip(reg, tiny_base):
    from adapterhub_c.runtime.bases import load_base_model

    row, _ = create_variant(reg, tiny_base.name, prune="ffn-channels", sparsity=0.25, **FAST)
    # a delta over the base's own weight blob: no copy of the weights, only indices + config + recipe
    assert row.files["base/model.safetensors"] == tiny_base.files["model.safetensors"]
    assert "model.safetensors" not in row.files and "masks.safetensors" not in row.files
    assert row.stats["storage"] == "delta" and row.stats["own_bytes"] < 16384
    kept = variant_kept_indices(reg, row.name)
    assert set(kept) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    base, _ = load_base_model(reg, tiny_base)
    variant = load_variant(reg, row)  # by row
    for name, idx in kept.items():
        assert idx.dtype == torch.long and len(idx) == 96 and torch.all(idx[1:] > idx[:-1])
        b, v = base.get_submodule(name), variant.get_submodule(name)
        assert torch.equal(v.up_proj.weight, b.up_proj.weight[idx])
        assert torch.equal(v.gate_proj.weight, b.gate_proj.weight[idx])
        assert torch.equal(v.down_proj.weight, b.down_proj.weight[:, idx])
    assert variant.config.intermediate_size == 96
    # no kept indices for other recipes
    other, _ = create_variant(reg, tiny_base.name, prune="2:4", calib=None, eval_tokens=0)
    assert other.name == "tiny-llama-2of4-mag" and variant_kept_indices(reg, other) is None
    w = load_variant(reg, other).model.layers[1].mlp.down_proj.weight
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)


def test_ls_json_fields_and_table(cli, reg, tiny_base):
    create_variant(reg, tiny_base.name, quant="int8", **FAST)
    create_variant(reg, tiny_base.name, quant="nf4", prune="wanda", sparsity=0.5, **FAST)
    rows = cli("variant", "ls", "--json").json()
    assert [r["name"] for r in rows] == ["tiny-llama-int8", "tiny-llama-nf4-wanda50"]
    for r in rows:
        for key in ("name", "base", "recipe", "params_kept", "sparsity", "bits_per_weight", "stored_bytes",
                    "ideal_bytes", "perplexity", "base_perplexity", "ppl_ratio"):
            assert r[key] is not None, key
        assert r["base"] == "builtin:tiny-llama"
    int8, nf4w = rows
    assert 8 < int8["bits_per_weight"] < 9 and nf4w["bits_per_weight"] == pytest.approx(4.5)
    assert nf4w["ideal_bytes"] < int8["ideal_bytes"] < int8["base_fp16_bytes"]
    assert nf4w["params_kept"] < int8["params_kept"]
    table = cli("variant", "ls")
    assert table.code == 0 and "perplexity" in table.out and "nf4, wanda 50%" in table.out
    assert cli("variant", "ls", "--base", "builtin:tiny-llama", "--json").json() == rows


def test_cli_create_eval_generate_and_rm(cli, reg, tiny_base):
    r = cli("variant", "create", "builtin:tiny-llama", "--quant", "nf4", "--prune", "wanda", "--sparsity", "0.5",
            "--calib-samples", "4", "--calib-seq-len", "64", "--eval-tokens", "384", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["created"] and out["name"] == "tiny-llama-nf4-wanda50" and out["perplexity"] > 1
    r2 = cli("variant", "create", "builtin:tiny-llama", "--quant", "nf4", "--prune", "wanda", "--sparsity", "0.5",
             "--calib-samples", "4", "--calib-seq-len", "64", "--eval-tokens", "384", "--json")
    assert r2.code == 0 and not r2.json()["created"] and r2.json()["id"] == out["id"]

    ev = cli("eval", "builtin:tiny-llama", "--variant", out["name"], "--data", "builtin:pydoc", "--max-tokens", "384",
             "--json")
    assert ev.code == 0, ev.err
    assert ev.json()["perplexity"] == pytest.approx(out["perplexity"], rel=1e-4)  # same model, same tokens
    gen = cli("generate", "builtin:tiny-llama", "abc", "--variant", out["name"], "--max-new-tokens", "4")
    assert gen.code == 0, gen.err

    # a variant with something deriving from it cannot be removed
    from adapterhub_c.registry.artifacts import register_artifact

    register_artifact(reg, kind="lora", name="child-lora", base_id=tiny_base.id, variant_id=out["id"], files={})
    r = cli("rm", out["name"], "--yes")
    assert r.code == 2 and "child-lora" in r.err
    assert [v["name"] for v in cli("variant", "ls", "--json").json()] == [out["name"]]
    assert cli("rm", "child-lora", "--yes").code == 0
    assert cli("rm", out["name"], "--yes").code == 0
    assert cli("variant", "ls", "--json").json() == []


def test_rm_refused_while_a_lineage_child_exists_one_line_naming_it(cli, reg, tiny_base):
    """A dependent known only through lineage (no variant_id) also blocks `adapt rm <variant>`."""
    from adapterhub_c.registry.artifacts import register_artifact

    row, _ = create_variant(reg, tiny_base.name, quant="int8", eval_tokens=0)
    register_artifact(reg, kind="prompt", name="lineage-child", base_id=tiny_base.id, files={},
                      parents=[(row, "learned-on")])
    r = cli("rm", row.name, "--yes")
    assert r.code == 2
    assert "lineage-child" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert [v.name for v in _variants(reg)] == [row.name]  # nothing removed
    # the base cannot go either while its variant exists
    assert cli("rm", tiny_base.name, "--yes").code == 2
    assert cli("rm", "lineage-child", "--yes").code == 0
    assert cli("rm", row.name, "--yes").code == 0
    assert _variants(reg) == []
