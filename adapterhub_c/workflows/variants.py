"""Registry operations on variants: create (build, measure, register), load, list.

What a variant row stores (its `files`, digests into the blob store; see variants/build.py):
- pruned variants (delta): the base's `config.json` / `*.safetensors` blobs under `base/`
  (the same digests as the base row's, so nothing is copied and `gc` keeps them), the
  variant's own `config.json` (shrunk `intermediate_size` after ffn-channels),
  `masks.safetensors` (bit-packed keep-masks; magnitude / wanda / 2:4) or
  `kept_indices.safetensors` (ffn-channels), and `variant.json` (recipe + stats).
  Before storing, `check_delta` verifies that base × masks is bit for bit the pruned model.
- unpruned variants (quantization only): the base's own `config.json` / `*.safetensors`
  blobs at the top level plus `variant.json`; quantization happens at load.
- GGUF variants (`--quant gguf:TYPE`): the GGUF file made from the (pruned) weights, the
  variant's `config.json` and `variant.json` (workflows/ggufvariants.py); nothing shared.
- variants made before issue 15 hold a whole-model `model.safetensors` of their own; they
  are read as they are (runtime/variants.py tells the three forms apart).
The recipe (canonical JSON) and its digest identify a variant: creating the same recipe
on the same base again returns the existing row.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from adapterhub_c.errors import AdaptError, AdaptWarning, UsageError
from adapterhub_c.evals.data import DEFAULT_CORPUS, load_dataset
from adapterhub_c.evals.evaluate import evaluate_model
from adapterhub_c.evals.metrics import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, token_stream
from adapterhub_c.formats.checkpoint import load_checkpoint
from adapterhub_c.models.device import resolve_device
from adapterhub_c.models.weights import is_gguf_weight_file
from adapterhub_c.options.variant import (
    CALIB_USERS,
    DEFAULT_CALIB,
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_CALIB_SEQ_LEN,
    DefaultCalib,
    VariantOptions,
)
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import check_name_syntax
from adapterhub_c.registry.models import BaseModel, Evaluation, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.bases import load_base_model
from adapterhub_c.runtime.variants import COMPUTE_DTYPE, GGUF, origin_of, storage_form, variant_recipe
from adapterhub_c.variants.build import (
    BASE_DIR,
    KEPT_FILE,
    STORAGE_DELTA,
    VARIANT_FILE,
    apply_recipe,
    check_delta,
    load_variant_model,
    storage_dtype,
)
from adapterhub_c.variants.calibration import calibration_rows
from adapterhub_c.variants.quantize import load_quantized
from adapterhub_c.variants.recipe import Recipe
from adapterhub_c.workflows.ggufvariants import write_gguf_build

EVAL_DATA = DEFAULT_CORPUS
EVAL_SPLIT = "test"
# bnb announces on every int8 forward that float32 inputs are cast to float16 (by design of LLM.int8)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


# ---- loading ---------------------------------------------------------------------------










# ---- creating --------------------------------------------------------------------------


def short_base_name(base: BaseModel) -> str:
    """The base's name without ``builtin:`` or an owner: the stem of its variants' default names."""
    name = base.name.split(":", 1)[-1].rsplit("/", 1)[-1]
    return name or base.id[:8]


def default_variant_name(base: BaseModel, recipe: Recipe) -> str:
    """`<base-short>-<recipe>`, e.g. 'smollm2-135m-nf4-wanda50'."""
    parts = []
    if recipe.quant == "gptq":  # e.g. gptq4, gptq3g128-act-sym
        parts.append(f"gptq{recipe.bits}" + (f"g{recipe.group_size}" if recipe.group_size else "")
                     + "-act" * recipe.act_order + "-sym" * recipe.sym)
    elif recipe.gguf_type is not None:  # e.g. gguf-q4_k_m
        parts.append(f"gguf-{recipe.gguf_type.lower()}")
    elif recipe.quant != "none":
        parts.append(recipe.quant + ("dq" if recipe.double_quant else ""))
    if recipe.prune != "none":
        pct = f"{recipe.sparsity * 100:g}".replace(".", "p")
        label = {"2:4": "2of4", "magnitude": f"mag{pct}", "wanda": f"wanda{pct}",
                 "ffn-channels": f"ffn{pct}", "sparsegpt": f"sparsegpt{pct}",
                 "sparsegpt:2:4": "sparsegpt2of4"}[recipe.prune]
        if recipe.prune_granularity == "layer":
            label += "-layer"
        if recipe.prune in ("2:4", "ffn-channels") and recipe.calib is None:
            label += "-mag"
        parts.append(label)
    if recipe.moefy:  # e.g. moe8k2, moe8k2-sim
        parts.append(f"moe{recipe.experts}k{recipe.active}" + "-sim" * (recipe.moe_router == "similarity"))
    if recipe.include_embeddings:
        parts.append("emb")
    if recipe.include_lm_head:
        parts.append("head")
    return "-".join([short_base_name(base)] + parts)


def unique_variant_name(s, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``… if a variant has it (in session ``s``)."""
    name, i = stem, 1
    while s.scalar(select(Variant.id).where(Variant.name == name)) is not None:
        i += 1
        name = f"{stem}-{i}"
    return name


