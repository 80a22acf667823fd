"""Encode/decode throughput of the pack encodings, against a copy baseline of the same run.

Usage: python benchmarks/pack_speed.py [--numel 10000000] [--repeat 5]

CPU: M params/s for encode (sign pattern → streams), decode (streams → positions and
signs) and decode to a dense fp16 tensor, for golomb and bitmask at k = 5, 10, 20%; the
baseline is numpy copying an fp16 array of the same number of elements (the "ratio"
column is decode-to-dense time / copy time). CUDA (when available): Triton bitmask
decode to fp16 against ``torch`` copying an fp16 tensor of the same size: the fraction
of copy bandwidth reached, counting the bytes each moves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterhub_c.pack.encoding import decode, encode  # noqa: E402

DENSITIES = [0.05, 0.10, 0.20]


def best(fn, repeat: int) -> float:
    """Fastest of ``repeat`` timed calls (seconds)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def to_dense(idx: np.ndarray, neg: np.ndarray, n: int, scale: float) -> np.ndarray:
    out = np.zeros(n, dtype=np.float16)
    out[idx] = np.where(neg, -scale, scale).astype(np.float16)
    return out


def cpu_table(n: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    src = np.zeros(n, dtype=np.float16)
    copy_s = best(lambda: src.copy(), repeat)
    print(f"CPU, {n:,} params; baseline fp16 copy: {n / copy_s / 1e6:,.0f} M params/s")
    print(f"{'enc':>8} {'k':>5} {'encode M/s':>11} {'decode M/s':>11} {'dense M/s':>10} {'copy/dense':>10}")
    for k in DENSITIES:
        idx = np.flatnonzero(rng.random(n) < k)
        neg = rng.random(idx.size) < 0.5
        for encoding in ("golomb", "bitmask"):
            enc = encode(idx, neg, n, encoding)
            assert all(np.array_equal(a, b) for a, b in zip(decode(enc), (idx, neg)))
            e = best(lambda: encode(idx, neg, n, encoding), repeat)
            d = best(lambda: decode(enc), repeat)
            dd = best(lambda: to_dense(*decode(enc), n, 0.01), repeat)
            print(f"{encoding:>8} {k:5.2f} {n / e / 1e6:11,.0f} {n / d / 1e6:11,.0f} {n / dd / 1e6:10,.0f} "
                  f"{copy_s / dd:10.3f}")


def cuda_table(n: int, repeat: int) -> None:
    from adapterhub_c.kernels import bitmask_decode
    from adapterhub_c.pack.encoding import pack_plane

    rng = np.random.default_rng(1)
    t = np.where(rng.random(n) < 0.1, np.where(rng.random(n) < 0.5, -1, 1), 0)
    pos = torch.from_numpy(pack_plane(t > 0).copy()).cuda()
    neg = torch.from_numpy(pack_plane(t < 0).copy()).cuda()
    src = torch.zeros(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat * 10):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / (repeat * 10)

    copy_s = timed(lambda: dst.copy_(src))
    dec_s = timed(lambda: bitmask_decode(pos, neg, n, 0.01, torch.float16))
    copy_bw = 4 * n / copy_s  # reads and writes 2 bytes per element
    dec_bw = (2 * n + n / 4) / dec_s  # writes 2 bytes, reads 2 bits per element
    print(f"\nCUDA ({torch.cuda.get_device_name()}), {n:,} params")
    print(f"{'op':>22} {'ms':>8} {'G params/s':>11} {'GB/s':>8} {'x copy BW':>9}")
    print(f"{'torch fp16 copy':>22} {copy_s * 1e3:8.3f} {n / copy_s / 1e9:11.1f} {copy_bw / 1e9:8.0f} {1.0:9.2f}")
    print(f"{'triton bitmask decode':>22} {dec_s * 1e3:8.3f} {n / dec_s / 1e9:11.1f} {dec_bw / 1e9:8.0f} "
          f"{dec_bw / copy_bw:9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cpu_table(args.numel, args.repeat)
    if torch.cuda.is_available():
        cuda_table(max(args.numel, 100_000_000), args.repeat)
    else:
        print("\nno CUDA device: Triton decode throughput not measured")


if __name__ == "__main__":
    main()
