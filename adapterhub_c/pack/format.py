"""The pack file: ComPEFT-compressed adapter tensors in a safetensors container.

Tensors, per packed source tensor ``<name>``:
  ``<name>::header`` int64 [numel, nnz, param, unary_bits]  (see :mod:`.encoding`)
  ``<name>::scale``  float32 [1]
  ``<name>::shape``  int64 [ndim]
  ``<name>::bits``   uint8  (golomb)   or  ``<name>::pos`` / ``<name>::neg`` int32 (bitmask)
and ``<name>::raw`` for tensors stored verbatim (``modules_to_save`` copies and any key
that is not a LoRA factor or LoRA bias: those are full weights, not deltas from zero).

Metadata (str → str): ``format_version`` ("1"), ``kind``, ``density``, ``alpha``,
``scope``, ``method``, ``encoding``, ``tensors`` (JSON: shape, dtype, scale, numel, nnz,
param per tensor), ``raw`` (JSON list), ``source_digest``, ``base``,
``adapter_config`` (JSON) and ``pack_digest``.

``pack_digest`` = :func:`.digest.tensors_digest` over all tensors plus all metadata
except ``pack_digest`` itself. This rule is the same for every format version, so a
file is checked before its version is looked at: a flipped byte is an IntegrityError,
an intact file from a newer version is a UsageError.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..adapters.lora import LoraAdapter, check_lora_config
from ..errors import IntegrityError, UsageError
from ..fsutil import atomic_write_bytes
from .compeft import check_params, compress_tensors
from .digest import tensors_digest
from .encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound
from .ternary import TernaryTensor, dtype_from_name

FORMAT_VERSION = "1"
KIND = "adapterhub_c.pack"
_LORA_DELTA_RE = re.compile(r"\.lora_(A|B)\.weight$|\.lora_B\.bias$")


@dataclass(eq=False)
class Pack:
    """A pack in memory: ternary tensors, verbatim tensors, parameters and provenance."""

    tensors: dict[str, TernaryTensor]
    encoded: dict[str, EncodedSigns]
    raw: dict[str, torch.Tensor]
    density: float
    alpha: float
    scope: str
    method: str
    encoding: str
    base: str
    source_digest: str
    adapter_config: dict = field(default_factory=dict)
    pack_digest: str = ""


def build_pack(tensors: Mapping[str, torch.Tensor], *, density: float, base: str, source_digest: str,
               adapter_config: dict | None = None, alpha: float = 1.0, scope: str = "global",
               method: str = "compeft", encoding: str = "golomb",
               raw: Mapping[str, torch.Tensor] | None = None) -> Pack:
    """Compress ``tensors`` (see :func:`.compeft.compress_tensors`) and encode them.

    ``raw`` tensors are carried verbatim. ``base`` and ``source_digest`` are provenance
    given by the caller (e.g. the registry's digest of the source adapter).
    """
    check_params(density, alpha, scope, method)
    if encoding not in ENCODINGS:
        raise UsageError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if not isinstance(base, str) or not base:
        raise UsageError("a pack needs the name of its base model")
    raw = {k: v.detach().cpu().contiguous() for k, v in (raw or {}).items()}
    if set(raw) & set(tensors):
        raise UsageError(f"tensors both packed and raw: {sorted(set(raw) & set(tensors))}")
    ternary = compress_tensors(tensors, density, alpha=alpha, scope=scope, method=method)
    encoded = {n: encode(t.indices, t.negative, t.numel, encoding) for n, t in ternary.items()}
    return Pack(ternary, encoded, raw, float(density), float(alpha), scope, method, encoding,
                base, str(source_digest), dict(adapter_config or {}))


def pack_adapter(adapter: LoraAdapter, *, density: float, base: str, source_digest: str, **kw) -> Pack:
    """Pack a LoRA adapter: factors and LoRA biases are compressed, other keys kept raw."""
    packed = {k: v for k, v in adapter.tensors.items() if _LORA_DELTA_RE.search(k)}
    raw = {k: v for k, v in adapter.tensors.items() if k not in packed}
    return build_pack(packed, raw=raw, density=density, base=base, source_digest=source_digest,
                      adapter_config=adapter.config, **kw)


# ---- writing --------------------------------------------------------------------------
def _file_content(pack: Pack) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    info = {}
    for name in sorted(pack.tensors):
        t, e = pack.tensors[name], pack.encoded[name]
        out[f"{name}::header"] = torch.tensor([e.numel, e.nnz, e.param, e.unary_bits], dtype=torch.int64)
        out[f"{name}::scale"] = torch.tensor([t.scale], dtype=torch.float32)
        out[f"{name}::shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        for stream, arr in e.data.items():
            out[f"{name}::{stream}"] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        info[name] = {"shape": list(t.shape), "dtype": t.dtype, "scale": t.scale,
                      "numel": e.numel, "nnz": e.nnz, "param": e.param}
    for name, t in pack.raw.items():
        out[f"{name}::raw"] = t
    meta = {
        "format_version": FORMAT_VERSION, "kind": KIND,
        "density": repr(pack.density), "alpha": repr(pack.alpha), "scope": pack.scope,
        "method": pack.method, "encoding": pack.encoding,
        "tensors": json.dumps(info, sort_keys=True), "raw": json.dumps(sorted(pack.raw)),
        "source_digest": pack.source_digest, "base": pack.base,
        "adapter_config": json.dumps(pack.adapter_config, sort_keys=True),
    }
    return out, meta


def write_pack(pack: Pack, path: str | Path) -> str:
    """Write ``pack`` atomically to ``path``; returns (and sets) its ``pack_digest``."""
    tensors, meta = _file_content(pack)
    meta["pack_digest"] = tensors_digest(tensors, meta)
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    pack.pack_digest = meta["pack_digest"]
    return pack.pack_digest


# ---- reading --------------------------------------------------------------------------
def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such pack file") from None
    try:
        tensors = st_load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as e:  # the container itself is unreadable: truncated or garbled
        raise IntegrityError(f"{path}: corrupt or truncated pack file ({e})") from None
    stored = meta.get("pack_digest")
    if not stored or tensors_digest(tensors, {k: v for k, v in meta.items() if k != "pack_digest"}) != stored:
        raise IntegrityError(f"{path}: pack digest mismatch (the file is corrupt)")
    return tensors, meta


def _parse(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Pack:
    info = json.loads(meta["tensors"])
    ternary, encoded = {}, {}
    for name, ti in info.items():
        header = tensors[f"{name}::header"].tolist()
        scale = float(tensors[f"{name}::scale"][0])
        shape = tuple(tensors[f"{name}::shape"].tolist())
        if len(header) != 4 or header[0] != math.prod(shape) or list(shape) != ti["shape"] or scale != ti["scale"]:
            raise IntegrityError(f"{path}: inconsistent header for {name!r}")
        streams = ("bits",) if meta["encoding"] == "golomb" else ("pos", "neg")
        data = {s: tensors[f"{name}::{s}"].numpy() for s in streams}
        enc = EncodedSigns(meta["encoding"], header[0], header[1], header[2], header[3], data)
        idx, neg = decode(enc)
        dtype_from_name(ti["dtype"])
        ternary[name] = TernaryTensor(idx, neg, scale, shape, ti["dtype"])
        encoded[name] = enc
    raw = {name: tensors[f"{name}::raw"] for name in json.loads(meta["raw"])}
    return Pack(ternary, encoded, raw, float(meta["density"]), float(meta["alpha"]), meta["scope"],
                meta["method"], meta["encoding"], meta["base"], meta["source_digest"],
                json.loads(meta["adapter_config"]), meta["pack_digest"])


def read_pack(path: str | Path, expected_base: str | None = None) -> Pack:
    """Read and verify a pack file.

    IntegrityError: unreadable, truncated, or digest mismatch (any flipped byte).
    UsageError: an unknown ``format_version``, or ``expected_base`` given and different.
    """
    path = Path(path)
    tensors, meta = _load(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION or meta.get("kind") != KIND:
        raise UsageError(f"{path}: pack format version {version!r} is not supported "
                         f"(this adapterhub-c reads version {FORMAT_VERSION})")
    if expected_base is not None and meta.get("base") != expected_base:
        raise UsageError(f"{path}: pack was made for base {meta.get('base')!r}, not {expected_base!r}")
    try:
        return _parse(path, tensors, meta)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        # the digest matched, so the writer produced this: still not a pack we can read
        raise IntegrityError(f"{path}: malformed pack content ({e!r})") from None


def unpack_to_adapter(pack: Pack) -> LoraAdapter:
    """Dense LoRA adapter (original dtypes, config preserved) that plain PEFT loads."""
    config = dict(pack.adapter_config)
    check_lora_config(config, "pack")
    tensors = {name: t.to_dense() for name, t in pack.tensors.items()}
    tensors.update({name: t.clone() for name, t in pack.raw.items()})
    return LoraAdapter(config=config, tensors=tensors)


# ---- inspection -----------------------------------------------------------------------
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pack_stats(pack: Pack) -> dict:
    """Per-tensor and total sizes of a pack against the entropy bound and fp16."""
    rows, numel, nnz, bits, bound = {}, 0, 0, 0, 0.0
    for name in sorted(pack.tensors):
        t, e = pack.tensors[name], pack.encoded[name]
        k = t.density
        b = e.payload_bits()
        h = entropy_bound(k) * t.numel
        rows[name] = {
            "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, "nnz": t.nnz, "density": k,
            "scale": t.scale, "param": e.param, "encoded_bits": b,
            "bits_per_param": _ratio(b, t.numel), "entropy_bits_per_param": entropy_bound(k),
            "ratio_to_bound": _ratio(b, h),
        }
        numel, nnz, bits, bound = numel + t.numel, nnz + t.nnz, bits + b, bound + h
    raw_bytes = sum(t.numel() * t.element_size() for t in pack.raw.values())
    return {
        "encoding": pack.encoding, "method": pack.method, "scope": pack.scope,
        "density": pack.density, "alpha": pack.alpha, "base": pack.base,
        "source_digest": pack.source_digest, "pack_digest": pack.pack_digest,
        "tensors": rows, "raw_tensors": sorted(pack.raw), "raw_bytes": raw_bytes,
        "totals": {
            "numel": numel, "nnz": nnz, "density": _ratio(nnz, numel), "encoded_bits": bits,
            "bits_per_param": _ratio(bits, numel), "entropy_bits": bound,
            "entropy_bits_per_param": _ratio(bound, numel), "ratio_to_bound": _ratio(bits, bound),
            "ratio_vs_fp16": _ratio(16 * numel, bits),
        },
    }


def inspect_pack(path: str | Path) -> dict:
    """Verify and describe a pack file (JSON-serialisable): per tensor density, scale,
    bits per parameter, entropy bound H(k); totals; ratio vs fp16 (16 bits/param) of the
    payload and of the whole file."""
    path = Path(path)
    stats = pack_stats(read_pack(path))
    size = path.stat().st_size
    t = stats["totals"]
    t["file_bytes"] = size
    t["file_bits_per_param"] = _ratio(8 * size - 8 * stats["raw_bytes"], t["numel"])
    t["file_ratio_vs_fp16"] = _ratio(2 * t["numel"], size - stats["raw_bytes"])
    return stats
