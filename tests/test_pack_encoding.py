"""Exact round trips of the golomb and bitmask encodings, and golomb size vs the bound."""
from __future__ import annotations

import numpy as np
import pytest

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.packing.encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound, golomb_parameter

SIZES = [0, 1, 31, 32, 33, 1000, 100003]
DENSITIES = [0.0, 0.001, 0.05, 0.2, 0.5, 0.9, 1.0]


def _random_pattern(rng, n, k):
    t = np.where(rng.random(n) < k, np.where(rng.random(n) < 0.5, -1, 1), 0)
    idx = np.flatnonzero(t).astype(np.int64)
    return idx, t[idx] < 0


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_all_sizes_and_densities(encoding):
    rng = np.random.default_rng(0)
    for n in SIZES:
        for k in DENSITIES:
            idx, neg = _random_pattern(rng, n, k)
            enc = encode(idx, neg, n, encoding)
            i2, n2 = decode(enc)
            assert i2.dtype == np.int64 and n2.dtype == bool
            assert np.array_equal(i2, idx) and np.array_equal(n2, neg), (n, k)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_edge_patterns(encoding):
    for n in (1, 31, 32, 33, 64, 65):
        for idx in (np.arange(n), np.array([0]), np.array([n - 1]), np.arange(0, n, 2)):
            for neg in (np.zeros(idx.size, bool), np.ones(idx.size, bool)):
                i2, n2 = decode(encode(idx, neg, n, encoding))
                assert np.array_equal(i2, idx) and np.array_equal(n2, neg)


def test_golomb_any_parameter_round_trips():
    rng = np.random.default_rng(1)
    idx, neg = _random_pattern(rng, 5000, 0.1)
    for m in (1, 2, 3, 5, 7, 8, 16, 100, 4097):
        i2, n2 = decode(encode(idx, neg, 5000, "golomb", m=m))
        assert np.array_equal(i2, idx) and np.array_equal(n2, neg), m


@pytest.mark.parametrize("k", [0.05, 0.10, 0.20])
def test_golomb_within_one_percent_of_entropy_bound(k):
    rng = np.random.default_rng(2)
    n = 2_000_000
    idx = np.flatnonzero(rng.random(n) < k)
    enc = encode(idx, rng.random(idx.size) < 0.5, n, "golomb")
    bound = entropy_bound(idx.size / n) * n
    assert enc.payload_bits() <= 1.01 * bound


def test_entropy_bound_and_parameter():
    assert entropy_bound(0.05) == pytest.approx(0.3364, abs=1e-4)
    assert entropy_bound(0.10) == pytest.approx(0.5690, abs=1e-4)
    assert entropy_bound(0.20) == pytest.approx(0.9219, abs=1e-4)
    assert entropy_bound(0) == 0 and entropy_bound(1) == 1
    assert golomb_parameter(1.0) == 1 and golomb_parameter(0.5) == 1
    assert golomb_parameter(0.1) == 7


def test_bitmask_layout_is_documented_one():
    # element 32w+i is bit i of int32 word w; the last word zero-padded
    enc = encode(np.array([0, 31, 33]), np.array([False, True, False]), 40, "bitmask")
    pos, neg = enc.data["pos"], enc.data["neg"]
    assert pos.dtype.itemsize == 4 and pos.size == 2
    assert int(pos.view(np.uint32)[0]) == 1 and int(pos.view(np.uint32)[1]) == 2
    assert int(neg.view(np.uint32)[0]) == 1 << 31 and int(neg.view(np.uint32)[1]) == 0


def test_corrupt_streams_are_integrity_errors():
    rng = np.random.default_rng(3)
    idx, neg = _random_pattern(rng, 1000, 0.2)
    g = encode(idx, neg, 1000, "golomb")
    short = EncodedSigns("golomb", g.numel, g.nnz, g.param, g.unary_bits, {"bits": g.data["bits"][:-3]})
    with pytest.raises(IntegrityError):
        decode(short)
    wrong = EncodedSigns("golomb", g.numel, g.nnz + 1, g.param, g.unary_bits, g.data)
    with pytest.raises(IntegrityError):
        decode(wrong)
    b = encode(idx, neg, 1000, "bitmask")
    both = b.data["pos"] | b.data["neg"]
    with pytest.raises(IntegrityError):
        decode(EncodedSigns("bitmask", 1000, b.nnz, data={"pos": both, "neg": b.data["neg"]}))
    pad = b.data["pos"].copy()
    pad[-1] |= np.int32(1 << 30)  # element 1022 >= numel
    with pytest.raises(IntegrityError):
        decode(EncodedSigns("bitmask", 1000, b.nnz, data={"pos": pad, "neg": b.data["neg"]}))


def test_bad_input_is_usage_error():
    with pytest.raises(UsageError):
        encode(np.array([3, 2]), np.array([False, False]), 10)
    with pytest.raises(UsageError):
        encode(np.array([10]), np.array([False]), 10)
    with pytest.raises(UsageError):
        encode(np.array([1]), np.array([False]), 10, "rle")