def make_recipe(*, quant: str = "none", double_quant: bool = False, prune: str = "none",
                sparsity: float | None = None, granularity: str | None = None, calib: str | None = DEFAULT_CALIB,
                calib_samples: int = DEFAULT_CALIB_SAMPLES, calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
                **recipe_fields: Any) -> Recipe:
    """A validated Recipe from create_variant's options (UsageError on bad input).

    The default calibration set (``options.variant.DEFAULT_CALIB``) is used only by the
    methods that read activations (wanda, 2:4 and ffn-channels score by activations when
    given one); an explicitly named one is refused where it would go unused. `calib=None`
    gives magnitude-scored 2:4 / ffn-channels. ``recipe_fields``: the other fields of
    ``Recipe`` (include_embeddings, include_lm_head, …), passed on as they are.
    """
    prune_l = str(prune).lower()
    if isinstance(calib, DefaultCalib) and prune_l not in CALIB_USERS and str(quant).lower() != "gptq" \
            and not recipe_fields.get("moefy"):
        calib = None
    if sparsity is not None and prune_l == "none" and sparsity == 0:
        sparsity = None
    recipe = Recipe(quant=quant, double_quant=double_quant, prune=prune, sparsity=sparsity,
                    prune_granularity=granularity, calib=calib, calib_samples=calib_samples,
                    calib_seq_len=calib_seq_len, **recipe_fields)
    if recipe.quant == "none" and recipe.prune == "none" and not recipe.moefy:
        raise UsageError("this recipe compresses nothing: give a quantization (--quant), a pruning method (--prune) "
                         "and/or --moefy")
    return recipe


def calibration_ids(tokenizer, recipe: Recipe) -> list[torch.Tensor] | None:
    """The recipe's calibration input: the train split of `recipe.calib` as one token stream
    (texts joined by EOS) cut into `calib_samples` consecutive rows of `calib_seq_len` tokens.
    None when the recipe uses no calibration."""
    if not recipe.uses_calibration:
        return None
    return calibration_rows(tokenizer, recipe.calib, recipe.calib_samples, recipe.calib_seq_len)


def _find_base_perplexity(reg: Registry, base: BaseModel, tokens: int) -> float | None:
    with reg.session() as s:
        rows = s.scalars(select(Evaluation).where(
            Evaluation.base_id == base.id, Evaluation.variant_id.is_(None), Evaluation.artifact_id.is_(None),
            Evaluation.prompt_id.is_(None), Evaluation.dataset == EVAL_DATA, Evaluation.split == EVAL_SPLIT,
            Evaluation.metric == "perplexity").order_by(Evaluation.id.desc())).all()
        for ev in rows:
            d = ev.details or {}
            if d.get("tokens") == tokens and d.get("max_length") and d.get("stride"):
                if (d["max_length"], d["stride"]) == (DEFAULT_MAX_LENGTH, DEFAULT_STRIDE):
                    return ev.value
    return None


