"""A model folder's stored weights, whatever file holds them: safetensors files, or one GGUF file.

A base is stored as the files that are the model. For a Hub base those are its safetensors
files; for a base that exists as a quantized GGUF (the built-in SmolLM2, a Q4_1 file) it is
the GGUF file itself, beside the transformers ``config.json`` and tokenizer files written
from it. Every reader of a base's weights (loading the base, building and loading a variant
over it, checking a variant's delta, adapter fit checks) reads them through this module, so a
GGUF base is seen as its dequantized tensors everywhere.

GGUF tensors are read by :mod:`adapterhub_c.models.gguf_tensors` (the ``gguf`` package's
dequantization, llama.cpp's tensor names mapped back to the model's, q/k rows un-permuted) into
float32: bit for bit what transformers' ``from_pretrained(..., gguf_file=...)`` gives (a test
checks it), i.e. the float32 safetensors copy registries made before; 2-3x faster than
transformers' loader on the built-in SmolLM2.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from adapterhub_c.errors import IntegrityError, UsageError

GGUF_SUFFIX = ".gguf"
GENERATION_FILE = "generation_config.json"
GGUF_DTYPE = torch.float32  # dequantized GGUF values: exact in float32 (d·q + m overflows 16-bit mantissas)


def gguf_weights(folder: str | Path) -> Path | None:
    """The GGUF file holding the folder's weights (a folder with no safetensors and one .gguf), else None."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return None
    files = sorted(folder.glob(f"*{GGUF_SUFFIX}"))
    if len(files) > 1:
        raise IntegrityError(f"{folder} holds {len(files)} GGUF files; a model folder holds one")
    return files[0] if files else None


def is_gguf_weight_file(rel: str) -> bool:
    """True for a stored file name that is a GGUF weight file."""
    return rel.endswith(GGUF_SUFFIX)


def _meta_model(folder: Path):
    """The folder's model on the meta device (names and shapes, no storage)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def read_gguf_state(path: str | Path, folder: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The dequantized float32 tensors of a GGUF file under the model's names (``folder``: where its
    ``config.json`` is; default the file's folder). A tied LM head is left out, as save_pretrained does."""
    import json

    from adapterhub_c.models.gguf_tensors import read_gguf_state as read_tensors

    path = Path(path)
    config_file = (Path(folder) if folder is not None else path.parent) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{config_file}: unreadable model config ({type(e).__name__})") from None
    return read_tensors(path, config, GGUF_DTYPE)


def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights: its `*.safetensors` files (all shards) in their stored
    dtype, or its GGUF file dequantized (float32)."""
    from safetensors.torch import load_file

    gguf = gguf_weights(folder)
    if gguf is not None:
        return read_gguf_state(gguf, folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise IntegrityError(f"{folder} holds no safetensors or GGUF weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def param_shapes(folder: str | Path) -> dict[str, list[int]]:
    """{parameter name: shape} of the model ``config.json`` describes (built on the meta device; tied
    weights once, under the embedding's name), whatever its weights are stored in."""
    return {k: list(v.shape) for k, v in _meta_model(Path(folder)).named_parameters()}


def weight_shapes(folder: str | Path) -> dict[str, list[int]]:
    """{tensor name: shape} of the folder's weights without loading them (GGUF: :func:`param_shapes`)."""
    from adapterhub_c.fsutil import read_safetensors_header

    folder = Path(folder)
    if gguf_weights(folder) is not None:
        return param_shapes(folder)
    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header = read_safetensors_header(f)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def count_params(folder: str | Path) -> int:
    """Parameters of the folder's weights (tied weights once), read without loading them."""
    total = 0
    for shape in weight_shapes(folder).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def lazy_state(folder: str | Path, stack: ExitStack) -> dict[str, Any]:
    """{tensor name: safetensors slice} of the folder's `*.safetensors` files (all shards), open until
    ``stack`` closes. A slice is read when indexed (``slice[...]``, in its stored dtype), with ``pread``
    into ordinary memory: a loader that takes the tensors one at a time holds one at a time, and the
    file's pages never count in the process's memory (a mapped file's pages, which ``load_file`` and
    ``from_pretrained(folder)`` give, stay in its RSS until the last tensor read from it is freed)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise IntegrityError(f"{folder} holds no safetensors or GGUF weights")
    state: dict[str, Any] = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), "pt", backend="pread"))
            state.update({k: handle.get_slice(k) for k in handle.keys()})
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a bad file
            raise IntegrityError(f"weight file {f.name} is unreadable ({e})") from None
    return state


def causal_lm_class(config):
    """The ``AutoModelForCausalLM`` class of a transformers config (UsageError when it is not a causal LM's)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise UsageError(f"{type(config).__name__} is not a causal language model configuration") from None


def from_state(config, state_dict: Mapping[str, Any], folder: str | Path | None = None, **kwargs):
    """``from_pretrained`` of a causal LM from a state dict (tensors or :func:`lazy_state` slices) and its
    config; ``folder``: the model folder they come from, whose generation config and name the model takes,
    as ``from_pretrained(folder)`` gives them. ``kwargs``: ``from_pretrained``'s (dtype, quantization)."""
    from transformers import GenerationConfig

    if folder is not None and (Path(folder) / GENERATION_FILE).exists():
        kwargs["generation_config"] = GenerationConfig.from_pretrained(str(folder))
    model = causal_lm_class(config).from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    if folder is not None:
        model.name_or_path = model.config.name_or_path = str(folder)
    release_free_heap()  # the tensors read and converted one by one were freed into the C heap
    return model


def release_free_heap() -> None:
    """Give the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Tensors of a few MB that a loader reads, converts and frees come from glibc's heap once its
    dynamic mmap threshold has risen (to 32 MB), and freed heap memory between live blocks stays in
    the process's RSS: after a 1.7B-parameter variant load, 1.2 GB of it, on top of everything loaded next.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)


def _libc():
    """The C library's symbols (None where they cannot be reached)."""
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 4 << 20


def cap_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> None:
    """From now on give every C allocation of ``nbytes`` or more its own mapping, returned to the OS when
    freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing).

    glibc raises this threshold up to 32 MB as large blocks are freed; training then takes its activations
    and the 4-bit layers' dequantized weights (a few MB to 32 MB each) from the heap, where the holes left
    between live blocks stay in RSS: at the SmolLM2-1.7B shape a CA-LoRA step peaked 0.7 GB higher so."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, int(nbytes))


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` of a model folder in ``dtype`` (a GGUF folder: its dequantized tensors).

    Safetensors weights are read one tensor at a time (:func:`lazy_state`): loading holds the model
    and the tensors being converted, not a mapped copy of the weight files."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    gguf = gguf_weights(folder)
    if gguf is not None:
        return causal_lm_class(config).from_pretrained(None, config=config, state_dict=read_gguf_state(gguf, folder),
                                                       dtype=dtype)
    with ExitStack() as stack:
        return from_state(config, lazy_state(folder, stack), folder, dtype=dtype)
