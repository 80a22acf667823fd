"""Readers and writers of outside formats (DESIGN.md "Layout and layers"): domain code, no registry.

- ``checkpoint``: pre-quantized Hugging Face checkpoints (compressed-tensors, GPTQ, AWQ,
  bitsandbytes): what a folder holds (``inspect_checkpoint``), whether it is a copy of a
  base (``check_architecture``) and its Ŵ as a model on CPU (``load_checkpoint``).
- ``gptq``: the AutoGPTQ ``qweight / qzeros / scales / g_idx`` layout, packed and unpacked
  by our own code (no GPTQ library installs beside our pins).
- ``compressed``: GPTQ variants written as compressed-tensors ``pack-quantized`` (what vLLM
  loads) by that library (``adapt export --format compressed-tensors``).
"""