def perplexity_details(model, tokenizer, eval_tokens: int, progress: Progress | None) -> dict:
    """A loaded model's perplexity on the variants' evaluation tokens, with its details."""
    res = evaluate_model(model, tokenizer, EVAL_DATA, EVAL_SPLIT, max_tokens=eval_tokens, progress=progress)
    return res["_details"]["perplexity"]


def _base_weight_files(base: BaseModel) -> dict[str, str]:
    """The base's config and weight blobs (what an unpruned variant points at)."""
    keep = {}
    for rel, digest in (base.files or {}).items():
        if rel in ("config.json", "generation_config.json") or rel.endswith(".safetensors") \
                or rel.endswith(".safetensors.index.json") or is_gguf_weight_file(rel):
            keep[rel] = digest
    if "config.json" not in keep or not any(r.endswith(".safetensors") or is_gguf_weight_file(r) for r in keep):
        raise UsageError(f"base {base.name!r} has no safetensors or GGUF weights to build a variant from")
    return keep


STORAGE_FULL = "full-copy"


def _delta_refusal(build, base_folder) -> str | None:
    """Why this build cannot be stored as masks over the base (None when it can)."""
    try:
        check_delta(build, base_folder)
    except AdaptError as e:
        return str(e)
    return None


def create_variant(reg: Registry, base_ref: str | BaseModel, options: VariantOptions | None = None, *,
                   name: str | None = None, progress: Progress | None = None,
                   **fields: Any) -> tuple[Variant, bool]:
    """Build, measure and register a compressed variant of a base; returns (row, created).

    ``options``: a ``VariantOptions`` (``fields`` set single fields of it by the same names:
    ``quant``, ``prune``, ``sparsity``, ``granularity``, ``calib``, ``eval_tokens``, …).
    Idempotent: the same recipe (canonical JSON, see recipe.py) on the same base returns
    the existing row with created=False, whatever `name` says. Bad input (unknown base,
    a reference-only base, bad sparsity / quantization / 2:4 sparsity, ffn-channels on a
    model without a gated MLP, a taken name) raises UsageError with nothing registered.

    Pruning runs on the base loaded in float32; calibration (wanda; 2:4 and ffn-channels
    when `calib` is set, which is the default) reads `calib_samples` × `calib_seq_len`
    tokens of the `calib` data set's train split. Pruned variants store the pruned weights
    (+ kept indices) as blobs; unpruned ones reuse the base's weight blobs (no copy).
    Quantization is applied by bitsandbytes at load. With `eval_tokens` > 0 the perplexity
    of the variant (and of the base, unless already recorded for the same token count) on
    the first `eval_tokens` tokens of builtin:pydoc test is measured and recorded as
    Evaluation rows and in `stats` ('perplexity', 'base_perplexity').
    """
    opts = VariantOptions.of(options, fields)
    recipe = make_recipe(**opts.recipe_fields())
    if name is not None:
        check_name_syntax(name, "variant name", namespace=False)
    base, existing, final_name = _find_or_name(reg, base_ref, recipe, name)
    if existing is not None:
        if name is not None and name != existing.name:
            warnings.warn(same_recipe_warning(existing.name, name), AdaptWarning, stacklevel=2)
        return existing, False
    base_files = _base_weight_files(base)
    params = dict(base=base.name, recipe=recipe.to_dict(), name=final_name, eval_tokens=opts.eval_tokens,
                  device=str(opts.device))
    with record_run(reg, "variant create", params) as run:
        model, tokenizer = load_base_model(reg, base, opts.device)
        base_ppl, base_eval = base_perplexity(reg, base, model, tokenizer, opts.eval_tokens, progress)
        calib_ids = calibration_ids(tokenizer, recipe)
        base_folder = reg.materialize(base)
        # a GGUF recipe prunes here (if at all) and quantizes when the GGUF is written (_store_build)
        build_recipe = replace(recipe, quant="none") if recipe.gguf_type else recipe
        build = apply_recipe(model, build_recipe, calib_ids, progress=progress,
                             storage_dtype=storage_dtype(base_folder))
        stats = build.stats.to_dict()
        meta = {"recipe": recipe.to_dict(), "stats": stats}
        with reg.staging("variant") as tmp:
            files, load_from = _store_build(reg, Path(tmp), recipe, build, base_folder, base_files, meta)
            del build, model
            variant_eval = _variant_perplexity(load_from, recipe, tokenizer, opts, progress)
            variant_ppl = variant_eval["perplexity"] if variant_eval else None
            stats.update(perplexity=variant_ppl, base_perplexity=base_ppl, eval_tokens=opts.eval_tokens,
                         eval_data=f"{EVAL_DATA}:{EVAL_SPLIT}")
            meta["stats"] = stats
            files[VARIANT_FILE] = reg.blobs.put_bytes(json.dumps(meta, indent=2, sort_keys=True).encode())
        size = _file_sizes(reg, base, files, stats, meta)
        made = _Made(base, final_name, recipe, files, stats, size, base_eval, variant_eval)
        row, created = _insert_variant(reg, made, run.id)
        run.output = ({"variant": row.name, "id": row.id, "created": True, "recipe": recipe.describe(),
                       "perplexity": variant_ppl, "base_perplexity": base_ppl, "size_bytes": size} if created
                      else {"variant": row.name, "id": row.id, "created": False})
        return row, created


