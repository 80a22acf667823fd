"""Fused CPU decoders (numba): a pack's shared streams → dense ``scale · T`` tensors, one pass.

The twins are the numpy decoder of :mod:`adapterhub_c.packing.encoding` (``decode``) followed
by ``TernaryTensor.to_dense``; the tests compare the two bit for bit, and on hostile streams
both refuse the same inputs.

One call decodes every tensor of one output dtype: the streams of all tensors lie back to
back (``bits``, or ``pos``/``neg``), ``index`` holds one row per tensor (numel, nnz, m,
unary_bits, offset, length: the pack file's index table), and each tensor is written to
``out[start[t]:start[t] + numel]`` of one flat output buffer, whose per-tensor views the
caller slices. The kernels write integer bit patterns (uint16 for fp16/bf16, uint32 for
fp32, uint64 for fp64): ``vals[t]`` = (bits of +0, of +scale, of -scale) in the output dtype,
rounded by the caller exactly as the twin rounds, so no float arithmetic happens here.

Golomb: the unary stream is read 64 bits at a time and its ones taken lowest first
(trailing-zero count, clear lowest bit: no loop-carried shift chain); the prefixes, the
signs and the extra bits are each read in order from a 64-bit buffer refilled when spent
(a bit-position load per non-zero and stream cost 20% more), the truncated-binary step
branch-free; the output is zeroed in L1-sized chunks just ahead of the
write position, so the dense tensor is written once. Bitmask: a branch-free select per
element, 32 per word, which LLVM vectorises (the output index is unsigned: numba's
negative-index wraparound would stop it). Numbers: ``benchmarks/results/pack_speed.md``.

Every check of the twin happens in the kernel (counts, parameter range, stream lengths,
padding, positions past the end); the caller must only pass index rows whose numel and
nnz it has bounded (0 <= nnz <= numel <= 2^32) and whose offset/length lie inside the
streams. A kernel returns (tensor, status): status 0 = all decoded, else the code of the
first failure (:data:`STATUS_MESSAGES`) and the tensor it happened in.

Compiled on first use (a few seconds) and cached on disk (``cache=True``).
"""
from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

_CHUNK = 4096  # elements zeroed at a time ahead of the golomb writes (16 KB of fp32)
_MAX_PARAM = 1 << 32
_INT_SAFE = 1 << 62

OK, BAD_PARAM, PAST_END, TRUNCATED, UNARY, REMAINDER, LENGTH, BOTH, PADDING, COUNT = range(10)
STATUS_MESSAGES = {
    BAD_PARAM: "golomb parameter is out of range for its non-zero count",
    PAST_END: "golomb stream decodes past the end of the tensor",
    TRUNCATED: "golomb stream is truncated",
    UNARY: "golomb unary stream does not match the non-zero count",
    REMAINDER: "golomb remainder out of range",
    LENGTH: "golomb stream has the wrong length or non-zero padding",
    BOTH: "bitmask: a position is both positive and negative",
    PADDING: "bitmask padding bits are not zero",
    COUNT: "bitmask non-zero count does not match the header",
}


_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U63 = np.uint64(63)


@numba.njit(cache=True, nogil=True, inline="always")
def _bits_at(words, j):  # pragma: no cover - compiled
    """The 64 stream bits from bit ``j`` on (LSB first), from two words of the padded stream."""
    wj = np.uint64(j >> 6)  # unsigned indices: numba adds no negative-index wraparound
    sh = np.uint64(j & 63)
    lo = words[wj] >> sh
    hi = (words[wj + _U1] << _U1) << (_U63 - sh)  # two shifts: a shift by 64 is undefined
    return lo | hi


@numba.njit(cache=True, nogil=True, inline="always")
def _bit(words, k):  # pragma: no cover - compiled
    """Stream bit ``k`` (0 or 1, int64): one load, where :func:`_bits_at` takes two."""
    return np.int64((words[np.uint64(k >> 6)] >> np.uint64(k & 63)) & _U1)


