"""adapt variant add: a pre-quantized checkpoint of a registered base, as a variant.

``add_variant(reg, REPO, base)`` downloads a Hub repo (the client that pulls bases and
adapters, ``--include`` / ``--exclude`` to pick files; a local folder is read in place),
recognises its quantization (formats/checkpoint.py: compressed-tensors, GPTQ, bitsandbytes;
anything else is refused in one line naming what was found), checks it against the base
(architecture and shape fields of config.json, then every weight's shape once loaded) and
stores the checkpoint's files as they are (DESIGN.md "Registry": "the file itself for …
an imported checkpoint"). Ŵ is computed when the variant is loaded (runtime/variants.py).

A GGUF file (llama.cpp's format) is imported the same way: ``FILE.gguf`` (a local file), a
folder or Hub repo holding one (``REPO:FILE.gguf`` or ``--include`` picks one when it holds
several quantizations). Its architecture and every tensor's shape are checked against the base
from the file's header (formats/gguf_read.py: one line naming the first tensor that differs; a
truncated file or a type the ``gguf`` package cannot dequantize is refused before anything is
stored); the row stores the GGUF file (its stored size) and the base's ``config.json`` blob
(shared, not counted), and Ŵ is the file's dequantized tensors.

Identity: an imported variant has an origin instead of a recipe. The row's ``recipe``
column holds ``{"origin": {method, scheme, files}, "version": 1}`` in canonical JSON, where
``files`` maps every stored file to its sha256, so the same checkpoint added twice (from the
same repo, a copy of it, or a local folder) is one variant of a base. Where it came from
(repo, revision, commit, endpoint) is in the row's stats (``source``), not in its identity.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from adapterhub_c.errors import AdaptWarning, UsageError
from adapterhub_c.formats.checkpoint import (
    Checkpoint,
    check_architecture,
    gguf_scheme,
    inspect_checkpoint,
    load_checkpoint,
    read_config,
)
from adapterhub_c.formats.gguf_read import check_gguf_against, inspect_gguf
from adapterhub_c.hub import client
from adapterhub_c.models.weights import GGUF_SUFFIX, param_shapes
from adapterhub_c.options.variant import VariantAddOptions
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import check_name_syntax
from adapterhub_c.registry.blobs import sha256_file
from adapterhub_c.registry.models import BaseModel, Evaluation, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.bases import load_base_model
from adapterhub_c.runtime.variants import COMPUTE_DTYPE
from adapterhub_c.variants.quantize import dequantize_linear, is_bnb_linear, quantized_storage_bits
from adapterhub_c.workflows.hubcommon import split_repo
from adapterhub_c.workflows.variants import (
    EVAL_DATA,
    EVAL_SPLIT,
    base_perplexity,
    perplexity_details,
    short_base_name,
    unique_variant_name,
)

ORIGIN_VERSION = 1
_SKIPPED = ("README.md", ".gitattributes")
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class _Source:
    """A checkpoint folder on disk and where it came from."""

    folder: Path
    label: str  # how messages name it
    source: dict[str, Any]  # repo / revision / commit / endpoint, or the local path
    names: list[str] | None = None  # the files downloaded (a snapshot folder may hold more); None: all


def split_gguf_file(repo: str) -> tuple[str, str | None]:
    """``"REPO:FILE.gguf"`` → (``REPO``, ``FILE.gguf``); anything else → (repo, None)."""
    head, sep, tail = repo.rpartition(":")
    if sep and head and tail.lower().endswith(GGUF_SUFFIX):
        return head, tail
    return repo, None


def _fetch(repo: str, opts: VariantAddOptions, token: str | None, endpoint: str | None,
           progress: Progress | None) -> _Source:
    """The checkpoint's folder: a local folder (or GGUF file) as it is, else the Hub repo downloaded
    into the HF cache (``REPO:FILE.gguf``: that file only)."""
    local = Path(repo).expanduser()
    if local.is_dir():
        return _Source(local.resolve(), str(local), {"path": str(local.resolve())})
    if local.is_file():
        if not local.name.lower().endswith(GGUF_SUFFIX):
            raise UsageError(f"{local} is a file but not a .gguf; give a GGUF file, a checkpoint folder or a Hub repo")
        return _Source(local.resolve().parent, str(local), {"path": str(local.resolve())}, [local.name])
    repo, file = split_gguf_file(repo)
    if file is not None and opts.include:
        raise UsageError(f"{repo}:{file} names its file; drop --include (or give the file with --include only)")
    include = [file] if file is not None else list(opts.include or []) or None
    repo_id, revision = split_repo(repo, opts.revision)
    got = client.download_repo(repo_id, revision=revision, include=include,
                               exclude=list(opts.exclude or []) or None, token=token, endpoint=endpoint,
                               progress=progress)
    return _Source(Path(got.path), repo_id, {"repo": repo_id, "revision": revision or "main",
                                             "commit": got.commit_sha, "endpoint": client.public_endpoint(endpoint)},
                   list(got.files))


def checkpoint_files(folder: Path, label: str, names: list[str] | None = None) -> dict[str, Path]:
    """The files a variant stores: every file (of ``names``) but the card, .gitattributes, hidden and pickles."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if names is not None and rel not in names:
            continue
        if not p.is_file() or p.name in _SKIPPED or any(part.startswith(".") for part in rel.split("/")) \
                or rel.endswith(_PICKLES):
            continue
        files[rel] = p
    if not any(rel.endswith(".safetensors") for rel in files):
        raise UsageError(f"{label} holds no safetensors weights (pickle weights are not read)")
    return files


