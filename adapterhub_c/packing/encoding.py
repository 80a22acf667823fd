"""Two exact encodings of a ternary sign pattern (positions of the non-zeros + signs).

``golomb`` (storage and transfer, within about 1% of the entropy bound)
    The gaps (zeros before each non-zero) are Golomb-coded with the best parameter for
    the tensor's own density, ``m = ceil(log(2-k) / -log(1-k))``. The code is split in
    four bit streams, concatenated in this order into one little-endian bit string
    (bit i of byte j = stream bit 8j+i), zero-padded to a byte:

    1. unary quotients: ``q = gap // m`` zeros, then a one (``unary_bits`` bits in all);
    2. remainder prefixes: ``b-1`` bits per non-zero, least significant bit first
       (``b = ceil(log2 m)``, ``u = 2**b - m``);
    3. signs: one bit per non-zero, 1 = negative;
    4. remainder extra bits: one per non-zero whose prefix ``p >= u``.

    A remainder ``r < u`` is its prefix; otherwise ``r + u`` is ``2p + e`` (``e`` the
    extra bit). This is truncated binary coding, split so that every stream except the
    unary one has a fixed width and the decoder runs in a handful of numpy calls.

``bitmask`` (kernels and bitwise merging)
    Two bit planes: ``pos`` (bit set where T = +1) and ``neg`` (bit set where T = -1),
    each as little-endian int32 words, bit i of word w = element 32w+i. The last word is
    zero-padded; the length is stored separately. A set bit in both planes, or in the
    padding, is corrupt data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.options.pack import ENCODINGS  # the names live with the options (re-exported)

# Decoder bounds: the writer's m is about ln2/density (at most ~numel); with m <= 2^32,
# nnz·m < 2^62 and numel < 2^62 no int64 step of the golomb index arithmetic can wrap.
MAX_GOLOMB_PARAM = 1 << 32
_INT_SAFE = 1 << 62


@dataclass(frozen=True, eq=False)
class EncodedSigns:
    """An encoded sign pattern.

    ``data`` holds the streams: golomb → ``{"bits": uint8}``; bitmask → ``{"pos": int32,
    "neg": int32}``. ``param`` is the Golomb m (0 for bitmask); ``unary_bits`` the length
    of the golomb unary stream (0 for bitmask).
    """

    encoding: str
    numel: int
    nnz: int
    param: int = 0
    unary_bits: int = 0
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def payload_bits(self) -> int:
        """Bits actually stored in the data streams (padding included)."""
        return sum(int(a.nbytes) * 8 for a in self.data.values())


def entropy_bound(k: float) -> float:
    """H(k) in bits per parameter for density k, one sign bit per non-zero included."""
    if k <= 0.0:
        return 0.0
    if k >= 1.0:
        return 1.0
    return -((1 - k) * math.log2(1 - k) + k * math.log2(k / 2))


def golomb_parameter(k: float) -> int:
    """Best Golomb m for i.i.d. non-zeros of density k: ceil(log(2-k) / -log(1-k))."""
    if k >= 1.0 or k <= 0.0:
        return 1
    return max(1, math.ceil(math.log(2 - k) / -math.log1p(-k)))


def encode(indices: np.ndarray, negative: np.ndarray, numel: int, encoding: str = "golomb",
           *, m: int | None = None) -> EncodedSigns:
    """Encode sorted flat ``indices`` of the non-zeros and their ``negative`` flags.

    ``m`` overrides the Golomb parameter (e.g. a power of two for Rice coding).
    """
    indices = np.asarray(indices, dtype=np.int64)
    negative = np.asarray(negative, dtype=bool)
    if indices.shape != negative.shape or indices.ndim != 1:
        raise UsageError("indices and negative must be 1-d arrays of the same length")
    if indices.size and (indices[0] < 0 or indices[-1] >= numel or np.any(np.diff(indices) <= 0)):
        raise UsageError("indices must be strictly increasing and within [0, numel)")
    if encoding == "golomb":
        return _golomb_encode(indices, negative, int(numel), m)
    if encoding == "bitmask":
        return _bitmask_encode(indices, negative, int(numel))
    raise UsageError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")


def decode(enc: EncodedSigns) -> tuple[np.ndarray, np.ndarray]:
    """Back to (indices int64, negative bool); IntegrityError on inconsistent streams.

    The indices are checked strictly increasing and within [0, numel), whatever the
    streams say.
    """
    if not 0 <= enc.nnz <= enc.numel < _INT_SAFE:
        raise IntegrityError(f"bad counts: numel={enc.numel}, nnz={enc.nnz}")
    if enc.encoding == "golomb":
        indices, negative = _golomb_decode(enc)
    elif enc.encoding == "bitmask":
        indices, negative = _bitmask_decode(enc)
    else:
        raise IntegrityError(f"unknown encoding {enc.encoding!r}")
    if indices.size and (indices[0] < 0 or indices[-1] >= enc.numel or not (np.diff(indices) > 0).all()):
        raise IntegrityError("decoded positions are not strictly increasing within the tensor")
    return indices, negative


# ---- golomb -------------------------------------------------------------------------
def _widths(m: int) -> tuple[int, int]:
    """(prefix width b-1, threshold u) of truncated binary coding for remainders < m."""
    b = (m - 1).bit_length()
    return max(b - 1, 0), (1 << b) - m


def _golomb_encode(indices, negative, numel, m) -> EncodedSigns:
    nnz = indices.size
    if m is None:
        m = golomb_parameter(nnz / numel if numel else 0.0)
    if m < 1:
        raise UsageError(f"Golomb parameter must be >= 1, got {m}")
    gaps = np.diff(indices, prepend=-1) - 1
    q, r = np.divmod(gaps, m)
    unary_bits = int(q.sum()) + nnz
    unary = np.zeros(unary_bits, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    w, u = _widths(m)
    big = r >= u
    p = np.where(big, (r + u) >> 1, r)
    prefix = ((p[:, None] >> np.arange(w)) & 1).astype(np.uint8).reshape(-1)
    extra = ((r[big] + u) & 1).astype(np.uint8)
    if m == 1:  # remainders are always 0: no prefix, no extra bits
        prefix, extra = prefix[:0], extra[:0]
    bits = np.concatenate([unary, prefix, negative.astype(np.uint8), extra])
    data = np.packbits(bits, bitorder="little")
    return EncodedSigns("golomb", numel, nnz, m, unary_bits, {"bits": data})


def _prefix_values(seg: np.ndarray, nnz: int, w: int) -> np.ndarray:
    """Integers from ``nnz`` rows of ``w`` bits, least significant first."""
    rows = seg.reshape(nnz, w)
    p = np.zeros(nnz, dtype=np.int64)
    for j in range(w):  # w is small (about log2 of 1/density); each step is vectorised
        p |= rows[:, j].astype(np.int64) << j
    return p


def _golomb_decode(enc: EncodedSigns) -> tuple[np.ndarray, np.ndarray]:
    nnz, m, ub = enc.nnz, enc.param, enc.unary_bits
    data = enc.data.get("bits")
    if data is None or data.dtype != np.uint8 or data.ndim != 1 or ub < nnz:
        raise IntegrityError("golomb stream: bad header or missing data")
    if not 1 <= m <= MAX_GOLOMB_PARAM or nnz * m >= _INT_SAFE:
        raise IntegrityError(f"golomb parameter {m} is out of range for {nnz} non-zeros")
    if (ub - nnz) * m + nnz > enc.numel:  # the quotients alone already pass the end
        raise IntegrityError("golomb stream decodes past the end of the tensor")
    w, u = _widths(m)
    if m == 1:
        w = 0
    bits = np.unpackbits(data, bitorder="little")
    fixed_end = ub + nnz * w + nnz
    if bits.size < fixed_end:
        raise IntegrityError("golomb stream is truncated")
    ends = np.flatnonzero(bits[:ub].view(bool))  # bool view: numpy's fast nonzero path
    if ends.size != nnz or (nnz and ends[-1] != ub - 1):
        raise IntegrityError("golomb unary stream does not match the non-zero count")
    p = _prefix_values(bits[ub:ub + nnz * w], nnz, w)
    negative = bits[ub + nnz * w:fixed_end].astype(bool)
    big = (p >= u) if m > 1 else np.zeros(nnz, dtype=bool)
    n_extra = int(np.count_nonzero(big))
    total = fixed_end + n_extra
    if data.size != (total + 7) // 8 or bits[total:].any():
        raise IntegrityError("golomb stream has the wrong length or non-zero padding")
    # the extra bit of the j-th "big" remainder is stream bit fixed_end + j: a gather
    # through a running count is much faster than boolean-mask assignment
    slot = np.cumsum(big, dtype=np.int64)
    slot += fixed_end - 1
    e = bits.take(np.minimum(slot, bits.size - 1)).astype(np.int64) if nnz else np.zeros(0, np.int64)
    r = np.where(big, 2 * p - u + e, p)
    if nnz and int(r.max()) >= m:
        raise IntegrityError("golomb remainder out of range")
    # index_i = sum_{j<=i} (q_j·m + r_j + 1) - 1 and ends_i = sum_{j<=i} (q_j + 1) - 1
    indices = m * ends - (m - 1) * np.arange(nnz, dtype=np.int64) + np.cumsum(r)
    if nnz and indices[-1] >= enc.numel:
        raise IntegrityError("golomb stream decodes past the end of the tensor")
    return indices, negative


# ---- bitmask ------------------------------------------------------------------------
def n_words(numel: int) -> int:
    """Number of int32 words of one bit plane for ``numel`` elements."""
    return (numel + 31) // 32


def pack_plane(bits: np.ndarray) -> np.ndarray:
    """A flat bool/0-1 array → int32 words (bit i of word w = element 32w+i)."""
    n = bits.size
    padded = np.zeros(n_words(n) * 32, dtype=np.uint8)
    padded[:n] = bits
    return np.packbits(padded, bitorder="little").view("<i4")


def unpack_plane(words: np.ndarray, numel: int) -> np.ndarray:
    """int32 words → flat uint8 0/1 array of length ``numel`` (padding must be zero)."""
    bits = np.unpackbits(np.ascontiguousarray(words, dtype="<i4").view(np.uint8), bitorder="little")
    if bits[numel:].any():
        raise IntegrityError("bitmask padding bits are not zero")
    return bits[:numel]


def _bitmask_encode(indices, negative, numel) -> EncodedSigns:
    pos = np.zeros(numel, dtype=np.uint8)
    neg = np.zeros(numel, dtype=np.uint8)
    pos[indices[~negative]] = 1
    neg[indices[negative]] = 1
    return EncodedSigns("bitmask", numel, indices.size, data={"pos": pack_plane(pos), "neg": pack_plane(neg)})


def _bitmask_decode(enc: EncodedSigns) -> tuple[np.ndarray, np.ndarray]:
    pos_w, neg_w = enc.data.get("pos"), enc.data.get("neg")
    if enc.param or enc.unary_bits:
        raise IntegrityError("bitmask entry with golomb fields")
    nw = n_words(enc.numel)
    for plane in (pos_w, neg_w):
        if plane is None or plane.dtype.kind not in "iu" or plane.itemsize != 4 or plane.shape != (nw,):
            raise IntegrityError("bitmask planes are missing or have the wrong size")
    pos, neg = unpack_plane(pos_w, enc.numel), unpack_plane(neg_w, enc.numel)
    if (pos & neg).any():
        raise IntegrityError("bitmask: a position is both positive and negative")
    indices = np.flatnonzero(pos | neg).astype(np.int64)
    if indices.size != enc.nnz:
        raise IntegrityError("bitmask non-zero count does not match the header")
    return indices, neg[indices].astype(bool)
