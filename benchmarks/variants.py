"""Compressed variants of the real SmolLM2-135M: size, ideal size, bits per weight, perplexity.

Usage: python benchmarks/variants.py [--home DIR] [--eval-tokens 8192] [--calib-samples 32]
                                     [--only NAME ...] [--out benchmarks/results/variants.md]

Every variant is made with `adapterhub_c.workflows.variants.create_variant` on
`builtin:smollm2-135m` in a registry at --home (a fresh temporary folder by default), so
the figures are what `adapt variant create` / `adapt variant ls` record. Perplexity is
measured on the first --eval-tokens tokens of builtin:pydoc test (windows of 512, stride
256), for the base and every variant in this run. Columns:
- stored: bytes of the blobs the variant points at (an unpruned variant points at the
  base's weights: `own` is what it adds);
- loaded: bytes of the model in memory as bitsandbytes holds it (quantized linears
  with their scales, other tensors at the stored float32);
- ideal: CPET Table 1 style — values at the format's bits (16 for unquantized tensors)
  + quantization scales + positions of unstructured sparsity (see variants/sizes.py);
- bits/w: loaded bits per weight of the decoder linears, scales included (gptq: as stored, codes +
  fp16 scales + uint8 zeros; it loads as the dense Ŵ);
- own / fp16: what the variant adds to the store (its own blobs) / the base at 16 bits;
- load s: seconds to load the variant from the registry (load_variant), next to the base's
  (load_base_model) in the base row;
- ratios: ideal size / base fp16 size, and perplexity / base perplexity (same run);
- MLP FLOPs: MoEfication (`moe K/E`, SmolLM2's MLP width 1536 in E experts, K per token): the
  fraction of the MLP FLOPs per token a gathered kernel would compute (K/E of the channels + the
  routers; our routed forward masks, so it computes them all), and in brackets the share of the
  expert activation-norm mass the router keeps on held-out calibration tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = [  # (label, create_variant kwargs)
    ("int8", dict(quant="int8")),
    ("nf4", dict(quant="nf4")),
    ("nf4+dq", dict(quant="nf4", double_quant=True)),
    ("magnitude 50%", dict(prune="magnitude", sparsity=0.5)),
    ("wanda 50%", dict(prune="wanda", sparsity=0.5)),
    ("2:4 (wanda-scored)", dict(prune="2:4")),
    ("ffn-channels 25%", dict(prune="ffn-channels", sparsity=0.25)),
    ("ffn-channels 30%", dict(prune="ffn-channels", sparsity=0.30)),
    ("nf4 + wanda 50%", dict(quant="nf4", prune="wanda", sparsity=0.5)),
    ("gptq 4-bit", dict(quant="gptq", bits=4)),
    ("gptq 3-bit g64", dict(quant="gptq", bits=3, group_size=64)),
    ("sparsegpt 50%", dict(prune="sparsegpt", sparsity=0.5)),
    ("sparsegpt 2:4", dict(prune="sparsegpt:2:4")),
    ("gptq 4-bit + sparsegpt 50%", dict(quant="gptq", bits=4, prune="sparsegpt", sparsity=0.5)),
    ("nf4 + sparsegpt 50%", dict(quant="nf4", prune="sparsegpt", sparsity=0.5)),
    ("moe 24/48 (mlp router)", dict(moefy=True, experts=48, active=24)),
    ("moe 12/48 (mlp router)", dict(moefy=True, experts=48, active=12)),
    ("moe 12/48 (similarity)", dict(moefy=True, experts=48, active=12, moe_router="similarity")),
    ("nf4 + moe 12/48 (Q+M)", dict(quant="nf4", moefy=True, experts=48, active=12)),
]


def mlp_flops(summary: dict) -> str:
    """MoEfication's MLP FLOPs fraction per token and the router's captured activation mass ('-' otherwise)."""
    moe = summary.get("moe")
    if not moe:
        return "-"
    return f"{moe['mlp_flops_fraction']:.3f} ({moe['captured'][moe['router']]:.2f})"


def load_seconds(fn) -> float:
    """Wall seconds of one load (the model is dropped at once)."""
    t = time.monotonic()
    model = fn()
    secs = time.monotonic() - t
    del model
    return secs


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None, help="registry home (default: a fresh temporary folder)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="labels of the recipes to run (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "variants.md"))
    args = ap.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="adapterhub-bench-variants-"))
    os.environ["ADAPTERHUB_HOME"] = str(home)
    import torch

    from adapterhub_c.registry import Registry
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.variants import create_variant, variant_summary

    torch.manual_seed(0)
    reg = Registry(home=home)
    t0 = time.monotonic()
    base, _ = add_builtin_base(reg, "builtin:smollm2-135m")
    print(f"base ready in {time.monotonic() - t0:.0f}s (home {home}), torch threads {torch.get_num_threads()}",
          flush=True)

    def progress(desc, done, total):
        if total and done == total:
            print(f"  {desc}: {done}/{total} ({time.monotonic() - t_start:.0f}s)", flush=True)

    rows = []
    base_row = None
    for label, kwargs in RECIPES:
        if args.only and label not in args.only:
            continue
        t_start = time.monotonic()
        print(f"[{label}] …", flush=True)
        row, created = create_variant(reg, base.name, eval_tokens=args.eval_tokens,
                                      calib_samples=args.calib_samples, progress=progress, **kwargs)
        secs = time.monotonic() - t_start
        summary = variant_summary(row, base)
        summary.update(label=label, seconds=secs, created=created, load_seconds=load_seconds(
            lambda name=row.name: load_variant(reg, name)))
        st = row.stats
        if base_row is None:
            base_row = {"label": "base (fp32 stored)", "stored_bytes": base.size_bytes, "own_bytes": base.size_bytes,
                        "loaded_bytes": st["base_params"] * 4, "ideal_bytes": st["base_fp16_bytes"],
                        "bits_per_weight": 32.0, "sparsity": 0.0, "params_kept": st["base_params"],
                        "ideal_ratio": 1.0, "perplexity": st["base_perplexity"], "ppl_ratio": 1.0, "seconds": None,
                        "load_seconds": load_seconds(lambda: load_base_model(reg, base)[0])}
        rows.append(summary)
        print(f"  {row.name}: ppl {summary['perplexity']:.3f} (base {summary['base_perplexity']:.3f}), "
              f"ideal {mib(summary['ideal_bytes'])} MiB, {secs:.0f}s", flush=True)

    table = [base_row] + rows
    base_fp16 = base_row["ideal_bytes"]
    header = ("| variant | params kept | sparsity | bits/w (loaded) | stored MiB (own) | loaded MiB | ideal MiB "
              "| ideal / base fp16 | own / base fp16 | ppl | ppl / base | build+eval s | load s | MLP FLOPs |")
    lines = [header, "|" + "---|" * 14]
    for r in table:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"| {r['label']} | {r['params_kept'] / 1e6:.1f}M | {r['sparsity']:.2f} | {r['bits_per_weight']:.2f} "
            f"| {mib(r['stored_bytes'])} ({mib(r['own_bytes'])}) | {mib(r['loaded_bytes'])} | {mib(r['ideal_bytes'])} "
            f"| {r['ideal_ratio']:.3f} | {r['own_bytes'] / base_fp16:.3f} | {r['perplexity']:.3f} "
            f"| {r['ppl_ratio']:.3f} | {secs} | {r['load_seconds']:.2f} | {mlp_flops(r)} |")
    text = "\n".join(lines)
    print()
    print(text)
    meta = (f"SmolLM2-135M-Instruct (builtin:smollm2-135m, weights stored as float32), perplexity on the first "
            f"{args.eval_tokens} tokens of builtin:pydoc test (windows 512, stride 256), calibration "
            f"{args.calib_samples} x 128 tokens of builtin:pydoc train; CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; total {time.monotonic() - t0:.0f}s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Variants of SmolLM2-135M\n\n"
                   f"Command: `python benchmarks/variants.py {shlex.join(sys.argv[1:])}`\n\n"
                   f"{meta}\n\n{text}\n\n"
                   "Columns: see the docstring of benchmarks/variants.py. `stored` counts the blobs a variant "
                   "points at; quantization-only variants reuse the base's weight blobs (own = their variant.json).\n")
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "rows": table}, indent=2, default=str))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
