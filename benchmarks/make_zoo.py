"""Build the shared zoo of "community" task LoRAs on SmolLM2 (see ``benchmarks/zoo.py``).

Usage:
  nohup nice -n 5 .venv/bin/python benchmarks/make_zoo.py > benchmarks/.zoo.log 2>&1 &
  python benchmarks/make_zoo.py [--tasks reverse-words,uppercase,...] [--steps N]
                                [--batch-size B] [--seq-len T] [--lr LR] [--rank R]
                                [--eval-examples N] [--eval-tokens N] [--device cpu|cuda]
                                [--base builtin:smollm2-135m] [--zoo-dir DIR]
  python benchmarks/make_zoo.py --remeasure   # re-evaluate the zoo's LoRAs, no training

For each task, in the order given (default: reverse-words, uppercase, sort-numbers, pydoc,
add-numbers, json-field, so that consumers of the first LoRAs can start early):

1. ``adapterhub_c.workflows.training.train_adapter`` trains a LoRA (r=16, alpha=32, q/k/v/o) on the
   base in the zoo's own registry (``ZOO_DIR/home``), on the task's train split, and
   measures base and base+LoRA on the test split (exact match and completion perplexity
   on the first ``--eval-examples`` prompts for the built-in tasks; perplexity on the
   first ``--eval-tokens`` tokens for ``pydoc``);
2. ``adapterhub_c.workflows.push.push_artifact`` pushes it to a local Hub served over
   ``ZOO_DIR/hub`` as ``zoo/<base short name>-<task>``;
3. the manifest ``ZOO_DIR/zoo.json`` is rewritten atomically.

Re-running skips the LoRAs already in the manifest (and pushes, without retraining, one
that was trained but not yet pushed when a previous run stopped). The table at the end
(also written to ``benchmarks/results/zoo.md``) compares base vs base+LoRA per task, the
ratio being measured in the same run. ``--remeasure`` evaluates every LoRA of the manifest
again with today's metrics (same examples and tokens as recorded) and rewrites the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import REPO_ROOT, ZOO_DIR, load_manifest, manifest_path, serve_zoo, write_manifest  # noqa: E402

DEFAULT_TASKS = ("reverse-words", "uppercase", "sort-numbers", "pydoc", "add-numbers", "json-field")
RESULTS = REPO_ROOT / "benchmarks" / "results" / "zoo.md"


def data_of(task: str) -> str:
    """The dataset spec of a zoo task name."""
    return "builtin:pydoc" if task == "pydoc" else f"builtin:task/{task}"


def short_base(base: str) -> str:
    """``builtin:smollm2-135m`` → ``smollm2-135m`` (used in repo ids)."""
    return base.split(":", 1)[-1].split("/")[-1].lower()


def _progress(task: str):
    last = {"t": 0.0}

    def cb(desc, done, total):
        now = time.monotonic()
        if total is None or done == total or now - last["t"] > 20:
            last["t"] = now
            print(f"  [{task}] {desc} {done}/{total if total is not None else '?'}", flush=True)
    return cb


def _summary(entry: dict) -> dict:
    m = entry["metrics"]
    before, after = m.get("before") or {}, m.get("after") or {}
    primary = "perplexity" if entry["task"] == "pydoc" else "exact_match"
    # tasks: completion perplexity (entries measured before it existed show none)
    ppl = "perplexity" if entry["task"] == "pydoc" else "completion_ppl"
    return {"task": entry["task"], "metric": primary, "base": before.get(primary), "lora": after.get(primary),
            "ppl_base": before.get(ppl), "ppl_lora": after.get(ppl),
            "steps": entry["steps"], "batch": entry.get("batch_size"),
            "n_em": (entry.get("eval") or {}).get("max_examples"), "n_tok": (entry.get("eval") or {}).get("max_tokens"),
            "train_s": m["train"]["wall_s"], "total_s": entry.get("wall_s"),
            "loss": f'{m["train"]["loss_start_avg"]:.3f}→{m["train"]["loss_end_avg"]:.3f}',
            "tok_s": m["train"]["tokens_per_s"]}


def remeasure(reg, manifest: dict, device: str) -> None:
    """Evaluate base and base+LoRA of every manifest entry again, in place (no training)."""
    from adapterhub_c.evals.metrics import QUALITY_METRICS
    from adapterhub_c.workflows.evals import run_eval

    for entry in manifest["loras"]:
        ev = entry.get("eval") or {}
        kw = dict(max_tokens=ev.get("max_tokens"), max_examples=ev.get("max_examples"), device=device)
        for key, adapter in (("before", None), ("after", entry["artifact"])):
            print(f"{entry['task']}: measuring {'base' if adapter is None else adapter}", flush=True)
            row = run_eval(reg, manifest["base"], entry["data"], "test", adapter=adapter,
                           progress=_progress(entry["task"]), **kw)
            entry["metrics"][key] = {k: v for k, v in row.items() if k in QUALITY_METRICS}


def render_table(manifest: dict) -> str:
    """Markdown table of the manifest: base vs base+LoRA per task."""
    def f(v, nd=3):
        return "–" if v is None else f"{v:.{nd}f}"

    lines = ["| task | metric | base | base+LoRA | ppl base | ppl base+LoRA | steps × batch | eval (prompts / pydoc tokens) "
             "| loss (first→last) | train s | train tok/s | total s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in manifest.get("loras", []):
        r = _summary(entry)
        lines.append(f"| {r['task']} | {r['metric']} | {f(r['base'])} | {f(r['lora'])} | {f(r['ppl_base'], 2)} | "
                     f"{f(r['ppl_lora'], 2)} | {r['steps']} × {r['batch']} | {r['n_em']} / {r['n_tok']} | {r['loss']} | "
                     f"{r['train_s']:.0f} | {r['tok_s']:.0f} | {r['total_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="builtin:smollm2-135m")
    ap.add_argument("--zoo-dir", type=Path, default=ZOO_DIR)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--steps", type=int, default=8, help="steps for the built-in tasks")
    ap.add_argument("--pydoc-steps", type=int, default=4, help="steps for pydoc")
    ap.add_argument("--pydoc-batch-size", type=int, default=4, help="batch size for pydoc")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--eval-examples", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--remeasure", action="store_true", help="re-evaluate the zoo's LoRAs (no training) and exit")
    args = ap.parse_args(argv)

    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.artifacts import name_taken
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.push import push_artifact
    from adapterhub_c.workflows.training import train_adapter

    zoo_dir: Path = args.zoo_dir
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        manifest = load_manifest(zoo_dir)
        if manifest.get("base") != args.base:
            print(f"zoo at {zoo_dir} is for {manifest.get('base')}, not {args.base}", file=sys.stderr)
            return 2
    except FileNotFoundError:
        manifest = {"base": args.base, "loras": []}
    reg = Registry(home=zoo_dir / "home")
    base, _ = add_builtin_base(reg, args.base)
    print(f"zoo {zoo_dir} base {base.name}; tasks {tasks}; steps {args.steps} batch {args.batch_size} "
          f"seq_len {args.seq_len} lr {args.lr} rank {args.rank}; eval: {args.eval_examples} examples, "
          f"{args.eval_tokens} tokens of the test split; device {args.device}", flush=True)
    if args.remeasure:
        remeasure(reg, manifest, args.device)
        write_manifest(manifest, zoo_dir)
        tasks = []
    with serve_zoo(zoo_dir) as endpoint:
        for task in tasks:
            if any(e["task"] == task for e in manifest["loras"]):
                print(f"{task}: already in the zoo, skipped", flush=True)
                continue
            data = data_of(task)
            steps = args.pydoc_steps if task == "pydoc" else args.steps
            batch_size = args.pydoc_batch_size if task == "pydoc" else args.batch_size
            name = f"zoo-{task}"
            t0 = time.perf_counter()
            if name_taken(reg, name):   # trained by a run that stopped before pushing
                art = reg.get(name, "artifact")
                metrics = art.metrics or {}
                report = {"train": metrics.get("train"), "before": (metrics.get("eval") or {}).get("before"),
                          "after": (metrics.get("eval") or {}).get("after")}
                print(f"{task}: trained before, pushing {name}", flush=True)
            else:
                print(f"{task}: training {steps} steps on {data}", flush=True)
                art, report = train_adapter(reg, base.name, data, rank=args.rank, alpha=args.alpha, steps=steps,
                                            lr=args.lr, batch_size=batch_size, seq_len=args.seq_len,
                                            name=name, max_eval_tokens=args.eval_tokens,
                                            max_eval_examples=args.eval_examples, device=args.device,
                                            progress=_progress(task))
            repo = f"zoo/{short_base(args.base)}-{task}"
            pushed = push_artifact(reg, art.name, repo, endpoint=endpoint,
                                   commit_message=f"{task} LoRA ({steps} steps)")
            entry = {"task": task, "data": data, "repo": repo, "commit": pushed["commit_sha"],
                     "artifact": art.name, "steps": steps, "rank": args.rank, "alpha": args.alpha,
                     "lr": args.lr, "batch_size": batch_size, "seq_len": args.seq_len,
                     "eval": {"split": "test", "max_examples": args.eval_examples,
                              "max_tokens": args.eval_tokens},
                     "metrics": {"train": report["train"], "before": report["before"], "after": report["after"]},
                     "wall_s": round(time.perf_counter() - t0, 1)}
            manifest["loras"].append(entry)
            write_manifest(manifest, zoo_dir)
            s = _summary(entry)
            print(f"{task}: pushed {repo}@{pushed['commit_sha'][:12]}; {s['metric']} base {s['base']} → "
                  f"LoRA {s['lora']}; loss {s['loss']}; {entry['wall_s']:.0f} s", flush=True)
    table = render_table(manifest)
    print(table)
    if args.base == "builtin:smollm2-135m" and zoo_dir == ZOO_DIR:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            f"# Zoo of task LoRAs on {args.base}\n\nCommand: `python benchmarks/make_zoo.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            f"LoRA r={args.rank}, alpha={args.alpha}, q/k/v/o, lr {args.lr}, batch {args.batch_size}, "
            f"seq_len {args.seq_len} (pydoc: {args.pydoc_steps} steps, batch {args.pydoc_batch_size}), "
            f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end). Test split: exact match and completion perplexity "
            f"(ppl columns: exp of the mean NLL of the completion tokens given the prompt) on the first "
            f"{args.eval_examples} prompts; pydoc: perplexity on the first {args.eval_tokens} tokens.\n\n{table}\n")
    print(f"manifest: {manifest_path(zoo_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
