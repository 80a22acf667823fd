"""CA-LoRA ablation on a compressed variant: inherit × recover × distill at equal steps.

Usage:
  python benchmarks/ca_lora.py [--task reverse-words] [--steps 8] [--batch-size 4] [--lr 1e-3]
                               [--eval-examples 20] [--ppl-tokens 1024] [--recover-rank 16]
                               [--device cpu|cuda] [--home DIR] [--out benchmarks/results/ca_lora.md]
  python benchmarks/ca_lora.py --tiny        # builtin:tiny-llama, a LoRA trained in-process (dev/CI)

Setup (the shape of Table 3 of the CA-LoRA paper, on SmolLM2-135M):

- source LoRA: the zoo's task LoRA (``benchmarks/zoo.py``: served from the local hub and
  pulled like a community LoRA); with ``--tiny``, a LoRA trained here with ``train_adapter``;
- variant: NF4 + 50 % Wanda (``create_variant(quant="nf4", prune="wanda", sparsity=0.5)``);
- 8 conversions with ``convert_adapter`` on the task's train split, all with the same
  steps / batch / lr / seed: inherit (student LoRA starts as the source) × recover
  (recovery modules beside every linear layer) × distill (MSE on the last hidden state
  of the teacher base + source LoRA). The row with none of the three is "variant + fresh
  LoRA" (plain QLoRA training on the variant);
- reference rows: "base + LoRA" (the teacher), "variant, no LoRA", and "variant + LoRA,
  inherit only, 0 steps" (the naive transfer).

Columns: exact match and completion perplexity (exp of the mean NLL of the completion
tokens given the prompt) on the first ``--eval-examples`` prompts of the task's test split,
perplexity on the first ``--ppl-tokens`` tokens of builtin:pydoc test, training tokens/s
(prompt + completion tokens per second of wall time, the training loop's count). Gap
closed = (full − fresh) / (base+LoRA − fresh) per metric (for completion perplexity, of its
log: the completion NLL); the target is ≥ 80 %.
Conversions are registered artefacts with fixed names, so an interrupted run picks up
the rows it already has.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import REPO_ROOT, ZOO_DIR, pull_zoo, serve_zoo  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "ca_lora.md"


def _progress(label: str):
    last = {"t": 0.0, "desc": None}

    def cb(desc, done, total):
        now = time.monotonic()
        if desc != last["desc"] or total is None or done == total or now - last["t"] > 30:
            last["t"], last["desc"] = now, desc
            print(f"  [{label}] {desc} {done}/{total if total is not None else '?'}", flush=True)
    return cb


def flags_label(inherit: bool, recover: bool, distill: bool) -> str:
    """``inherit+recover+distill`` / ``none`` style label of one ablation row."""
    on = [n for n, v in (("inherit", inherit), ("recover", recover), ("distill", distill)) if v]
    return "+".join(on) if on else "none (variant + fresh LoRA)"


def setup(reg, args) -> tuple[str, str]:
    """(base name, source LoRA artefact name): the zoo LoRA, or a tiny one trained here."""
    from adapterhub_c.registry.artifacts import name_taken
    from adapterhub_c.workflows.bases import add_builtin_base

    data = f"builtin:task/{args.task}"
    if args.tiny:
        base, _ = add_builtin_base(reg, "builtin:tiny-llama")
        name = f"tiny-{args.task}-lora"
        if not name_taken(reg, name):
            from adapterhub_c.workflows.training import train_adapter

            print(f"training the source LoRA on {base.name} ({args.source_steps} steps)", flush=True)
            train_adapter(reg, base.name, data, steps=args.source_steps, lr=3e-3, batch_size=16, seq_len=64,
                          name=name, baseline=False, max_eval_examples=2, max_eval_tokens=256,
                          device=args.device)
        return base.name, name
    with serve_zoo() as endpoint:
        names = pull_zoo(reg, endpoint, [args.task])
    return "builtin:smollm2-135m", names[args.task]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="reverse-words")
    ap.add_argument("--tiny", action="store_true", help="builtin:tiny-llama and an in-process LoRA (fast)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--recover-rank", type=int, default=16)
    ap.add_argument("--distill-alpha", type=float, default=1.0)
    ap.add_argument("--eval-examples", type=int, default=20)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--source-steps", type=int, default=150, help="--tiny: steps of the source LoRA")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--home", type=Path, default=None,
                    help="registry (default: ZOO_DIR/ca-lora-home, or a tiny one under it with --tiny)")
    ap.add_argument("--out", type=Path, default=None, help=f"markdown results (default {RESULTS}; none with --tiny)")
    args = ap.parse_args(argv)

    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.artifacts import name_taken
    from adapterhub_c.workflows.evals import run_eval
    from adapterhub_c.workflows.training import ROW_CONVERTED, ROW_NAIVE, ROW_TEACHER, ROW_VARIANT, convert_adapter
    from adapterhub_c.workflows.variants import create_variant

    t_start = time.perf_counter()
    home = args.home or (ZOO_DIR / ("ca-lora-home-tiny" if args.tiny else "ca-lora-home"))
    reg = Registry(home=home)
    data = f"builtin:task/{args.task}"
    base_name, source = setup(reg, args)
    var, created = create_variant(reg, base_name, quant="nf4", prune="wanda", sparsity=0.5,
                                  calib_samples=args.calib_samples, eval_tokens=0,
                                  device=args.device, progress=_progress("variant"))
    print(f"variant {var.name} ({'created' if created else 'reused'}); source LoRA {source}", flush=True)

    common = dict(data=data, eval_data=data, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                  seq_len=args.seq_len, recover_rank=args.recover_rank, distill_alpha=args.distill_alpha,
                  max_eval_examples=args.eval_examples, max_eval_tokens=args.seq_len * args.eval_examples,
                  device=args.device)
    tag = f"{args.task}-s{args.steps}b{args.batch_size}"
    rows: list[dict] = []
    refs: dict[str, dict] = {}
    # full CA-LoRA first: its call also measures the reference rows on the task
    combos = sorted(itertools.product((True, False), repeat=3), reverse=True)
    for inherit, recover, distill in combos:
        label = flags_label(inherit, recover, distill)
        suffix = f"{'i' if inherit else ''}{'r' if recover else ''}{'d' if distill else ''}" or "none"
        name = f"calora-{tag}-{suffix}"
        first = not rows
        if name_taken(reg, name):
            art = reg.get(name, "artifact")
            m = art.metrics or {}
            ev = (m.get("eval") or {}).get("rows") or {}
            train = m.get("train") or {}
            print(f"{label}: reusing {name}", flush=True)
        else:
            print(f"{label}: converting ({args.steps} steps)", flush=True)
            art, report = convert_adapter(reg, source, var.name, inherit=inherit, recover=recover, distill=distill,
                                          name=name, reference_rows=first, progress=_progress(label), **common)
            ev = {r["row"]: r for r in report["rows"]}
            train = report["train"] or {}
        if first:
            refs = {k: ev.get(k) or {} for k in (ROW_VARIANT, ROW_NAIVE, ROW_TEACHER)}
        rows.append({"row": label, "inherit": inherit, "recover": recover, "distill": distill, "artifact": art.name,
                     "exact_match": (ev.get(ROW_CONVERTED) or {}).get("exact_match"),
                     "completion_ppl": (ev.get(ROW_CONVERTED) or {}).get("completion_ppl"),
                     "tokens_per_s": train.get("tokens_per_s"), "train_s": train.get("wall_s"),
                     "loss": (train.get("loss_start_avg"), train.get("loss_end_avg"))})

    def pydoc_ppl(label, **stack):
        print(f"{label}: perplexity on builtin:pydoc test ({args.ppl_tokens} tokens)", flush=True)
        res = run_eval(reg, base_name, "builtin:pydoc", "test", max_tokens=args.ppl_tokens, device=args.device,
                       **stack)
        return res["perplexity"]

    def completion_ppl(label, recorded, **stack):
        """The recorded value, or (artefacts converted before completion_ppl existed) a measurement."""
        if recorded.get("completion_ppl") is not None:
            return recorded["completion_ppl"]
        print(f"{label}: completion perplexity on {data} test ({args.eval_examples} examples)", flush=True)
        return run_eval(reg, base_name, data, "test", max_examples=args.eval_examples, device=args.device,
                        **stack)["completion_ppl"]

    for r in rows:
        r["pydoc_ppl"] = pydoc_ppl(r["row"], variant=var.name, adapter=r["artifact"])
        r["completion_ppl"] = completion_ppl(r["row"], r, variant=var.name, adapter=r["artifact"])
    references = (("base + LoRA (teacher)", "teacher", ROW_TEACHER, {"adapter": source}),
                  ("variant, no LoRA", "variant", ROW_VARIANT, {"variant": var.name}),
                  ("variant + LoRA, inherit only (0 steps)", "naive", ROW_NAIVE,
                   {"variant": var.name, "adapter": source}))
    ref_rows = [{"row": row, "exact_match": refs[key].get("exact_match"),
                 "completion_ppl": completion_ppl(label, refs[key], **stack),
                 "pydoc_ppl": pydoc_ppl(label, **stack)} for row, label, key, stack in references]
    full = next(r for r in rows if r["inherit"] and r["recover"] and r["distill"])
    fresh = next(r for r in rows if not (r["inherit"] or r["recover"] or r["distill"]))
    gap = gap_closed(fresh, ref_rows[0], full)
    total_s = time.perf_counter() - t_start
    text = render(args, base_name, var, source, rows, ref_rows, gap, total_s)
    print(text)
    out = args.out or (None if args.tiny else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written {out}")
    return 0


def gap_closed(fresh: dict, teacher: dict, full: dict) -> dict:
    """(full − fresh) / (teacher − fresh) per metric; completion perplexity in NLL (its log)."""
    gap = {}
    for metric in ("exact_match", "completion_ppl", "pydoc_ppl"):
        a, b, c = fresh[metric], teacher[metric], full[metric]
        if metric == "completion_ppl" and None not in (a, b, c):
            metric, (a, b, c) = "completion_nll", (math.log(a), math.log(b), math.log(c))
        if None not in (a, b, c) and b != a:
            gap[metric] = (c - a) / (b - a)
    return gap


def render(args, base_name, var, source, rows, ref_rows, gap, total_s) -> str:
    """The markdown report: the 8-row ablation, the reference rows, the gap closed."""
    def f(v, nd=3):
        return "–" if v is None else f"{v:.{nd}f}"

    fresh_tps = next(r for r in rows if not (r["inherit"] or r["recover"] or r["distill"]))["tokens_per_s"]
    lines = [f"# CA-LoRA ablation on {base_name} → {var.name} (NF4 + 50 % Wanda)", "",
             f"Command: `python benchmarks/ca_lora.py {' '.join(sys.argv[1:])}`", "",
             f"Source LoRA `{source}` (task `{args.task}`). Every conversion: {args.steps} steps × batch "
             f"{args.batch_size} (seq_len ≤ {args.seq_len}), lr {args.lr}, seed 0, recovery rank "
             f"{args.recover_rank} (gelu), distillation alpha {args.distill_alpha} on the last hidden state. "
             f"Exact match (EM) and completion ppl (exp of the mean NLL of the completion tokens given the prompt, "
             f"formatted as for EM) on the first {args.eval_examples} prompts of the task's test split; pydoc ppl "
             f"on the first {args.ppl_tokens} tokens of builtin:pydoc test. "
             f"Device {args.device}; total run time {total_s / 60:.1f} min.", "",
             "| inherit | recover | distill | row | EM | completion ppl | pydoc ppl | train tok/s | × fresh tok/s | "
             "loss first→last |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls, le = r["loss"]
        ratio = (r["tokens_per_s"] / fresh_tps) if r["tokens_per_s"] and fresh_tps else None
        lines.append(f"| {'✓' if r['inherit'] else ''} | {'✓' if r['recover'] else ''} | "
                     f"{'✓' if r['distill'] else ''} | {r['row']} | {f(r['exact_match'], 2)} | "
                     f"{f(r['completion_ppl'], 3)} | {f(r['pydoc_ppl'], 2)} | {f(r['tokens_per_s'], 1)} | "
                     f"{f(ratio, 2)} | {f(ls)}→{f(le)} |")
    for r in ref_rows:
        lines.append(f"|  |  |  | {r['row']} | {f(r['exact_match'], 2)} | {f(r['completion_ppl'], 3)} | "
                     f"{f(r['pydoc_ppl'], 2)} | – | – | – |")
    lines += ["", "Gap closed by full CA-LoRA, (full − fresh) / (base+LoRA − fresh; completion ppl in NLL): "
              + ", ".join(f"{k} {v:.0%}" for k, v in gap.items()) + " (target ≥ 80 %)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
