"""Kernels: the reference twins against plain numpy truths (in-process), and the Triton
kernels against the twins bit for bit under TRITON_INTERPRET=1 (in a subprocess, since
the variable must be set before triton is imported)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels import bitmask_add_, bitmask_decode, elect_signs, ternary_agreement, ternary_agreement_ref
from adapterhub_c.packing.encoding import pack_plane

SIZES = [1, 31, 32, 33, 1000]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _planes(rng, n, k):
    t = np.where(rng.random(n) < k, np.where(rng.random(n) < 0.5, -1, 1), 0).astype(np.int8)
    return torch.from_numpy(pack_plane(t > 0).copy()), torch.from_numpy(pack_plane(t < 0).copy()), t


def test_twins_match_numpy_truth():
    rng = np.random.default_rng(0)
    for n in SIZES:
        p, q, t = _planes(rng, n, 0.3)
        out = bitmask_decode(p, q, n, 0.25, torch.float32)  # CPU → twin
        assert np.array_equal(out.numpy(), t.astype(np.float32) * 0.25)
        w = torch.randn(n)
        expect = w + 0.25 * torch.from_numpy(t).float()
        assert torch.equal(bitmask_add_(w.clone(), p, q, 0.25), expect)
        p2, q2, t2 = _planes(rng, n, 0.6)
        r = ternary_agreement(p, q, p2, q2)
        both = (t != 0) & (t2 != 0)
        assert r["dot"] == int((t.astype(int) * t2).sum())
        assert r["agree"] == int((both & (t == t2)).sum()) and r["disagree"] == int((both & (t != t2)).sum())
        assert r["nnz_a"] == int((t != 0).sum()) and r["nnz_b"] == int((t2 != 0).sum())
        stack = [_planes(rng, n, 0.5) for _ in range(4)]
        P, Q = torch.stack([s[0] for s in stack]), torch.stack([s[1] for s in stack])
        T = np.stack([s[2] for s in stack]).astype(np.int64)
        ep, en = elect_signs(P, Q, n)
        c = T.sum(axis=0)
        assert torch.equal(ep, torch.from_numpy(pack_plane(c > 0).copy()))
        assert torch.equal(en, torch.from_numpy(pack_plane(c < 0).copy()))
        wts = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)
        ep, en = elect_signs(P, Q, n, wts)
        cw = (T * wts[:, None]).sum(axis=0)  # exact here: dyadic weights
        assert torch.equal(ep, torch.from_numpy(pack_plane(cw > 0).copy()))


def test_add_leaves_untouched_positions_bitwise():
    w = torch.tensor([-0.0, 1.0, 2.0])
    p = torch.tensor([0b010], dtype=torch.int32)
    bitmask_add_(w, p, torch.zeros(1, dtype=torch.int32), 0.5)
    assert torch.equal(w.view(torch.int32), torch.tensor([-0.0, 1.5, 2.0]).view(torch.int32))


def test_bad_input():
    p = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(UsageError):
        bitmask_decode(p, p, 100, 1.0)  # 4 words needed
    with pytest.raises(UsageError):
        bitmask_decode(p.long(), p.long(), 40, 1.0)
    with pytest.raises(UsageError):
        bitmask_decode(p, p, 40, 1.0, torch.float64)
    with pytest.raises(UsageError):
        bitmask_decode(p, p, 40, 1.0, impl="cuda")
    with pytest.raises(UsageError):
        ternary_agreement(p, p, p, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(UsageError):
        elect_signs(p[None], p[None], 40, weights=[1.0, 2.0])


def test_agreement_ref_popcount_large():
    rng = np.random.default_rng(1)
    p, q, t = _planes(rng, 100003, 0.1)
    r = ternary_agreement_ref(p, q, p, q)
    assert r["agree"] == r["nnz_a"] == int((t != 0).sum()) and r["disagree"] == 0


def _interpreter_checks() -> None:
    """Runs in the subprocess: every Triton kernel equals its twin bit for bit."""
    from adapterhub_c.kernels import bitmask_add_ref, bitmask_decode_ref, elect_signs_ref

    rng = np.random.default_rng(2)
    for n in SIZES:
        for k in (0.0, 0.3, 1.0):
            p, q, _ = _planes(rng, n, k)
            for dt in DTYPES:
                for scale in (0.1234, 3.0e-3):
                    a = bitmask_decode(p, q, n, scale, dt, impl="triton")
                    b = bitmask_decode_ref(p, q, n, scale, dt)
                    assert torch.equal(a.view(INT_VIEW[dt]), b.view(INT_VIEW[dt])), ("decode", n, k, dt)
                    w = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dt)
                    w[0] = -0.0
                    w1 = bitmask_add_(w.clone(), p, q, scale, impl="triton")
                    w2 = bitmask_add_ref(w.clone(), p, q, scale)
                    assert torch.equal(w1.view(INT_VIEW[dt]), w2.view(INT_VIEW[dt])), ("add", n, k, dt)
            p2, q2, _ = _planes(rng, n, 0.5)
            assert ternary_agreement(p, q, p2, q2, impl="triton") == ternary_agreement_ref(p, q, p2, q2)
            stack = [_planes(rng, n, kk) for kk in (0.2, 0.5, 0.9)]
            P, Q = torch.stack([s[0] for s in stack]), torch.stack([s[1] for s in stack])
            for wts in (None, [0.3, -1.7, 0.11]):
                e1 = elect_signs(P, Q, n, wts, impl="triton")
                e2 = elect_signs_ref(P, Q, n, wts)
                assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1]), ("elect", n, k, wts)
    print("INTERPRETER-OK")


def test_triton_kernels_equal_twins_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, proc.stdout + proc.stderr


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _interpreter_checks()