@numba.njit(cache=True, nogil=True, inline="always")
def _zero_to(out, base, z, pos, numel):  # pragma: no cover - compiled
    """Zero ``out[base + z:]`` in L1-sized chunks until it covers ``pos``; the new ``z``."""
    while pos >= z:
        hi = min(z + _CHUNK, numel)
        out[base + z:base + hi] = 0  # +0.0 is all zero bits in every dtype: a memset
        z = hi
    return z


@numba.njit(cache=True, nogil=True)
def _golomb_checks(numel, nnz, m, ub):  # pragma: no cover - compiled
    """The header checks of the twin, in overflow-safe int64 (numel, nnz <= 2^32)."""
    if ub < nnz or m < 1 or m > _MAX_PARAM or nnz > (_INT_SAFE - 1) // m:
        return BAD_PARAM
    if ub - nnz > (numel - nnz) // m:  # (ub - nnz)·m + nnz > numel: the quotients pass the end
        return PAST_END
    return OK


@numba.njit(cache=True, nogil=True)
def _zero_bits(words, a, b):  # pragma: no cover - compiled
    """Whether stream bits [a, b) are all zero."""
    for k in range(a, b):
        if _bit(words, k):
            return False
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _golomb_shape(m):  # pragma: no cover - compiled
    """(prefix width w, threshold u, whether there are extra bits) of truncated binary coding
    of remainders in [0, m): a prefix p >= u takes one extra bit."""
    b = 0 if m == 1 else 64 - np.int64(leading_zeros(np.uint64(m - 1)))
    return (0 if m == 1 else max(b - 1, 0)), (1 << b) - m, (1 if m > 1 else 0)


@numba.njit(cache=True, nogil=True)
def _golomb_one(words, numel, nnz, m, ub, off, length, out, base, zero, pv, nv):  # pragma: no cover
    status = _golomb_checks(numel, nnz, m, ub)
    if status != OK:
        return status
    w, u, has_extra = _golomb_shape(m)
    bit0, end_bits, ub_end = 8 * off, 8 * (off + length), 8 * off + ub
    sign0 = ub_end + nnz * w
    if sign0 + nnz > end_bits:
        return TRUNCATED
    last_bit = 8 * (words.size - 1) * 8 - 1  # reads past the stream (hostile extras) are clamped here
    e = sign0 + nnz  # the extra bits follow the signs
    pos, z, i = -1, 0, 0  # out[base:base + z] is written
    last = bit0 - 1  # stream position of the previous unary one
    wpos = bit0  # the unary stream is scanned a word at a time, its ones taken lowest first
    # the prefixes, signs and extra bits are each read in order from a 64-bit buffer, refilled when spent
    p_mask, p_buf, p_left, p_at = np.uint64((1 << w) - 1), _U0, 0, ub_end
    s_buf, e_buf, e_left = _U0, _U0, 0
    while i < nnz:
        if wpos >= ub_end:
            return UNARY
        x = _bits_at(words, wpos)
        if ub_end - wpos < 64:  # ones past the unary stream are not quotients
            x &= (_U1 << np.uint64(ub_end - wpos)) - _U1
        while x != 0 and i < nnz:
            end = wpos + np.int64(trailing_zeros(x))
            x &= x - _U1
            q = end - last - 1
            last = end
            if p_left < w:
                p_buf = _bits_at(words, p_at)
                p_left = 64
            p = np.int64(p_buf & p_mask)
            p_buf >>= np.uint64(w)
            p_left -= w
            p_at += w
            # branch-free truncated binary: a "big" prefix takes the next extra bit
            big = has_extra & np.int64(p >= u)
            if e_left == 0:
                e_buf = _bits_at(words, min(e, last_bit))
                e_left = 64
            r = p + big * (p - u + np.int64(e_buf & _U1))
            e += big
            e_buf >>= np.uint64(big)
            e_left -= big
            pos += q * m + r + 1
            if (r >= m) | (pos >= numel):  # one rarely taken branch for both
                return REMAINDER if r >= m else PAST_END
            z = _zero_to(out, base, z, pos, numel)
            if (i & 63) == 0:
                s_buf = _bits_at(words, sign0 + i)
            neg = np.int64((s_buf >> np.uint64(i & 63)) & _U1)
            out[np.uint64(base + pos)] = pv ^ ((pv ^ nv) & -neg)  # a select: a sign branch mispredicts
            i += 1
        wpos += 64
    out[base + z:base + numel] = 0
    return _golomb_end(words, nnz, last, bit0, ub_end, e, end_bits, length)


