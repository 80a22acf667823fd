"""Reading GGUF models: what a file holds, whether it is a copy of a base, and its Ŵ as HF tensors.

Parsing and dequantization are the ``gguf`` package's (``GGUFReader``, ``gguf.quants``): every
type it dequantizes is readable (F32, F16, BF16, Q4_0 … Q8_0, Q2_K … Q6_K, IQ types); any
other type is refused naming it. A file whose header or tensor data runs past its end, or
whose header does not parse, is refused in one line before anything else reads it.

Shapes are reported in Hugging Face order (``[out, in]`` for a linear weight: GGUF lists
dimensions innermost first). Tensors come back under Hugging Face names, with llama.cpp's
q/k row order undone (:mod:`adapterhub_c.models.gguf_names`); a model with tied embeddings
has no ``lm_head.weight``, as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models.gguf_names import config_value, gguf_arch, hf_to_gguf
from adapterhub_c.models.gguf_tensors import dequantizable, gguf_field, hf_shape, open_gguf


@dataclass
class GgufInfo:
    """What a GGUF model file holds, read from its header."""

    path: Path
    architecture: str
    block_count: int | None
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # gguf name → (HF shape, type)
    file_size: int = 0
    file_type: str = "model"  # general.type: "model" or "adapter"

    def types(self) -> dict[str, int]:
        """{tensor type name: how many tensors have it}."""
        out: dict[str, int] = {}
        for _, type_name in self.tensors.values():
            out[type_name] = out.get(type_name, 0) + 1
        return out


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Architecture, block count, every tensor's HF-order shape and type, and the file size.

    IntegrityError (one line) for a truncated or corrupt file; UsageError naming the type when
    a tensor has a type the gguf package cannot dequantize.
    """
    path = Path(path)
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise IntegrityError(f"{path}: GGUF without general.architecture")
    blocks = gguf_field(reader, f"{arch}.block_count")
    info = GgufInfo(path=path, architecture=arch, block_count=int(blocks) if blocks is not None else None,
                    file_size=path.stat().st_size, file_type=str(gguf_field(reader, "general.type", "model")))
    for t in reader.tensors:
        if not dequantizable(t.tensor_type):
            raise UsageError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize")
        info.tensors[t.name] = (hf_shape(t), t.tensor_type.name)
    return info


def check_gguf_against(info: GgufInfo, base_config: dict, base_shapes: dict[str, tuple[int, ...]],
                       label: str) -> None:
    """UsageError naming the first tensor that differs between GGUF ``info`` and a base, or the architecture.

    ``base_shapes`` maps the base's HF tensor names to shapes (no ``lm_head.weight`` when the
    base ties its embeddings); ``label`` names the file in the message.
    """
    want_arch = gguf_arch(config_value(base_config, "model_type"))
    if info.file_type != "model":
        raise UsageError(f"{label}: a GGUF {info.file_type}, not a model")
    if info.architecture != want_arch:
        raise UsageError(f"{label}: GGUF architecture {info.architecture!r}, the base is {want_arch!r}")
    n_layers = int(config_value(base_config, "num_hidden_layers"))
    seen = set()
    for hf_name, shape in base_shapes.items():
        name = hf_to_gguf(want_arch, hf_name, n_layers)
        seen.add(name)
        if name not in info.tensors:
            raise UsageError(f"{label}: tensor {name} ({hf_name}) is missing from the GGUF")
        got = info.tensors[name][0]
        if tuple(got) != tuple(shape):
            raise UsageError(f"{label}: tensor {name} ({hf_name}) has shape {list(got)}, the base's is {list(shape)}")
    extra = [n for n in info.tensors if n not in seen]
    if extra:
        raise UsageError(f"{label}: tensor {extra[0]} is not in the base")


