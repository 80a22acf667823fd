"""LoraHub-style composition on a held-out task from the other task LoRAs: original vs packed inputs.

Usage:
  python benchmarks/compose.py --zoo all --held-out json-field [--shots 5] [--budget 40] [--examples 16]
  python benchmarks/compose.py --home H --loras A,B,C --tasks t1,t2,t3 --held-out t4

The held-out task's own LoRA (if the zoo has one) is NOT an input; it is scored as the
reference of what a LoRA trained on the task reaches. Inputs: every other LoRA. They are
composed with ``adapt compose``'s registry operation
(:func:`adapterhub_c.workflows.merges.compose_artifacts`: A = Σ w_i A_i, B = Σ w_i B_i,
nevergrad NGOpt, weights start at 0 in [-1.5, 1.5], loss = mean completion cross-entropy +
0.05·mean|w|) on the first ``--shots`` pairs of the held-out task's train split, once
from the LoRAs and once from their ComPEFT packs (registered like ``adapt pack``; packs
are decoded once). Each composition is scored on the first ``--examples`` test pairs:
greedy exact match (batched with a KV cache) and completion perplexity; baselines in the
same run: the base alone, uniform weights 1/N over the LoRAs, and the held-out task's
own LoRA. Wall time per optimizer step = the search's time / budget (each step rebuilds
the adapter with one matrix-vector product and runs one forward over the shots).
Writes ``benchmarks/results/compose.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402
from merge import parse_alpha  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", required=True, help="built-in task to compose for")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=16, help="test pairs scored")
    ap.add_argument("--pack-density", type=float, default=0.2)
    ap.add_argument("--pack-alpha", type=parse_alpha, default=1.0, help="a number or 'auto'")
    ap.add_argument("--pack-method", default="delta-fit", choices=["delta-fit", "compeft"])
    ap.add_argument("--pack-scope", default="tensor", choices=["tensor", "global"])
    ap.add_argument("--out", default=None)
    bench_zoo.add_arguments(ap, default_zoo="all")
    args = ap.parse_args()
    started = time.time()

    from merge import ensure_pack
    from peft import PeftModel

    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import completion_perplexity, wilson_interval
    from adapterhub_c.merging import ComposeStack
    from adapterhub_c.runtime.adapters import load_adapter_artifact
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.merges import compose_artifacts, load_inputs, resolve_inputs

    reg, pairs = bench_zoo.open_loras(args)
    own = [n for t, n in pairs if t == args.held_out]
    inputs = [(t, n) for t, n in pairs if t != args.held_out]
    if len(inputs) < 2:
        raise SystemExit(f"need at least 2 LoRAs of other tasks than {args.held_out} (have {inputs})")
    names = [n for _, n in inputs]
    packs = [ensure_pack(reg, n, args.pack_density, args.pack_alpha, args.pack_scope, task=t, method=args.pack_method)
             for t, n in inputs]
    sizes = {n: reg.get(n, "artifact").size_bytes for n in names + packs}
    examples = f"builtin:task/{args.held_out}"

    results = {}
    for label, refs in (("LoRAs", names), ("packs", packs)):
        log(f"composing from {label}: {refs}")
        t0 = time.perf_counter()
        art, rep = compose_artifacts(reg, refs, examples=examples, shots=args.shots, budget=args.budget,
                                     seed=args.seed)
        results[label] = (art, rep, time.perf_counter() - t0)
        log(f"{label}: loss {rep['loss']:.4f}, {rep['seconds_per_step']:.2f} s/step, weights "
            f"{[round(w, 3) for w in rep['weights']]}, optimizer {rep['optimizer_used']}")

    arts, base, _ = resolve_inputs(reg, names)
    loras = [x.adapter for x in load_inputs(reg, arts, torch.device("cpu"))]
    n = len(loras)
    uniform = ComposeStack(loras, names).adapter([1.0 / n] * n)
    model, tok = load_base_model(reg, base, "cpu")
    test = load_dataset(examples, "test").pairs[:args.examples]
    shots = load_dataset(examples, "train").pairs[:args.shots]
    candidates: list[tuple[str, LoraAdapter | None, dict]] = [("base (no adapter)", None, {})]
    candidates.append((f"uniform 1/{n} over the LoRAs", uniform, {}))
    for label in ("LoRAs", "packs"):
        art, rep, wall = results[label]
        candidates.append((f"composed from {label}", load_adapter_artifact(reg, art).lora, {
            "s/step": rep["seconds_per_step"], "search s": rep["compose_seconds"], "command s": wall,
            "optimizer": "→".join(rep["optimizer_used"]), "weights": ", ".join(f"{w:.2f}" for w in rep["weights"])}))
    if own:
        candidates.append((f"own LoRA {own[0]} (not an input)", load_adapter_artifact(reg, reg.get(own[0], "artifact")).lora, {}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, adapter, extra) in enumerate(candidates):
            m = model if adapter is None else \
                PeftModel.from_pretrained(model, str(adapter.to_folder(Path(tmp) / f"c{i}"))).eval()
            em = bench_zoo.batched_exact_match(m, tok, test)
            lo, hi = wilson_interval(round(em * len(test)), len(test))
            row = {"adapter": label, "shots loss": completion_perplexity(m, tok, shots, batch_size=16)["completion_nll"],
                   "test EM": em, "EM 95%": f"{lo:.2f}–{hi:.2f}",
                   "test ppl": completion_perplexity(m, tok, test, batch_size=16)["completion_ppl"], **extra}
            rows.append(row)
            log(str(row))
            if adapter is not None:
                model = m.unload()
    lo = next(r for r in rows if r["adapter"] == "composed from LoRAs")
    pk = next(r for r in rows if r["adapter"] == "composed from packs")
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    cols = ["adapter", "shots loss", "test EM", "EM 95%", "test ppl", "s/step", "search s", "command s", "optimizer", "weights"]
    fmt = {"shots loss": "{:.4f}", "test EM": "{:.3f}", "test ppl": "{:.3f}", "s/step": "{:.2f}",
           "search s": "{:.1f}", "command s": "{:.1f}"}
    text = "\n".join([
        f"# LoraHub-style composition on the held-out task {args.held_out}", "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU, torch threads "
        f"{torch.get_num_threads()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), base {base.name}", "",
        f"Inputs ({n}): " + ", ".join(f"{nm} ({t})" for t, nm in inputs)
        + f"; their packs ({args.pack_method}, k={args.pack_density:g}, alpha={args.pack_alpha}, {args.pack_scope} "
        f"scope): "
        + ", ".join(packs) + ". Sizes: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()) + ".",
        f"Composition: `adapt compose` registry op, {args.shots} shots (train split), budget {args.budget}, "
        f"seed {args.seed}, NGOpt, bounds [-1.5, 1.5], l1 {results['LoRAs'][1]['l1']:g}. Scores: shots loss = completion NLL "
        f"on the {args.shots} shots (what the search minimises, without the penalty); test = first "
        f"{args.examples} test pairs: greedy exact match (batched, KV cache) and completion perplexity. "
        "s/step = search wall time / budget; search s = the search; command s = the whole registry "
        "operation (read/decode inputs, load the base, search, register).", "",
        bench_zoo.md_table(rows, cols, fmt), "",
        f"Packs vs LoRAs: test EM {pk['test EM']:.3f} vs {lo['test EM']:.3f}, test ppl ratio "
        f"{pk['test ppl'] / lo['test ppl']:.3f}, time per step ratio {pk['s/step'] / lo['s/step']:.2f} "
        f"(packs / LoRAs). Total wall time {time.time() - started:.0f} s.",
    ])
    print(text)
    print(f"\nwrote {bench_zoo.write_result('compose', text, args.out)}")


if __name__ == "__main__":
    main()
