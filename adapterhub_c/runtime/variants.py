"""Loading registered variants: both storage forms.

- delta (issue 15): the row's files are the base's config and weight blobs under
  `base/` (shared with the base row, content-addressed) plus the variant's own
  `config.json`, `masks.safetensors` (bit-packed keep-masks), `kept_indices.safetensors`
  and / or `compressed.safetensors` (GPTQ codes, SparseGPT kept values), and `variant.json`;
- base (quantization only): the base's own `config.json` / weight blobs at the top level;
- gguf (issue 26, `--quant gguf:TYPE`): a GGUF file + the variant's `config.json`, read as an
  imported GGUF is (formats/checkpoint.py);
- full copy (registries written before issue 15): the variant's own whole-model
  `model.safetensors` (+ `config.json`, `kept_indices.safetensors`). Still read as is.
A missing or corrupt blob of a variant is an IntegrityError naming the variant.
"""
from __future__ import annotations

import json

import torch

from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.formats.checkpoint import load_checkpoint
from adapterhub_c.models.device import resolve_device
from adapterhub_c.models.weights import is_gguf_weight_file
from adapterhub_c.registry.models import Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.variants.build import (
    BASE_DIR,
    KEPT_FILE,
    MASKS_FILE,
    WEIGHTS_FILE,
    load_variant_model,
    read_kept_indices,
)
from adapterhub_c.variants.moefy import MOE_FILE
from adapterhub_c.variants.packed import COMPRESSED_FILE
from adapterhub_c.variants.quantize import load_quantized
from adapterhub_c.variants.recipe import Recipe

COMPUTE_DTYPE = torch.float32  # as load_base_model: variant and base perplexities are comparable
OWN_FILES = (MASKS_FILE, KEPT_FILE, COMPRESSED_FILE)
IMPORTED = "imported"  # storage form of a pre-quantized checkpoint added with `adapt variant add`
GGUF = "gguf"  # storage form of a variant made as a GGUF file (`--quant gguf:TYPE`)


def origin_of(row: Variant) -> dict | None:
    """An imported checkpoint's origin (method, scheme, files), or None for a variant built by a recipe."""
    try:
        data = json.loads(row.recipe or "{}")
    except ValueError:
        return None
    return data.get("origin") if isinstance(data, dict) else None


def _variant_row(reg: Registry, variant: Variant | str) -> Variant:
    if isinstance(variant, Variant):
        return variant
    if not isinstance(variant, str) or not variant:
        raise UsageError(f"a variant name or id is expected, got {variant!r}")
    return reg.get(variant, "variant")


def storage_form(row: Variant) -> str:
    """'delta', 'base' (quantization only, the base's blobs), 'imported' (a pre-quantized checkpoint's
    own files), 'gguf' (a GGUF file made here) or 'full-copy' (before issue 15)."""
    if origin_of(row) is not None:
        return IMPORTED
    if (row.stats or {}).get("storage") == GGUF:
        return GGUF
    files = row.files or {}
    if any(rel.startswith(f"{BASE_DIR}/") for rel in files):
        return "delta"
    if WEIGHTS_FILE in files and (row.stats or {}).get("shares_base_weights"):
        return "base"
    if any((rel.endswith(".safetensors") and rel not in OWN_FILES) or is_gguf_weight_file(rel) for rel in files) \
            and (row.stats or {}).get("shares_base_weights"):
        return "base"  # sharded base weights, or a GGUF base's file
    return "full-copy"


def materialize_variant(reg: Registry, row: Variant):
    """The row's files laid out in a folder (verified); IntegrityError naming the variant if one is bad."""
    try:
        return reg.materialize(row)
    except IntegrityError as e:
        raise IntegrityError(f"variant {row.name!r}: {_blob_role(row, str(e))} {e}") from None
    except AdaptError as e:
        if "missing blob" not in str(e):
            raise
        raise IntegrityError(f"variant {row.name!r}: {_blob_role(row, str(e))} {e}") from None


def _blob_role(row: Variant, message: str) -> str:
    for rel, digest in (row.files or {}).items():
        if digest[:12] in message:
            what = {MASKS_FILE: "keep-mask", KEPT_FILE: "kept-indices", COMPRESSED_FILE: "compressed-weights",
                    MOE_FILE: "MoE router"}.get(rel)
            if what is None and rel.startswith(f"{BASE_DIR}/"):
                what = "base weight"
            return f"{what or rel} blob"
    return "blob"


def load_variant(reg: Registry, variant: Variant | str, device: str | None = "cpu",
                 compute_dtype: torch.dtype = COMPUTE_DTYPE):
    """The variant as a transformers model (bnb layers where quantized) on `device`, eval mode.

    `variant`: a Variant row or a name / id prefix. Unquantized tensors and the bnb
    matmuls run in `compute_dtype` (float32 by default, like `load_base_model`), whatever
    dtype the base is stored in. bnb's CPU bf16 repacking is kept off, so the model can be
    trained (LoRA) after an eval forward.
    """
    row = _variant_row(reg, variant)
    dev = str(resolve_device(device))
    folder = materialize_variant(reg, row)
    if origin_of(row) is not None or storage_form(row) == GGUF:  # the files as they are: Ŵ from their format
        return load_checkpoint(folder, compute_dtype, dev)
    recipe = Recipe.from_json(row.recipe)
    form = storage_form(row)
    if form == "base":  # from_pretrained reads the base's (possibly sharded) weights
        return load_quantized(folder, recipe.bnb_quant, recipe.double_quant, compute_dtype, dev,
                              include_lm_head=recipe.include_lm_head, dtype=compute_dtype)
    try:
        return load_variant_model(folder, recipe=recipe, device=dev, compute_dtype=compute_dtype)
    except IntegrityError as e:
        raise IntegrityError(f"variant {row.name!r}: {e}") from None


def variant_kept_indices(reg: Registry, variant: Variant | str) -> dict[str, torch.Tensor] | None:
    """ffn-channels variants: {MLP module name: kept intermediate channels (int64, sorted)}; else None."""
    row = _variant_row(reg, variant)
    digest = (row.files or {}).get(KEPT_FILE)
    if digest is None:
        return None
    try:
        return read_kept_indices(reg.blobs.verified_path(digest))
    except AdaptError as e:
        raise IntegrityError(f"variant {row.name!r}: kept-indices blob: {e}") from None


def variant_recipe(row: Variant) -> Recipe:
    """The row's recipe as a `Recipe` (an imported checkpoint has none: the empty recipe)."""
    return Recipe() if origin_of(row) is not None else Recipe.from_json(row.recipe)
