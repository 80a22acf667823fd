"""Quality of packed task LoRAs across densities: ComPEFT (auto alpha) vs delta-fit vs STC vs pruned-only.

Usage:
  python benchmarks/pack_quality.py --zoo reverse-words,uppercase,sort-numbers
        [--ks 0.05,0.1,0.2,0.5] [--examples 24] [--val-examples 16]
  python benchmarks/pack_quality.py --home H --loras A,B --tasks t1,t2     # LoRAs already registered

For each task LoRA (on its base, loaded once; the adapter is attached once and its weights
swapped in place, :class:`adapterhub_c.packing.alpha.AdapterSlot`), on the first
``--examples`` pairs of the task's test split: greedy exact match (the task metric) and
completion perplexity (:func:`adapterhub_c.evals.metrics.completion_perplexity`: exp of
the mean NLL of the completion tokens given the prompt, teacher forced; exact match is the
library's greedy rule, batched with a KV cache: :func:`bench_zoo.batched_exact_match`). A ``pydoc`` LoRA is scored by strided perplexity on ``--ppl-tokens`` tokens of
the pydoc test split only. Rows, as in ComPEFT's Figure 5:

- ``base``: no adapter; ``original``: the LoRA as trained (the baseline of the ratios);
- ``compeft``: the paper's method, top-k, signs kept, magnitude alpha·std, alpha chosen on
  the validation split from the paper's grid (0.5 … 10) — criterion: completion NLL on the
  first ``--val-examples`` validation pairs (pydoc: perplexity on ``--val-tokens``), one
  teacher-forced pass per alpha (the library's ``--alpha auto`` uses greedy exact match,
  which costs more on CPU);
- ``delta-fit`` (:mod:`adapterhub_c.packing.deltafit`): the same top-k and bits, taken on
  the SVD-balanced factors of each module, one scale per module matching the norm of B·A;
  no data (gain 1); ``delta-fit auto``: the gain chosen on validation data like alpha;
- ``stc``: the same top-k and signs, magnitude = mean |kept| (no alpha);
- ``pruned``: the same top-k, kept values unchanged (no ternarisation).

Every compressed row goes through the real pack file (write, read with digest check,
decode) except ``pruned`` (not a pack format). Ratios are to ``original`` measured in the
same run. Writes ``benchmarks/results/pack_quality.md`` and ``pack_quality.png``.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402

from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.lora import LoraAdapter  # noqa: E402
from adapterhub_c.runtime.adapters import load_adapter_artifact  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Scorer:
    """Test/validation scoring of one task on a model whose adapter weights change."""

    def __init__(self, task: str, tokenizer, n_test: int, n_val: int, ppl_tokens: int, val_tokens: int):
        from adapterhub_c.evals.data import load_dataset

        self.task, self.tok = task, tokenizer
        self.is_text = task == "pydoc"
        spec = "builtin:pydoc" if self.is_text else f"builtin:task/{task}"
        test, val = load_dataset(spec, "test"), load_dataset(spec, "validation")
        if self.is_text:
            self.test_texts, self.val_texts = test.texts, val.texts
            self.ppl_tokens, self.val_tokens = ppl_tokens, val_tokens
        else:
            self.test_pairs, self.val_pairs = test.pairs[:n_test], val.pairs[:n_val]

    def _ppl_text(self, model, texts, tokens) -> float:
        from adapterhub_c.evals.metrics import perplexity

        return perplexity(model, self.tok, texts, max_length=512, stride=512, max_tokens=tokens)["perplexity"]

    def _completion(self, model, pairs) -> dict:
        from adapterhub_c.evals.metrics import completion_perplexity

        return completion_perplexity(model, self.tok, pairs, batch_size=16)

    def validation(self, model) -> float:
        """Alpha-search criterion (lower is better): completion NLL; pydoc: perplexity."""
        if self.is_text:
            return self._ppl_text(model, self.val_texts, self.val_tokens)
        return self._completion(model, self.val_pairs)["completion_nll"]

    def test(self, model) -> dict:
        if self.is_text:
            return {"EM": None, "ppl": self._ppl_text(model, self.test_texts, self.ppl_tokens)}
        from adapterhub_c.evals.metrics import wilson_interval

        em = bench_zoo.batched_exact_match(model, self.tok, self.test_pairs)
        lo, hi = wilson_interval(round(em * len(self.test_pairs)), len(self.test_pairs))
        return {"EM": em, "EM 95%": f"{lo:.2f}–{hi:.2f}",
                "ppl": self._completion(model, self.test_pairs)["completion_ppl"]}


def through_pack(lora: LoraAdapter, tmp: Path, **kw) -> tuple[LoadedAdapter, int]:
    """Pack → file → read (digest checked) → decode; returns (decoded adapter, file bytes)."""
    from adapterhub_c.packing import pack_adapter, read_pack, write_pack
    from adapterhub_c.runtime.packs import loaded_from_pack

    path = tmp / "p.pack"
    write_pack(pack_adapter(lora, base="benchmark", source_digest="benchmark", **kw), path)
    return loaded_from_pack(read_pack(path)), path.stat().st_size


def run_task(task: str, name: str, reg, state: dict, args, tmp: Path) -> tuple[list[dict], list[dict]]:
    from adapterhub_c.packing import prune_tensors
    from adapterhub_c.packing.alpha import ALPHA_GRID, AdapterSlot
    from adapterhub_c.packing.deltafit import GAIN_GRID
    from adapterhub_c.runtime.bases import load_base_model

    art = reg.get(name, "artifact")
    loaded = load_adapter_artifact(reg, art)
    modules = tuple(sorted(loaded.lora.modules()))
    if state.get("modules") != modules or state.get("base_id") != art.base_id:
        from adapterhub_c.registry.models import BaseModel

        with reg.session() as s:
            base = s.get(BaseModel, art.base_id)
        t0 = time.perf_counter()
        model, tok = load_base_model(reg, base, "cpu")
        state.update(tok=tok, base_name=base.name, modules=modules, base_id=art.base_id,
                     base_scores={}, slot=None, model=model)
        log(f"loaded {base.name} in {time.perf_counter() - t0:.1f}s")
    tok = state["tok"]
    scorer = Scorer(task, tok, args.examples, args.val_examples, args.ppl_tokens, args.val_tokens)
    rows, curves = [], []

    def add(method, k, res, alpha=None, nbytes=None, seconds=None, adapter=None):
        null = None
        if adapter is not None:  # modules whose ΔW = B·A is zero: all of A or all of B dropped
            null = sum(1 for layer in adapter.lora.layers().values() if not (layer.A.any() and layer.B.any()))
        rows.append({"task": task, "method": method, "k": k, "alpha": alpha, "EM": res["EM"],
                     "EM 95%": res.get("EM 95%"), "ppl": res["ppl"], "bytes": nbytes,
                     "bits / param": 8 * nbytes / params if nbytes else None, "null modules": null, "s": seconds})
        log(f"{task:14s} {method:9s} k={k} alpha={alpha} EM={res['EM']} ppl={res['ppl']:.4g}")

    if state["slot"] is None:
        t0 = time.perf_counter()
        add("base", None, scorer.test(state["model"]), seconds=time.perf_counter() - t0)
        state["slot"] = AdapterSlot(state["model"], loaded)
    else:
        # the slot wraps the base: scoring "no adapter" = zero LoRA factors
        zero = LoadedAdapter(LoraAdapter(loaded.lora.config, {k: torch.zeros_like(v) for k, v in loaded.lora.tensors.items()}))
        state["slot"].set(zero)
        t0 = time.perf_counter()
        add("base", None, scorer.test(state["slot"].model), seconds=time.perf_counter() - t0)
    slot = state["slot"]
    model = slot.model
    from safetensors.torch import save as st_save

    fp16 = len(st_save({k: v.half().contiguous() for k, v in loaded.lora.tensors.items()}))
    params = loaded.lora.num_parameters()
    slot.set(loaded)
    t0 = time.perf_counter()
    add("original", None, scorer.test(model), nbytes=fp16, seconds=time.perf_counter() - t0)
    def searched(method, k, grid):
        """Pack at every point of ``grid`` (alpha or gain), keep the best by the validation criterion."""
        curve = []
        for a in grid:
            dec, _ = through_pack(loaded.lora, tmp, density=k, alpha=a, scope=args.scope, method=method)
            slot.set(dec)
            curve.append({"alpha": a, "val": scorer.validation(model)})
        best = min(curve, key=lambda p: p["val"] if math.isfinite(p["val"]) else math.inf)
        curves.append({"task": task, "method": method, "k": k, "curve": curve, "best": best["alpha"]})
        return best["alpha"]

    for k in args.ks:
        for method, label, alpha in (("compeft", "compeft", "auto"), ("delta-fit", "delta-fit", 1.0),
                                     ("delta-fit", "delta-fit auto", "auto"), ("stc", "stc", 1.0)):
            if method == "delta-fit" and args.scope != "tensor":
                continue
            t0 = time.perf_counter()
            if alpha == "auto":
                alpha = searched(method, k, ALPHA_GRID if method == "compeft" else GAIN_GRID)
            dec, nbytes = through_pack(loaded.lora, tmp, density=k, alpha=alpha, method=method, scope=args.scope)
            slot.set(dec)
            add(label, k, scorer.test(model), alpha=None if method == "stc" else alpha, nbytes=nbytes,
                seconds=time.perf_counter() - t0, adapter=dec)
        t0 = time.perf_counter()
        pruned = LoadedAdapter(LoraAdapter(loaded.lora.config, prune_tensors(loaded.lora.tensors, k, scope=args.scope)))
        slot.set(pruned)
        add("pruned", k, scorer.test(model), seconds=time.perf_counter() - t0, adapter=pruned)
    orig = next(r for r in rows if r["method"] == "original")
    for r in rows:
        r["EM / orig"] = r["EM"] / orig["EM"] if r["EM"] is not None and orig["EM"] else None
        r["ppl / orig"] = r["ppl"] / orig["ppl"]
        r["fp16 / bytes"] = fp16 / r["bytes"] if r["bytes"] else None
    return rows, curves


def summarize(rows: list[dict]) -> list[dict]:
    """Per (k, method): means over the tasks of EM / orig, ppl / orig and bits / param, and the pooled EM ratio."""
    out = []
    for k in sorted({r["k"] for r in rows if r["k"]}):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["k"] == k))
        for method in methods:
            group = [r for r in rows if r["k"] == k and r["method"] == method]
            em = [r["EM / orig"] for r in group if r["EM / orig"] is not None]
            pooled_src = [(r["EM"], r["EM"] / r["EM / orig"]) for r in group if r["EM / orig"]]
            bits = [r["bits / param"] for r in group if r["bits / param"]]
            out.append({"k": k, "method": method, "EM / orig": sum(em) / len(em) if em else None,
                        "EM pooled / orig": (sum(a for a, _ in pooled_src) / sum(b for _, b in pooled_src)
                                             if pooled_src else None),
                        "ppl / orig": sum(r["ppl / orig"] for r in group) / len(group),
                        "bits / param": sum(bits) / len(bits) if bits else None})
        ref = next((r["bits / param"] for r in out if r["k"] == k and r["method"] == "compeft"), None)
        for r in out:
            if r["k"] == k:
                r["bits vs compeft"] = r["bits / param"] / ref if ref and r["bits / param"] else None
    return out


def null_table(reg, pairs, ks) -> list[dict]:
    """Per LoRA and k: modules whose ΔW the ComPEFT top-k zeroes, for each scope (no model needed)."""
    from adapterhub_c.packing import compress_tensors

    out = []
    for task, name in pairs:
        lora = load_adapter_artifact(reg, reg.get(name, "artifact")).lora
        layers = lora.layers()
        a_std = torch.cat([layer.A.flatten() for layer in layers.values()]).std().item()
        b_std = torch.cat([layer.B.flatten() for layer in layers.values()]).std().item()
        for k in ks:
            row = {"task": task, "k": k, "modules": len(layers), "std A": a_std, "std B": b_std}
            for scope in ("global", "tensor"):
                tern = compress_tensors(lora.tensors, k, scope=scope)
                row[f"null ({scope})"] = sum(
                    1 for m in layers
                    if not (tern[f"base_model.model.{m}.lora_A.weight"].nnz and tern[f"base_model.model.{m}.lora_B.weight"].nnz))
            out.append(row)
            log(f"null modules {row}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        tr = [r for r in rows if r["task"] == task]
        metric = "EM" if tr[0]["EM"] is not None else "ppl"
        for method, style in (("compeft", "o-"), ("delta-fit", "D-"), ("delta-fit auto", "D--"), ("stc", "s--"),
                              ("pruned", "^:")):
            pts = [(r["k"], r[metric]) for r in tr if r["method"] == method]
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], style, label=method)
        for method, color in (("original", "black"), ("base", "gray")):
            ref = next(r for r in tr if r["method"] == method)
            ax.axhline(ref[metric], color=color, linestyle="-." if method == "base" else "-", linewidth=1,
                       label=method)
        ax.set_xscale("log")
        ks = sorted({100 * r["k"] for r in tr if r["k"]})
        ax.set_xticks(ks)
        ax.set_xticklabels([f"{k:g}" for k in ks])
        ax.set_xlabel("density k (%)")
        ax.set_ylabel("exact match" if metric == "EM" else "perplexity")
        ax.set_title(task, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="0.05,0.1,0.2,0.5")
    ap.add_argument("--examples", type=int, default=24, help="test pairs per task (exact match + perplexity)")
    ap.add_argument("--val-examples", type=int, default=16, help="validation pairs for the alpha search")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="pydoc test tokens")
    ap.add_argument("--val-tokens", type=int, default=1024, help="pydoc validation tokens (alpha search)")
    ap.add_argument("--scope", default="tensor", choices=["tensor", "global"],
                    help="top-k and magnitude over all tensors (the paper's code) or per tensor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    bench_zoo.add_arguments(ap, default_zoo="reverse-words,uppercase,sort-numbers")
    args = ap.parse_args()
    args.ks = [float(x) for x in args.ks.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    reg, pairs = bench_zoo.open_loras(args)
    null_rows = null_table(reg, pairs, args.ks)
    rows, curves, state = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, name in pairs:
            r, c = run_task(task, name, reg, state, args, Path(tmp))
            rows += r
            curves += c
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    cols = ["task", "method", "k", "alpha", "EM", "EM 95%", "EM / orig", "ppl", "ppl / orig", "bytes", "bits / param",
            "fp16 / bytes", "null modules", "s"]
    fmt = {"k": "{:.2f}", "alpha": "{:g}", "EM": "{:.3f}", "EM / orig": "{:.3f}", "ppl": "{:.4f}", "bits / param": "{:.3f}",
           "ppl / orig": "{:.4f}", "bytes": "{:,d}", "fp16 / bytes": "{:.1f}", "s": "{:.1f}"}
    curve_rows = [{"task": c["task"], "method": c["method"], "k": c["k"], "best": c["best"],
                   **{f"{p['alpha']:g}": p["val"] for p in c["curve"]}} for c in curves]
    summary = summarize(rows)
    out_md = Path(args.out) if args.out else bench_zoo.ROOT / "benchmarks" / "results" / "pack_quality.md"
    png = out_md.with_suffix(".png")
    text = "\n".join([
        "# Packed task LoRAs: quality across densities (the shape of ComPEFT's Figure 5)", "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU, torch threads "
        f"{torch.get_num_threads()}, base {state.get('base_name')}", "",
        bench_zoo.source_line(args, pairs) + ".",
        f"Scope {args.scope} (top-k and magnitude over {'all tensors together, as the paper' if args.scope == 'global' else 'each tensor'}). "
        f"null modules = adapted modules whose ΔW = B·A became 0 (all of A or of B dropped). "
        f"Test: first {args.examples} pairs of each task's test split — EM = greedy exact match, ppl = completion "
        f"perplexity (teacher forced); pydoc: strided perplexity on {args.ppl_tokens} test tokens. compeft alpha: "
        f"best of the paper's grid by completion NLL on the first {args.val_examples} validation pairs (pydoc: "
        f"perplexity on {args.val_tokens} validation tokens). bytes = pack file (golomb) or, for original, the fp16 "
        "safetensors of the same tensors; fp16 / bytes = compression vs that file. EM / orig and ppl / orig: "
        "ratio to the uncompressed LoRA in this run. s = seconds for the row (compeft: incl. the alpha search).", "",
        "## Mean over the tasks", "",
        "EM / orig: mean over the tasks of each task's exact match over its unpacked LoRA's; pooled: all tasks' "
        "exact matches summed over the unpacked ones'; bits / param: pack file bits over the LoRA's parameters "
        "(header and tensor table included), mean over the tasks; ppl / orig likewise.", "",
        bench_zoo.md_table(summary, ["k", "method", "EM / orig", "EM pooled / orig", "ppl / orig", "bits / param",
                                     "bits vs compeft"],
                           {"k": "{:.2f}", "EM / orig": "{:.3f}", "EM pooled / orig": "{:.3f}", "ppl / orig": "{:.3f}",
                            "bits / param": "{:.3f}", "bits vs compeft": "{:.3f}"}), "",
        "## Per task", "",
        bench_zoo.md_table(rows, cols, fmt), "",
        f"![quality vs density]({png.name})", "",
        "## Modules wiped out by the top-k, per scope (no model involved)", "",
        "A module's ΔW = B·A is 0 when the top-k keeps no entry of A or none of B. With the global scope (one "
        "top-k over all factors, the paper's code) this happens when one factor's entries are much larger than "
        "the other's, as in a LoRA trained briefly from B = 0 (std A vs std B below).", "",
        bench_zoo.md_table(null_rows, ["task", "k", "modules", "std A", "std B", "null (global)", "null (tensor)"],
                           {"k": "{:.2f}", "std A": "{:.3g}", "std B": "{:.3g}"}), "",
        "## Alpha (compeft) and gain (delta-fit) search curves (validation completion perplexity; pydoc: "
        "perplexity)", "",
        bench_zoo.md_table(curve_rows, list(curve_rows[0]) if curve_rows else [], {"k": "{:.2f}"}), "",
        f"Total wall time {time.time() - started:.0f} s.",
    ])
    print(text)
    bench_zoo.write_result("pack_quality", text, str(out_md))
    plot(rows, png)
    print(f"\nwrote {out_md} and {png}")


if __name__ == "__main__":
    main()
