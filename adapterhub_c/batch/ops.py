"""Batch operations: ``run_batch`` (adapt batch convert) and ``batch_status``.

A batch is named; its items live in the registry (``batches`` / ``batch_items``). Running
the same batch again skips done items, retries failed ones while they have attempts
left, and appends sources not yet in it. The run itself is one ``runs`` row; every step
of every item records its own run too (pull, convert, pack, eval, push).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from adapterhub_c.batch import queue
from adapterhub_c.batch.executors import WorkerSpec, default_threads, make_executor
from adapterhub_c.errors import UsageError
from adapterhub_c.options.batch import BATCH_GROUPS, BatchExecution, BatchItems, BatchSteps
from adapterhub_c.options.convert import ConvertOptions
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import check_name_syntax
from adapterhub_c.registry.models import Artifact, Batch, Variant, utcnow
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.workflows.search import search_adapters_for

POLL_S = 0.5


def read_sources(path: str | Path) -> list[str]:
    """Item sources from a file: one ``org/repo[@revision]`` or ``artifact:NAME`` a line; # comments."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _search(reg: Registry, base: str, limit: int) -> list[str]:
    return [r["id"] for r in search_adapters_for(reg, base, limit=limit)]


def batch_options(convert: ConvertOptions | dict[str, Any] | None = None, **fields: Any
                  ) -> tuple[ConvertOptions | dict[str, Any] | None, BatchItems, BatchSteps, BatchExecution]:
    """Route keyword ``fields`` (the flags' names) to the option group that owns each; unknown → UsageError."""
    groups = {cls: {} for cls in BATCH_GROUPS}
    owner = {f.name: cls for cls in BATCH_GROUPS for f in dataclasses.fields(cls)}
    for key, value in fields.items():
        if key not in owner:
            raise UsageError(f"unknown batch option {key!r}")
        groups[owner[key]][key] = value
    items, steps, execution = (cls.from_params(groups[cls]) for cls in BATCH_GROUPS)
    return convert, items, steps, execution


def run_batch(reg: Registry, *, variant: str | None = None, name: str | None = None,
              convert: ConvertOptions | dict[str, Any] | None = None, items: BatchItems | None = None,
              steps: BatchSteps | None = None, execution: BatchExecution | None = None,
              progress: Progress | None = None, **fields: Any) -> dict[str, Any]:
    """Convert many adapters to variant ``variant``: pull → convert → pack → evaluate → push.

    Items (``BatchItems``) come from ``sources``, a file (``from_file``) or a Hub search for
    adapters of ``search_base`` (``limit``). ``convert``: the options of every conversion (a
    ``ConvertOptions``, or a dict of its fields where None means the default); the batch
    stores ``params()`` and every worker converts with them. ``steps`` (``BatchSteps``): pack,
    evaluate, push and device; ``execution`` (``BatchExecution``): workers, executor,
    retries, leases, threads per local worker (default: the cores shared out among the
    workers). Instead of the three objects, their fields may be given as keywords. ``name``
    defaults to one derived from the variant and the options, so the same command resumes
    the same batch; ``name`` alone resumes a batch with its stored options. Each item is
    tried at most ``retries + 1`` times over all runs. Returns the batch summary
    (``batch_status``) with this run's figures.
    """
    if fields:
        if items or steps or execution:
            raise UsageError("give the batch's option objects or their fields, not both")
        convert, items, steps, execution = batch_options(convert, **fields)
    items, steps, execution = items or BatchItems(), steps or BatchSteps(), execution or BatchExecution()
    executor_obj = make_executor(execution.executor, execution.workers, execution.ray_address)  # before the registry
    given = list(items.sources) + (read_sources(items.from_file) if items.from_file is not None else [])
    existing = _find_batch(reg, name) if name else None
    if name is not None and existing is None:  # a new batch: the name rule (old ones still resume)
        check_name_syntax(name, "batch name", namespace=False)
    if variant is None and existing is None:
        raise UsageError("give --variant (or --name of an existing batch to resume it)")
    params = dict(existing.params) if existing is not None and variant is None else _params(reg, variant, convert,
                                                                                            steps)
    if items.search_base is not None:
        given += _search(reg, items.search_base, items.limit)
    if existing is None and not given:
        raise UsageError("nothing to do: give --from-file FILE or --search-base BASE")
    name = name or _default_name(reg, params)
    batch, changes = queue.open_batch(reg, name, "convert", params, given, max_attempts=execution.retries + 1)
    run_params = dict(batch=name, variant=params["variant_name"], items=len(given), workers=execution.workers,
                      executor=execution.executor, ray_address=execution.ray_address, retries=execution.retries,
                      lease_seconds=execution.lease_seconds,
                      options={k: v for k, v in params.items() if k not in ("variant", "variant_name")})
    with record_run(reg, "batch convert", run_params) as run:
        with reg.session() as s:
            row = s.get(Batch, batch.id)
            row.run_id, row.updated_at = run.id, utcnow()
        stats = execute_batch(reg, batch.id, executor_obj, lease_seconds=execution.lease_seconds, run_id=run.id,
                              step_hook=execution.step_hook, threads=execution.threads, progress=progress,
                              label=f"batch {name}")
        stats["changes"] = changes
        summary = batch_status(reg, batch.id)
        summary["this_run"] = stats
        run.output = {"batch": name, "counts": summary["counts"], "done_this_run": stats["done"],
                      "failed_this_run": stats["failed"], "items_per_minute": stats["items_per_minute"]}
    return summary


