"""The per-tensor records of a pack: one table, checked once for all tensors.

Both pack format versions are read into a :class:`PackTable` (names, shapes, dtypes,
scales and the int64 ``index`` rows the decoders take); version 2 writes it compactly.

Version 2 stores the table as one uint8 tensor ``table``: the zlib (deflate) compression of

  ``<QQ`` T (tensors), D (dimensions of all shapes together), then
  int64 × (6T + D), byte-shuffled (the first byte of every value, then the second, …):
      the columns ndim, dtype code, nnz, param, unary_bits, length (T values each), then
      the dims of every shape back to back (D values);
  float32 × T, byte-shuffled: the scales;
  the names, a JSON list of T strings, sorted and unique (the rest of the blob).

Numel and offsets are not stored: numel is the product of the shape, offsets are the
running sum of the lengths. Shuffling puts the always-zero high bytes of small integers
next to each other, which deflate then all but drops: about 6 bytes per tensor, names
included, against ~110 bytes of JSON row plus 52 bytes of index row in version 1.
"""
from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.packing.compeft import kept_at_density
from adapterhub_c.packing.encoding import MAX_GOLOMB_PARAM

DTYPE_CODES = ("float16", "bfloat16", "float32", "float64")
_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NDIM = 8
MAX_PACK_NUMEL = 1 << 32
# What inflating the table may allocate: honest tables deflate about 10:1; the allowance
# covers ~20,000 tensors whatever the ratio
TABLE_RATIO_CAP = 64
TABLE_ALLOWANCE = 1 << 20
_HEAD = struct.Struct("<QQ")


@dataclass(frozen=True, eq=False)
class PackTable:
    """The checked per-tensor records, in name order.

    ``index`` int64 [T, 6]: numel, nnz, param, unary_bits, offset, length per tensor (the
    version-1 index table); ``dtypes`` int64 codes into :data:`DTYPE_CODES`; ``dims`` int64
    [T, 1 + MAX_NDIM]: the rank, then the shape padded with ones."""

    names: list[str]
    dims: np.ndarray
    dtypes: np.ndarray
    scales: np.ndarray
    index: np.ndarray

    @functools.cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        ndim = self.dims[:, 0]
        if ndim.size and (ndim == ndim[0]).all():  # one rank (the usual case): rows cut at once
            return list(map(tuple, self.dims[:, 1:1 + int(ndim[0])].tolist()))
        return [tuple(row[1:1 + row[0]]) for row in self.dims.tolist()]

    def dtype_name(self, t: int) -> str:
        return DTYPE_CODES[int(self.dtypes[t])]


def dtype_code(name: str) -> int:
    """The code of a dtype name (UsageError for dtypes a pack cannot hold)."""
    try:
        return DTYPE_CODES.index(name)
    except ValueError:
        raise UsageError(f"a pack cannot hold tensors of dtype {name}") from None


def torch_dtype(code: int) -> torch.dtype:
    """The torch dtype of a tensor-table dtype code."""
    return _TORCH_DTYPES[code]


def torch_dtype_code(dtype: torch.dtype) -> int:
    """The code of a torch dtype (UsageError for dtypes a pack cannot hold)."""
    if dtype not in _TORCH_DTYPES:
        raise UsageError(f"a pack cannot be decoded into {dtype}; use one of {', '.join(DTYPE_CODES)}")
    return _TORCH_DTYPES.index(dtype)


# ---- writing ------------------------------------------------------------------------------
def _shuffled(values: np.ndarray) -> bytes:
    """Little-endian bytes of ``values``, byte planes first (byte 0 of each, byte 1, …)."""
    a = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(a.view(np.uint8).reshape(a.size, a.itemsize).T).tobytes()


def _unshuffled(data: memoryview | bytes, dtype: str, count: int) -> np.ndarray:
    item = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, dtype=np.uint8, count=count * item).reshape(item, count)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(count)


