"""The pack file: ComPEFT-compressed adapter tensors in a safetensors container.

Per-tensor overhead matters (a 10% pack of a 1.8M-parameter LoRA is ~115 KB of payload
over 240 tensors), so the per-source-tensor records are not safetensors entries of their
own but rows of one table, and the streams of all tensors lie back to back:

  ``table``  uint8 (format version 2): the deflated per-tensor records, names, shapes,
             dtype codes, scales, counts and stream lengths (see :mod:`.table`); about 6
             bytes a tensor
  ``bits``   uint8, the golomb streams of all tensors back to back (see :mod:`.encoding`)
  ``pos``, ``neg`` int32, the bitmask planes of all tensors back to back
  ``raw::<name>`` tensors stored as they are (``modules_to_save`` copies, in fp16, and any key
             that is not a LoRA factor or LoRA bias: full weights, not deltas from zero; DoRA
             magnitude vectors in their own dtype)

Format version 1 (still read) held the same records as ``index`` int64 [T, 6] (numel,
nnz, param, unary_bits, offset, length), ``scales`` float32 [T] and the metadata key
``tensors`` (JSON list of [name, shape, dtype, scale]): ~160 bytes a tensor.

Converted adapters (CA-LoRA) also carry recovery modules: their D/U tensors are packed like
LoRA factors under the names ``recovery::<module>.recovery_D`` / ``…recovery_U`` (in the
same top-k and std as the LoRA factors with ``scope="global"``), and the recovery config
(rank, alpha, act, dropout, init seed) is kept as JSON in the metadata key ``recovery_config``
(only when there is recovery). When the recovery config names the seed D started from
(``init_seed``), the pack holds D − D₀ (``adapters.recovery.seeded_d_init``, drawn again on
decode) and the config says so (``d_from_init: true``): a random D₀ is noise a sparse
ternary code cannot keep, while what training changed is small and compresses like a task
vector (measured on the demo's converted adapter: packing D itself cost 18 of 98 points of
exact match).

Version 3 is version 2 whose recovery D is stored as D − D₀ (below); it is written only for
such packs, so readers of versions 1–2 refuse them rather than decode a wrong D.

Metadata (str → str): ``format_version`` ("2", or "3"), ``kind``, ``density``, ``alpha``,
``scope``, ``method``, ``encoding``, ``raw`` (JSON list), ``source_digest``, ``base``,
``adapter_config`` (JSON), ``recovery_config`` (JSON, optional), ``tensors`` (version 1
only) and ``pack_digest``.

``pack_digest`` = :func:`.digest.tensors_digest` over all tensors plus all metadata
except ``pack_digest`` itself. This rule is the same for every format version, so a
file is checked before its version is looked at: a flipped byte is an IntegrityError,
an intact file from a newer version is a UsageError.

Two readers share the checks: :func:`read_pack` decodes with the numpy decoder into
ternary tensors (inspection, merges); :func:`read_pack_dense` decodes straight into
dense tensors with the compiled decoder (loading an adapter).
"""
from __future__ import annotations

import bisect
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

from adapterhub_c.adapters.lora import LoraAdapter, check_lora_config, lora_key_parts, lora_modules_fault
from adapterhub_c.adapters.recovery import recovery_geometry_fault, seeded_d_init
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes, parse_safetensors_header
from adapterhub_c.packing.compeft import (
    KEPT_COUNT_RULE,
    METHODS,
    SCOPES,
    check_params,
    compress_tensors,
)
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound
from adapterhub_c.packing.table import (
    MAX_PACK_NUMEL,
    PackTable,
    check_claims,
    check_out_dtypes,
    check_scales,
    check_streams,
    decode_table,
    encode_table,
    rows_to_table,
    torch_dtype,
    torch_dtype_code,
)
from adapterhub_c.packing.ternary import TernaryTensor, dtype_from_name, scale_fits

