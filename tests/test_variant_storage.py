"""Variants stored as what differs from the base (issue 15): keep-masks, kept channels, shared base blobs."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from adapterhub_c.errors import AdaptError, IntegrityError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.variants import Recipe, apply_recipe, load_variant_model
from adapterhub_c.variants.build import check_delta
from adapterhub_c.variants.masks import masks_from_bytes, masks_to_bytes, pack_mask, unpack_mask

warnings.filterwarnings("ignore", message="MatMul8bitLt")


def calib(n: int = 4, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 259, (length,), generator=g) for _ in range(n)]


RECIPES = [
    Recipe(prune="magnitude", sparsity=0.5),
    Recipe(prune="magnitude", sparsity=0.3, prune_granularity="layer"),
    Recipe(quant="nf4", prune="wanda", sparsity=0.5, calib="c"),
    Recipe(quant="int8", prune="2:4"),
    Recipe(quant="fp4", double_quant=True, prune="2:4", calib="c"),
    Recipe(quant="nf4", prune="ffn-channels", sparsity=0.25),
    Recipe(prune="ffn-channels", sparsity=0.5, calib="c"),
    Recipe(prune="magnitude", sparsity=0.4, include_embeddings=True, include_lm_head=True),
]


# ---- keep-masks -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (63,), (64,), (65,), (3, 5), (13, 17), (2, 3, 11), (0,),
                                   (1000003,)])
def test_mask_round_trip_is_bit_exact_for_any_length(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    for density in (0.0, 0.3, 0.5, 1.0):
        mask = torch.rand(shape, generator=g) < density
        packed = pack_mask(mask)
        n = mask.numel()
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)  # 1 bit per weight, last byte padded
        back = unpack_mask(packed, shape)
        assert back.dtype == torch.bool and back.shape == mask.shape and torch.equal(back, mask)
    masks = {"a.weight": torch.rand(shape, generator=g) < 0.5, "b.weight": torch.rand((5, 3), generator=g) < 0.5}
    again = masks_from_bytes(masks_to_bytes(masks))
    assert set(again) == set(masks) and all(torch.equal(again[k], masks[k]) for k in masks)


def test_corrupt_mask_files_raise_integrity_error():
    data = masks_to_bytes({"w": torch.tensor([True, False, True])})
    for bad in (b"", data[:5], b"\xff" * 8 + data[8:], data.replace(b"adapterhub_c.keep-mask", b"something-else-entirely")):
        with pytest.raises(IntegrityError):
            masks_from_bytes(bad)
    with pytest.raises(IntegrityError):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (3, 8))  # 24 bits need 3 bytes


# ---- delta folders load bit for bit what a whole-model copy loads ---------------------------


def _delta_folder(build, base_dir, dest):
    folder = build.save_delta(dest)
    (folder / "base").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(base_dir / name, folder / "base" / name)
    return folder


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.describe() + ("+emb+head" if r.include_embeddings else ""))
def test_delta_variant_logits_identical_to_the_full_copy_variant(recipe, tmp_path):
    base, _ = build_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model, _ = build_tiny_llama()
    build = apply_recipe(model, recipe, calib() if recipe.uses_calibration else None)
    check_delta(build, tmp_path / "base")
    full = build.save(tmp_path / "full")  # the pre-issue-15 storage: the whole pruned model
    delta = _delta_folder(build, tmp_path / "base", tmp_path / "delta")
    own = sum(p.stat().st_size for p in delta.iterdir() if p.is_file())  # masks / indices + config + recipe
    masks = delta / "masks.safetensors"
    if recipe.prune == "ffn-channels":
        assert not masks.exists() and (delta / "kept_indices.safetensors").stat().st_size < 2048 + 8 * 2 * 128
    else:  # 1 bit per pruned weight + a header (name, offsets, shape: under 200 bytes a tensor)
        header = 200 * len(build.masks) + 512
        assert build.stats.target_params_base / 8 < masks.stat().st_size < build.stats.target_params_base / 8 + header
    assert own < (full / "model.safetensors").stat().st_size / 20
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(5))
    old, new = load_variant_model(full), load_variant_model(delta)
    assert type(old.model.layers[0].mlp.up_proj) is type(new.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)
    for (name, a), (name_b, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("prune", ["wanda", "ffn-channels"])
def test_other_architectures_store_deltas_with_the_full_copy_logits(model_type, prune, tmp_path):
    """Fused gate/up (phi3), Conv1D with biases (gpt2) and a head saved under a legacy name
    (gpt_neox: lm_head as embed_out) are stored as masks / a channel plan over the base."""
    from adapterhub_c.models.tiny import build_tiny

    base, _ = build_tiny(model_type)
    base.save_pretrained(tmp_path / "base")
    model, _ = build_tiny(model_type)
    build = apply_recipe(model, Recipe(prune=prune, sparsity=0.5, calib="builtin:pydoc", calib_samples=4,
                                       calib_seq_len=24), calib())
    check_delta(build, tmp_path / "base")  # refused before: ffn-channels on all three, wanda on gpt_neox
    if prune == "ffn-channels":
        assert build.channel_plan and all(entry[0] in build.kept_indices for entry in build.channel_plan.values())
    full = build.save(tmp_path / "full")
    delta = _delta_folder(build, tmp_path / "base", tmp_path / "delta")
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    old, new = load_variant_model(full), load_variant_model(delta)
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)


def test_bf16_base_delta_equals_the_full_copy_made_from_the_upcast_base(tmp_path):
    """A base stored in bf16, pruned in float32 (as create_variant does), loaded in float32."""
    base, _ = build_tiny_llama()
    base.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    recipe = Recipe(quant="nf4", prune="wanda", sparsity=0.5, calib="c")
    build = apply_recipe(model, recipe, calib(), storage_dtype=torch.bfloat16)
    check_delta(build, tmp_path / "base")
    full = build.save(tmp_path / "full")
    delta = _delta_folder(build, tmp_path / "base", tmp_path / "delta")
    ids = torch.randint(3, 259, (1, 12))
    with torch.no_grad():
        a = load_variant_model(full, compute_dtype=torch.float32)(ids).logits
        b = load_variant_model(delta, compute_dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)
    assert build.stats.export_bytes < build.stats.quantized_bytes  # embeddings exported in bf16, held in fp32


def test_check_delta_refuses_a_build_whose_kept_values_differ_from_the_base(tmp_path):
    base, _ = build_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model, _ = build_tiny_llama()
    build = apply_recipe(model, Recipe(prune="magnitude", sparsity=0.5))
    w = build.state_dict["model.layers.0.self_attn.q_proj.weight"]
    kept = w.nonzero()[0].tolist()
    w[kept[0], kept[1]] += 1.0  # a method that changes a kept value
    with pytest.raises(AdaptError, match="changes kept values"):
        check_delta(build, tmp_path / "base")


# ---- in the registry ------------------------------------------------------------------------

REGISTRY_RECIPES = [dict(quant="nf4", prune="wanda", sparsity=0.5), dict(quant="int8", prune="2:4", calib=None),
                    dict(prune="ffn-channels", sparsity=0.25), dict(prune="magnitude", sparsity=0.5)]


@pytest.mark.parametrize("kwargs", REGISTRY_RECIPES, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_registered_variant_is_a_delta_with_the_full_copy_logits(reg, tiny_base, kwargs, tmp_path):
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.workflows.variants import calibration_ids, create_variant, list_variants, make_recipe

    fast = dict(calib_samples=4, calib_seq_len=64, eval_tokens=0)
    before = set(reg.blobs.all_digests())
    row, _ = create_variant(reg, tiny_base.name, **kwargs, **fast)
    new_blobs = set(reg.blobs.all_digests()) - before
    assert row.files["base/model.safetensors"] == tiny_base.files["model.safetensors"]  # shared, not copied
    assert new_blobs == {d for d in row.files.values() if d not in set(tiny_base.files.values())}
    assert {r for r in row.files if not r.startswith("base/")} <= {"config.json", "variant.json", "masks.safetensors",
                                                                    "kept_indices.safetensors"}
    own = sum(reg.blobs.path_for(d).stat().st_size for d in new_blobs)
    summary = next(v for v in list_variants(reg) if v["id"] == row.id)
    assert summary["stored_bytes"] == own == row.stats["own_bytes"]

    # the pre-issue-15 variant: the whole pruned model, built the same way and loaded from its folder
    model, tokenizer = load_base_model(reg, tiny_base)
    recipe = make_recipe(**kwargs, **{k: v for k, v in fast.items() if k != "eval_tokens"})
    old = load_variant_model(apply_recipe(model, recipe, calibration_ids(tokenizer, recipe)).save(tmp_path / "old"))
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(load_variant(reg, row.name)(ids).logits, old(ids).logits)


# ---- registries written before issue 15 -------------------------------------------------------


def _old_full_copy_variant(reg, base, tmp_path, recipe_kwargs, name):
    """A variant row + blobs exactly as create_variant wrote them before issue 15 (a whole-model copy)."""
    import json

    from adapterhub_c.registry.models import Variant
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.variants import calibration_ids, make_recipe

    model, tokenizer = load_base_model(reg, base)
    recipe = make_recipe(**recipe_kwargs)
    build = apply_recipe(model, recipe, calibration_ids(tokenizer, recipe))
    folder = build.save(tmp_path / name)  # config.json, model.safetensors, variant.json (+ kept_indices)
    stats = build.stats.to_dict()
    stats["stored_bytes"] = stats.pop("full_copy_bytes")  # the old stats: the blob's tensor bytes
    for key in ("export_bytes",):
        stats.pop(key)
    stats.update(perplexity=None, base_perplexity=None, eval_tokens=0, eval_data="builtin:pydoc:test")
    (folder / "variant.json").write_text(json.dumps({"recipe": recipe.to_dict(), "stats": stats}, indent=2,
                                                    sort_keys=True))
    files = reg.blobs.put_folder(folder)
    size = sum(reg.blobs.path_for(d).stat().st_size for d in set(files.values()))
    stats.update(own_bytes=size, stored_file_bytes=size, shares_base_weights=False)
    with reg.session() as s:
        row = Variant(base_id=base.id, name=name, recipe=recipe.canonical_json(), recipe_digest=recipe.digest(),
                      files=files, stats=stats, size_bytes=size, sparsity=stats["sparsity"])
        s.add(row)
        s.flush()
        reg.add_lineage(s, base, row, "variant-of")
    return row, load_variant_model(folder)


def test_a_registry_with_pre_issue_15_full_copy_variants_keeps_working(reg, tiny_base, tmp_path, cli):
    from adapterhub_c.registry import Registry
    from adapterhub_c.runtime.variants import load_variant, storage_form, variant_kept_indices
    from adapterhub_c.workflows.variants import create_variant, list_variants

    fast = dict(calib_samples=4, calib_seq_len=64)
    old_w, ref_w = _old_full_copy_variant(reg, tiny_base, tmp_path, dict(quant="nf4", prune="wanda", sparsity=0.5,
                                                                        **fast), "old-wanda")
    old_f, ref_f = _old_full_copy_variant(reg, tiny_base, tmp_path, dict(prune="ffn-channels", sparsity=0.25, **fast),
                                          "old-ffn")
    assert "model.safetensors" in old_w.files and old_w.files["model.safetensors"] != tiny_base.files[
        "model.safetensors"]
    reg.close()
    reopened = Registry(home=reg.home)  # opened as a user upgrading would: migrations run, rows untouched
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(2))
    for row, ref in ((old_w, ref_w), (old_f, ref_f)):
        row = reopened.get(row.name, "variant")
        assert storage_form(row) == "full-copy"
        with torch.no_grad():
            assert torch.equal(load_variant(reopened, row.name)(ids).logits, ref(ids).logits)
    kept = variant_kept_indices(reopened, "old-ffn")
    assert set(kept) == {"model.layers.0.mlp", "model.layers.1.mlp"} and all(len(v) == 96 for v in kept.values())
    # the same recipe is the same variant: create returns the old row, it does not build a second one
    again, created = create_variant(reopened, tiny_base.name, quant="nf4", prune="wanda", sparsity=0.5,
                                    eval_tokens=0, **fast)
    assert not created and again.id == old_w.id
    rows = {r["name"]: r for r in list_variants(reopened)}
    assert rows["old-wanda"]["storage"] == "full-copy" and rows["old-wanda"]["stored_bytes"] == old_w.size_bytes
    r = cli("variant", "ls")
    assert r.code == 0 and "old-wanda" in r.out, r.err
    # a new variant beside the old ones is a delta; gc keeps every blob somebody needs
    new, _ = create_variant(reopened, tiny_base.name, prune="magnitude", sparsity=0.5, eval_tokens=0)
    assert storage_form(new) == "delta"
    reopened.blobs.gc(reopened.referenced_digests())
    with torch.no_grad():
        assert torch.equal(load_variant(reopened, "old-wanda")(ids).logits, ref_w(ids).logits)
        load_variant(reopened, new.name)(ids)
    reopened.close()


# ---- bad input: what the store needs stays, broken blobs are named --------------------------------


def test_rm_base_refused_while_variants_need_its_blob_and_gc_keeps_it(cli, reg, tiny_base):
    from adapterhub_c.workflows.variants import create_variant

    row, _ = create_variant(reg, tiny_base.name, prune="magnitude", sparsity=0.5, eval_tokens=0)
    weights = tiny_base.files["model.safetensors"]
    r = cli("rm", tiny_base.name, "--yes")
    assert r.code == 2 and "needed by 1 variant" in r.err and row.name in r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert reg.get(tiny_base.name, "base") is not None
    # even with the base row gone (a registry edited by hand), gc keeps what the variant points at
    with reg.session() as s:
        from adapterhub_c.registry.models import BaseModel

        s.get(BaseModel, tiny_base.id).files = {}
    r = cli("gc", "--json")
    assert r.code == 0, r.err
    assert reg.blobs.exists(weights) and all(reg.blobs.exists(d) for d in row.files.values())
    ids = torch.randint(3, 259, (1, 8))
    from adapterhub_c.runtime.variants import load_variant

    with torch.no_grad():
        load_variant(reg, row.name)(ids)
    with reg.session() as s:
        s.get(BaseModel, tiny_base.id).files = dict(tiny_base.files)
    assert cli("rm", tiny_base.name, "--yes", "--cascade").code == 0
    cli("gc")
    assert not reg.blobs.exists(weights) and not reg.blobs.exists(row.files["masks.safetensors"])


@pytest.mark.parametrize("damage", ["corrupt", "missing", "garbage"])
def test_missing_or_corrupt_mask_blob_is_one_line_integrity_error_naming_the_variant(cli, reg, tiny_base, damage,
                                                                                    tmp_path):
    from adapterhub_c.workflows.variants import create_variant

    row, _ = create_variant(reg, tiny_base.name, quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0)
    path = reg.blobs.path_for(row.files["masks.safetensors"])
    before = {r.name: r.files for r in [reg.get(row.name, "variant")]}
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "missing":
        path.unlink()
    else:  # a blob whose digest matches but is not a mask file (written by something else)
        from adapterhub_c.registry.models import Variant

        digest = reg.blobs.put_bytes(b"not a safetensors file at all")
        with reg.session() as s:
            v = s.get(Variant, row.id)
            v.files = {**v.files, "masks.safetensors": digest}
    for args in (["eval", tiny_base.name, "--variant", row.name, "--data", "builtin:pydoc", "--max-tokens", "64"],
                 ["export", row.name, "--out", str(tmp_path / "out")]):
        r = cli(*args)
        assert r.code == 1, (args, r.out, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and row.name in lines[0] and "keep-mask" in lines[0], r.err
    assert not (tmp_path / "out").exists()
    if damage != "garbage":
        assert {r.name: r.files for r in [reg.get(row.name, "variant")]} == before  # nothing changed
