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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterhub_c.adapters.lora import LoraAdapter, check_lora_config
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes, read_safetensors_header
from adapterhub_c.packing.compeft import (
    KEPT_COUNT_RULE,
    METHODS,
    SCOPES,
    check_params,
    compress_tensors,
    kept_at_density,
)
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound
from adapterhub_c.packing.ternary import TernaryTensor, dtype_from_name, scale_fits

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
    for name, t in raw.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"raw tensor {name!r} has NaN or infinite values")
    ternary = compress_tensors(tensors, density, alpha=alpha, scope=scope, method=method)
    for name, t in ternary.items():
        if not scale_fits(t.scale, t.dtype):
            raise UsageError(f"the magnitude {t.scale:g} of {name!r} does not fit {t.dtype}; use a smaller alpha")
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
def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such pack file") from None
    try:
        tensors = st_load(data)
    except Exception as e:  # the container itself is unreadable: truncated or garbled
        raise IntegrityError(f"{path}: corrupt or truncated pack file ({e})") from None
    meta = read_safetensors_header(path).get("__metadata__") or {}
    stored = meta.get("pack_digest")
    if not stored or tensors_digest(tensors, {k: v for k, v in meta.items() if k != "pack_digest"}) != stored:
        raise IntegrityError(f"{path}: pack digest mismatch (the file is corrupt)")
    return tensors, meta, len(data)


# The pack digest only catches accidents: anyone can recompute it. So the reader trusts
# no header field: each is checked against its type and range, and what decoding
# allocates is bounded by the bytes in the file (issue 20).
#
# Claimed elements (what unpacking allocates, ~9 bytes each): an honest payload takes at
# least density·numel bits (golomb: about density·numel·(log2(1/density) + 1.5) bits,
# bitmask: 2·numel), so 8·file_bytes/density bounds honest packs 2-10x above their size;
# NUMEL_SLACK leaves room for sources with many exact zeros (never stored),
# MIN_NUMEL_ALLOWANCE for tiny packs, and MAX_PACK_NUMEL (beyond any LoRA we pack)
# caps a pack whose claimed density is tiny.
NUMEL_SLACK = 4
MIN_NUMEL_ALLOWANCE = 1 << 24
MAX_PACK_NUMEL = 1 << 32
_TENSOR_KEYS = {"index": (torch.int64, 2), "scales": (torch.float32, 1), "bits": (torch.uint8, 1),
                "pos": (torch.int32, 1), "neg": (torch.int32, 1)}


def numel_cap(file_bytes: int, density: float) -> int:
    """The most packed elements a pack file of ``file_bytes`` at ``density`` may claim."""
    relative = NUMEL_SLACK * 8 * file_bytes / density
    return int(min(MAX_PACK_NUMEL, max(MIN_NUMEL_ALLOWANCE, relative)))