def gguf_file(src: _Source) -> Path | None:
    """The GGUF file the source names or holds (UsageError when it holds several and none was picked)."""
    names = src.names if src.names is not None else [p.relative_to(src.folder).as_posix()
                                                     for p in sorted(src.folder.rglob(f"*{GGUF_SUFFIX}"))]
    found = sorted(n for n in names if n.lower().endswith(GGUF_SUFFIX))
    if len(found) > 1:
        shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        raise UsageError(f"{src.label} holds {len(found)} GGUF files ({shown}); pick one with --include FILE "
                         "or REPO:FILE.gguf")
    return src.folder / found[0] if found else None


def origin_json(ckpt: Checkpoint, digests: dict[str, str]) -> str:
    """The canonical JSON that identifies an imported checkpoint (stored as the row's recipe)."""
    origin = {"method": ckpt.method, "scheme": ckpt.scheme, "files": dict(sorted(digests.items()))}
    return json.dumps({"origin": origin, "version": ORIGIN_VERSION}, sort_keys=True, separators=(",", ":"))


def _default_name(base: BaseModel, ckpt: Checkpoint, source: dict) -> str:
    stem = (source.get("repo") or source.get("path") or "checkpoint").rstrip("/").rsplit("/", 1)[-1]
    if source.get("file"):
        stem = Path(source["file"]).name[:-len(GGUF_SUFFIX)]
    short = short_base_name(base)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or f"{short}-{ckpt.method}"
    return name if name.startswith(short) else f"{short}-{name}"


def _find_base(reg: Registry, base_ref: str | BaseModel) -> BaseModel:
    with reg.session() as s:
        base = base_ref if isinstance(base_ref, BaseModel) else reg.resolve(s, base_ref, "base")
        base = s.get(BaseModel, base.id)
        if base.is_reference:
            raise UsageError(f"base {base.name!r} is only a reference; fetch its weights first (adapt base add)")
        return base


def _existing_or_name(reg: Registry, base: BaseModel, digest: str, name: str | None,
                      ckpt: Checkpoint, source: dict) -> tuple[Variant | None, str]:
    with reg.session() as s:
        existing = s.scalar(select(Variant).where(Variant.base_id == base.id, Variant.recipe_digest == digest))
        if existing is not None:
            return existing, existing.name
        if name is not None and s.scalar(select(Variant.id).where(Variant.name == name)) is not None:
            raise UsageError(f"a variant named {name!r} already exists; pick another --name")
        return None, name or unique_variant_name(s, _default_name(base, ckpt, source))


def _dense_weights(model) -> dict[str, torch.Tensor]:
    """{weight name: float32 Ŵ} of every linear (bnb layers dequantized) and the other parameters' shapes."""
    out = {}
    for mname, module in model.named_modules():
        if is_bnb_linear(module):
            out[f"{mname}.weight"] = dequantize_linear(module)
    for pname, p in model.named_parameters():
        out.setdefault(pname, p.detach())
    return out


def check_shapes(model, base_model, label: str, base_name: str) -> dict[str, torch.Tensor]:
    """UsageError unless the checkpoint's model has every base weight, in the base's shape; its Ŵ by name."""
    mine = _dense_weights(model)
    for pname, p in base_model.named_parameters():
        got = mine.get(pname)
        if got is None:
            raise UsageError(f"{label} has no {pname!r}, which base {base_name!r} has: not a quantized copy of it")
        if tuple(got.shape) != tuple(p.shape):
            raise UsageError(f"{label}: {pname} is {list(got.shape)}, in base {base_name!r} {list(p.shape)}: "
                             "not a quantized copy of it")
    return mine


