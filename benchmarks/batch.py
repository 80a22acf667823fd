"""Batch conversion throughput: items per minute with 1 and 2 local workers, lock errors counted.

Usage:
  python benchmarks/batch.py [--items 8] [--workers 1,2] [--steps 5] [--threads N] [--pg-url URL]
                             [--queue-items 100] [--queue-workers 1,2,4]
                             [--zoo-tasks reverse-words,uppercase,sort-numbers] [--zoo-steps 3] [--no-zoo]
                             [--out benchmarks/results/batch.md]

Three parts, each measured in this run with the 1-worker row as the baseline (ratio =
items per minute / the 1-worker figure of the same part):

- queue: the work queue alone (no models): ``--queue-items`` items whose pipeline only
  records a step, claimed by 1, 2, 4 local worker processes, on SQLite and (``--pg-url``
  or $ADAPTERHUB_TEST_PG_URL, an admin URL: a scratch database is made and dropped) on
  PostgreSQL. Shows the claim path's overhead and that no item is claimed twice.
- tiny: ``--items`` random rank-4 LoRAs of ``builtin:tiny-llama`` served by a local Hub;
  each item is pull → convert (``--steps`` steps, to a 50 % magnitude-pruned variant) →
  ComPEFT pack (k=0.3) → evaluate, with ``adapt batch convert``'s library call
  (``batch.ops.run_batch``), a fresh registry per row.
- zoo: the real zoo task LoRAs of SmolLM2-135M (benchmarks/zoo.py; skipped when the zoo is
  not built) converted to an NF4 variant with ``--zoo-steps`` steps, seq-len 64.

"lock errors" counts item errors (final or from earlier attempts) and driver exceptions
that mention a database lock ("database is locked", deadlocks, lock timeouts,
serialization failures); "twice" counts items that needed more than one attempt (with no
failures injected, any such item would mean a claim went wrong). Every run is on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LOCK_MARKERS = ("database is locked", "database table is locked", "deadlock", "lock timeout",
                "could not obtain lock", "could not serialize", "lock not available")
TINY = "builtin:tiny-llama"


def noop_pipeline(ctx) -> list[str]:
    """The queue part's pipeline: one recorded step, no model."""
    with ctx.step("work"):
        pass
    ctx.record("work", {"by": ctx.claim.worker_id})
    return []


def lock_errors(status: dict) -> int:
    """Item errors (final and earlier attempts) that are database lock errors."""
    n = 0
    for it in status["items"]:
        texts = [it.get("error") or ""] + [e.get("error", "") for e in (it["outputs"].get("errors") or [])]
        n += sum(any(m in t.lower() for m in LOCK_MARKERS) for t in texts)
    return n


def work_span(reg, batch_id: str) -> float | None:
    """Seconds from the first claim to the last finish (the run without worker start-up)."""
    from sqlalchemy import func, select

    from adapterhub_c.registry.models import BatchItem

    with reg.session() as s:
        first, last = s.execute(select(func.min(BatchItem.started_at), func.max(BatchItem.finished_at))
                                .where(BatchItem.batch_id == batch_id)).one()
    return (last - first).total_seconds() if first and last else None


def _row(part: str, db: str, workers: int, status: dict, stats: dict, span: float | None,
         driver_lock_errors: int = 0) -> dict:
    done = status["counts"]["done"]
    return {"part": part, "db": db, "workers": workers, "items": status["total"],
            "done": done, "failed": status["counts"]["failed"],
            "seconds": stats["elapsed_s"], "items_per_min": stats["items_per_minute"],
            "work_s": round(span, 2) if span else None,
            "work_per_min": round(60 * done / span, 1) if span else None,
            "lock_errors": lock_errors(status) + driver_lock_errors,
            "twice": sum(it["attempts"] > 1 for it in status["items"])}