@numba.njit(cache=True, nogil=True)
def _golomb_end(words, nnz, last, bit0, ub_end, e, end_bits, length):  # pragma: no cover - compiled
    """The checks once every non-zero is decoded: the unary stream ends with the last one, and the
    extra bits (up to ``e``) end the stream, its padding zero."""
    if nnz == 0:
        if not _zero_bits(words, bit0, ub_end):  # no one may appear in the unary stream at all
            return UNARY
    elif last != ub_end - 1:
        return UNARY
    if e > end_bits or length != (e - bit0 + 7) // 8 or not _zero_bits(words, e, end_bits):
        return LENGTH
    return OK


@numba.njit(cache=True, nogil=True)
def golomb_dense(words, index, start, vals, out):  # pragma: no cover - compiled
    """Decode every tensor of ``index`` from the golomb stream into ``out``; ``words`` is the
    stream as little-endian uint64 words, followed by at least one zero word (:func:`padded_words`)."""
    for t in range(index.shape[0]):
        numel, nnz, m, ub, off, length = index[t, 0], index[t, 1], index[t, 2], index[t, 3], index[t, 4], index[t, 5]
        status = _golomb_one(words, numel, nnz, m, ub, off, length, out, start[t], vals[t, 0], vals[t, 1], vals[t, 2])
        if status != OK:
            return t, status
    return -1, OK


def padded_words(bits: np.ndarray) -> np.ndarray:
    """A uint8 stream as uint64 words, zero-padded to a whole word plus one word."""
    words = np.zeros(bits.size // 8 + 2, dtype="<u8")
    words.view(np.uint8)[:bits.size] = bits
    return words


@numba.njit(cache=True, nogil=True, inline="always")
def _popcount(x):  # pragma: no cover - compiled
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    return (((x + (x >> 4)) & 0x0F0F0F0F) * 0x01010101 & 0xFFFFFFFF) >> 24


@numba.njit(cache=True, nogil=True, inline="always")
def _select_word(out, o, n_el, p, n, pv, nv):  # pragma: no cover - compiled
    """out[o + k] = +scale / -scale / 0 for bit k of the planes ``p`` / ``n`` (k < n_el), branch-free."""
    for k in range(n_el):
        out[np.uint64(o + k)] = (pv & -((p >> k) & 1)) | (nv & -((n >> k) & 1))


@numba.njit(cache=True, nogil=True)
def _bitmask_one(pos, neg, numel, nnz, off, out, base, pv, nv):  # pragma: no cover - compiled
    full = numel // 32
    both = np.int64(0)
    count = np.int64(0)
    for wi in range(full):
        p = np.int64(pos[off + wi]) & 0xFFFFFFFF
        n = np.int64(neg[off + wi]) & 0xFFFFFFFF
        both |= p & n
        count += _popcount(p) + _popcount(n)
        _select_word(out, base + 32 * wi, 32, p, n, pv, nv)
    rest = numel - 32 * full
    if rest:
        p = np.int64(pos[off + full]) & 0xFFFFFFFF
        n = np.int64(neg[off + full]) & 0xFFFFFFFF
        if (p | n) >> rest:
            return PADDING
        both |= p & n
        count += _popcount(p) + _popcount(n)
        _select_word(out, base + 32 * full, rest, p, n, pv, nv)
    if both:
        return BOTH
    if count != nnz:
        return COUNT
    return OK


@numba.njit(cache=True, nogil=True)
def bitmask_dense(pos, neg, index, start, vals, out):  # pragma: no cover - compiled
    """Decode every tensor of ``index`` from the bit planes ``pos``/``neg`` into ``out``.

    Index rows must already have length == ceil(numel / 32) and no golomb fields."""
    for t in range(index.shape[0]):
        status = _bitmask_one(pos, neg, index[t, 0], index[t, 1], index[t, 4], out, start[t], vals[t, 1], vals[t, 2])
        if status != OK:
            return t, status
    return -1, OK
