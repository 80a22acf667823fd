"""Registry variant rows → loaded (pruned, quantized) models and their kept channels."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from adapterhub_c.errors import UsageError
from adapterhub_c.models.device import resolve_device
from adapterhub_c.registry.models import Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.variants.build import KEPT_FILE, WEIGHTS_FILE, load_variant_model
from adapterhub_c.variants.quantize import load_quantized
from adapterhub_c.variants.recipe import Recipe

COMPUTE_DTYPE = torch.float32  # as load_base_model: variant and base perplexities are comparable


def _variant_row(reg: Registry, variant: Variant | str) -> Variant:
    if isinstance(variant, Variant):
        return variant
    if not isinstance(variant, str) or not variant:
        raise UsageError(f"a variant name or id is expected, got {variant!r}")
    return reg.get(variant, "variant")


def load_variant(reg: Registry, variant: Variant | str, device: str | None = "cpu",
                 compute_dtype: torch.dtype = COMPUTE_DTYPE):
    """The variant as a transformers model (bnb layers where quantized) on `device`, eval mode.

    `variant`: a Variant row or a name / id prefix. Unquantized tensors and the bnb
    matmuls run in `compute_dtype` (float32 by default, like `load_base_model`). bnb's
    CPU bf16 repacking is kept off, so the model can be trained (LoRA) after an eval
    forward.
    """
    row = _variant_row(reg, variant)
    recipe = Recipe.from_json(row.recipe)
    dev = str(resolve_device(device))
    folder = reg.materialize(row)
    if (folder / WEIGHTS_FILE).exists():
        return load_variant_model(folder, recipe=recipe, device=dev, compute_dtype=compute_dtype)
    # an unpruned variant of a base with sharded weights: from_pretrained reads the shards
    return load_quantized(folder, recipe.quant, recipe.double_quant, compute_dtype, dev,
                          include_lm_head=recipe.include_lm_head, dtype=compute_dtype)


def variant_kept_indices(reg: Registry, variant: Variant | str) -> dict[str, torch.Tensor] | None:
    """ffn-channels variants: {MLP module name: kept intermediate channels (int64, sorted)}; else None."""
    row = _variant_row(reg, variant)
    digest = (row.files or {}).get(KEPT_FILE)
    if digest is None:
        return None
    return {k: v.long() for k, v in load_file(str(reg.blobs.verified_path(digest))).items()}