def encode_table(names: list[str], shapes: list[tuple[int, ...]], dtypes: list[str], scales: list[float],
                 index: np.ndarray) -> bytes:
    """The version-2 ``table`` blob (see the module docstring) of tensors in name order."""
    if any(len(s) > MAX_NDIM for s in shapes):
        raise UsageError(f"a pack holds tensors of at most {MAX_NDIM} dimensions")
    cols = np.stack([np.array([len(s) for s in shapes], dtype=np.int64),
                     np.array([dtype_code(d) for d in dtypes], dtype=np.int64),
                     index[:, 1], index[:, 2], index[:, 3], index[:, 5]]) if names else np.zeros((6, 0), np.int64)
    dims = np.array([d for s in shapes for d in s], dtype=np.int64)
    ints = np.concatenate([cols.reshape(-1), dims])
    body = (_HEAD.pack(len(names), dims.size) + _shuffled(ints)
            + _shuffled(np.asarray(scales, dtype=np.float32))
            + json.dumps(names, separators=(",", ":"), ensure_ascii=False).encode())
    return zlib.compress(body, 9)


# ---- reading ------------------------------------------------------------------------------
def _inflate(blob: bytes) -> bytes:
    """The inflated table; at most TABLE_RATIO_CAP · len + TABLE_ALLOWANCE bytes are allocated."""
    cap = TABLE_RATIO_CAP * len(blob) + TABLE_ALLOWANCE
    d = zlib.decompressobj()
    try:
        body = d.decompress(blob, cap)
    except zlib.error as e:
        raise IntegrityError(f"the tensor table is not deflate data ({e})") from None
    if d.unconsumed_tail or not d.eof or d.unused_data:
        raise IntegrityError("the tensor table is truncated, trailed by data, or inflates past its cap")
    return body


def _names(data: bytes, count: int) -> list[str]:
    try:
        names = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError("the tensor names are not a JSON list") from None
    if not isinstance(names, list) or len(names) != count or set(map(type, names)) - {str} or "" in names:
        raise IntegrityError(f"the tensor names must be a list of {count} non-empty strings")
    if len(set(names)) != count or names != sorted(names):
        raise IntegrityError("tensor names are not unique and sorted")
    return names


