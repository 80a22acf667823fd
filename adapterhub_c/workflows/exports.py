"""adapt export: a variant as a standalone folder that plain transformers loads.

Formats:
- `hf`: `save_pretrained` of the loaded variant. Quantized variants are written in
  bitsandbytes' serialization (int8: `weight` + `SCB`; nf4 / fp4: packed `weight` +
  `absmax` / `quant_map` / nested state, with the `quantization_config` in config.json),
  which `AutoModelForCausalLM.from_pretrained(DIR)` loads with bitsandbytes installed and
  no adapterhub_c (verified on CPU with bitsandbytes 0.50.2 for int8, nf4, fp4, double
  quantization). Pruned weights are materialised as zeros (quantized: zeros are exact in
  int8, nf4 and fp4). Unquantized tensors are written in the base's stored dtype (bf16 for
  the built-in SmolLM2), so `from_pretrained(DIR, dtype=torch.float32)` gives the logits
  of `adapt eval` bit for bit. Tokenizer and generation files are the base's.
- `compressed-tensors`, GPTQ variants (issue 25): that library's `pack-quantized` format (what
  vLLM loads; formats/compressed.py): the stored codes, scales and zeros as its packed int32
  weights, scales and zero points, `quantization_config` in config.json, written by its
  `ModelCompressor`. 4 and 8 bits, symmetric or not, grouped or per row; 2 / 3 bits and
  act-order with groups are refused (one line, exit 2). Its dequantization is the variant's Ŵ.
  Measured with transformers 5.25 + compressed-tensors 0.20.1: a symmetric export loads with
  plain `from_pretrained(DIR)`; an asymmetric one (zero points packed, as vLLM reads them) only
  with `quantization_config=CompressedTensorsConfig(dequantize=True)` (the library builds the
  compressed model's zero points unpacked: "size mismatch"), which the load check then uses.
- `compressed-tensors`, other variants: the pruned model in that library's `sparse-bitmask` format
  (values + bitmask + row offsets per pruned linear, `sparsity_config` in config.json),
  written with the library. Refused for quantized variants (bitsandbytes formats are not
  compressed-tensors formats; converting would re-quantize, i.e. approximate) and for
  ffn-channels (a dense, smaller model: nothing sparse to store). The written folder is
  loaded back with transformers before it is renamed into place; where the installed
  versions cannot write or load the format, the export is refused (exit 2) with that
  reason rather than written in some other way. Measured: compressed-tensors 0.20.1 (and
  every release since 0.15) has no sparse compressors and transformers 5.24 reads no
  sparsity config; compressed-tensors 0.12.2 and 0.14.0.1 write sparse-bitmask, but
  transformers 4.57.1 fails to load it ("Cannot copy out of meta tensor": its
  compressed-tensors quantizer compresses the meta-device model before loading).
- `gguf` (issue 26; workflows/ggufvariants.py): one `.gguf` file llama.cpp loads and an ollama
  `Modelfile` beside it. A GGUF variant (made with `--quant gguf:TYPE` or added from a GGUF file)
  exports its own file, byte for byte; an uncompressed or pruned variant is converted from its
  Ŵ in the base's stored dtype (exact); bitsandbytes, GPTQ, MoEfied variants and imported
  non-GGUF checkpoints are refused in one line saying what to do instead.
An adapter exports as `gguf` only (`export_adapter_gguf`): the GGUF LoRA llama.cpp loads
(formats/gguf_lora.py: what it cannot hold, DoRA, recovery modules, soft prompts, embedding
LoRAs, is refused in one line saying what to do instead) beside the GGUF of the model it runs on
(the adapter's variant, or `variant=`, or its base) and an ollama `Modelfile` (`FROM` + `ADAPTER`).
A pack is decoded first; merged and composed adapters are stored as their dense LoRA already.
Writes go to a temp folder beside `out`, renamed into place when complete. The measured
size is recorded in the variant's stats (`exports`), for `adapt variant ls`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from adapterhub_c.adapters.recovery import FILE_NAME as RECOVERY_FILE
from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.formats.gguf_lora import write_gguf_lora
from adapterhub_c.fsutil import atomic_dir
from adapterhub_c.models.weights import GGUF_SUFFIX, gguf_weights
from adapterhub_c.options.export import EXPORT_FORMATS
from adapterhub_c.progress import Progress
from adapterhub_c.registry.kinds import ADAPTER_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.bases import load_base_model
from adapterhub_c.runtime.variants import (
    GGUF,
    load_variant,
    materialize_variant,
    origin_of,
    storage_form,
    variant_recipe,
)
from adapterhub_c.training.recovery import recovery_file_bytes
from adapterhub_c.variants.build import BASE_DIR, storage_dtype
from adapterhub_c.variants.recipe import Recipe
from adapterhub_c.workflows.ggufvariants import (
    MODELFILE,
    gguf_export_refusal,
    stored_gguf,
    write_gguf_export,
    write_modelfile,
)
from adapterhub_c.workflows.variants import short_base_name

META_NAME = "adapterhub_c.json"
_NOT_COPIED = (".safetensors", ".safetensors.index.json", ".bin", ".gguf")
_SKIPPED_NAMES = ("config.json", "README.md", ".gitattributes", "variant.json")


@dataclass
class ExportResult:
    """What `export_variant` wrote."""

    variant: str
    format: str
    out: str
    files: list[dict]  # [{path, size}] sorted by path
    weights_bytes: int  # bytes of the *.safetensors / *.gguf files
    folder_bytes: int  # bytes of every file written
    base_fp16_bytes: int | None
    adapter: str | None = None  # an adapter's export: its name (``variant``: the model it runs on)
    notes: list[str] | None = None  # what the export changed to fit the format (folded scales, …)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refusal(recipe: Recipe, fmt: str) -> str | None:
    """Why `fmt` cannot hold a variant of this recipe (one line), or None when it can."""
    if fmt not in EXPORT_FORMATS:
        return f"unknown export format {fmt!r}; pick one of {', '.join(EXPORT_FORMATS)}"
    if fmt == "hf":
        return None
    if fmt == "gguf":
        return gguf_export_refusal(recipe, None)
    if recipe.gguf_type is not None:
        return f"a GGUF variant ({recipe.quant}) is exported as its own file (--format gguf) or as hf"
    if recipe.quant == "gptq":
        from adapterhub_c.formats.compressed import pack_quantized_refusal

        return pack_quantized_refusal(recipe.bits, recipe.group_size, recipe.act_order)
    if recipe.quant != "none":
        return (f"compressed-tensors cannot hold a bitsandbytes {recipe.quant} variant (its quantized formats are "
                "its own; converting would re-quantize the weights): use --format hf")
    if recipe.prune == "ffn-channels":
        return ("an ffn-channels variant is dense (smaller layers, no zeros): compressed-tensors' sparse-bitmask "
                "has nothing to compress; use --format hf")
    return _compressed_tensors_unavailable()


def _compressed_tensors_unavailable() -> str | None:
    """Why the installed compressed-tensors + transformers cannot write / load sparse-bitmask, or None."""
    import importlib.metadata as md

    try:
        ct_version = md.version("compressed-tensors")
    except md.PackageNotFoundError:
        return ("the compressed-tensors library is not installed (and the releases that still write sparse-bitmask, "
                "<= 0.14, do not load in transformers 4.57 / 5.x): use --format hf")
    tf_version = md.version("transformers")
    try:
        from compressed_tensors.compressors import BaseCompressor

        BaseCompressor.get_value_from_registry("sparse-bitmask")
    except Exception:  # noqa: BLE001 - any failure means the compressor is not there
        return (f"compressed-tensors {ct_version} has no sparse-bitmask compressor (removed after 0.14, and 0.14 "
                f"needs transformers<5; transformers {tf_version} is installed): use --format hf")
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if "sparsity_config" not in CompressedTensorsConfig.__init__.__code__.co_varnames:
        return (f"transformers {tf_version} no longer loads compressed-tensors sparsity formats: "
                "use --format hf")
    return None


def export_refusal(row: Variant, fmt: str) -> str | None:
    """Why variant ``row`` cannot be exported as ``fmt`` (one line), or None when it can."""
    recipe = variant_recipe(row)
    origin = origin_of(row)
    if origin is not None and fmt == "gguf":
        return gguf_export_refusal(recipe, origin.get("method"))
    if origin is not None and fmt != "hf":  # an imported checkpoint's own files are its export
        return "an imported checkpoint is exported as hf (its dequantized weights, or its bnb layers)"
    return refusal(recipe, fmt)


def export_variant(reg: Registry, variant: str | Variant, out: str | Path, fmt: str = "hf", *,
                   force: bool = False, progress: Progress | None = None) -> ExportResult:
    """Write the variant as a standalone folder `out` in `fmt` (see the module docstring).

    Refused with a UsageError (exit 2, nothing written) when the format cannot hold the
    variant, or when `out` exists and is not empty (unless `force`: then it is replaced
    whole once the new folder is complete).
    """
    row = variant if isinstance(variant, Variant) else reg.get(variant, "variant")
    reason = export_refusal(row, fmt)
    if reason is not None:
        raise UsageError(f"cannot export {row.name!r} as {fmt}: {reason}")
    out = Path(out)
    _check_out(out, force)
    with reg.session() as s:
        base = s.get(BaseModel, row.base_id)
    params = dict(variant=row.name, format=fmt, out=str(out.resolve()), force=force)
    with record_run(reg, "export", params) as run:
        if progress:
            progress(f"exporting {row.name} ({fmt})", 0, 2)
        with atomic_dir(out) as tmp:
            write_export(reg, row, base, tmp, fmt)
            if fmt == "compressed-tensors":
                _check_transformers_loads(reg, row, tmp)
            files = _files(tmp)
        if progress:
            progress(f"exporting {row.name} ({fmt})", 2, 2)
        weights = sum(f["size"] for f in files if f["path"].endswith((".safetensors", GGUF_SUFFIX)))
        result = ExportResult(variant=row.name, format=fmt, out=str(out), files=files, weights_bytes=weights,
                              folder_bytes=sum(f["size"] for f in files),
                              base_fp16_bytes=(row.stats or {}).get("base_fp16_bytes"))
        with reg.session() as s:
            r = s.get(Variant, row.id)
            exports = dict((r.stats or {}).get("exports") or {})
            exports[fmt] = {"bytes": weights, "folder_bytes": result.folder_bytes}
            r.stats = {**(r.stats or {}), "exports": exports}
        run.output = {k: v for k, v in result.to_dict().items() if k != "files"}
        return result


def _files(folder: Path) -> list[dict]:
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def decoded_peft_folder(reg: Registry, art: Artifact, dest: Path, base_label: str | None = None) -> Path:
    """Adapter ``art`` as a PEFT folder: its stored folder (LoRA kinds), or a pack decoded into ``dest``
    (its recovery modules beside it); ``base_label`` sets a decoded pack's base_model_name_or_path."""
    if art.kind not in PACK_KINDS:
        return reg.materialize(art)
    loaded = load_adapter_artifact(reg, art)
    lora = loaded.lora
    if base_label is not None:
        lora.config = {**lora.config, "base_model_name_or_path": base_label}
    lora.to_folder(dest)
    if loaded.recovery_state is not None:
        (dest / RECOVERY_FILE).write_bytes(recovery_file_bytes(loaded.recovery_state, loaded.recovery_config))
    return dest