FORMAT_VERSION = "2"
# version 3 = version 2 whose recovery D is stored as D − D₀ (d_from_init): written only then,
# so that a reader that cannot add D₀ back refuses the file instead of decoding a wrong D
FORMAT_VERSION_D_FROM_INIT = "3"
READ_VERSIONS = ("1", "2", "3")
KIND = "adapterhub_c.pack"
_LORA_DELTA_RE = re.compile(r"\.lora_(A|B)\.weight$|\.lora_B\.bias$|\.lora_embedding_(A|B)$")
_KEEP_DTYPE_RE = re.compile(r"\.lora_magnitude_vector$")  # DoRA magnitudes: small, verbatim
# the lora_key_part parts of the canonical keys that _LORA_DELTA_RE finds: what a pack may hold
_DELTA_PARTS = frozenset({"lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B"})
RECOVERY_PREFIX = "recovery::"
D_FROM_INIT = "d_from_init"  # recovery config key: the pack holds D − seeded_d_init, not D


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
    numel, nnz = sum(t.numel for t in ternary.values()), sum(t.nnz for t in ternary.values())
    if encoding == "golomb" and numel > max(MIN_NUMEL_ALLOWANCE, NUMEL_PER_NONZERO * nnz):
        raise UsageError(f"density {density:g} keeps {nnz} of {numel} entries: a pack of more than "
                         f"{MIN_NUMEL_ALLOWANCE} entries must keep at least one in {NUMEL_PER_NONZERO} "
                         "(readers refuse sparser claims); use a higher density")
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
        recovery_config = dict(recovery_config)
        if recovery_config.get("init_seed") is not None:  # pack D's change from its seeded start
            recovery_state = _shift_d(recovery_state, recovery_config["init_seed"], -1)
            recovery_config[D_FROM_INIT] = True
        packed.update({RECOVERY_PREFIX + k: v for k, v in recovery_state.items()})
    pack = build_pack(packed, raw=raw, density=density, base=base, source_digest=source_digest,
                      adapter_config=adapter.config, **kw)
    pack.recovery_config = recovery_config if recovery_state else None
    return pack


def _shift_d(state: Mapping[str, torch.Tensor], seed: int, sign: int) -> dict[str, torch.Tensor]:
    """``state`` with ``sign`` · D₀ added to every recovery D (D₀ = ``seeded_d_init``, float32)."""
    out = dict(state)
    for key, d in state.items():
        if key.endswith(".recovery_D"):
            d0 = seeded_d_init(key.removesuffix(".recovery_D"), d.shape[0], d.shape[1], seed)
            out[key] = (d.to(torch.float32) + sign * d0).to(d.dtype)
    return out