def _dims(ndim: np.ndarray, dims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(:attr:`PackTable.dims`, numels) from the ndim column and the dims, every product bounded."""
    if ((ndim < 0) | (ndim > MAX_NDIM)).any() or int(ndim.sum()) != dims.size:
        raise IntegrityError(f"shape ranks must be in [0, {MAX_NDIM}] and account for the stored dims")
    if (dims < 0).any():
        raise IntegrityError("shapes must be lists of non-negative integers")
    starts = np.cumsum(ndim) - ndim
    grid = np.ones((ndim.size, 1 + MAX_NDIM), dtype=np.int64)
    grid[:, 0] = ndim
    rows = np.repeat(np.arange(ndim.size), ndim)
    grid[rows, 1 + np.arange(dims.size) - starts[rows]] = dims
    # float64 products are exact below 2^53 and overflow nothing, so they guard the int64 ones
    if (np.prod(grid[:, 1:].astype(np.float64), axis=1) > MAX_PACK_NUMEL).any():
        raise IntegrityError(f"a shape has more than {MAX_PACK_NUMEL} elements")
    return grid, np.prod(grid[:, 1:], axis=1)


def decode_table(blob: bytes) -> PackTable:
    """A version-2 ``table`` blob → :class:`PackTable` (offsets filled in, nothing else checked
    beyond the blob's own structure and shapes: see :func:`check_scales`, :func:`check_streams`)."""
    body = _inflate(blob)
    if len(body) < _HEAD.size:
        raise IntegrityError("the tensor table is truncated")
    n, d = _HEAD.unpack_from(body)
    ints_end = _HEAD.size + 8 * (6 * n + d)
    if n > len(body) or d > len(body) or ints_end + 4 * n > len(body):
        raise IntegrityError(f"the tensor table claims {n} tensors and {d} dims in {len(body)} bytes")
    view = memoryview(body)
    ints = _unshuffled(view[_HEAD.size:ints_end], "<i8", 6 * n + d)
    scales = _unshuffled(view[ints_end:ints_end + 4 * n], "<f4", n)
    names = _names(body[ints_end + 4 * n:], n)
    ndim, dtypes, nnz, param, unary, length = ints[:6 * n].reshape(6, n)
    dims, numel = _dims(ndim, ints[6 * n:])
    if ((dtypes < 0) | (dtypes >= len(DTYPE_CODES))).any():
        raise IntegrityError("unknown tensor dtype code")
    if (length < 0).any():
        raise IntegrityError("a stream length is negative")
    offset = np.cumsum(length) - length
    index = np.stack([numel, nnz, param, unary, offset, length], axis=1)
    return PackTable(names, dims, dtypes.copy(), scales, np.ascontiguousarray(index))


# ---- checks common to both versions -----------------------------------------------------------
def check_scales(table: PackTable) -> None:
    """Every scale finite, >= 0, and finite in its tensor's dtype (what decoding computes)."""
    s = np.ascontiguousarray(table.scales, dtype=np.float32)
    ok = np.isfinite(s) & (s >= 0)
    for code in _codes(table.dtypes):
        sel = slice(None) if code is None else table.dtypes == code
        dtype = torch_dtype(int(table.dtypes[0] if code is None else code))
        if dtype != torch.float32 and dtype != torch.float64:
            ok[sel] &= torch.isfinite(torch.from_numpy(s[sel]).to(dtype)).numpy()
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise IntegrityError(f"scale of {table.names[bad]!r} must be finite, >= 0 and fit "
                             f"{table.dtype_name(bad)}, got {float(table.scales[bad])!r}")


def check_out_dtypes(table: PackTable, out_codes: np.ndarray) -> None:
    """UsageError when a tensor decoded into another dtype (``out_codes``) would not keep its
    scale finite: the scale as its own dtype holds it (:func:`check_scales` passed), cast."""
    n = len(DTYPE_CODES)
    pairs = table.dtypes * n + out_codes  # (own dtype, output dtype) as one number
    if not pairs.size:
        return
    s = torch.from_numpy(np.ascontiguousarray(table.scales, dtype=np.float32))
    one = (pairs == pairs[0]).all()  # the usual case: no masks
    ok = np.ones(pairs.shape, dtype=bool)
    for pair in ([int(pairs[0])] if one else np.unique(pairs).tolist()):
        if pair // n != pair % n:
            sel = slice(None) if one else pairs == pair
            cast = s[sel if one else torch.from_numpy(sel)].to(torch_dtype(pair // n)).to(torch_dtype(pair % n))
            ok[sel] = torch.isfinite(cast).numpy()
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise UsageError(f"the scale {float(table.scales[bad]):g} of {table.names[bad]!r} does not fit "
                         f"{DTYPE_CODES[int(out_codes[bad])]}; decode it into its own dtype "
                         f"{table.dtype_name(bad)}")


def _codes(dtypes: np.ndarray) -> list:
    """The dtype codes present; [None] when there is one (the common case: no masks needed)."""
    if not dtypes.size:
        return []
    return [None] if (dtypes == dtypes[0]).all() else np.unique(dtypes).tolist()


def check_streams(table: PackTable, encoding: str, stream_size: int) -> None:
    """Counts in range and the streams tiled exactly by the tensors' data, in order."""
    numel, nnz, param, unary, offset, length = table.index.T
    bad = np.flatnonzero((nnz < 0) | (nnz > numel))
    if bad.size:
        raise IntegrityError(f"inconsistent index entry for {table.names[bad[0]]!r}")
    ends = offset + length
    expect = np.concatenate([[0], ends[:-1]]) if ends.size else ends
    bad = np.flatnonzero((length < 0) | (offset != expect) | (ends > stream_size))
    if bad.size:
        raise IntegrityError(f"data of {table.names[bad[0]]!r} overlaps another tensor's or runs past the end")
    if (int(ends[-1]) if ends.size else 0) != stream_size:
        raise IntegrityError("the streams hold data that no tensor owns")
    if encoding == "bitmask":
        bad = np.flatnonzero((param != 0) | (unary != 0) | (length != (numel + 31) // 32))
        if bad.size:
            raise IntegrityError(f"bitmask entry of {table.names[bad[0]]!r} has golomb fields or planes "
                                 "of the wrong size")
    else:
        _check_golomb_counts(table)


def _check_golomb_counts(table: PackTable) -> None:
    """Each tensor's non-zeros fit the bits of its own stream: a unary terminator, the remainder
    prefix (``ceil(log2 m) - 1`` bits) and a sign for each, so nothing a header claims about the
    non-zeros is more than its stream encodes; no non-zeros, no stream."""
    numel, nnz, param, unary, _, length = table.index.T
    if ((param < 1) | (param > MAX_GOLOMB_PARAM)).any():
        bad = int(np.flatnonzero((param < 1) | (param > MAX_GOLOMB_PARAM))[0])
        raise IntegrityError(f"golomb parameter of {table.names[bad]!r} is out of range")
    # prefix width of truncated binary coding: bit_length(m - 1) - 1 (frexp is exact below 2^53)
    width = np.maximum(np.frexp((param - 1).astype(np.float64))[1].astype(np.int64) - 1, 0)
    fixed = unary + nnz * (width + 1)
    bad = np.flatnonzero((unary < nnz) | (unary > 8 * length) | (fixed > 8 * length) | ((nnz == 0) & ((unary != 0) | (length != 0))))
    if bad.size:
        raise IntegrityError(f"golomb entry of {table.names[bad[0]]!r} claims more non-zeros than its "
                             "stream holds")


def check_claims(table: PackTable, density: float, scope: str, cap: int, file_bytes: int) -> None:
    """The claimed sizes against the file's size (``cap``) and the density of the top-k."""
    numel, nnz = table.index[:, 0], table.index[:, 1]
    total = int(numel.sum())
    if total > cap:
        raise IntegrityError(f"claims {total} packed elements; a {file_bytes}-byte pack at density "
                             f"{density:g} holds at most {cap}")
    if scope == "global":
        n, k = total, int(nnz.sum())
        if k > kept_at_density(n, density=density):
            raise IntegrityError(f"{k} non-zeros of {n} entries exceed density {density:g}")
        return
    # kept_at_density per tensor, vectorised (the same float64 arithmetic)
    kept = np.minimum(numel, np.floor(density * numel.astype(np.float64) + 0.5).astype(np.int64))
    bad = np.flatnonzero(nnz > kept)
    if bad.size:
        t = int(bad[0])
        raise IntegrityError(f"{int(nnz[t])} non-zeros of {int(numel[t])} entries exceed density {density:g}")


def rows_to_table(rows, index: np.ndarray, scales: np.ndarray) -> PackTable:
    """A version-1 table: the checked [name, shape, dtype, scale] rows and the index tensor."""
    if index.shape != (len(rows), 6) or scales.shape != (len(rows),):
        raise IntegrityError("index and tensor list disagree")
    dims = np.ones((len(rows), 1 + MAX_NDIM), dtype=np.int64)
    for t, (name, shape, _, _) in enumerate(rows):
        if len(shape) > MAX_NDIM:
            raise IntegrityError(f"shape of {name!r} has more than {MAX_NDIM} dimensions")
        dims[t, 0] = len(shape)
        dims[t, 1:1 + len(shape)] = shape
    numel = np.array([math.prod(r[1]) for r in rows], dtype=np.int64)
    json_scales = np.array([r[3] for r in rows], dtype=np.float64)
    bad = np.flatnonzero((index[:, 0] != numel) | (json_scales != scales.astype(np.float64)))
    if bad.size:
        raise IntegrityError(f"inconsistent index entry for {rows[bad[0]][0]!r}")
    return PackTable([r[0] for r in rows], dims,
                     np.array([DTYPE_CODES.index(r[2]) for r in rows], dtype=np.int64),
                     np.ascontiguousarray(scales, dtype=np.float32), np.ascontiguousarray(index, dtype=np.int64))