def _runs_on(reg: Registry, art: Artifact, variant: str | Variant | None) -> tuple[BaseModel, Variant | None]:
    """The base and variant an adapter's GGUF export runs on; UsageError naming both bases when they differ."""
    with reg.session() as s:
        base = s.get(BaseModel, art.base_id)
        row = s.get(Variant, art.variant_id) if art.variant_id and variant is None else None
    if variant is not None:
        row = variant if isinstance(variant, Variant) else reg.get(variant, "variant")
        if row.base_id != art.base_id:
            with reg.session() as s:
                other = s.get(BaseModel, row.base_id)
            raise UsageError(f"adapter {art.name!r} is for base {base.name!r}, variant {row.name!r} is of base "
                             f"{other.name!r}: export it with a variant of {base.name!r}")
    return base, row


def write_adapter_gguf(reg: Registry, art: Artifact, dest: Path, variant: str | Variant | None = None) -> dict:
    """The GGUF LoRA of adapter ``art`` (+ the GGUF of the model it runs on and a Modelfile) in ``dest``;
    returns the export's metadata (written as adapterhub_c.json)."""
    if art.kind not in ADAPTER_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}: only adapters ({', '.join(ADAPTER_KINDS)}) export as a "
                         "GGUF LoRA")
    base, row = _runs_on(reg, art, variant)
    lora_name = f"{art.name}.lora{GGUF_SUFFIX}"
    with tempfile.TemporaryDirectory(prefix="adapterhub-peft-", dir=dest.parent) as tmp:
        report = write_gguf_lora(decoded_peft_folder(reg, art, Path(tmp)), base.config, dest / lora_name)
    if row is not None:
        reason = export_refusal(row, "gguf")
        if reason is not None:
            raise UsageError(f"cannot export {art.name!r} with variant {row.name!r} as gguf: {reason}")
        _write_gguf(reg, row, base, dest, _stored_dtype(reg, row, base))
        model_file = json.loads((dest / META_NAME).read_text())["file"]
    else:
        model_file = _write_base_gguf(reg, base, dest).name
    write_modelfile(dest, model_file, lora_name)
    meta = {"format": "gguf", "adapter": art.name, "kind": art.kind, "variant": row.name if row else None,
            "base": base.hub_id or base.name, "model_file": model_file, "lora_file": lora_name,
            "lora_alpha": report.alpha, "modules": len(report.modules), "folded": report.folded,
            "notes": report.notes,
            "load": f"llama-cli -m {model_file} --lora {lora_name}  |  ollama create NAME -f {MODELFILE}"}
    (dest / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _write_base_gguf(reg: Registry, base: BaseModel, dest: Path) -> Path:
    """The base as a GGUF in ``dest``: its own GGUF file (a base stored as one), else its weights converted."""
    folder = reg.materialize(base)
    own = gguf_weights(folder)
    if own is not None:
        return write_gguf_export(own, dest, short_base_name(base))
    model, _ = load_base_model(reg, base)
    return write_gguf_export(dict(model.state_dict()), dest, short_base_name(base), config=model.config,
                             tokenizer_dir=folder, dtype=storage_dtype(folder) or torch.float32)


def export_adapter_gguf(reg: Registry, adapter: str | Artifact, out: str | Path, *, variant: str | Variant | None = None,
                        force: bool = False, progress: Progress | None = None) -> ExportResult:
    """Write adapter ``adapter`` as a GGUF LoRA with the GGUF of its model and an ollama Modelfile into
    folder ``out`` (see the module docstring); UsageError (nothing written) for what GGUF cannot hold."""
    art = adapter if isinstance(adapter, Artifact) else reg.get(adapter, "artifact")
    out = Path(out)
    _check_out(out, force)
    params = dict(adapter=art.name, format="gguf", out=str(out.resolve()), force=force,
                  variant=variant.name if isinstance(variant, Variant) else variant)
    with record_run(reg, "export", params) as run:
        if progress:
            progress(f"exporting {art.name} (gguf)", 0, 1)
        with atomic_dir(out) as tmp:
            meta = write_adapter_gguf(reg, art, tmp, variant)
            files = _files(tmp)
        if progress:
            progress(f"exporting {art.name} (gguf)", 1, 1)
        result = ExportResult(variant=meta["variant"] or meta["base"], format="gguf", out=str(out), files=files,
                              weights_bytes=sum(f["size"] for f in files if f["path"].endswith(GGUF_SUFFIX)),
                              folder_bytes=sum(f["size"] for f in files), base_fp16_bytes=None, adapter=art.name,
                              notes=meta["notes"])
        run.output = {k: v for k, v in result.to_dict().items() if k != "files"}
        return result


def export(reg: Registry, name: str, out: str | Path, fmt: str = "hf", *, variant: str | None = None,
           force: bool = False, progress: Progress | None = None) -> tuple[ExportResult, Variant | Artifact]:
    """``adapt export NAME``: a variant's export (`export_variant`), else an adapter's GGUF
    (`export_adapter_gguf`, ``variant``: the model it runs on); (result, the row exported)."""
    try:
        row = reg.get(name, "variant")
    except NotFoundError:
        row = None
    if row is not None:
        if variant is not None:
            raise UsageError(f"--variant names the model an adapter runs on; {row.name!r} is a variant")
        return export_variant(reg, row, out, fmt, force=force, progress=progress), row
    try:
        art = reg.get(name, "artifact")
    except NotFoundError:
        with reg.session() as s:
            known = [n for cls in (Variant, Artifact) for n in s.scalars(select(cls.name))]
        raise NotFoundError("variant or adapter", name, known) from None
    if fmt != "gguf":
        raise UsageError(f"{art.name!r} is an adapter: it exports as gguf (a GGUF LoRA for llama.cpp and ollama); "
                         "its PEFT folder is what adapt push sends")
    return export_adapter_gguf(reg, art, out, variant=variant, force=force, progress=progress), art


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} exists and is not empty; pick another --out or pass --force")