def same_recipe_warning(existing: str, asked: str) -> str:
    """What create says when ``--name asked`` got the variant ``existing`` that the same recipe already made."""
    return (f"--name {asked!r} ignored: variant {existing!r} already has this recipe on this base "
            f"(a recipe makes one variant); returned {existing!r}")


def _find_or_name(reg: Registry, base_ref: str | BaseModel, recipe: Recipe,
                  name: str | None) -> tuple[BaseModel, Variant | None, str]:
    """The base; the variant the same recipe already made of it (or None); the name a new one takes."""
    digest = recipe.digest()
    with reg.session() as s:
        base = base_ref if isinstance(base_ref, BaseModel) else reg.resolve(s, base_ref, "base")
        base = s.get(BaseModel, base.id)
        if base.is_reference:
            raise UsageError(f"base {base.name!r} is only a reference; fetch its weights first (adapt base add)")
        existing = s.scalar(select(Variant).where(Variant.base_id == base.id, Variant.recipe_digest == digest))
        if existing is not None:
            return base, existing, existing.name
        if name is not None and s.scalar(select(Variant.id).where(Variant.name == name)) is not None:
            raise UsageError(f"a variant named {name!r} already exists; pick another --name")
        return base, None, name or unique_variant_name(s, default_variant_name(base, recipe))


def base_perplexity(reg: Registry, base: BaseModel, model, tokenizer, eval_tokens: int,
                     progress: Progress | None) -> tuple[float | None, dict | None]:
    """The base's perplexity on the evaluation tokens: recorded already (details None) or measured now."""
    if not eval_tokens:
        return None, None
    n_scored = token_stream(tokenizer, load_dataset(EVAL_DATA, EVAL_SPLIT).as_texts(), eval_tokens).numel() - 1
    recorded = _find_base_perplexity(reg, base, n_scored)
    if recorded is not None:
        return recorded, None
    details = perplexity_details(model, tokenizer, eval_tokens, progress)
    return details["perplexity"], details


