"""GGUF variants made here (``adapt variant create B --quant gguf:TYPE``) and GGUF exports of variants.

A GGUF variant is stored as the file llama.cpp runs: the (pruned, when the recipe prunes)
weights written as a float32 GGUF with the base's tokenizer (formats/gguf_write.py, the
``gguf`` package's writer and name map), then quantized to TYPE (Q4_0 … Q8_0 by the ``gguf``
package, k-quants by llama.cpp's ``llama_model_quantize``). The row's files are that GGUF,
the variant's ``config.json`` (the base's, shrunk after ffn-channels) and ``variant.json``;
its Ŵ is the file's dequantized tensors (formats/checkpoint.py reads the folder as it reads an
imported GGUF). A matrix whose rows are not a whole number of the type's blocks keeps another
type (the quantizer's fallback): the per-type counts are in the row's stats.

``adapt export V --format gguf`` writes a folder with one ``.gguf`` and an ollama ``Modelfile``
(``FROM ./FILE.gguf``): a GGUF variant (made here or added) exports its own file, byte for
byte; a pruned or uncompressed variant is converted from its Ŵ in the base's stored dtype
(f32, f16 or bf16: exact); a bitsandbytes, GPTQ or MoEfied variant is refused (converting
would re-quantize, or drop the routing), naming what to do instead.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapterhub_c.formats.checkpoint import gguf_scheme
from adapterhub_c.formats.gguf_read import inspect_gguf
from adapterhub_c.formats.gguf_write import quantize_gguf, write_gguf_model
from adapterhub_c.models.weights import GGUF_SUFFIX, gguf_weights
from adapterhub_c.registry.models import Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.variants.recipe import Recipe

MODELFILE = "Modelfile"
_DTYPE_FTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def gguf_file_name(stem: str, type_name: str) -> str:
    """``<stem>.<TYPE>.gguf``, as llama.cpp's quantized files are usually named."""
    return f"{stem}.{type_name}{GGUF_SUFFIX}"


def write_gguf_build(state: dict[str, torch.Tensor], config: Any, tokenizer_dir: Path, folder: Path,
                     type_name: str, stem: str = "model") -> dict[str, Any]:
    """Write ``state`` as a ``type_name`` GGUF in ``folder`` (float32 GGUF first, then quantized; the
    intermediate file is removed) with the config beside it; returns the GGUF stats of the row."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    dest = folder / gguf_file_name(stem, type_name)
    with tempfile.TemporaryDirectory(prefix="adapterhub-gguf-", dir=folder.parent) as tmp:
        f32 = write_gguf_model(state, config, tokenizer_dir, Path(tmp) / f"{stem}.F32{GGUF_SUFFIX}", ftype="f32")
        report = quantize_gguf(f32, dest, type_name)
    scheme = gguf_scheme(inspect_gguf(dest))
    return {"gguf_file": dest.name, "gguf_bytes": dest.stat().st_size, "gguf_types": scheme["types"],
            "gguf_quantizer": report.quantizer, "gguf_fallbacks": report.fallbacks(),
            "bits_per_weight": scheme["bits"]}


def gguf_export_refusal(recipe: Recipe, imported_method: str | None) -> str | None:
    """Why a variant of this recipe (or an imported checkpoint of this method) cannot be written as a
    GGUF (one line), or None when it can."""
    if imported_method is not None:
        return None if imported_method == "gguf" else (
            f"an imported {imported_method} checkpoint is not a GGUF (converting would re-quantize it): "
            "export it as hf, or add a GGUF of the base with adapt variant add FILE.gguf")
    if recipe.gguf_type is not None:
        return None
    if recipe.moefy:
        return "a GGUF holds no MoE routing; export a variant without --moefy"
    if recipe.quant != "none":
        return (f"a {recipe.quant} variant's quantization is not a GGUF type (converting would re-quantize "
                "it): make a GGUF variant instead, adapt variant create BASE --quant gguf:TYPE with the same pruning")
    return None


def write_gguf_export(model_or_file: Any, dest: Path, stem: str, *, config: Any = None,
                      tokenizer_dir: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the GGUF of an export into ``dest`` with its ollama Modelfile; returns the GGUF's path.

    ``model_or_file``: a stored GGUF file (copied as it is), or a state dict converted with
    ``config`` and ``tokenizer_dir`` in ``dtype``'s GGUF type.
    """
    if isinstance(model_or_file, Path):
        out = dest / model_or_file.name
        shutil.copyfile(model_or_file, out)
    else:
        ftype = _DTYPE_FTYPES.get(dtype or torch.float32, "f32")
        out = write_gguf_model(model_or_file, config, tokenizer_dir, dest / f"{stem}.{ftype.upper()}{GGUF_SUFFIX}",
                               ftype=ftype)
    write_modelfile(dest, out.name)
    return out


def write_modelfile(dest: Path, model_file: str, adapter_file: str | None = None) -> Path:
    """An ollama ``Modelfile`` in ``dest``: ``FROM ./MODEL`` (+ ``ADAPTER ./LORA``)."""
    lines = [f"FROM ./{model_file}"] + ([f"ADAPTER ./{adapter_file}"] if adapter_file else [])
    path = dest / MODELFILE
    path.write_text("\n".join(lines) + "\n")
    return path


def stored_gguf(reg: Registry, row: Variant) -> Path | None:
    """The GGUF file a variant stores (made here or added), or None."""
    folder = reg.materialize(row)
    return gguf_weights(folder)


__all__ = ["MODELFILE", "write_gguf_build", "gguf_export_refusal", "write_gguf_export",
           "write_modelfile", "stored_gguf", "gguf_file_name"]
