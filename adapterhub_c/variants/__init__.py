"""Compressed variants of a base model: recipes, pruning, bitsandbytes quantization, sizes.

Build: `apply_recipe(model, recipe, calib_input_ids)` prunes in place and returns a
`VariantBuild` (keep-masks, kept channel indices, config, stats, and the pruned state);
`save_delta` writes what a variant stores over its base (masks.py: 1 bit per pruned weight).
Load: `load_variant_model(folder_or_state, config, recipe, device)` applies the delta to the
base's weights, quantizes with bitsandbytes at load time and returns an eval-mode model
ready for PEFT.
"""
from adapterhub_c.variants.build import VariantBuild, VariantStats, apply_recipe, compute_stats, load_variant_model
from adapterhub_c.variants.pruning import (
    decoder_blocks,
    kept_at_sparsity,
    n_m_mask,
    prune_2_4,
    prune_ffn_channels,
    prune_magnitude,
    prune_unstructured,
    prune_wanda,
    target_linears,
    unstructured_mask,
)
from adapterhub_c.variants.quantize import bnb_config, dequantize_linear, is_bnb_linear, load_quantized
from adapterhub_c.variants.recipe import PRUNE_METHODS, QUANT_METHODS, Recipe

__all__ = [
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "Recipe",
    "VariantBuild",
    "VariantStats",
    "apply_recipe",
    "bnb_config",
    "compute_stats",
    "decoder_blocks",
    "dequantize_linear",
    "is_bnb_linear",
    "kept_at_sparsity",
    "load_quantized",
    "load_variant_model",
    "n_m_mask",
    "prune_2_4",
    "prune_ffn_channels",
    "prune_magnitude",
    "prune_unstructured",
    "prune_wanda",
    "target_linears",
    "unstructured_mask",
]