def _store_build(reg: Registry, tmp: Path, recipe: Recipe, build, base_folder: Path, base_files: dict[str, str],
                 meta: dict) -> tuple[dict[str, str], Path]:
    """Store what the variant adds to its base; (its files, the folder its model loads from)."""
    if recipe.gguf_type is not None:  # the GGUF file llama.cpp runs, made from the pruned weights
        folder = tmp / "variant"
        meta["stats"].update(write_gguf_build(build.state_dict, build.config, base_folder, folder, recipe.gguf_type))
        meta["storage"] = GGUF
        return reg.blobs.put_folder(folder), folder
    if not recipe.stores_weights:  # bnb quantization only: the base's own blobs, quantized at load
        return dict(base_files), base_folder
    why_not = _delta_refusal(build, base_folder)
    if why_not is not None:
        # base x masks is not the pruned model here: keep the whole pruned copy (the old form)
        message = f"{why_not}; variant stored as a whole pruned copy instead"
        warnings.warn(message, AdaptWarning, stacklevel=3)
        meta["warnings"] = [message]
        full_dir = build.save(tmp / "variant")
        (full_dir / VARIANT_FILE).unlink()  # written later, with the measured perplexity
        meta["storage"] = STORAGE_FULL
        return reg.blobs.put_folder(full_dir), full_dir
    # store the delta only: keep-masks / kept channels + config, over the base's shared weight blobs
    delta_dir = build.save_delta(tmp / "variant")
    (delta_dir / VARIANT_FILE).unlink()  # written later, with the measured perplexity
    own = reg.blobs.put_folder(delta_dir)
    meta["storage"] = STORAGE_DELTA
    files = {**{f"{BASE_DIR}/{rel}": d for rel, d in base_files.items()}, **own}
    return files, reg.blobs.materialize(files, tmp / "view")  # what load_variant will read


def _variant_perplexity(load_from: Path, recipe: Recipe, tokenizer, opts: VariantOptions,
                        progress: Progress | None) -> dict | None:
    """The stored variant, loaded as ``load_variant`` will, measured on the evaluation tokens (None: skipped)."""
    if not opts.eval_tokens:
        return None
    device = str(resolve_device(opts.device))
    if recipe.gguf_type is not None:
        vmodel = load_checkpoint(load_from, COMPUTE_DTYPE, device)
    elif not recipe.stores_weights:
        vmodel = load_quantized(load_from, recipe.quant, recipe.double_quant, COMPUTE_DTYPE, device,
                                include_lm_head=recipe.include_lm_head, dtype=COMPUTE_DTYPE)
    else:
        vmodel = load_variant_model(load_from, recipe=recipe, device=device, compute_dtype=COMPUTE_DTYPE)
    return perplexity_details(vmodel, tokenizer, opts.eval_tokens, progress)


def _file_sizes(reg: Registry, base: BaseModel, files: dict[str, str], stats: dict, meta: dict) -> int:
    """Fill the stored sizes into ``stats``; the bytes of every file the variant references."""
    shared = set((base.files or {}).values())
    own = {d for r, d in files.items() if d not in shared}
    size = sum(reg.blobs.path_for(d).stat().st_size for d in set(files.values()))
    stats["own_bytes"] = stats["stored_bytes"] = sum(reg.blobs.path_for(d).stat().st_size for d in own)
    stats["stored_file_bytes"] = size
    stats["storage"] = meta.get("storage") or "base"
    stats["shares_base_weights"] = stats["storage"] not in (STORAGE_FULL, GGUF)
    return size


@dataclass
class _Made:
    """A built and stored variant, ready for its row."""

    base: BaseModel
    name: str
    recipe: Recipe
    files: dict[str, str]
    stats: dict
    size: int
    base_eval: dict | None
    variant_eval: dict | None


def _insert_variant(reg: Registry, made: _Made, run_id: str) -> tuple[Variant, bool]:
    """Add the row, its lineage and its evaluations; (row, True), or (theirs, False) when built concurrently."""
    base, digest = made.base, made.recipe.digest()
    with reg.session() as s:
        theirs = s.scalar(select(Variant).where(Variant.base_id == base.id, Variant.recipe_digest == digest))
        if theirs is not None:  # built concurrently by another process: keep theirs
            return theirs, False
        if s.scalar(select(Variant.id).where(Variant.name == made.name)) is not None:
            raise UsageError(f"a variant named {made.name!r} was created meanwhile; pick another --name")
        row = Variant(base_id=base.id, name=made.name, recipe=made.recipe.canonical_json(), recipe_digest=digest,
                      files=made.files, stats=made.stats, size_bytes=made.size, sparsity=made.stats["sparsity"],
                      run_id=run_id)
        s.add(row)
        s.flush()
        reg.add_lineage(s, base, row, "variant-of")
        for variant_id, ev in ((None, made.base_eval), (row.id, made.variant_eval)):
            if ev is not None:
                s.add(Evaluation(base_id=base.id, variant_id=variant_id, dataset=EVAL_DATA, split=EVAL_SPLIT,
                                 metric="perplexity", value=float(ev["perplexity"]), details=ev, run_id=run_id))
        s.flush()
        return row, True


