"""Encode/decode throughput of the pack encodings, against a copy baseline of the same run.

Usage: python benchmarks/pack_speed.py [--numel 10000000] [--repeat 5] [--zoo TASK | --random]

CPU: M params/s for encode (sign pattern → streams), decode (streams → positions and
signs) and decode to a dense fp16 tensor with the numpy decoder, and G params/s of the
compiled decoder (numba, one core) straight to a dense fp16 tensor, for golomb and bitmask
at k = 5, 10, 20%; the baseline is numpy copying an fp16 array of the same number of
elements (the "ratio" columns are copy time / decode time). CUDA (when available): Triton bitmask
decode to fp16 against ``torch`` copying an fp16 tensor of the same size: the fraction
of copy bandwidth reached, counting the bytes each moves.

Pack file → ready adapter (``--zoo TASK``: a real zoo LoRA; ``--random``: SmolLM2-135M
shapes): the local CPU time to read + verify + decode the pack file (k = 5/10/20%,
golomb and bitmask) into dense fp16 LoRA tensors (``read_pack_dense(..., dtype=torch.float16)``:
the compiled decoder; into the source dtype and the numpy decoder of ``read_pack`` alongside),
for the LoRA as trained and cast to bf16, against reading the fp16 safetensors file of
the same tensors into fp16 tensors (files in the page cache; best of ``--repeat``), and
each file's size in bits per parameter against the entropy bound of its tensors. Then
the time to get a ready adapter when the file first has to travel over a link of a given
bandwidth: bytes / bandwidth (SIMULATED, not a measured network transfer) + the measured
local time. Writes ``benchmarks/results/pack_speed.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402

from adapterhub_c.packing.encoding import decode, encode  # noqa: E402

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


def compiled_to_fp16(enc, scale: float):
    """A no-argument call decoding ``enc`` into a dense fp16 array with the compiled kernel."""
    from adapterhub_c.kernels import unpack_cpu

    stream = enc.data["bits" if enc.encoding == "golomb" else "pos"]
    index = np.array([[enc.numel, enc.nnz, enc.param, enc.unary_bits, 0, stream.size]], dtype=np.int64)
    start = np.zeros(1, dtype=np.int64)
    vals = torch.tensor([[0.0, scale, -scale]]).to(torch.float16).view(torch.int16).numpy()
    if enc.encoding == "golomb":
        words = unpack_cpu.padded_words(stream)
        return lambda: unpack_cpu.golomb_dense(words, index, start, vals, np.empty(enc.numel, np.int16))
    return lambda: unpack_cpu.bitmask_dense(enc.data["pos"], enc.data["neg"], index, start, vals,
                                            np.empty(enc.numel, np.int16))


def cpu_table(n: int, repeat: int, out: list[str]) -> None:
    rng = np.random.default_rng(0)
    src = np.zeros(n, dtype=np.float16)
    copy_s = best(lambda: src.copy(), repeat)
    rows = []
    for k in DENSITIES:
        idx = np.flatnonzero(rng.random(n) < k)
        neg = rng.random(idx.size) < 0.5
        for encoding in ("golomb", "bitmask"):
            enc = encode(idx, neg, n, encoding)
            assert all(np.array_equal(a, b) for a, b in zip(decode(enc), (idx, neg), strict=False))
            e = best(lambda idx=idx, neg=neg, encoding=encoding: encode(idx, neg, n, encoding), repeat)
            d = best(lambda enc=enc: decode(enc), repeat)
            dd = best(lambda enc=enc: to_dense(*decode(enc), n, 0.01), repeat)
            fn = compiled_to_fp16(enc, 0.01)
            assert fn()[1] == 0
            cd = best(fn, repeat)
            rows.append({"encoding": encoding, "k": k, "encode M/s": n / e / 1e6, "decode M/s": n / d / 1e6,
                         "decode→fp16 M/s": n / dd / 1e6, "fp16 copy M/s": n / copy_s / 1e6,
                         "decode→fp16 / copy": copy_s / dd, "compiled →fp16 G/s": n / cd / 1e9,
                         "compiled / copy": copy_s / cd})
    out += [f"## CPU encode / decode, {n:,} parameters (random ternary at density k), best of {repeat}", "",
            "decode = bit streams → positions and signs (numpy decoder); decode→fp16 = numpy decoder to a "
            "dense fp16 array (scale applied); compiled →fp16 = the numba kernel of `read_pack_dense`, streams "
            "straight to the dense fp16 array, one core; baseline: numpy copying an fp16 array of the same "
            "size (same run); the / copy columns = throughput relative to that copy.", "",
            bench_zoo.md_table(rows, list(rows[0]), {"k": "{:.2f}", "encode M/s": "{:,.0f}", "decode M/s": "{:,.0f}",
                                                    "decode→fp16 M/s": "{:,.0f}", "fp16 copy M/s": "{:,.0f}",
                                                    "decode→fp16 / copy": "{:.3f}", "compiled →fp16 G/s": "{:.2f}",
                                                    "compiled / copy": "{:.3f}"}), ""]


def cuda_table(n: int, repeat: int, out: list[str]) -> None:
    from adapterhub_c.kernels import bitmask_decode
    from adapterhub_c.packing.encoding import pack_plane

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
    rows = [{"op": "torch fp16 copy", "ms": copy_s * 1e3, "G params/s": n / copy_s / 1e9, "GB/s": copy_bw / 1e9,
             "x copy BW": 1.0},
            {"op": "triton bitmask decode", "ms": dec_s * 1e3, "G params/s": n / dec_s / 1e9, "GB/s": dec_bw / 1e9,
             "x copy BW": dec_bw / copy_bw}]
    out += [f"## CUDA ({torch.cuda.get_device_name()}), {n:,} parameters", "", bench_zoo.md_table(rows, list(rows[0])), ""]


BANDWIDTHS = [("10 Mbit/s", 10e6 / 8), ("100 Mbit/s", 100e6 / 8), ("1 Gbit/s", 1e9 / 8), ("local NVMe 2 GB/s", 2e9)]


def ready_table(adapter, what: str, repeat: int, out: list[str]) -> None:
    """Pack file → dense adapter tensors vs fp16 safetensors file → fp16 tensors."""
    import os
    import tempfile

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from adapterhub_c.packing import (
        inspect_pack,
        pack_adapter,
        read_pack,
        read_pack_dense,
        tensors_digest,
        unpack_to_adapter,
        write_pack,
    )

    tensors16 = {k: v.to(torch.float16).contiguous() for k, v in adapter.tensors.items()}
    n = adapter.num_parameters()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "adapter_model.safetensors")
        with open(f16, "wb") as f:
            f.write(st_save(tensors16))

        def load_fp16():
            with open(f16, "rb") as f:
                return st_load(f.read())

        t16, _ = best(load_fp16, repeat), None
        size16 = os.path.getsize(f16)
        digest = tensors_digest(adapter.tensors)
        cases = [("fp16 safetensors", size16, t16, None, None, {})]
        for k in (0.05, 0.10, 0.20):
            for encoding in ("golomb", "bitmask"):
                path = os.path.join(tmp, f"p{k}{encoding}.pack")
                write_pack(pack_adapter(adapter, density=k, encoding=encoding, base="benchmark", scope="tensor",
                                        method="delta-fit", source_digest=digest), path)
                read_pack_dense(path)  # compiles the kernels (cached on disk after the first run)
                fast = read_pack_dense(path, dtype=torch.float16).to_adapter().tensors
                ref = {name: t.to(torch.float16) for name, t in unpack_to_adapter(read_pack(path)).tensors.items()}
                assert list(fast) == list(ref) and all(torch.equal(fast[n], ref[n]) for n in ref)
                t = best(lambda path=path: read_pack_dense(path, dtype=torch.float16).to_adapter(), repeat)
                t_own = best(lambda path=path: read_pack_dense(path).to_adapter(), repeat)
                t_np = best(lambda path=path: unpack_to_adapter(read_pack(path)), repeat)
                cases.append((f"pack k={k:.2f} {encoding}", os.path.getsize(path), t, t_own, t_np,
                              inspect_pack(path)["totals"]))
    for label, size, local, own, local_np, totals in cases:
        row = {"file": label, "bytes": size, "local s": local, "local x": t16 / local,
               "own dtype s": own, "own dtype x": t16 / own if own else None,
               "numpy decoder s": local_np, "file bits/param": totals.get("file_bits_per_param"),
               "bound bits/param": totals.get("entropy_bits_per_param"),
               "file / bound": (totals["file_bits_per_param"] / totals["entropy_bits_per_param"]
                                if totals else None)}
        for bw_name, bw in BANDWIDTHS:
            total = size / bw + local
            base_total = size16 / bw + t16
            row[f"@{bw_name} s"] = total
            row[f"@{bw_name} x"] = base_total / total
        rows.append(row)
    size_cols = ["file", "bytes", "file bits/param", "bound bits/param", "file / bound"]
    cols = ["file", "local s", "local x", "own dtype s", "own dtype x", "numpy decoder s"] + [c for bw, _ in BANDWIDTHS
                                                                for c in (f"@{bw} s", f"@{bw} x")]
    fmt = {"bytes": "{:,d}", "local s": "{:.4f}", "local x": "{:.2f}", "own dtype s": "{:.4f}",
           "own dtype x": "{:.2f}", "numpy decoder s": "{:.4f}",
           "file bits/param": "{:.4f}", "bound bits/param": "{:.4f}", "file / bound": "{:.3f}",
           **{f"@{bw} s": "{:.3f}" for bw, _ in BANDWIDTHS}, **{f"@{bw} x": "{:.2f}" for bw, _ in BANDWIDTHS}}
    from adapterhub_c.packing.dense import decode_threads

    out += [f"## Pack file → ready adapter vs the fp16 safetensors file ({what}; {n:,} parameters)", "",
            f"Packs: the default method (delta-fit, per-tensor top-k). Decoder threads: {decode_threads()} "
            "(`ADAPTERHUB_DECODE_THREADS`; the fp16 load is one thread). "
            "local s: MEASURED on this CPU (files in the page cache, best of "
            f"{repeat}): fp16 = read the file + safetensors load into fp16 tensors; pack = read + verify the "
            "digest + check every field + decode into dense fp16 tensors, what the fp16 file gives "
            "(`read_pack_dense(path, dtype=torch.float16).to_adapter()`, the compiled decoder writing fp16 "
            "directly; checked equal to the numpy decoder's tensors cast to fp16 before timing); local x = "
            "fp16 local / pack local (>= 1: the pack is ready no later than the fp16 file); own dtype s / x = "
            "the same decoded into the source dtype (`read_pack_dense(path).to_adapter()`); numpy decoder s = "
            "`unpack_to_adapter(read_pack(path))`, source dtype. @link s: bytes / link bandwidth "
            "(SIMULATED transfer time, no network involved) + the measured local time; x = fp16 total / this "
            "total (> 1: the pack gives a ready adapter sooner).", "",
            bench_zoo.md_table(rows, cols, fmt), "",
            "File size: the whole pack file (safetensors header, tensor table, padding) in bits per "
            "parameter, against the entropy bound H(k) of its tensors at their own densities (sign bit "
            "included); goal file / bound <= 1.05 at k = 10%.", "",
            bench_zoo.md_table(rows[1:], size_cols, fmt), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--random", action="store_true", help="ready-adapter table on a random SmolLM2-shaped LoRA")
    ap.add_argument("--out", default=None)
    bench_zoo.add_arguments(ap)
    args = ap.parse_args()
    started = time.time()
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    out = ["# Pack encode / decode speed and time to a ready adapter", "",
           f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads "
           f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", ""]
    cpu_table(args.numel, args.repeat, out)
    if args.random or args.zoo or args.loras:
        if args.random:
            from pack_size import smollm2_like_lora

            adapter, what = smollm2_like_lora(), "random SmolLM2-135M-shaped LoRA r=16"
        else:
            from adapterhub_c.runtime.adapters import load_adapter_artifact

            reg, pairs = bench_zoo.open_loras(args)
            task, name = pairs[0]
            adapter = load_adapter_artifact(reg, reg.get(name, "artifact")).lora
            what = f"LoRA {name}, task {task}"
        dtype = next(iter(adapter.tensors.values())).dtype
        ready_table(adapter, f"{what}, {str(dtype)[6:]} as trained", args.repeat, out)
        if dtype != torch.bfloat16:  # bf16 is what most Hub LoRAs of bf16 bases are saved in
            from adapterhub_c.adapters.lora import LoraAdapter

            half = LoraAdapter(adapter.config, {k: v.to(torch.bfloat16) for k, v in adapter.tensors.items()})
            ready_table(half, f"{what}, cast to bfloat16", args.repeat, out)
    if torch.cuda.is_available():
        cuda_table(max(args.numel, 100_000_000), args.repeat, out)
    else:
        out += ["## GPU", "", "No CUDA device in this run: the Triton decode throughput (goal >= 0.85 of the "
                "device's copy bandwidth) was NOT measured.", ""]
    out.append(f"Total wall time {time.time() - started:.1f} s.")
    text = "\n".join(out)
    print(text)
    if args.zoo or args.loras or args.out:
        print(f"\nwrote {bench_zoo.write_result('pack_speed', text, args.out)}")


if __name__ == "__main__":
    main()