def import_stats(model, weights: dict[str, torch.Tensor], base_model, files: dict[str, Path],
                 ckpt: Checkpoint) -> dict[str, Any]:
    """Sizes and counts of an imported checkpoint (the keys `variant_summary` reads)."""
    base_params = sum(p.numel() for p in base_model.parameters())
    own = sum(p.stat().st_size for p in files.values())
    loaded = sum(_held_bits(m) for m in model.modules() if is_bnb_linear(m)) // 8 + sum(
        p.numel() * p.element_size() for m in model.modules() if not is_bnb_linear(m)
        for p in m.parameters(recurse=False))
    return {
        "base_params": base_params, "params_total": sum(w.numel() for w in weights.values()),
        "params_nonzero": int(sum(int(torch.count_nonzero(w)) for w in weights.values())),
        "sparsity": 0.0, "model_sparsity": 0.0,
        "bits_per_weight": ckpt.scheme["bits"] if ckpt.method == "gguf" else quantized_bits_per_weight(files, weights),
        "own_bytes": own, "stored_bytes": own, "stored_file_bytes": own, "quantized_bytes": loaded,
        "base_fp16_bytes": base_params * 2, "storage": "imported", "shares_base_weights": False,
        "imported": ckpt.describe(), "quant_method": ckpt.method, "quant_bits": ckpt.bits,
    }


def quantized_bits_per_weight(files: dict[str, Path], weights: dict[str, torch.Tensor]) -> float | None:
    """Bits the checkpoint's files spend per weight of its quantized layers (codes, scales, zeros, …;
    biases left out); a layer is quantized when it stores more than a floating-point weight."""
    from safetensors import safe_open

    parts: dict[str, list[tuple[str, int, bool]]] = {}  # layer → (key, bytes, dense float weight)
    for rel, path in files.items():
        if not rel.endswith(".safetensors"):
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                nbytes = math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                layer = key[:key.index(".weight")] if ".weight" in key else key.rsplit(".", 1)[0]
                parts.setdefault(layer, []).append((key, nbytes, key.endswith(".weight") and
                                                    sl.get_dtype() in ("F32", "F16", "BF16")))
    bits = numel = 0
    for layer, entries in parts.items():
        w = weights.get(f"{layer}.weight")
        if w is None or w.dim() != 2 or all(dense or key.endswith(".bias") for key, _, dense in entries):
            continue
        bits += 8 * sum(n for key, n, _ in entries if not key.endswith(".bias"))
        numel += w.numel()
    return bits / numel if numel else None


def _held_bits(module) -> int:
    bits = quantized_storage_bits(module)
    return bits + (module.bias.numel() * module.bias.element_size() * 8 if module.bias is not None else 0)


@dataclass
class _Import:
    """A checked checkpoint, ready to store."""

    base: BaseModel
    name: str
    src: _Source
    ckpt: Checkpoint
    files: dict[str, Path]  # what the row stores: {name in the variant's folder: file}
    recipe: str
    digest: str
    notes: list[str]
    shared: tuple[str, ...] = ()  # stored files that are the base's blobs (not the variant's own bytes)


def add_variant(reg: Registry, repo: str, base_ref: str | BaseModel, options: VariantAddOptions | None = None, *,
                name: str | None = None, token: str | None = None, endpoint: str | None = None,
                progress: Progress | None = None, **fields: Any) -> tuple[Variant, bool]:
    """Register the pre-quantized checkpoint ``repo`` (a Hub repo ``owner/name[@rev]``, ``REPO:FILE.gguf``,
    a local folder or ``.gguf`` file) as a variant of ``base_ref``; returns (row, created).

    ``options``: a ``VariantAddOptions`` (``fields`` set single fields of it: ``revision``,
    ``include``, ``exclude``, ``eval_tokens``, ``device``). Idempotent: the same checkpoint
    files on the same base return the existing row with created=False. Bad input (no
    quantization_config, an unknown or unread method, another architecture or other shapes
    than the base's, a taken name) raises UsageError naming what was found, nothing registered.
    With ``eval_tokens`` > 0 the perplexity of the variant (and of the base, unless recorded)
    on builtin:pydoc test is measured and recorded, as ``variant create`` does.
    """
    opts = VariantAddOptions.of(options, fields)
    if name is not None:
        check_name_syntax(name, "variant name", namespace=False)
    base = _find_base(reg, base_ref)
    src = _fetch(repo, opts, token, endpoint, progress)
    base_folder = reg.materialize(base)
    gguf = gguf_file(src)
    if gguf is not None:
        ckpt, files, shared = _checked_gguf(gguf, base, base_folder, src)
        identity = {gguf.name: sha256_file(gguf)}
    else:
        ckpt = inspect_checkpoint(src.folder, src.label)
        check_architecture(ckpt.config, read_config(base_folder, f"base {base.name!r}"), src.label, base.name)
        files, shared = checkpoint_files(src.folder, src.label, src.names), ()
        identity = {rel: sha256_file(p) for rel, p in files.items()}
    recipe = origin_json(ckpt, identity)
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    existing, final_name = _existing_or_name(reg, base, digest, name, ckpt, src.source)
    if existing is not None:
        return existing, False
    notes = []
    if ckpt.scheme.get("act_bits"):
        notes.append(f"{src.label} also quantizes activations to {ckpt.scheme['act_bits']} bits at run time; "
                     "the variant computes with its dequantized weights and unquantized activations")
        warnings.warn(notes[-1], AdaptWarning, stacklevel=2)
    job = _Import(base, final_name, src, ckpt, files, recipe, digest, notes, shared)
    params = dict(repo=repo, base=base.name, name=final_name, **opts.params())
    with record_run(reg, "variant add", params) as run:
        row, created = _register(reg, job, opts, progress, run.id)
        run.output = {"variant": row.name, "id": row.id, "created": created, "imported": ckpt.describe()}
        return row, created


