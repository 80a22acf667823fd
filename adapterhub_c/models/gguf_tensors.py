"""A GGUF model file's tensors as Hugging Face tensors: dequantized, renamed, q/k rows in HF order.

Parsing and dequantization are the ``gguf`` package's (``GGUFReader``, ``gguf.quants``): every
type it dequantizes is readable (F32, F16, BF16, Q4_0 … Q8_0, Q2_K … Q6_K, IQ types); any other
type is refused naming it. A file whose header or tensor data runs past its end, or whose header
does not parse, is refused in one line before anything else reads it. Names and llama.cpp's q/k
row order come from :mod:`adapterhub_c.models.gguf_names`; a model with tied embeddings has no
``lm_head.weight``, as in transformers.

This sits in ``models/`` (not ``formats/``) because a base stored as a GGUF file (the built-in
SmolLM2) is read through it by :mod:`adapterhub_c.models.weights`, below ``formats/`` in the
layers; ``formats.gguf_read`` inspects and checks files with it.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models.gguf_names import config_value, gguf_arch, gguf_to_hf, unpermute_from_gguf


@lru_cache(maxsize=64)
def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """True when the gguf package dequantizes tensors of this type (probed on one zero block)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A GGUF reader over ``path``; IntegrityError (one line) for a file that is not GGUF, truncated or corrupt."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise IntegrityError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, MemoryError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {str(e)[:80]})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise IntegrityError(f"{path}: truncated GGUF (tensor {t.name} runs past the end of the file)")
    return reader


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of header field ``key`` (``default`` when absent); IntegrityError when it does not parse."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        raise IntegrityError(f"GGUF field {key} is corrupt") from None


def hf_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in Hugging Face order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _tied(config: Any) -> bool:
    return bool(config_value(config, "tie_word_embeddings", False))


def read_gguf_state(path: str | Path, base_config: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{HF name: dequantized tensor} of a GGUF model, in HF shapes and row order (``dtype``).

    ``output.weight`` is dropped when ``base_config`` ties the embeddings (transformers' tied
    models have no ``lm_head.weight``).
    """
    path = Path(path)
    reader = open_gguf(path)
    arch = gguf_arch(config_value(base_config, "model_type"))
    got_arch = gguf_field(reader, "general.architecture")
    if got_arch != arch:
        raise UsageError(f"{path}: GGUF architecture {got_arch!r}, the base is {arch!r}")
    n_layers = int(config_value(base_config, "num_hidden_layers"))
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf(arch, t.name, n_layers)
        if hf_name == "lm_head.weight" and _tied(base_config):
            continue
        if not dequantizable(t.tensor_type):
            raise UsageError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantize")
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensor = torch.from_numpy(values.reshape(hf_shape(t)))
        state[hf_name] = unpermute_from_gguf(hf_name, tensor, base_config).to(dtype).contiguous()
    return state