def write_export(reg: Registry, row: Variant, base: BaseModel, dest: Path, fmt: str = "hf") -> None:
    """Write the export of `row` into the existing empty folder `dest` (no checks, no run row)."""
    recipe = variant_recipe(row)
    stored = _stored_dtype(reg, row, base)
    if fmt == "gguf":
        _write_gguf(reg, row, base, dest, stored)
        return
    model = load_variant(reg, row, "cpu")
    _cast_unquantized(model, stored)
    if fmt == "hf":
        model.save_pretrained(dest)
    elif recipe.quant == "gptq":
        _save_pack_quantized(reg, row, recipe, model, dest)
    else:
        _save_compressed_tensors(model, recipe, row, dest)
    del model
    _copy_base_extras(reg, base, dest)
    meta = {"format": fmt, "variant": row.name, "base": base.hub_id or base.name, "recipe": recipe.to_dict(),
            "storage_dtype": str(stored).replace("torch.", ""),
            "perplexity": (row.stats or {}).get("perplexity"),
            "eval_tokens": (row.stats or {}).get("eval_tokens"),
            "load": _load_hint(recipe, fmt)}
    (dest / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _write_gguf(reg: Registry, row: Variant, base: BaseModel, dest: Path, stored: torch.dtype) -> None:
    """The variant's GGUF (its own file, or its Ŵ converted) + Modelfile + adapterhub_c.json in ``dest``."""
    own = stored_gguf(reg, row) if storage_form(row) in (GGUF, "imported") else None
    if own is not None:
        out = write_gguf_export(own, dest, row.name)
    else:
        model = load_variant(reg, row, "cpu")
        state = {k: v for k, v in model.state_dict().items()}
        out = write_gguf_export(state, dest, row.name, config=model.config, tokenizer_dir=reg.materialize(base),
                                dtype=stored)
        del model, state
    meta = {"format": "gguf", "variant": row.name, "base": base.hub_id or base.name, "file": out.name,
            "copied": own is not None, "perplexity": (row.stats or {}).get("perplexity"),
            "load": f"llama-cli -m {out.name}  |  ollama create NAME -f {MODELFILE}"}
    (dest / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _load_hint(recipe: Recipe, fmt: str) -> str:
    if fmt == "compressed-tensors" and recipe.quant == "gptq" and not recipe.sym:
        return ("AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32, quantization_config="
                "CompressedTensorsConfig(dequantize=True)) gives adapt's logits (vLLM loads DIR as is)")
    return "AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32) gives adapt's logits"


def _stored_dtype(reg: Registry, row: Variant, base: BaseModel) -> torch.dtype:
    folder = materialize_variant(reg, row)
    weights = folder / BASE_DIR if storage_form(row) == "delta" else folder
    return storage_dtype(weights) or torch.float32


@torch.no_grad()
def _cast_unquantized(model, dtype: torch.dtype) -> None:
    """Floating parameters / buffers outside bnb layers to the base's stored dtype (exact: they came from it)."""
    from adapterhub_c.variants.quantize import is_bnb_linear

    bnb_params = {id(p) for m in model.modules() if is_bnb_linear(m) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in bnb_params and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype and not is_bnb_linear(m) \
                    and "inv_freq" not in name:
                m._buffers[name] = b.to(dtype)
    model.config.dtype = dtype


def _save_compressed_tensors(model, recipe: Recipe, row: Variant, dest: Path) -> None:
    """compressed-tensors' sparse-bitmask through the library (the API of compressed-tensors <= 0.14)."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig

    ignore = [] if recipe.include_lm_head else ["lm_head"]
    config = BitmaskConfig(global_sparsity=float((row.stats or {}).get("model_sparsity") or 0.0),
                           sparsity_structure="2:4" if recipe.prune == "2:4" else "unstructured",
                           targets=["Linear"], ignore=ignore)
    compressor = ModelCompressor(sparsity_config=config)
    state = compressor.compress(model)
    model.save_pretrained(dest, state_dict=state)
    compressor.update_config(str(dest))


def _save_pack_quantized(reg: Registry, row: Variant, recipe: Recipe, model, dest: Path) -> None:
    """A GPTQ variant's stored codes / scales / zeros as compressed-tensors pack-quantized (formats/compressed.py)."""
    from adapterhub_c.formats.compressed import save_pack_quantized
    from adapterhub_c.variants.packed import COMPRESSED_FILE, load_compressed

    weights = load_compressed(materialize_variant(reg, row) / COMPRESSED_FILE)
    save_pack_quantized(model, weights, dest, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym)


def _check_transformers_loads(reg: Registry, row: Variant, folder: Path) -> None:
    """Refuse (UsageError, nothing written) unless transformers loads `folder` with the variant's logits."""
    import importlib.metadata as md

    versions = f"transformers {md.version('transformers')} with compressed-tensors {md.version('compressed-tensors')}"
    try:
        model = _load_back(folder, variant_recipe(row))
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the folder is not loadable
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"cannot export {row.name!r} as compressed-tensors: {versions} cannot load the "
                         f"folder it writes ({type(e).__name__}: {first}); use --format hf") from None
    ids = torch.arange(3, 19).view(1, 16) % model.config.vocab_size
    with torch.no_grad():
        same = torch.equal(model(ids).logits, load_variant(reg, row, "cpu")(ids).logits)
    if not same:
        raise UsageError(f"cannot export {row.name!r} as compressed-tensors: {versions} loads the folder with "
                         "other logits than the variant's; use --format hf")


def _load_back(folder: Path, recipe: Recipe):
    """`from_pretrained(folder)` in float32; an asymmetric GPTQ export decompressed on load when that fails."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception:
        if recipe.quant != "gptq" or recipe.sym:
            raise
    # transformers 5.25 + compressed-tensors 0.20.1 build the compressed model's zero points unpacked
    # ("size mismatch" [out·b/32, G] vs [out, G]), so asymmetric pack-quantized loads only decompressed
    from transformers import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


def _copy_base_extras(reg: Registry, base: BaseModel, dest: Path) -> None:
    """The base's tokenizer / generation files (everything but weights, config and card)."""
    for rel, digest in sorted((base.files or {}).items()):
        if rel.endswith(_NOT_COPIED) or Path(rel).name in _SKIPPED_NAMES:
            continue
        if (dest / rel).exists() and rel != "generation_config.json":  # the base's generation settings win
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reg.blobs.verified_path(digest), target)
