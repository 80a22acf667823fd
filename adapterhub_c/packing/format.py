"""The pack file: ComPEFT-compressed adapter tensors in a safetensors container.

Per-tensor overhead matters (a 5% pack of a 1.8M-parameter LoRA is ~70 KB of payload
over 240 tensors), so the per-source-tensor records are rows of shared tensors rather
than four safetensors entries each:

  ``index``  int64 [T, 6]: numel, nnz, param, unary_bits, offset, length per tensor, in
             the order of the ``tensors`` metadata list (sorted names); offset/length in
             bytes of ``bits`` (golomb) or in words of ``pos``/``neg`` (bitmask)
  ``scales`` float32 [T]
  ``bits``   uint8, the golomb streams of all tensors back to back (see :mod:`.encoding`)
  ``pos``, ``neg`` int32, the bitmask planes of all tensors back to back
  ``raw::<name>`` tensors stored as they are (``modules_to_save`` copies, in fp16, and any key
             that is not a LoRA factor or LoRA bias: full weights, not deltas from zero; DoRA
             magnitude vectors in their own dtype)

Converted adapters (CA-LoRA) also carry recovery modules: their D/U tensors are packed like
LoRA factors under the names ``recovery::<module>.recovery_D`` / ``…recovery_U`` (in the
same top-k and std as the LoRA factors with ``scope="global"``), and the recovery config
(rank, alpha, act, dropout) is kept as JSON in the metadata key ``recovery_config``. The
key is written only when there is recovery, so version-1 readers of plain packs are
unaffected.

Metadata (str → str): ``format_version`` ("1"), ``kind``, ``density``, ``alpha``,
``scope``, ``method``, ``encoding``, ``tensors`` (JSON list of [name, shape, dtype,
scale]), ``raw`` (JSON list), ``source_digest``, ``base``, ``adapter_config`` (JSON),
``recovery_config`` (JSON, optional) and ``pack_digest``.

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

from adapterhub_c.adapters.lora import LoraAdapter, check_lora_config
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes
from adapterhub_c.packing.compeft import check_params, compress_tensors
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound
from adapterhub_c.packing.ternary import TernaryTensor, dtype_from_name

FORMAT_VERSION = "1"
KIND = "adapterhub_c.pack"
_LORA_DELTA_RE = re.compile(r"\.lora_(A|B)\.weight$|\.lora_B\.bias$|\.lora_embedding_(A|B)$")
_KEEP_DTYPE_RE = re.compile(r"\.lora_magnitude_vector$")  # DoRA magnitudes: small, verbatim
RECOVERY_PREFIX = "recovery::"


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
    recovery_config: dict | None = None

    @property
    def has_recovery(self) -> bool:
        return any(n.startswith(RECOVERY_PREFIX) for n in self.tensors)


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


def pack_adapter(adapter: LoraAdapter, *, density: float, base: str, source_digest: str,
                 recovery_state: Mapping[str, torch.Tensor] | None = None,
                 recovery_config: dict | None = None, **kw) -> Pack:
    """Pack a LoRA adapter: factors, LoRA biases and embedding-LoRA factors are compressed;
    other keys are kept raw: ``modules_to_save`` copies as fp16 side tensors, DoRA magnitude
    vectors verbatim.

    DoRA: A and B are compressed, the magnitude vector kept raw, so the pack's update is
    DoRA's in weight space with the decoded factors, m·(W+s·B̂Â)/‖W+s·B̂Â‖_c − W (PEFT
    loads it as DoRA); ``encoding="bitmask"`` is refused for DoRA (see the message).

    ``recovery_state`` ({``<module>.recovery_D``/``_U``: tensor}, a converted adapter's
    recovery modules) is compressed with the factors under :data:`RECOVERY_PREFIX`;
    ``recovery_config`` (a dict, ``RecoveryConfig.to_dict()``) is stored with it.
    """
    if adapter.is_dora and kw.get("encoding") == "bitmask":
        raise UsageError("a DoRA adapter cannot be packed with encoding bitmask: bitmask packs feed the popcount "
                         "TIES merge of A/B sign planes, which cannot hold its magnitude vector (a DoRA update "
                         "lives in weight space); use encoding golomb (A, B compressed, the magnitude verbatim)")
    packed = {k: v for k, v in adapter.tensors.items() if _LORA_DELTA_RE.search(k)}
    # modules_to_save copies (full lm_head / embed_tokens tensors) travel as fp16 side tensors
    raw = {k: (v.to(torch.float16) if v.is_floating_point() and not _KEEP_DTYPE_RE.search(k) else v)
           for k, v in adapter.tensors.items() if k not in packed}
    if recovery_state:
        if recovery_config is None:
            raise UsageError("recovery tensors need their recovery config")
        packed.update({RECOVERY_PREFIX + k: v for k, v in recovery_state.items()})
    pack = build_pack(packed, raw=raw, density=density, base=base, source_digest=source_digest,
                      adapter_config=adapter.config, **kw)
    pack.recovery_config = dict(recovery_config) if recovery_state else None
    return pack


# ---- writing --------------------------------------------------------------------------
_STREAMS = {"golomb": ("bits",), "bitmask": ("pos", "neg")}


def _file_content(pack: Pack) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    names = sorted(pack.tensors)
    streams = _STREAMS[pack.encoding]
    index, chunks, offset = [], {s: [] for s in streams}, 0
    for name in names:
        e = pack.encoded[name]
        length = e.data[streams[0]].size
        index.append([e.numel, e.nnz, e.param, e.unary_bits, offset, length])
        for st in streams:
            chunks[st].append(np.ascontiguousarray(e.data[st]))
        offset += length
    out: dict[str, torch.Tensor] = {
        "index": torch.tensor(index, dtype=torch.int64).reshape(len(names), 6),
        "scales": torch.tensor([pack.tensors[n].scale for n in names], dtype=torch.float32),
    }
    for st in streams:
        dtype = np.uint8 if st == "bits" else np.int32
        out[st] = torch.from_numpy(np.concatenate(chunks[st]).astype(dtype) if names else np.zeros(0, dtype))
    for name, t in pack.raw.items():
        out[f"raw::{name}"] = t
    info = [[n, list(pack.tensors[n].shape), pack.tensors[n].dtype, pack.tensors[n].scale] for n in names]
    meta = {
        "format_version": FORMAT_VERSION, "kind": KIND,
        "density": repr(pack.density), "alpha": repr(pack.alpha), "scope": pack.scope,
        "method": pack.method, "encoding": pack.encoding,
        "tensors": json.dumps(info, separators=(",", ":")), "raw": json.dumps(sorted(pack.raw)),
        "source_digest": pack.source_digest, "base": pack.base,
        "adapter_config": json.dumps(pack.adapter_config, sort_keys=True),
    }
    if pack.recovery_config is not None:
        meta["recovery_config"] = json.dumps(pack.recovery_config, sort_keys=True)
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
    encoding = meta["encoding"]
    streams = {st: tensors[st].numpy() for st in _STREAMS[encoding]}
    index = tensors["index"].tolist()
    scales = tensors["scales"].tolist()
    if len(index) != len(info) or len(scales) != len(info):
        raise IntegrityError(f"{path}: index and tensor list disagree")
    ternary, encoded = {}, {}
    for (name, shape, dtype, scale), row, stored_scale in zip(info, index, scales, strict=False):
        numel, nnz, param, unary_bits, offset, length = row
        shape = tuple(int(x) for x in shape)
        if numel != math.prod(shape) or scale != stored_scale or offset < 0 or length < 0:
            raise IntegrityError(f"{path}: inconsistent index entry for {name!r}")
        data = {st: arr[offset:offset + length] for st, arr in streams.items()}
        if any(d.size != length for d in data.values()):
            raise IntegrityError(f"{path}: data of {name!r} runs past the end")
        enc = EncodedSigns(encoding, numel, nnz, param, unary_bits, data)
        idx, neg = decode(enc)
        dtype_from_name(dtype)
        ternary[name] = TernaryTensor(idx, neg, float(scale), shape, dtype)
        encoded[name] = enc
    raw = {name: tensors[f"raw::{name}"] for name in json.loads(meta["raw"])}
    recovery = json.loads(meta["recovery_config"]) if "recovery_config" in meta else None
    pack = Pack(ternary, encoded, raw, float(meta["density"]), float(meta["alpha"]), meta["scope"],
                meta["method"], encoding, meta["base"], meta["source_digest"],
                json.loads(meta["adapter_config"]), meta["pack_digest"], recovery)
    if pack.has_recovery and recovery is None:
        raise IntegrityError(f"{path}: recovery tensors without a recovery config")
    return pack


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
    """Dense LoRA adapter (original dtypes, config preserved) that plain PEFT loads.

    Recovery tensors are left out (see :func:`unpack_recovery`)."""
    config = dict(pack.adapter_config)
    check_lora_config(config, "pack")
    tensors = {name: t.to_dense() for name, t in pack.tensors.items() if not name.startswith(RECOVERY_PREFIX)}
    tensors.update({name: t.clone() for name, t in pack.raw.items()})
    return LoraAdapter(config=config, tensors=tensors)


def unpack_recovery(pack: Pack) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(dense recovery state without the prefix, recovery config dict), or None."""
    if not pack.has_recovery:
        return None
    n = len(RECOVERY_PREFIX)
    state = {name[n:]: t.to_dense() for name, t in pack.tensors.items() if name.startswith(RECOVERY_PREFIX)}
    return state, dict(pack.recovery_config or {})


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


def inspect_pack(path: str | Path, expected_base: str | None = None) -> dict:
    """Verify and describe a pack file (JSON-serialisable): per tensor density, scale,
    bits per parameter, entropy bound H(k); totals; ratio vs fp16 (16 bits/param) of the
    payload and of the whole file."""
    path = Path(path)
    pack = read_pack(path, expected_base)
    stats = pack_stats(pack)
    stats["recovery_config"] = pack.recovery_config
    size = path.stat().st_size
    t = stats["totals"]
    t["file_bytes"] = size
    t["file_bits_per_param"] = _ratio(8 * size - 8 * stats["raw_bytes"], t["numel"])
    t["file_ratio_vs_fp16"] = _ratio(2 * t["numel"], size - stats["raw_bytes"])
    return stats
