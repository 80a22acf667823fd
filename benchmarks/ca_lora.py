"""CA-LoRA ablation on a compressed variant: inherit × recover × distill at equal steps.

Usage:
  python benchmarks/ca_lora.py [--task reverse-words] [--steps 8] [--batch-size 4] [--lr 1e-3]
                               [--eval-examples 20] [--ppl-tokens 1024] [--recover-rank 16]
                               [--device cpu|cuda] [--home DIR] [--out benchmarks/results/ca_lora.md]
  python benchmarks/ca_lora.py --tiny        # builtin:tiny-llama, a LoRA trained in-process (dev/CI)
  python benchmarks/ca_lora.py --lowrank [--tasks reverse-words,uppercase,sort-numbers]
                               [--variants nf4-wanda50,2:4] [--steps 20] [--eval-examples 50] [--tiny]
                               [--out benchmarks/results/ca_lora_lowrank.md]

  python benchmarks/ca_lora.py --seeds [--tasks reverse-words,uppercase,sort-numbers]
                               [--variants gptq3,sparsegpt62p5,moe24of48,qupm] [--seeds-lowrank]
                               [--out benchmarks/results/ca_lora_seeds.md]

``--seeds``: CA-LoRA's Table 2/3 shape on the seeds' compressors (GPTQ, SparseGPT, MoEfication and
a quant + unstructured prune + MoEfication combination), per variant and task: the ceiling (base +
source LoRA), the source LoRA on the variant as it is, full CA-LoRA, and with ``--seeds-lowrank``
the zero-data compensated conversion (see ``seeds_main``).

``--lowrank``: compensated conversion (``adapt convert --recover lowrank``, issue 18) against
the naive transfer, the teacher and CA-LoRA's recovery modules, per variant and task (see
``lowrank_main``).

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


def write_results(args, text: str, default: Path) -> None:
    """Write the markdown ``text`` to ``--out``, else ``default`` (nothing with ``--tiny`` and no ``--out``)."""
    out = args.out or (None if args.tiny else default)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written {out}")


def flags_label(inherit: bool, recover: bool, distill: bool) -> str:
    """``inherit+recover+distill`` / ``none`` style label of one ablation row."""
    on = [n for n, v in (("inherit", inherit), ("recover", recover), ("distill", distill)) if v]
    return "+".join(on) if on else "none (variant + fresh LoRA)"


def setup(reg, args, tasks=None) -> tuple[str, dict[str, str]] | tuple[str, str]:
    """(base name, source LoRA artefact name): the zoo LoRA, or a tiny one trained here.

    With ``tasks``: (base name, {task: source LoRA artefact name})."""
    from adapterhub_c.registry.artifacts import name_taken
    from adapterhub_c.workflows.bases import add_builtin_base

    wanted = list(tasks) if tasks is not None else [args.task]
    if args.tiny:
        base, _ = add_builtin_base(reg, "builtin:tiny-llama")
        names = {}
        for task in wanted:
            name = names[task] = f"tiny-{task}-lora"
            if not name_taken(reg, name):
                from adapterhub_c.workflows.training import train_adapter

                print(f"training the {task} source LoRA on {base.name} ({args.source_steps} steps)", flush=True)
                train_adapter(reg, base.name, f"builtin:task/{task}", steps=args.source_steps, lr=3e-3,
                              batch_size=16, seq_len=64, name=name, baseline=False, max_eval_examples=2,
                              max_eval_tokens=256, device=args.device)
    else:
        with serve_zoo() as endpoint:
            names = pull_zoo(reg, endpoint, wanted)
    base_name = "builtin:tiny-llama" if args.tiny else "builtin:smollm2-135m"
    return (base_name, names) if tasks is not None else (base_name, names[args.task])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lowrank", action="store_true", help="the compensated-conversion table (issue 18)")
    ap.add_argument("--tasks", default="reverse-words,uppercase,sort-numbers", help="--lowrank: zoo tasks")
    ap.add_argument("--seeds", action="store_true", help="the seeds' compressors table (issue 25)")
    ap.add_argument("--seeds-lowrank", action="store_true",
                    help="--seeds: also the zero-data compensated conversion (--recover lowrank, 0 steps)")
    ap.add_argument("--variants", default=None,
                    help=f"--lowrank: of {', '.join(LOWRANK_VARIANTS)} (default nf4-wanda50,2:4); "
                         f"--seeds: of {', '.join(SEEDS_VARIANTS)} (default all)")
    ap.add_argument("--compensate-rank", type=int, default=16, help="--lowrank: R, the rank added to r")
    ap.add_argument("--compensate-targets", default="all", help="--lowrank: attn or all")
    ap.add_argument("--compensate-calib-samples", type=int, default=32,
                    help="--lowrank: calibration sequences of 128 tokens for the activation moments")
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
    if args.lowrank:
        return lowrank_main(args)
    if args.seeds:
        return seeds_main(args)

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
    write_results(args, text, RESULTS)
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

    def ci(em):
        from adapterhub_c.evals.metrics import wilson_interval

        if em is None:
            return "–"
        lo, hi = wilson_interval(round(em * args.eval_examples), args.eval_examples)
        return f"{lo:.2f}–{hi:.2f}"

    fresh_tps = next(r for r in rows if not (r["inherit"] or r["recover"] or r["distill"]))["tokens_per_s"]
    lines = [f"# CA-LoRA ablation on {base_name} → {var.name} (NF4 + 50 % Wanda)", "",
             f"Command: `python benchmarks/ca_lora.py {' '.join(sys.argv[1:])}`", "",
             f"Source LoRA `{source}` (task `{args.task}`). Every conversion: {args.steps} steps × batch "
             f"{args.batch_size} (seq_len ≤ {args.seq_len}), lr {args.lr}, seed 0, recovery rank "
             f"{args.recover_rank} (gelu), distillation alpha {args.distill_alpha} on the last hidden state. "
             f"Exact match (EM) and completion ppl (exp of the mean NLL of the completion tokens given the prompt, "
             f"formatted as for EM) on the first {args.eval_examples} prompts of the task's test split; pydoc ppl "
             f"on the first {args.ppl_tokens} tokens of builtin:pydoc test; EM 95% = Wilson interval. "
             f"Device {args.device}; total run time {total_s / 60:.1f} min.", "",
             "| inherit | recover | distill | row | EM | EM 95% | completion ppl | pydoc ppl | train tok/s | "
             "× fresh tok/s | loss first→last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls, le = r["loss"]
        ratio = (r["tokens_per_s"] / fresh_tps) if r["tokens_per_s"] and fresh_tps else None
        lines.append(f"| {'✓' if r['inherit'] else ''} | {'✓' if r['recover'] else ''} | "
                     f"{'✓' if r['distill'] else ''} | {r['row']} | {f(r['exact_match'], 2)} | {ci(r['exact_match'])} | "
                     f"{f(r['completion_ppl'], 3)} | {f(r['pydoc_ppl'], 2)} | {f(r['tokens_per_s'], 1)} | "
                     f"{f(ratio, 2)} | {f(ls)}→{f(le)} |")
    for r in ref_rows:
        lines.append(f"|  |  |  | {r['row']} | {f(r['exact_match'], 2)} | {ci(r['exact_match'])} | "
                     f"{f(r['completion_ppl'], 3)} | "
                     f"{f(r['pydoc_ppl'], 2)} | – | – | – |")
    lines += ["", "Gap closed by full CA-LoRA, (full − fresh) / (base+LoRA − fresh; completion ppl in NLL): "
              + ", ".join(f"{k} {v:.0%}" for k, v in gap.items()) + " (target ≥ 80 %)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# --lowrank: compensated conversion (issue 18)

LOWRANK_RESULTS = REPO_ROOT / "benchmarks" / "results" / "ca_lora_lowrank.md"
LOWRANK_VARIANTS = {"nf4-wanda50": ("NF4 + 50 % Wanda", dict(quant="nf4", prune="wanda", sparsity=0.5)),
                    "2:4": ("2:4 (activation-aware)", dict(prune="2:4"))}
R_TEACHER, R_VARIANT, R_NAIVE = "base + LoRA (teacher)", "variant alone", "variant + LoRA, inherited (0 steps)"
R_COMP0, R_COMPD = "compensated, 0 steps (no task data)", "compensated + {n} steps distillation"
R_CALORA, R_ALONE = "CA-LoRA recovery modules + {n} steps", "compensation alone (no source LoRA)"


def measure_task(model, tokenizer, data: str, n: int) -> dict:
    """Exact match (with its 95 % interval) and completion NLL on the first ``n`` test prompts."""
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import completion_perplexity, exact_match

    pairs = load_dataset(data, "test").pairs[:n]
    em = exact_match(model, tokenizer, pairs)
    return {"em": em["exact_match"], "em_ci": tuple(em["exact_match_ci95"]), "n": len(pairs),
            "nll": completion_perplexity(model, tokenizer, pairs)["completion_nll"]}


def pick_variants(spec: str, known: dict) -> list[str]:
    """The comma-separated variant keys of ``spec``; exits with the known keys on an unknown one."""
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown} (choose from {', '.join(known)})")
    return variants


def measure_stack(reg, device: str, label: str, target: str, data: str, n: int, **stack) -> dict:
    """``measure_task`` on a loaded stack (target base / variant, optional adapter)."""
    from adapterhub_c.runtime.stack import load_stack, resolve_stack

    print(f"  measuring {label}", flush=True)
    model, tok = load_stack(reg, resolve_stack(reg, target, **stack), device)
    return measure_task(model, tok, data, n)


def convert_once(reg, device: str, name: str, source: str, var, **opts) -> tuple:
    """``convert_adapter`` with a one-prompt evaluation, or the artefact of that name from an
    earlier run: (artefact, compensation info, seconds or None when reused)."""
    from adapterhub_c.registry.artifacts import name_taken
    from adapterhub_c.workflows.training import convert_adapter

    if name_taken(reg, name):
        art = reg.get(name, "artifact")
        return art, (art.config or {}).get("compensation") or {}, None
    print(f"  converting {name}", flush=True)
    t0 = time.perf_counter()
    art, report = convert_adapter(reg, source, var.name, name=name, progress=_progress(name), max_eval_examples=1,
                                  max_eval_tokens=64, reference_rows=False, device=device, **opts)
    return art, report.get("compensation") or {}, time.perf_counter() - t0


def lowrank_main(args) -> int:
    """Per variant × task: teacher, variant alone, naive, compensated (0 steps and + distillation),
    CA-LoRA (recovery modules, same steps), compensation alone; exact match on the first
    ``--eval-examples`` test prompts (95 % Wilson interval) and completion NLL on the same
    prompts; adapter sizes; per variant, builtin:pydoc perplexity of base / variant /
    variant + compensation alone."""
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.evals import run_eval
    from adapterhub_c.workflows.variants import create_variant

    t_start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = pick_variants(args.variants or "nf4-wanda50,2:4", LOWRANK_VARIANTS)
    home = args.home or (ZOO_DIR / ("ca-lora-home-tiny" if args.tiny else "ca-lora-home"))
    reg = Registry(home=home)
    base_name, sources = setup(reg, args, tasks)
    comp = dict(recover="lowrank", recover_rank=args.compensate_rank, recover_targets=args.compensate_targets,
                calib_samples=args.compensate_calib_samples)
    train = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                 distill_alpha=args.distill_alpha)
    measured: dict = {}

    def stack_row(label, target, tok_data, n, **stack):
        return measure_stack(reg, args.device, label, target, tok_data, n, **stack)

    def converted(name, source, var, **opts):
        return convert_once(reg, args.device, name, source, var, **opts)

    teacher_rows = {}
    for task in tasks:
        data = f"builtin:task/{task}"
        teacher_rows[task] = {"row": R_TEACHER, **stack_row(f"{task}: teacher", base_name, data, args.eval_examples,
                                                            adapter=sources[task]),
                              "size": reg.get(sources[task], "artifact").size_bytes}
    pydoc = {"base": run_eval(reg, base_name, "builtin:pydoc", "test", max_tokens=args.ppl_tokens,
                              device=args.device)["perplexity"]}
    for vkey in variants:
        label, recipe = LOWRANK_VARIANTS[vkey]
        var, created = create_variant(reg, base_name, **recipe, calib_samples=args.calib_samples, eval_tokens=0,
                                      device=args.device, progress=_progress("variant"))
        print(f"variant {var.name} ({'created' if created else 'reused'})", flush=True)
        vtag = vkey.replace(":", "")
        # the compensation alone first: it pays for the calibration moments, cached for the others
        rtag = f"R{args.compensate_rank}{args.compensate_targets}"
        alone, alone_info, alone_s = converted(f"lr-alone-{vtag}-{rtag}", sources[tasks[0]], var, inherit=False,
                                               **comp)
        pydoc[vkey] = {
            "variant": run_eval(reg, base_name, "builtin:pydoc", "test", variant=var.name,
                                max_tokens=args.ppl_tokens, device=args.device)["perplexity"],
            "compensated": run_eval(reg, base_name, "builtin:pydoc", "test", variant=var.name, adapter=alone.name,
                                    max_tokens=args.ppl_tokens, device=args.device)["perplexity"],
            "size": alone.size_bytes, "convert_s": alone_s}
        for task in tasks:
            data, src = f"builtin:task/{task}", sources[task]
            n = args.eval_examples
            tag = f"{vtag}-{task}-R{args.compensate_rank}{args.compensate_targets}"
            c0, c0_info, c0_s = converted(f"lr0-{tag}", src, var, **comp)
            cd, _, cd_s = converted(f"lrd-{tag}-s{args.steps}", src, var, data=data, **comp, **train)
            cm, _, cm_s = converted(f"calora-{vtag}-{task}-s{args.steps}", src, var, data=data, **train,
                                    recover_rank=args.recover_rank)
            rows = [teacher_rows[task],
                    {"row": R_VARIANT, **stack_row(f"{task}: variant", var.name, data, n), "size": 0},
                    {"row": R_NAIVE, **stack_row(f"{task}: naive", var.name, data, n, adapter=src),
                     "size": reg.get(src, "artifact").size_bytes},
                    {"row": R_COMP0, **stack_row(f"{task}: compensated", var.name, data, n, adapter=c0.name),
                     "size": c0.size_bytes, "convert_s": c0_s, "solve_s": c0_info.get("wall_s"),
                     "captured": c0_info.get("captured_mean"), "moments_cached": c0_info.get("moments_cached")},
                    {"row": R_COMPD.format(n=args.steps), **stack_row(f"{task}: compensated + distill", var.name,
                                                                      data, n, adapter=cd.name),
                     "size": cd.size_bytes, "convert_s": cd_s},
                    {"row": R_CALORA.format(n=args.steps), **stack_row(f"{task}: CA-LoRA", var.name, data, n,
                                                                       adapter=cm.name),
                     "size": cm.size_bytes, "convert_s": cm_s},
                    {"row": R_ALONE, **stack_row(f"{task}: compensation alone", var.name, data, n,
                                                 adapter=alone.name),
                     "size": alone.size_bytes, "convert_s": alone_s}]
            measured[(vkey, task)] = rows
            print(render_lowrank_rows(vkey, task, rows), flush=True)
    total_s = time.perf_counter() - t_start
    text = render_lowrank(args, base_name, tasks, variants, measured, pydoc, total_s)
    print(text)
    write_results(args, text, LOWRANK_RESULTS)
    return 0


def _gap(rows: list[dict], row: str, metric: str) -> float | None:
    by = {r["row"]: r for r in rows}
    naive, teacher, x = by[R_NAIVE][metric], by[R_TEACHER][metric], by[row][metric]
    return None if teacher == naive else (x - naive) / (teacher - naive)


def _size(b) -> str:
    if not b:
        return "–"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def render_lowrank_rows(vkey: str, task: str, rows: list[dict]) -> str:
    lines = [f"### {LOWRANK_VARIANTS[vkey][0]} — {task}", "",
             "| row | EM | EM 95 % CI | completion NLL | completion ppl | adapter size | convert s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["em_ci"]
        conv = "–" if r.get("convert_s") is None else f"{r['convert_s']:.0f}"
        lines.append(f"| {r['row']} | {r['em']:.2f} | {lo:.2f}–{hi:.2f} | {r['nll']:.3f} | {math.exp(r['nll']):.2f} "
                     f"| {_size(r.get('size'))} | {conv} |")
    return "\n".join(lines)


def render_lowrank(args, base_name, tasks, variants, measured, pydoc, total_s) -> str:
    steps = args.steps
    lines = [f"# Compensated conversion (issue 18) on {base_name}", "",
             f"Command: `python benchmarks/ca_lora.py {' '.join(sys.argv[1:])}`", "",
             f"Compensation: `adapt convert --recover lowrank --recover-rank {args.compensate_rank} --targets "
             f"{args.compensate_targets}`, calibration {args.compensate_calib_samples} × 128 tokens of builtin:pydoc train "
             f"(moments computed once per variant, then cached), regularised with 0.01·mean(diag C)·I. "
             f"Distillation rows: {steps} steps × batch {args.batch_size} (seq_len ≤ {args.seq_len}), lr {args.lr}, "
             f"alpha {args.distill_alpha} on the last hidden state, the task's train split; CA-LoRA recovery rank "
             f"{args.recover_rank}. Exact match (EM) on the first {args.eval_examples} prompts of each task's test "
             f"split, 95 % Wilson interval; completion NLL (nats per completion token, prompt as exact match "
             f"feeds it: evals.metrics.completion_perplexity) on the same prompts. 'convert s' is the whole `convert_adapter` call (model loading included, with a cheap "
             f"one-prompt evaluation; – when the artefact was reused). Device {args.device}; total "
             f"{total_s / 60:.1f} min.", ""]
    lines += ["## Gap closed, (row − naive) / (teacher − naive), mean over tasks", "",
              "| variant | row | EM | completion NLL |", "|---|---|---|---|"]
    for vkey in variants:
        for row in (R_COMP0, R_COMPD.format(n=steps), R_CALORA.format(n=steps), R_ALONE):
            gaps = {m: [g for t in tasks if (g := _gap(measured[(vkey, t)], row, m)) is not None]
                    for m in ("em", "nll")}
            cell = {m: (f"{sum(v) / len(v):.0%} ({len(v)} task{'s' if len(v) != 1 else ''})" if v else "–")
                    for m, v in gaps.items()}
            lines.append(f"| {LOWRANK_VARIANTS[vkey][0]} | {row} | {cell['em']} | {cell['nll']} |")
    lines += ["", "## Per task", ""]
    for vkey in variants:
        for task in tasks:
            lines += [render_lowrank_rows(vkey, task, measured[(vkey, task)]), ""]
    lines += ["## builtin:pydoc perplexity: does the variant get back toward the base without any adapter?", "",
              f"First {args.ppl_tokens} tokens of the test split.", "",
              "| variant | base | variant alone | variant + compensation alone | compensation size | convert s |",
              "|---|---|---|---|---|---|"]
    for vkey in variants:
        p = pydoc[vkey]
        conv = "–" if p.get("convert_s") is None else f"{p['convert_s']:.0f}"
        lines.append(f"| {LOWRANK_VARIANTS[vkey][0]} | {pydoc['base']:.2f} | {p['variant']:.2f} | "
                     f"{p['compensated']:.2f} | {_size(p['size'])} | {conv} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# --seeds: CA-LoRA on the seeds' compressors (issue 25)

SEEDS_RESULTS = REPO_ROOT / "benchmarks" / "results" / "ca_lora_seeds.md"
MOE = dict(moefy=True, experts=48, active=24)
SEEDS_VARIANTS = {"gptq3": ("GPTQ 3-bit (groups of 64)", dict(quant="gptq", bits=3, group_size=64)),
                  "sparsegpt62p5": ("SparseGPT 62.5 %", dict(prune="sparsegpt", sparsity=0.625)),
                  "moe24of48": ("MoEfication 24/48 experts", MOE),
                  "qupm": ("Q+UP+M: NF4 + SparseGPT 50 % + MoE 24/48",
                           dict(quant="nf4", prune="sparsegpt", sparsity=0.5, **MOE))}
S_CEIL, S_NAIVE, S_CALORA, S_LOWRANK = ("(a) base + source LoRA (ceiling)", "(b) variant + source LoRA as is",
                                        "(c) CA-LoRA: inherit + recover + distill, {n} steps",
                                        "(d) compensated (--recover lowrank), 0 steps, no data")
SEEDS_CLAIM = 0.8  # the issue: CA-LoRA closes >= 80 % of the exact-match gap


def seeds_gap(rows: list[dict], row: str, metric: str) -> float | None:
    """(row − b) / (a − b) on ``metric``; None when a and b are equal (no gap)."""
    by = {r["row"]: r for r in rows}
    a, b, x = by[S_CEIL][metric], by[S_NAIVE][metric], by[row][metric]
    return None if a == b else (x - b) / (a - b)


def seeds_main(args) -> int:
    """Per variant × task (CA-LoRA's Table 2/3 shape): (a) base + source LoRA, (b) the source
    LoRA on the variant as it is, (c) full CA-LoRA (``--steps`` of inherit + recover + distill),
    (d) with ``--seeds-lowrank`` the zero-data compensated conversion; exact match on the first
    ``--eval-examples`` test prompts (95 % Wilson interval) and completion perplexity on the same
    prompts; gap closed (c − b) / (a − b) per task; per variant, builtin:pydoc perplexity."""
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.evals import run_eval
    from adapterhub_c.workflows.variants import create_variant

    t_start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = pick_variants(args.variants or ",".join(SEEDS_VARIANTS), SEEDS_VARIANTS)
    home = args.home or (ZOO_DIR / ("ca-lora-home-tiny" if args.tiny else "ca-lora-home"))
    reg = Registry(home=home)
    base_name, sources = setup(reg, args, tasks)
    train = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                 distill_alpha=args.distill_alpha, recover_rank=args.recover_rank)
    comp = dict(recover="lowrank", recover_rank=args.compensate_rank, recover_targets=args.compensate_targets,
                calib_samples=args.compensate_calib_samples)
    n = args.eval_examples
    ceiling = {task: {"row": S_CEIL, **measure_stack(reg, args.device, f"{task}: base + LoRA", base_name,
                                                     f"builtin:task/{task}", n, adapter=sources[task])}
               for task in tasks}
    pydoc = {"base": run_eval(reg, base_name, "builtin:pydoc", "test", max_tokens=args.ppl_tokens,
                              device=args.device)["perplexity"]}
    measured, made = {}, {}
    for vkey in variants:
        label, recipe = SEEDS_VARIANTS[vkey]
        t0 = time.perf_counter()
        var, created = create_variant(reg, base_name, **recipe, calib_samples=args.calib_samples, eval_tokens=0,
                                      device=args.device, progress=_progress("variant"))
        made[vkey] = (var.name, time.perf_counter() - t0 if created else None)
        print(f"variant {var.name} ({'created' if created else 'reused'})", flush=True)
        pydoc[vkey] = run_eval(reg, base_name, "builtin:pydoc", "test", variant=var.name, max_tokens=args.ppl_tokens,
                               device=args.device)["perplexity"]
        for task in tasks:
            data, src = f"builtin:task/{task}", sources[task]
            cm, _, cm_s = convert_once(reg, args.device, f"seeds-calora-{vkey}-{task}-s{args.steps}b{args.batch_size}",
                                       src, var, data=data, **train)
            rows = [ceiling[task],
                    {"row": S_NAIVE, **measure_stack(reg, args.device, f"{task}: naive", var.name, data, n,
                                                     adapter=src)},
                    {"row": S_CALORA.format(n=args.steps), "convert_s": cm_s,
                     **measure_stack(reg, args.device, f"{task}: CA-LoRA", var.name, data, n, adapter=cm.name)}]
            if args.seeds_lowrank:
                lr0, _, lr0_s = convert_once(reg, args.device, f"seeds-lr0-{vkey}-{task}-R{args.compensate_rank}",
                                             src, var, **comp)
                rows.append({"row": S_LOWRANK, "convert_s": lr0_s,
                             **measure_stack(reg, args.device, f"{task}: compensated", var.name, data, n,
                                             adapter=lr0.name)})
            measured[(vkey, task)] = rows
            print(render_seeds_rows(vkey, task, rows), flush=True)
    text = render_seeds(args, base_name, tasks, variants, measured, pydoc, made, time.perf_counter() - t_start)
    print(text)
    write_results(args, text, SEEDS_RESULTS)
    return 0


def render_seeds_rows(vkey: str, task: str, rows: list[dict]) -> str:
    """One variant × task table: EM with its interval, completion NLL / ppl, gap closed, convert s."""
    lines = [f"### {SEEDS_VARIANTS[vkey][0]} — {task}", "",
             "| row | EM | EM 95 % CI | completion NLL | completion ppl | gap closed (EM / NLL) | convert s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["em_ci"]
        gaps = [seeds_gap(rows, r["row"], m) for m in ("em", "nll")]
        gap = "–" if r["row"] in (S_CEIL, S_NAIVE) else " / ".join("–" if g is None else f"{g:.0%}" for g in gaps)
        conv = "–" if r.get("convert_s") is None else f"{r['convert_s']:.0f}"
        lines.append(f"| {r['row']} | {r['em']:.2f} | {lo:.2f}–{hi:.2f} | {r['nll']:.3f} | {math.exp(r['nll']):.2f} "
                     f"| {gap} | {conv} |")
    return "\n".join(lines)


def render_seeds(args, base_name, tasks, variants, measured, pydoc, made, total_s) -> str:
    """The markdown report: the summary (EM per task and gap closed), the per-task tables, pydoc ppl."""
    calora = S_CALORA.format(n=args.steps)
    lines = [f"# CA-LoRA on the seeds' compressors (issue 25) on {base_name}", "",
             f"Command: `python benchmarks/ca_lora.py {' '.join(sys.argv[1:])}`", "",
             f"Source LoRAs: the zoo's (`benchmarks/make_zoo.py`), pulled from its local hub. (c): "
             f"`convert_adapter` with inherit + recover + distill, {args.steps} steps × batch {args.batch_size} "
             f"(seq_len ≤ {args.seq_len}), lr {args.lr}, seed 0, recovery rank {args.recover_rank} (gelu), "
             f"distillation alpha {args.distill_alpha} on the last hidden state, the task's train split"
             + (f"; (d): `--recover lowrank --recover-rank {args.compensate_rank} --targets "
                f"{args.compensate_targets}`, {args.compensate_calib_samples} × 128 calibration tokens of builtin:pydoc "
                "train, no task data" if args.seeds_lowrank else "")
             + f". Variants: `create_variant` with {args.calib_samples} calibration sequences of 128 tokens of "
             f"builtin:pydoc train. Exact match (EM) on the first {args.eval_examples} prompts of each task's test "
             "split, 95 % Wilson interval; completion NLL / ppl on the same prompts "
             f"(evals.metrics.completion_perplexity). Device {args.device}; total {total_s / 60:.1f} min.", "",
             f"## Gap closed by CA-LoRA on exact match, (c − b) / (a − b) (the issue's claim: ≥ {SEEDS_CLAIM:.0%})",
             "", "| variant | task | EM (a) ceiling | (b) as is | (c) CA-LoRA | gap closed EM | gap closed NLL | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for vkey in variants:
        for task in tasks:
            rows = measured[(vkey, task)]
            by = {r["row"]: r for r in rows}
            g_em, g_nll = seeds_gap(rows, calora, "em"), seeds_gap(rows, calora, "nll")
            verdict = ("no EM gap" if g_em is None else "holds" if g_em >= SEEDS_CLAIM
                       else f"short by {SEEDS_CLAIM - g_em:.0%}")
            lines.append(f"| {SEEDS_VARIANTS[vkey][0]} | {task} | {by[S_CEIL]['em']:.2f} | {by[S_NAIVE]['em']:.2f} | "
                         f"{by[calora]['em']:.2f} | {'–' if g_em is None else f'{g_em:.0%}'} | "
                         f"{'–' if g_nll is None else f'{g_nll:.0%}'} | {verdict} |")
    lines += ["", "## Per task", ""]
    for vkey in variants:
        for task in tasks:
            lines += [render_seeds_rows(vkey, task, measured[(vkey, task)]), ""]
    lines += [f"## builtin:pydoc perplexity (first {args.ppl_tokens} tokens of the test split), no adapter", "",
              "| variant | registered as | ppl | ppl / base | variant create s |", "|---|---|---|---|---|"]
    lines.append(f"| base | {base_name} | {pydoc['base']:.2f} | 1.00 | – |")
    for vkey in variants:
        name, secs = made[vkey]
        lines.append(f"| {SEEDS_VARIANTS[vkey][0]} | {name} | {pydoc[vkey]:.2f} | {pydoc[vkey] / pydoc['base']:.2f} | "
                     f"{'reused' if secs is None else f'{secs:.0f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