def _find_batch(reg: Registry, name: str) -> Batch | None:
    with reg.session() as s:
        return s.scalar(select(Batch).where(Batch.name == name))


def _params(reg: Registry, variant: str, convert: ConvertOptions | dict[str, Any] | None,
            steps: BatchSteps) -> dict[str, Any]:
    """What a batch stores and every worker reads: the variant, the conversion and the steps after it."""
    with reg.session() as s:
        var = reg.resolve(s, variant, "variant")
    conv = convert_options(convert, steps.device).params()
    pack = None if steps.pack_density is None else {
        "density": steps.pack_density, **({} if steps.pack_alpha is None else {"alpha": steps.pack_alpha})}
    evaluate = steps.evaluate or steps.eval_data
    return {
        "variant": var.id,
        "variant_name": var.name,
        "convert": conv,
        "pack": pack,
        "evaluate": {"data": steps.eval_data, "max_tokens": steps.eval_max_tokens} if evaluate else None,
        "push": None if steps.push_to is None else {"org": steps.push_to, "private": bool(steps.private)},
        "device": steps.device,
    }


def convert_options(convert: ConvertOptions | dict[str, Any] | None, device: str) -> ConvertOptions:
    """The batch's conversion options on ``device`` (a dict's None values take the defaults)."""
    if isinstance(convert, ConvertOptions):
        return convert.replace(device=device)
    given = {k: v for k, v in (convert or {}).items() if v is not None}
    return ConvertOptions.from_params(given, device=device)


def _default_name(reg: Registry, params: dict[str, Any]) -> str:
    digest = hashlib.sha256(queue.canonical(params).encode()).hexdigest()[:8]
    return f"convert-{params['variant_name']}-{digest}"