# ---- queue ------------------------------------------------------------------------------------
def bench_queue(n_items: int, workers: list[int], dbs: dict[str, object]) -> list[dict]:
    from adapterhub_c.batch import queue
    from adapterhub_c.batch.executors import make_executor
    from adapterhub_c.batch.ops import batch_status, execute_batch
    from adapterhub_c.registry import Registry

    rows = []
    for db_name, make_url in dbs.items():
        for w in workers:
            with tempfile.TemporaryDirectory(prefix="adapt-bench-q-") as home, make_url(home) as url:
                reg = Registry(url=url, home=home)
                batch, _ = queue.open_batch(reg, f"q{w}", "bench", {}, [f"item-{i}" for i in range(n_items)],
                                            max_attempts=3)
                errors = 0
                try:
                    stats = execute_batch(reg, batch.id, make_executor("local", w), lease_seconds=60,
                                          pipeline="batch:noop_pipeline", threads=1)
                except Exception as e:  # noqa: BLE001 - counted, then re-raised
                    errors += any(m in str(e).lower() for m in LOCK_MARKERS)
                    raise
                rows.append(_row("queue", db_name, w, batch_status(reg, batch.id), stats, work_span(reg, batch.id),
                                 errors) | {"threads": 1})
                reg.close()
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- tiny base over a local Hub -----------------------------------------------------------------
def make_tiny_loras(root: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    out = []
    for i in range(n):
        model, _ = build_tiny_llama()
        torch.manual_seed(i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folder = root / f"lora-{i}"
        get_peft_model(model, cfg).save_pretrained(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = TINY
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out.append(folder)
    return out


def run_convert_rows(part: str, sources: list[str], workers: list[int], setup, convert: dict,
                     pack_density: float | None, threads: int | None = None) -> list[dict]:
    """One fresh registry per worker count; ``setup(reg)`` registers the base and returns the variant name."""
    from adapterhub_c.batch.ops import run_batch
    from adapterhub_c.registry import Registry

    rows = []
    for w in workers:
        with tempfile.TemporaryDirectory(prefix=f"adapt-bench-{part}-") as home:
            os.environ["HF_HOME"] = str(Path(home) / "hf")
            reg = Registry(url=f"sqlite:///{Path(home) / 'registry.db'}", home=home)
            variant = setup(reg)
            errors = 0
            try:
                summary = run_batch(reg, variant=variant, sources=sources, convert=convert,
                                    pack_density=pack_density, evaluate=True, workers=w, retries=0,
                                    threads=threads, name=f"bench-{part}-w{w}")
            except Exception as e:  # noqa: BLE001 - counted, then re-raised
                errors += any(m in str(e).lower() for m in LOCK_MARKERS)
                raise
            row = _row(part, "sqlite", w, summary, summary["this_run"], work_span(reg, summary["id"]), errors)
            row["threads"] = summary["this_run"].get("threads")
            failed = [(it["source"], it["error"]) for it in summary["items"] if it["state"] == "failed"]
            if failed:
                row["errors"] = failed[:3]
            rows.append(row)
            reg.close()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_tiny(n_items: int, workers: list[int], steps: int, threads: int | None) -> list[dict]:
    from adapterhub_c.hub.client import push_folder
    from adapterhub_c.hubserver.server import BackgroundServer

    token = "hf_bench_" + secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="adapt-bench-hub-") as tmp, BackgroundServer(Path(tmp) / "hub",
                                                                                         token=token) as srv:
        sources = []
        for i, folder in enumerate(make_tiny_loras(Path(tmp) / "src", n_items)):
            repo = f"bench/tiny-lora-{i}"
            push_folder(folder, repo, token=token, endpoint=srv.endpoint)
            sources.append(repo)
        os.environ["HF_ENDPOINT"] = srv.endpoint  # the workers inherit it

        def setup(reg):
            from adapterhub_c.workflows.bases import add_builtin_base
            from adapterhub_c.workflows.variants import create_variant

            add_builtin_base(reg, TINY)
            v, _ = create_variant(reg, TINY, prune="magnitude", sparsity=0.5, eval_tokens=0, name="tiny-mag50")
            return v.name

        convert = dict(data="builtin:task/reverse-words", steps=steps, batch_size=2, seq_len=32,
                       max_eval_tokens=256, max_eval_examples=4, reference_rows=False)
        return run_convert_rows("tiny", sources, workers, setup, convert, pack_density=0.3, threads=threads)


# ---- the zoo on SmolLM2 ------------------------------------------------------------------------
def bench_zoo(tasks: list[str], workers: list[int], steps: int, threads: int | None) -> list[dict]:
    from zoo import load_manifest, serve_zoo

    manifest = load_manifest()
    by_task = {e["task"]: e for e in manifest.get("loras", [])}
    have = [t for t in tasks if t in by_task]
    if not have:
        print(f"zoo: none of {tasks} in the manifest yet (has {sorted(by_task)}); skipped", flush=True)
        return []
    base = manifest["base"]
    with serve_zoo() as endpoint:
        os.environ["HF_ENDPOINT"] = endpoint

        def setup(reg):
            from adapterhub_c.workflows.bases import add_builtin_base
            from adapterhub_c.workflows.variants import create_variant

            add_builtin_base(reg, base)
            v, _ = create_variant(reg, base, quant="nf4", eval_tokens=0)
            return v.name

        sources = [by_task[t]["repo"] for t in have]
        convert = dict(steps=steps, batch_size=2, seq_len=64, max_eval_tokens=512, max_eval_examples=4,
                       reference_rows=False)
        return run_convert_rows("zoo", sources, workers, setup, convert, pack_density=0.3, threads=threads)


# ---- report ----------------------------------------------------------------------------------
COLUMNS = ["part", "db", "workers", "threads", "items", "done", "failed", "seconds", "items_per_min", "ratio",
           "work_s", "work_per_min", "work_ratio", "lock_errors", "twice"]


def with_ratios(rows: list[dict]) -> list[dict]:
    for key, out in (("items_per_min", "ratio"), ("work_per_min", "work_ratio")):
        base = {(r["part"], r["db"]): r[key] for r in rows if r["workers"] == 1 and r[key]}
        for r in rows:
            b = base.get((r["part"], r["db"]))
            r[out] = round(r[key] / b, 2) if b and r[key] else None
    return rows


def markdown(rows: list[dict], args, seconds: float) -> str:
    lines = ["# Batch conversion throughput", "",
             f"Command: `python benchmarks/batch.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"Python {platform.python_version()}, CPU only; wall time {seconds:.0f} s. "
             "items_per_min = done ÷ wall time of the run (worker start-up included); work_per_min = done ÷ "
             "the span from the first claim to the last finish; ratio / work_ratio = the same ÷ the "
             "1-worker row of the same part and database.", "",
             f"- queue: {args.queue_items} model-free items (claim → record → complete).",
             f"- tiny: {args.items} rank-4 LoRAs of builtin:tiny-llama from a local Hub: pull → convert "
             f"({args.steps} steps, seq 32) → pack (k=0.3) → evaluate (4 examples); fresh SQLite registry per row.",
             f"- zoo: SmolLM2-135M zoo LoRAs ({args.zoo_tasks}) → NF4 variant, {args.zoo_steps} convert steps, "
             "seq 64, pack k=0.3, evaluate.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in COLUMNS) + " |")
    errs = [r for r in rows if r.get("errors")]
    for r in errs:
        lines.append(f"\nfailed items in {r['part']} w={r['workers']}: {r['errors']}")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    for r in rows:
        print("  ".join(("" if r.get(c) is None else str(r[c])).ljust(widths[c]) for c in COLUMNS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--queue-items", type=int, default=100)
    ap.add_argument("--queue-workers", default="1,2,4")
    ap.add_argument("--pg-url", default=os.environ.get("ADAPTERHUB_TEST_PG_URL"),
                    help="PostgreSQL admin URL for the queue part [$ADAPTERHUB_TEST_PG_URL]")
    ap.add_argument("--zoo-tasks", default="reverse-words,uppercase,sort-numbers")
    ap.add_argument("--zoo-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker in the convert parts [cores / workers]")
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--no-queue", action="store_true")
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "batch.md"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    os.environ.pop("HF_TOKEN", None)
    workers = [int(w) for w in args.workers.split(",")]
    t0 = time.monotonic()
    rows: list[dict] = []
    if not args.no_queue:
        dbs = {"sqlite": lambda home: contextlib.nullcontext(f"sqlite:///{Path(home) / 'registry.db'}")}
        if args.pg_url:
            from adapterhub_c.registry.db import scratch_postgres_database

            dbs["postgresql"] = lambda home: scratch_postgres_database(args.pg_url, "adapt_bench")
        rows += bench_queue(args.queue_items, [int(w) for w in args.queue_workers.split(",")], dbs)
    if not args.no_tiny:
        rows += bench_tiny(args.items, workers, args.steps, args.threads)
    if not args.no_zoo:
        try:
            rows += bench_zoo(args.zoo_tasks.split(","), workers, args.zoo_steps, args.threads)
        except (FileNotFoundError, RuntimeError, KeyError) as e:
            print(f"zoo: skipped ({e})", flush=True)
    rows = with_ratios(rows)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, args, time.monotonic() - t0))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
