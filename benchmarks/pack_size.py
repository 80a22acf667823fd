"""Pack sizes against the entropy bound and against the fp16 safetensors file.

Usage:
  python benchmarks/pack_size.py --zoo reverse-words            # a real zoo LoRA (pulled like a user would)
  python benchmarks/pack_size.py --home H --loras NAME --tasks T  # a LoRA already in a registry
  python benchmarks/pack_size.py FOLDER                         # a PEFT LoRA folder
  python benchmarks/pack_size.py --random                       # seeded random LoRA, SmolLM2-135M shapes

For each scope (global, tensor) and density k in 5, 10, 20, 30, 50% (ComPEFT): the pack file's bytes
(``golomb`` encoding, the default; ``bitmask`` bits/param alongside), payload bits per
parameter, the entropy bound (Σ numel·H(k_t) over tensors, each at its own density, one
sign bit per non-zero included), payload / bound and whole file / bound (the file adds the
safetensors header, per-tensor index rows and scales), and the fp16 safetensors file of the
same tensors / the pack file — all measured in this run. Writes
``benchmarks/results/pack_size.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402

from adapterhub_c.adapters.lora import LoraAdapter  # noqa: E402
from adapterhub_c.packing import inspect_pack, pack_adapter, tensors_digest, write_pack  # noqa: E402

DENSITIES = [0.05, 0.10, 0.20, 0.30, 0.50]


def smollm2_like_lora(seed: int = 0) -> LoraAdapter:
    """A random LoRA with the tensor shapes of SmolLM2-135M q/k/v/o at r=16.

    Gaussian factors: A with std 1/sqrt(in) (a kaiming-like init), B with std 0.02."""
    g = torch.Generator().manual_seed(seed)
    hidden, r, kv_out = 576, 16, 192
    tensors = {}
    for layer in range(30):
        for proj, out in (("q_proj", hidden), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", hidden)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=g) / hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = 0.02 * torch.randn(out, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return LoraAdapter(config=config, tensors=tensors)


def load_lora(args) -> tuple[LoraAdapter, str, int | None]:
    """(adapter, description, bytes of its own weights file or None)."""
    if args.random:
        return smollm2_like_lora(), "random SmolLM2-135M-shaped LoRA r=16 q/k/v/o (seed 0)", None
    if args.folder:
        path = Path(args.folder) / "adapter_model.safetensors"
        return LoraAdapter.from_folder(args.folder), f"PEFT folder {args.folder}", path.stat().st_size
    from adapterhub_c.adapters.lora import WEIGHTS_NAME
    from adapterhub_c.runtime.adapters import load_adapter_artifact

    reg, pairs = bench_zoo.open_loras(args)
    task, name = pairs[0]
    art = reg.get(name, "artifact")
    loaded = load_adapter_artifact(reg, art)
    size = reg.blobs.path_for(art.files[WEIGHTS_NAME]).stat().st_size
    src = "zoo LoRA" if not args.loras else "registry LoRA"
    return loaded.lora, f"{src} {name} (task {task}, kind {art.kind})", size


def null_modules(adapter: LoraAdapter, pack) -> int:
    """Adapted modules whose ΔW the pack zeroes (no kept entry in A or none in B)."""
    from adapterhub_c.adapters.lora import PREFIX

    return sum(1 for m in adapter.modules()
               if not (pack.tensors[f"{PREFIX}{m}.lora_A.weight"].nnz and pack.tensors[f"{PREFIX}{m}.lora_B.weight"].nnz))


def measure(adapter: LoraAdapter, scope: str, alpha: float) -> list[dict]:
    fp16_bytes = len(st_save({k: v.to(torch.float16).contiguous() for k, v in adapter.tensors.items()}))
    digest = tensors_digest(adapter.tensors)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.pack")
        for k in DENSITIES:
            row = {"k": k}
            for encoding in ("golomb", "bitmask"):
                t0 = time.perf_counter()
                pack = pack_adapter(adapter, density=k, alpha=alpha, scope=scope, encoding=encoding,
                                    base="benchmark", source_digest=digest)
                write_pack(pack, path)
                seconds = time.perf_counter() - t0
                t = inspect_pack(path)["totals"]
                if encoding == "golomb":
                    row.update({
                        "file bytes": t["file_bytes"], "bits/param": t["bits_per_param"],
                        "bound": t["entropy_bits_per_param"], "payload/bound": t["ratio_to_bound"],
                        "file/bound": t["file_bytes"] * 8 / t["entropy_bits"],
                        "fp16/pack": fp16_bytes / t["file_bytes"], "pack s": seconds,
                        "null modules": null_modules(adapter, pack),
                    })
                else:
                    row.update({"bitmask bits/param": t["bits_per_param"], "bitmask fp16/pack": fp16_bytes / t["file_bytes"]})
            rows.append(row)
    return rows, fp16_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--scopes", default="global,tensor", help="comma-separated: global (the paper's code), tensor")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    bench_zoo.add_arguments(ap)
    args = ap.parse_args()
    started = time.time()
    adapter, what, own_bytes = load_lora(args)
    n = adapter.num_parameters()
    cols = ["k", "file bytes", "bits/param", "bound", "payload/bound", "file/bound", "fp16/pack",
            "bitmask bits/param", "bitmask fp16/pack", "null modules", "pack s"]
    fmt = {"k": "{:.2f}", "file bytes": "{:,d}", "bits/param": "{:.4f}", "bound": "{:.4f}",
           "payload/bound": "{:.4f}", "file/bound": "{:.4f}", "fp16/pack": "{:.1f}",
           "bitmask bits/param": "{:.4f}", "bitmask fp16/pack": "{:.1f}", "pack s": "{:.2f}"}
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    lines = ["# Pack size vs the entropy bound and the fp16 file", "",
             f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    fp16_bytes = None
    for scope in args.scopes.split(","):
        rows, fp16_bytes = measure(adapter, scope, args.alpha)
        goal = all(r["payload/bound"] <= 1.01 for r in rows if r["k"] <= 0.2)
        worst = max(r["payload/bound"] for r in rows if r["k"] <= 0.2)
        lines += [f"## Scope {scope}" + (" (one top-k and one std over all tensors: the paper's code)"
                                         if scope == "global" else " (top-k and std per tensor)"), "",
                  bench_zoo.md_table(rows, cols, fmt), "",
                  f"Goal payload/bound <= 1.01 at k = 5–20%: {'met' if goal else 'MISSED'} (worst {worst:.4f}).", ""]
    lines[4:4] = [
        f"Adapter: {what}; {n:,} parameters; fp16 safetensors of the same tensors {fp16_bytes:,} bytes"
        + (f"; the artefact's own weights file {own_bytes:,} bytes" if own_bytes else "") + ".",
        f"ComPEFT, alpha {args.alpha:g} (alpha does not change sizes), golomb encoding (bitmask: bits/param "
        "and ratio alongside). bound = entropy bound H(k) per parameter at each tensor's own density (sign bit "
        "included); payload/bound = encoded bits / bound; file/bound = whole pack file (safetensors header, "
        "index rows, scales) / bound; fp16/pack = fp16 safetensors bytes / pack file bytes (both measured "
        "here); null modules = modules whose ΔW = B·A the pack zeroes (no kept entry in A or none in B).", ""]
    lines.append(f"Total wall time {time.time() - started:.1f} s.")
    text = "\n".join(lines)
    print(text)
    if not args.random or args.out:
        print(f"\nwrote {bench_zoo.write_result('pack_size', text, args.out)}")


if __name__ == "__main__":
    main()
