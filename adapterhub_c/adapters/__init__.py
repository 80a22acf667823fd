"""The adapter maths every consumer uses, written once.

``lora`` (LoRA / DoRA adapters as tensors, their PEFT-folder form, ΔW, the one alpha / r:
``rank_scale``), ``recovery`` (CA-LoRA recovery modules: forward, scale, seeded D₀, file),
``slicing`` (base tensors to an ffn-channels variant's kept channels), ``attach`` (attaching
an adapter to a model through PEFT), ``loaded`` (an adapter in memory).
"""
from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer, lora_scale

__all__ = ["LoraAdapter", "LoraLayer", "lora_scale"]