def execute_batch(reg: Registry, batch_id: str, executor, *, lease_seconds: float = 120.0,
                  run_id: str | None = None, step_hook: str | None = None, pipeline: str | None = None,
                  threads: int | None = None, progress: Progress | None = None,
                  label: str = "batch") -> dict[str, Any]:
    """Run workers on an opened batch until no item is queued or running; returns this run's figures.

    ``executor`` is a LocalExecutor / RayExecutor (``executors.make_executor``). Workers that
    die abnormally have their items returned to the queue at once (the attempt counts).
    """
    before = queue.counts(reg, batch_id)
    total = sum(before.values())
    todo = before["queued"] + before["running"]
    if todo == 0:  # nothing to do: no worker to start
        return {"done": 0, "failed": 0, "elapsed_s": 0.0, "items_per_minute": None, "workers": 0,
                "executor": executor.name, "lost_workers": []}
    # More workers than items would only start, find nothing and stop.
    executor.workers = min(executor.workers, todo)
    if threads is None and executor.name == "local":
        threads = default_threads(executor.workers)
    spec = WorkerSpec(url=reg.url, home=str(reg.home), batch_id=batch_id, lease_s=lease_seconds, run_id=run_id,
                      threads=threads, step_hook=step_hook, pipeline=pipeline)
    lost: list[dict[str, Any]] = []
    t0 = time.monotonic()
    executor.start(spec)
    try:
        while True:
            for token, why in executor.dead():
                n = queue.release_worker(reg, batch_id, f"{token}@", why)
                lost.append({"worker": token, "reason": why, "items_returned": n})
            now = queue.counts(reg, batch_id)
            if progress is not None:
                progress(label, now["done"] + now["failed"], total)
            if executor.alive() == 0:
                break
            time.sleep(POLL_S)
        for token, why in executor.dead():
            n = queue.release_worker(reg, batch_id, f"{token}@", why)
            lost.append({"worker": token, "reason": why, "items_returned": n})
    except KeyboardInterrupt:
        executor.stop()
        for token in executor.tokens:
            queue.release_worker(reg, batch_id, f"{token}@", "interrupted", count_attempt=False)
        raise
    finally:
        executor.stop()
    elapsed = time.monotonic() - t0
    after = queue.counts(reg, batch_id)
    done = after["done"] - before["done"]
    failed = max(0, after["failed"] - before["failed"])
    return {"done": done, "failed": failed, "elapsed_s": round(elapsed, 2),
            "items_per_minute": round(60 * done / elapsed, 2) if elapsed > 0 else None,
            "workers": executor.workers, "threads": threads, "executor": executor.name, "lost_workers": lost}


def batch_status(reg: Registry, ref: str) -> dict[str, Any]:
    """A batch's options, counts per state and its items (state, attempts, error, lease, worker, artefacts)."""
    batch = queue.get_batch(reg, ref)
    rows = queue.items(reg, batch.id)
    ids = {a for r in rows for a in (r.artifact_ids or [])}
    with reg.session() as s:
        names = dict(s.execute(select(Artifact.id, Artifact.name).where(Artifact.id.in_(ids))).all()) if ids else {}
        variant = s.get(Variant, batch.params["variant"]) if batch.params.get("variant") else None
    items = []
    for r in rows:
        arts = [names.get(a, a) for a in (r.artifact_ids or [])]
        out = dict(r.outputs or {})
        items.append({
            "position": r.position, "source": r.source, "state": r.state, "attempts": r.attempts,
            "error": r.error, "worker": r.worker_id, "step": out.get("step") if r.state == "running" else None,
            "lease_expires_at": r.lease_expires_at.isoformat() + "Z" if r.lease_expires_at else None,
            "duration_s": round(r.duration_s, 2) if r.duration_s is not None else None,
            "result": arts[-1] if arts and r.state == "done" else None,
            "artifacts": arts, "artifact_ids": list(r.artifact_ids or []),
            "outputs": {k: v for k, v in out.items() if k not in ("step", "names")},
        })
    counts = dict.fromkeys(queue.STATES, 0)
    for it in items:
        counts[it["state"]] += 1
    return {"batch": batch.name, "id": batch.id, "command": batch.command,
            "variant": variant.name if variant else batch.params.get("variant_name"),
            "max_attempts": batch.max_attempts, "created_at": batch.created_at.isoformat() + "Z",
            "updated_at": batch.updated_at.isoformat() + "Z", "run_id": batch.run_id,
            "params": batch.params, "counts": counts, "total": len(items), "items": items}

