"""Canonical sha256 digests of named tensors (and of a pack's metadata)."""
from __future__ import annotations

import hashlib
import json
from typing import Mapping

import torch


def _frame(h, data) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor in row-major order (any dtype)."""
    return _byte_view(t).tobytes()


def _byte_view(t: torch.Tensor):
    """The bytes of :func:`tensor_bytes` as a uint8 numpy array, without a copy when ``t`` is
    a contiguous CPU tensor."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 hex over every tensor (sorted keys; key, dtype, shape and bytes, each
    length-framed) followed by the canonical JSON of ``metadata`` when given."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        _frame(h, key.encode())
        _frame(h, str(t.dtype).encode())
        _frame(h, json.dumps(list(t.shape)).encode())
        _frame(h, _byte_view(t))
    if metadata is not None:
        _frame(h, json.dumps(dict(metadata), sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()
