"""In-memory LoRA adapters and their PEFT-folder form."""
from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer, lora_scale

__all__ = ["LoraAdapter", "LoraLayer", "lora_scale"]