# ---- listing ---------------------------------------------------------------------------


def _ratio(n, d):
    return n / d if n is not None and d else None


def variant_summary(row: Variant, base: BaseModel | None) -> dict[str, Any]:
    """One variant as a flat dict (the columns of `adapt variant ls`).

    Sizes, each also as a fraction of the base at 16 bits (`*_ratio`):
    - stored_bytes: what the variant adds to the store (its blobs not shared with the base:
      masks / kept indices, config, recipe; the whole copy for pre-issue-15 variants);
    - loaded_bytes: what the loaded variant holds in memory (bnb formats + the unquantized
      tensors in the float32 compute dtype);
    - export_bytes: the size of an `hf` export, measured by the last `adapt export` if any
      (`export_measured`), else the tensor bytes estimated at build time.
    """
    recipe, origin = variant_recipe(row), origin_of(row)
    st = row.stats or {}
    base_params = st.get("base_params") or 0
    ppl, base_ppl = st.get("perplexity"), st.get("base_perplexity")
    fp16 = st.get("base_fp16_bytes")
    exported = (st.get("exports") or {}).get("hf")
    export_bytes = exported["bytes"] if exported else st.get("export_bytes")
    stored = row.stored_bytes
    return {
        "name": row.name,
        "id": row.id,
        "base": base.name if base else row.base_id,
        "recipe": st["imported"] if origin else recipe.describe(),
        "recipe_json": {"origin": origin} if origin else recipe.to_dict(),
        "source": st.get("source"),
        "params_kept": st.get("params_nonzero"),
        "params_kept_frac": (st.get("params_nonzero") or 0) / base_params if base_params else None,
        "sparsity": row.sparsity,
        "bits_per_weight": st.get("bits_per_weight"),
        "storage": storage_form(row),
        "stored_bytes": stored,
        "stored_ratio": _ratio(stored, fp16),
        "own_bytes": st.get("own_bytes"),
        "referenced_bytes": row.size_bytes,
        "shares_base_weights": storage_form(row) not in ("full-copy", GGUF),
        "loaded_bytes": row.loaded_bytes,
        "loaded_ratio": _ratio(row.loaded_bytes, fp16),
        "export_bytes": export_bytes,
        "export_ratio": _ratio(export_bytes, fp16),
        "export_measured": bool(exported),
        "ideal_bytes": st.get("ideal_bytes"),
        "base_fp16_bytes": fp16,
        "ideal_ratio": _ratio(st.get("ideal_bytes"), fp16),
        "perplexity": ppl,
        "base_perplexity": base_ppl,
        "ppl_ratio": ppl / base_ppl if ppl and base_ppl else None,
        "eval_tokens": st.get("eval_tokens"),
        "kept_indices": KEPT_FILE in (row.files or {}),
        "moe": st.get("moe"),  # moefy: experts, active, mlp_flops_fraction, captured (router quality)
        "created_at": row.created_at.isoformat() if row.created_at else None,
    }


def show_variant(reg: Registry, name: str) -> dict[str, Any]:
    """One variant's summary (as a row of `list_variants`) by name or id prefix."""
    with reg.session() as s:
        row = reg.resolve(s, name, "variant")
        return variant_summary(row, s.get(BaseModel, row.base_id))


def list_variants(reg: Registry, base: str | None = None) -> list[dict[str, Any]]:
    """All variants (optionally of one base) as dicts, oldest first."""
    with reg.session() as s:
        q = select(Variant).order_by(Variant.created_at, Variant.name)
        if base is not None:
            q = q.where(Variant.base_id == reg.resolve(s, base, "base").id)
        rows = s.scalars(q).all()
        bases = {b.id: b for b in s.scalars(select(BaseModel))}
        return [variant_summary(r, bases.get(r.base_id)) for r in rows]