def _recovery_out(state: dict[str, torch.Tensor], config: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    """A decoded recovery state as the converted adapter had it: D₀ added back where the pack holds D − D₀."""
    config = dict(config or {})
    if config.pop(D_FROM_INIT, False):
        state = _shift_d(state, config["init_seed"], +1)
    return state, config


# ---- writing --------------------------------------------------------------------------
_STREAMS = {"golomb": ("bits",), "bitmask": ("pos", "neg")}


def _index_table(pack: Pack, names: list[str]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """The int64 index rows (see :class:`.table.PackTable`) and the concatenated streams."""
    streams = _STREAMS[pack.encoding]
    index, chunks, offset = [], {s: [] for s in streams}, 0
    for name in names:
        e = pack.encoded[name]
        length = e.data[streams[0]].size
        index.append([e.numel, e.nnz, e.param, e.unary_bits, offset, length])
        for st in streams:
            chunks[st].append(np.ascontiguousarray(e.data[st]))
        offset += length
    out = {}
    for st in streams:
        dtype = np.uint8 if st == "bits" else np.int32
        out[st] = torch.from_numpy(np.concatenate(chunks[st]).astype(dtype) if names else np.zeros(0, dtype))
    return np.array(index, dtype=np.int64).reshape(len(names), 6), out


def _file_content(pack: Pack, version: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the file; ``version`` "1" writes the legacy layout (for tests).

    By default version 2, or 3 when the pack holds recovery D as D − D₀."""
    if version is None:
        version = FORMAT_VERSION_D_FROM_INIT if (pack.recovery_config or {}).get(D_FROM_INIT) else FORMAT_VERSION
    names = sorted(pack.tensors)
    index, out = _index_table(pack, names)
    ts = [pack.tensors[n] for n in names]
    meta = {
        "format_version": version, "kind": KIND,
        "density": repr(pack.density), "alpha": repr(pack.alpha), "scope": pack.scope,
        "method": pack.method, "encoding": pack.encoding, "raw": json.dumps(sorted(pack.raw)),
        "source_digest": pack.source_digest, "base": pack.base,
        "adapter_config": json.dumps(pack.adapter_config, sort_keys=True),
    }
    if version == "1":
        out["index"] = torch.from_numpy(index)
        out["scales"] = torch.tensor([t.scale for t in ts], dtype=torch.float32)
        info = [[n, list(t.shape), t.dtype, t.scale] for n, t in zip(names, ts, strict=True)]
        meta["tensors"] = json.dumps(info, separators=(",", ":"))
    else:
        blob = encode_table(names, [t.shape for t in ts], [t.dtype for t in ts], [t.scale for t in ts], index)
        out["table"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    for name, t in pack.raw.items():
        out[f"raw::{name}"] = t
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
    meta = parse_safetensors_header(data, str(path)).get("__metadata__") or {}
    stored = meta.get("pack_digest")
    if not stored or tensors_digest(tensors, {k: v for k, v in meta.items() if k != "pack_digest"}) != stored:
        raise IntegrityError(f"{path}: pack digest mismatch (the file is corrupt)")
    return tensors, meta, len(data)


# The pack digest only catches accidents: anyone can recompute it. So the reader trusts
# no header field: each is checked against its type and range, and what decoding
# allocates is bounded by what the payload encodes (issues 20 and 28), never by a header
# number alone.
#
# Claimed elements (what unpacking allocates, ~9 bytes each, 8 more for a dense fp64 copy):
# every non-zero costs its stream at least two bits (a golomb unary terminator and a sign;
# :func:`.table.check_streams` holds each tensor's count to its own stream), and an honest
# pack keeps at least one element in NUMEL_PER_NONZERO (density >= 1/4096, rounding and
# exact zeros of the source included), so NUMEL_PER_NONZERO · non-zeros bounds a golomb
# pack; a bitmask pack's planes are two bits per element, so its streams bound it exactly.
# MIN_NUMEL_ALLOWANCE leaves room for tiny packs at any density (and for empty ones, which
# encode nothing at all), MAX_PACK_NUMEL (beyond any LoRA we pack) caps everything. The
# header's density can only lower the bound (8 · NUMEL_SLACK · file_bytes / density):
# setting it to 1e-9 raises nothing.
NUMEL_SLACK = 4
NUMEL_PER_NONZERO = 1 << 12
MIN_NUMEL_ALLOWANCE = 1 << 24
_TENSOR_KEYS = {"index": (torch.int64, 2), "scales": (torch.float32, 1), "bits": (torch.uint8, 1),
                "pos": (torch.int32, 1), "neg": (torch.int32, 1), "table": (torch.uint8, 1)}
_TABLE_KEYS = {"1": ("index", "scales"), "2": ("table",), "3": ("table",)}


def numel_cap(file_bytes: int, density: float, nonzeros: int | None = None) -> int:
    """The most packed elements a pack file of ``file_bytes`` at ``density`` may claim; with
    ``nonzeros`` (a golomb pack's non-zero count, already held to its streams) also at most
    :data:`NUMEL_PER_NONZERO` per non-zero."""
    relative = NUMEL_SLACK * 8 * file_bytes / density
    if nonzeros is not None:
        relative = min(relative, NUMEL_PER_NONZERO * nonzeros)
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
    """Version 1's ``tensors`` metadata: [name, shape, dtype, scale] rows, names unique and sorted."""
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


def _raw_names(meta: dict[str, str]) -> list[str]:
    names = _json(meta, "raw", list)
    if not all(isinstance(n, str) and n for n in names) or names != sorted(set(names)):
        raise IntegrityError("raw tensor names must be unique, sorted, non-empty strings")
    return names


def _check_tensor_keys(tensors: dict[str, torch.Tensor], version: str, encoding: str, raw: list[str]) -> None:
    """Exactly the tables of ``version``, the streams of ``encoding`` and the raw tensors, with their dtypes."""
    expected = {*_TABLE_KEYS[version], *_STREAMS[encoding], *(f"raw::{n}" for n in raw)}
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


def _table(tensors: dict[str, torch.Tensor], meta: dict[str, str], version: str) -> PackTable:
    if version == "1":
        return rows_to_table(_tensor_list(meta), tensors["index"].numpy(), tensors["scales"].numpy())
    return decode_table(tensors["table"].numpy().tobytes())


def _recovery_names(names: list[str]) -> list[str]:
    """The names in the sorted ``names`` that start with :data:`RECOVERY_PREFIX` (they sort together)."""
    a = bisect.bisect_left(names, RECOVERY_PREFIX)
    b = a
    while b < len(names) and names[b].startswith(RECOVERY_PREFIX):
        b += 1
    return names[a:b]


def _check_recovery_init(config: dict | None, table: PackTable, version: str) -> None:
    """Version 3 and only it holds D − D₀; it must name D₀'s seed, and every D must be a 2-D [rank, in] tensor."""
    flagged = bool(config) and D_FROM_INIT in config
    if flagged != (version == FORMAT_VERSION_D_FROM_INIT):
        raise IntegrityError(f"format version {version} with{'' if flagged else 'out'} d_from_init "
                             "(recovery D stored as D − D₀ is version 3 and only that)")
    if not flagged:
        return
    seed = config.get("init_seed")
    if config[D_FROM_INIT] is not True or isinstance(seed, bool) or not isinstance(seed, int) \
            or not 0 <= seed < 2 ** 63:
        raise IntegrityError("the recovery config's d_from_init / init_seed are not a flag and a seed")
    for t, name in enumerate(table.names):
        if name.startswith(RECOVERY_PREFIX) and name.endswith(".recovery_D") and len(table.shapes[t]) != 2:
            raise IntegrityError(f"recovery tensor {name!r} is not a matrix")


def _check_geometry(config: dict, table: PackTable, raw_shapes: dict[str, tuple[int, ...]]) -> None:
    """The config is a LoRA config, the packed tensors are LoRA factors (or biases) and recovery
    modules, and their shapes fit each other and the config (issue 28): what inspection shows
    is what loading will find, and a decoded tensor has the geometry the config promises."""
    check_lora_config(config, "pack")
    names, shapes = table.names, table.shapes
    a = bisect.bisect_left(names, RECOVERY_PREFIX)
    b = a + len(_recovery_names(names))  # the recovery tensors sort together
    lora, lora_shapes = names[:a] + names[b:], shapes[:a] + shapes[b:]
    parts = lora_key_parts(lora)
    bad = [n for n, part in zip(lora, parts, strict=True) if part is None or part[1] not in _DELTA_PARTS]
    if bad:
        raise IntegrityError(f"packed tensor {bad[0]!r} is not a LoRA factor")
    # raw tensors first: a packed tensor of the same module and part takes its place
    fault = lora_modules_fault(config, lora_key_parts(list(raw_shapes)) + parts,
                               list(raw_shapes.values()) + lora_shapes) or recovery_geometry_fault(
        {n[len(RECOVERY_PREFIX):]: s for n, s in zip(names[a:b], shapes[a:b], strict=True)})
    if fault is not None:
        raise IntegrityError(f"the LoRA geometry is inconsistent: {fault}")


@dataclass(frozen=True, eq=False)
class _Layout:
    """A verified pack file, every field checked, not decoded yet."""

    header: _Header
    table: PackTable
    streams: dict[str, np.ndarray]
    raw: dict[str, torch.Tensor]
    pack_digest: str
    version: str


def _layout(tensors: dict[str, torch.Tensor], meta: dict[str, str], version: str, file_bytes: int,
            semantics: bool = True) -> _Layout:
    """Every field checked; ``semantics=False``: all but :func:`_check_semantics` (the decoders rely on none of those)."""
    header = _header(meta)
    raw_names = _raw_names(meta)
    _check_tensor_keys(tensors, version, header.encoding, raw_names)
    table = _table(tensors, meta, version)
    if set(raw_names) & set(table.names):
        raise IntegrityError("a tensor is both packed and raw")
    streams = {st: tensors[st].numpy() for st in _STREAMS[header.encoding]}
    check_scales(table)
    check_streams(table, header.encoding, next(iter(streams.values())).size)
    if any(a.size != next(iter(streams.values())).size for a in streams.values()):
        raise IntegrityError("the streams hold data that no tensor owns")
    nonzeros = int(table.index[:, 1].sum()) if header.encoding == "golomb" else None
    check_claims(table, header.density, header.scope, numel_cap(file_bytes, header.density, nonzeros), file_bytes)
    raw = {name: tensors[f"raw::{name}"] for name in raw_names}
    layout = _Layout(header, table, streams, raw, meta["pack_digest"], version)
    if semantics:
        _check_semantics(layout)
    return layout


def _check_semantics(layout: _Layout) -> None:
    """The recovery tensors and config, and the LoRA geometry: what the tensors mean, which no
    decoder relies on (:func:`read_pack_dense` checks it while the streams decode)."""
    header, table = layout.header, layout.table
    if header.recovery_config is None and _recovery_names(table.names):
        raise IntegrityError("recovery tensors without a recovery config")
    _check_recovery_init(header.recovery_config, table, layout.version)
    _check_geometry(header.adapter_config, table, {name: tuple(t.shape) for name, t in layout.raw.items()})


def _open(path: str | Path, expected_base: str | None, semantics: bool = True) -> _Layout:
    """Load, verify the digest, check the version and the base, check every field
    (``semantics=False``: all but :func:`_check_semantics`)."""
    path = Path(path)
    tensors, meta, file_bytes = _load(path)
    version = meta.get("format_version")
    if version not in READ_VERSIONS or meta.get("kind") != KIND:
        raise UsageError(f"{path}: pack format version {version!r} is not supported "
                         f"(this adapterhub-c reads versions {', '.join(READ_VERSIONS)})")
    if expected_base is not None and meta.get("base") != expected_base:
        raise UsageError(f"{path}: pack was made for base {meta.get('base')!r}, not {expected_base!r}")
    try:
        return _layout(tensors, meta, version, file_bytes, semantics)
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None


def _encoded(layout: _Layout, t: int) -> EncodedSigns:
    numel, nnz, param, unary_bits, offset, length = layout.table.index[t].tolist()
    data = {st: arr[offset:offset + length] for st, arr in layout.streams.items()}
    return EncodedSigns(layout.header.encoding, numel, nnz, param, unary_bits, data)


def read_pack(path: str | Path, expected_base: str | None = None) -> Pack:
    """Read and verify a pack file (format version 1 or 2), decoded with the numpy decoder
    into ternary tensors (what inspection and the merges need; :func:`read_pack_dense`
    gives dense tensors faster).

    IntegrityError: unreadable, truncated, digest mismatch (any flipped byte), or a
    header or stream that the writer cannot have produced (a digest anyone can recompute
    proves nothing against a deliberate writer: every field is checked).
    UsageError: an unknown ``format_version``, or ``expected_base`` given and different.
    """
    layout = _open(path, expected_base)
    h, table = layout.header, layout.table
    ternary, encoded = {}, {}
    try:
        for t, name in enumerate(table.names):
            enc = _encoded(layout, t)
            idx, neg = decode(enc)
            ternary[name] = TernaryTensor(idx, neg, float(table.scales[t]), table.shapes[t], table.dtype_name(t))
            encoded[name] = enc
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None
    return Pack(ternary, encoded, layout.raw, h.density, h.alpha, h.scope, h.method, h.encoding, h.base,
                h.source_digest, h.adapter_config, layout.pack_digest, h.recovery_config)


@dataclass(eq=False)
class DecodedPack:
    """A verified pack decoded into dense tensors of their source dtypes (:func:`read_pack_dense`)."""

    tensors: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]
    density: float
    alpha: float
    scope: str
    method: str
    encoding: str
    base: str
    source_digest: str
    adapter_config: dict
    pack_digest: str
    recovery_config: dict | None
    dtype: torch.dtype | None = None  # what the LoRA tensors were decoded into (None: their own dtypes)

    def to_adapter(self) -> LoraAdapter:
        """What :func:`unpack_to_adapter` gives for the same file (recovery tensors left out);
        decoded into a ``dtype``: those tensors cast to it, the raw ones too."""
        config = dict(self.adapter_config)
        check_lora_config(config, "pack")
        tensors = dict(self.tensors)
        for name in self._recovery_keys():
            del tensors[name]
        cast = self.dtype is not None
        tensors.update({name: t.to(self.dtype, copy=True) if cast and t.is_floating_point() else t.clone()
                        for name, t in self.raw.items()})
        return LoraAdapter(config=config, tensors=tensors)

    def recovery(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """What :func:`unpack_recovery` gives: (recovery state without the prefix, config), or None."""
        n = len(RECOVERY_PREFIX)
        state = {k[n:]: self.tensors[k] for k in self._recovery_keys()}
        return _recovery_out(state, self.recovery_config) if state else None

    def _recovery_keys(self) -> list[str]:
        return _recovery_names(list(self.tensors))  # the keys are in name order, as decoded


def _dense_ref(layout: _Layout, out_codes: np.ndarray | None) -> dict[str, torch.Tensor]:
    """The reference twin: the numpy decoder, then :meth:`TernaryTensor.to_dense`, per tensor
    (then cast to its ``out_codes`` dtype when given)."""
    table, out = layout.table, {}
    for t, name in enumerate(table.names):
        idx, neg = decode(_encoded(layout, t))
        out[name] = TernaryTensor(idx, neg, float(table.scales[t]), table.shapes[t],
                                  table.dtype_name(t)).to_dense()
        if out_codes is not None:
            out[name] = out[name].to(torch_dtype(int(out_codes[t])))
    return out


def _out_codes(table: PackTable, dtype: torch.dtype) -> np.ndarray:
    """The dtype code each tensor is decoded into: ``dtype`` for the LoRA tensors, their own for
    the recovery tensors (D − D₀ is added back in the dtype D was packed from)."""
    codes = np.full(len(table.names), torch_dtype_code(dtype), dtype=np.int64)
    a = bisect.bisect_left(table.names, RECOVERY_PREFIX)
    b = a + len(_recovery_names(table.names))
    codes[a:b] = table.dtypes[a:b]
    return codes


def read_pack_dense(path: str | Path, expected_base: str | None = None, *, impl: str = "numba",
                    dtype: torch.dtype | None = None) -> DecodedPack:
    """Read, verify and decode a pack file straight into dense tensors of their source dtypes,
    or of ``dtype`` (the LoRA and raw tensors; recovery tensors keep theirs): the values of the
    source dtype cast, bit for bit ``.to(dtype)`` of the default decode, written once.

    ``impl="numba"``: one compiled pass over the streams per output dtype (:mod:`.dense`), writing
    one flat buffer that the tensors are views of; ``impl="ref"``: the numpy decoder per
    tensor. Both give the same bits and refuse the same files (errors as :func:`read_pack`;
    UsageError for a ``dtype`` a scale does not fit). The checks no decoder relies on
    (:func:`_check_semantics`) run while the streams decode; nothing is returned unless all pass.
    """
    from adapterhub_c.packing.dense import decode_dense

    if impl not in ("numba", "ref"):
        raise UsageError(f"impl must be numba or ref, got {impl!r}")
    layout = _open(path, expected_base, semantics=False)
    out_codes = None if dtype is None else _out_codes(layout.table, dtype)

    def checks() -> None:
        _check_semantics(layout)
        if out_codes is not None:
            check_out_dtypes(layout.table, out_codes)

    try:
        if impl == "ref":
            checks()
            dense = _dense_ref(layout, out_codes)
        else:
            dense = decode_dense(layout.table, layout.header.encoding, layout.streams, out_codes=out_codes,
                                 during=checks)
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None
    h = layout.header
    check_lora_config(dict(h.adapter_config), "pack")  # as unpack_to_adapter does: both readers refuse alike
    return DecodedPack(dense, layout.raw, h.density, h.alpha, h.scope, h.method, h.encoding, h.base,
                       h.source_digest, h.adapter_config, layout.pack_digest, h.recovery_config, dtype)


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
    return _recovery_out(state, pack.recovery_config)


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