def _json(meta: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise IntegrityError(f"metadata {key!r} is missing") from None
    except (TypeError, ValueError):
        raise IntegrityError(f"metadata {key!r} is not JSON") from None
    if not isinstance(value, kind):
        raise IntegrityError(f"metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _number(meta: dict[str, str], key: str) -> float:
    try:
        return float(meta[key])
    except KeyError:
        raise IntegrityError(f"metadata {key!r} is missing") from None
    except (TypeError, ValueError):
        raise IntegrityError(f"metadata {key!r} is not a number: {meta[key]!r}") from None


def _text(meta: dict[str, str], key: str, allowed: tuple[str, ...] | None = None) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        choices = f" (one of {', '.join(allowed)})" if allowed else ""
        raise IntegrityError(f"metadata {key!r} is {value!r}{choices}")
    return value


@dataclass(frozen=True)
class _Header:
    density: float
    alpha: float
    scope: str
    method: str
    encoding: str
    base: str
    source_digest: str
    adapter_config: dict
    recovery_config: dict | None


def _header(meta: dict[str, str]) -> _Header:
    """The pack parameters of the metadata, each checked as :func:`.compeft.check_params` would."""
    density, alpha = _number(meta, "density"), _number(meta, "alpha")
    if not 0.0 < density <= 1.0:  # NaN fails too
        raise IntegrityError(f"density must be in (0, 1], got {density!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise IntegrityError(f"alpha must be a finite positive number, got {alpha!r}")
    recovery = _json(meta, "recovery_config", dict) if "recovery_config" in meta else None
    return _Header(density, alpha, _text(meta, "scope", SCOPES), _text(meta, "method", METHODS),
                   _text(meta, "encoding", ENCODINGS), _text(meta, "base"), _text(meta, "source_digest"),
                   _json(meta, "adapter_config", dict), recovery)


def _shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
        raise IntegrityError(f"shape of {name!r} must be a list of non-negative integers, got {shape!r}")
    if math.prod(shape) > MAX_PACK_NUMEL:
        raise IntegrityError(f"shape {shape} of {name!r} has more than {MAX_PACK_NUMEL} elements")
    return tuple(shape)


def _tensor_list(meta: dict[str, str]) -> list[tuple[str, tuple[int, ...], str, float]]:
    """The ``tensors`` metadata: [name, shape, dtype, scale] rows, names unique and sorted."""
    rows = []
    for entry in _json(meta, "tensors", list):
        if not isinstance(entry, list) or len(entry) != 4:
            raise IntegrityError(f"tensor entry must be [name, shape, dtype, scale], got {entry!r}")
        name, shape, dtype, scale = entry
        if not isinstance(name, str) or not name:
            raise IntegrityError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(dtype, str):
            raise IntegrityError(f"dtype of {name!r} must be a string, got {dtype!r}")
        dtype_from_name(dtype)
        if type(scale) not in (int, float) or not scale_fits(scale, dtype):
            raise IntegrityError(f"scale of {name!r} must be finite, >= 0 and fit {dtype}, got {scale!r}")
        rows.append((name, _shape(name, shape), dtype, float(scale)))
    names = [r[0] for r in rows]
    if names != sorted(set(names)):
        raise IntegrityError("tensor names are not unique and sorted")
    return rows


def _raw_names(meta: dict[str, str], packed: list[str]) -> list[str]:
    names = _json(meta, "raw", list)
    if not all(isinstance(n, str) and n for n in names) or names != sorted(set(names)):
        raise IntegrityError("raw tensor names must be unique, sorted, non-empty strings")
    if set(names) & set(packed):
        raise IntegrityError("a tensor is both packed and raw")
    return names


def _check_tensor_keys(tensors: dict[str, torch.Tensor], encoding: str, raw: list[str]) -> None:
    """Exactly the tables, the streams of ``encoding`` and the raw tensors, with their dtypes."""
    expected = {"index", "scales", *_STREAMS[encoding], *(f"raw::{n}" for n in raw)}
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)
        raise IntegrityError(f"unexpected or missing tensors: {diff[:5]}")
    for key, (dtype, ndim) in _TENSOR_KEYS.items():
        if key in tensors and (tensors[key].dtype != dtype or tensors[key].dim() != ndim):
            raise IntegrityError(f"tensor {key!r} must be {ndim}-d {dtype}, got {tensors[key].dtype} "
                                 f"{list(tensors[key].shape)}")
    for name in raw:
        t = tensors[f"raw::{name}"]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise IntegrityError(f"raw tensor {name!r} has NaN or infinite values")


def _index_rows(tensors: dict[str, torch.Tensor], rows, streams: dict[str, np.ndarray]) -> list[list[int]]:
    """The ``index`` table, checked against the tensor list and laid back to back on the streams."""
    index, scales = tensors["index"], tensors["scales"]
    if index.shape != (len(rows), 6) or scales.shape != (len(rows),):
        raise IntegrityError("index and tensor list disagree")
    table, offset = index.tolist(), 0
    stream_size = next(iter(streams.values())).size
    for (name, shape, _, scale), row, stored_scale in zip(rows, table, scales.tolist(), strict=True):
        numel, nnz, _, _, start, length = row
        if numel != math.prod(shape) or not 0 <= nnz <= numel or scale != stored_scale:
            raise IntegrityError(f"inconsistent index entry for {name!r}")
        if start != offset or length < 0 or start + length > stream_size:
            raise IntegrityError(f"data of {name!r} overlaps another tensor's or runs past the end")
        offset += length
    if offset != stream_size or any(a.size != stream_size for a in streams.values()):
        raise IntegrityError("the streams hold data that no tensor owns")
    return table


def _check_claims(rows, table, header: _Header, file_bytes: int) -> None:
    """The claimed sizes against the file's size and the density (see :func:`numel_cap`)."""
    total = sum(row[0] for row in table)
    cap = numel_cap(file_bytes, header.density)
    if total > cap:
        raise IntegrityError(f"claims {total} packed elements; a {file_bytes}-byte pack at density "
                             f"{header.density:g} holds at most {cap}")
    # the writer keeps at most kept_at_density entries of each top-k group (fewer where they are 0)
    groups = [table] if header.scope == "global" else [[row] for row in table]
    for group in groups:
        numel, nnz = sum(r[0] for r in group), sum(r[1] for r in group)
        if nnz > kept_at_density(numel, density=header.density):
            raise IntegrityError(f"{nnz} non-zeros of {numel} entries exceed density {header.density:g}")


def _parse(tensors: dict[str, torch.Tensor], meta: dict[str, str], file_bytes: int) -> Pack:
    header = _header(meta)
    rows = _tensor_list(meta)
    raw_names = _raw_names(meta, [r[0] for r in rows])
    _check_tensor_keys(tensors, header.encoding, raw_names)
    streams = {st: tensors[st].numpy() for st in _STREAMS[header.encoding]}
    table = _index_rows(tensors, rows, streams)
    _check_claims(rows, table, header, file_bytes)
    ternary, encoded = {}, {}
    for (name, shape, dtype, scale), row in zip(rows, table, strict=True):
        numel, nnz, param, unary_bits, offset, length = row
        data = {st: arr[offset:offset + length] for st, arr in streams.items()}
        enc = EncodedSigns(header.encoding, numel, nnz, param, unary_bits, data)
        idx, neg = decode(enc)
        ternary[name] = TernaryTensor(idx, neg, scale, shape, dtype)
        encoded[name] = enc
    raw = {name: tensors[f"raw::{name}"] for name in raw_names}
    pack = Pack(ternary, encoded, raw, header.density, header.alpha, header.scope, header.method,
                header.encoding, header.base, header.source_digest, header.adapter_config,
                meta["pack_digest"], header.recovery_config)
    if pack.has_recovery and header.recovery_config is None:
        raise IntegrityError("recovery tensors without a recovery config")
    return pack


def read_pack(path: str | Path, expected_base: str | None = None) -> Pack:
    """Read and verify a pack file.

    IntegrityError: unreadable, truncated, digest mismatch (any flipped byte), or a
    header or stream that the writer cannot have produced (a digest anyone can recompute
    proves nothing against a deliberate writer: every field is checked).
    UsageError: an unknown ``format_version``, or ``expected_base`` given and different.
    """
    path = Path(path)
    tensors, meta, file_bytes = _load(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION or meta.get("kind") != KIND:
        raise UsageError(f"{path}: pack format version {version!r} is not supported "
                         f"(this adapterhub-c reads version {FORMAT_VERSION})")
    if expected_base is not None and meta.get("base") != expected_base:
        raise UsageError(f"{path}: pack was made for base {meta.get('base')!r}, not {expected_base!r}")
    try:
        return _parse(tensors, meta, file_bytes)
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None


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
        "density": pack.density, "kept_count": KEPT_COUNT_RULE, "alpha": pack.alpha, "base": pack.base,
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