def _checked_gguf(path: Path, base: BaseModel, base_folder: Path,
                  src: _Source) -> tuple[Checkpoint, dict[str, Path], tuple[str, ...]]:
    """A GGUF file checked against the base from its header: (checkpoint, files to store, shared files)."""
    label = src.label if src.label.lower().endswith(GGUF_SUFFIX) else f"{src.label}:{path.name}"
    info = inspect_gguf(path)  # truncated / corrupt / a type the gguf package cannot dequantize: refused
    config = read_config(base_folder, f"base {base.name!r}")
    check_gguf_against(info, config, param_shapes(base_folder), label)
    src.source["file"] = path.name
    return Checkpoint("gguf", gguf_scheme(info), config), \
        {path.name: path, "config.json": base_folder / "config.json"}, ("config.json",)


def _register(reg: Registry, job: _Import, opts: VariantAddOptions, progress: Progress | None,
              run_id: str) -> tuple[Variant, bool]:
    """Stage the files the row will store, load and check them against the base, measure, store, add the row."""
    with reg.staging("variant-add") as tmp:
        for rel, p in job.files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, Path(tmp) / rel)
        stats, evals = _measure(reg, job, Path(tmp), opts, progress)
        stored = reg.blobs.put_folder(tmp)
    return _insert(reg, job, stored, stats, evals, run_id)


def _measure(reg: Registry, job: _Import, folder: Path, opts: VariantAddOptions,
             progress: Progress | None) -> tuple[dict, tuple]:
    """The staged checkpoint loaded as the variant will be, checked against the base and measured."""
    base_model, tokenizer = load_base_model(reg, job.base, "cpu")
    model = load_checkpoint(folder, COMPUTE_DTYPE, "cpu", job.ckpt)
    weights = check_shapes(model, base_model, job.src.label, job.base.name)
    own = {rel: p for rel, p in job.files.items() if rel not in job.shared}
    stats = import_stats(model, weights, base_model, own, job.ckpt)
    stats["source"] = job.src.source
    if job.notes:
        stats["warnings"] = job.notes
    base_ppl, base_eval = base_perplexity(reg, job.base, base_model, tokenizer, opts.eval_tokens, progress)
    del base_model, weights
    variant_eval = None
    if opts.eval_tokens:
        from adapterhub_c.models.device import resolve_device

        model.to(str(resolve_device(opts.device)))
        variant_eval = perplexity_details(model, tokenizer, opts.eval_tokens, progress)
    del model
    stats.update(perplexity=variant_eval["perplexity"] if variant_eval else None, base_perplexity=base_ppl,
                 eval_tokens=opts.eval_tokens, eval_data=f"{EVAL_DATA}:{EVAL_SPLIT}")
    return stats, (base_eval, variant_eval)


def _insert(reg: Registry, job: _Import, files: dict[str, str], stats: dict, evals: tuple,
            run_id: str) -> tuple[Variant, bool]:
    size = sum(reg.blobs.path_for(d).stat().st_size for d in set(files.values()))
    with reg.session() as s:
        theirs = s.scalar(select(Variant).where(Variant.base_id == job.base.id, Variant.recipe_digest == job.digest))
        if theirs is not None:  # added concurrently by another process: keep theirs
            return theirs, False
        if s.scalar(select(Variant.id).where(Variant.name == job.name)) is not None:
            raise UsageError(f"a variant named {job.name!r} was created meanwhile; pick another --name")
        row = Variant(base_id=job.base.id, name=job.name, recipe=job.recipe, recipe_digest=job.digest, files=files,
                      stats=stats, size_bytes=size, sparsity=0.0, run_id=run_id)
        s.add(row)
        s.flush()
        reg.add_lineage(s, job.base, row, "variant-of")
        for variant_id, ev in zip((None, row.id), evals, strict=True):
            if ev is not None:
                s.add(Evaluation(base_id=job.base.id, variant_id=variant_id, dataset=EVAL_DATA, split=EVAL_SPLIT,
                                 metric="perplexity", value=float(ev["perplexity"]), details=ev, run_id=run_id))
        s.flush()
        return row, True
