"""A batch worker: claim an item, run its pipeline under a renewed lease, record the outcome.

Workers are separate processes (local ``spawn`` processes or Ray tasks), each with its own
``Registry`` on the shared URL. The convert pipeline runs, per item,
pull → convert → pack → evaluate → push; each step is optional, and each step's result
is recorded on the item as soon as it exists, so a retried item resumes after its last
recorded step. Names of artefacts are reserved on the item before the step that creates
them: an attempt killed between registering an artefact and recording it leaves an
artefact the next attempt adopts instead of converting again.

``step_hook`` ("module:function", default ``$ADAPTERHUB_BATCH_STEP_HOOK``) is called in the
worker before every step as ``hook(source, step, attempt)``: for monitoring, and for
fault-injection tests (stall or crash a worker at a chosen step).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from adapterhub_c.batch import queue
from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.evals.data import DEFAULT_CORPUS
from adapterhub_c.evals.metrics import QUALITY_METRICS
from adapterhub_c.options.convert import ConvertOptions
from adapterhub_c.options.train import DEFAULT_EVAL_EXAMPLES, DEFAULT_EVAL_TOKENS
from adapterhub_c.registry import Registry
from adapterhub_c.registry.artifacts import unique_name
from adapterhub_c.registry.kinds import PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Batch, Lineage, Variant, utcnow
from adapterhub_c.workflows.evals import run_eval
from adapterhub_c.workflows.packs import pack_artifact
from adapterhub_c.workflows.pull import pull_adapter
from adapterhub_c.workflows.push import push_artifact
from adapterhub_c.workflows.training import convert_adapter

HOOK_ENV = "ADAPTERHUB_BATCH_STEP_HOOK"
PIPELINES = {"convert": "adapterhub_c.batch.worker:convert_pipeline"}


class LeaseLost(Exception):
    """The item was taken over by another worker (our lease expired); drop it silently."""


def load_callable(path: str) -> Callable:
    """Import ``"package.module:function"``."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise UsageError(f"expected 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), attr)


def one_line(e: BaseException) -> str:
    """An error as one line: our own errors by message, others with their type."""
    text = str(e) if isinstance(e, AdaptError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:2000] or type(e).__name__


class Heartbeat:
    """Renews a claim's lease every quarter lease from a background thread."""

    def __init__(self, reg, claim: queue.Claim, lease_s: float):
        self.reg, self.claim, self.lease_s = reg, claim, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(max(0.2, self.lease_s / 4)):
            try:
                if not queue.renew(self.reg, self.claim, self.lease_s):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a transient database error; try again next beat
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class ItemContext:
    """What a pipeline sees of its item: source, batch params, and step bookkeeping."""

    def __init__(self, reg, claim: queue.Claim, params: dict[str, Any], heartbeat: Heartbeat,
                 hook: Callable | None, run_id: str | None):
        self.reg, self.claim, self.params = reg, claim, params
        self.heartbeat, self.hook, self.run_id = heartbeat, hook, run_id

    @property
    def source(self) -> str:
        return self.claim.source

    @property
    def outputs(self) -> dict[str, Any]:
        return self.claim.outputs

    def check(self) -> None:
        """Raise LeaseLost if another worker has taken the item over."""
        if self.heartbeat.lost:
            raise LeaseLost(self.claim.source)

    def record(self, key: str, value: Any) -> None:
        """Store a step result on the item (only while the claim is ours)."""
        if not queue.record_output(self.reg, self.claim, key, value):
            raise LeaseLost(self.claim.source)

    @contextlib.contextmanager
    def step(self, name: str):
        """Bracket one step: lease check, the step hook, the current step on the item."""
        self.check()
        self.record("step", name)
        if self.hook is not None:
            self.hook(self.claim.source, name, self.claim.attempt)
        yield
        self.check()

    def reserve_name(self, step: str, stem: str) -> str:
        """The artefact name this item's ``step`` creates: reserved once, reused on retries."""
        names = dict(self.outputs.get("names") or {})
        if step not in names:
            names[step] = unique_name(self.reg, stem)
            self.record("names", names)
        return names[step]

    def recorded_artifact(self, step: str):
        """The artefact a previous attempt's ``step`` produced, if it still exists."""
        out = self.outputs.get(step)
        if not isinstance(out, dict) or not out.get("id"):
            return None
        return _artifact_or_none(self.reg, out["id"])


def _artifact_or_none(reg, ref: str):
    from sqlalchemy import select

    with reg.session() as s:
        return s.scalar(select(Artifact).where((Artifact.id == ref) | (Artifact.name == ref)))


def _adoptable(reg, name: str, parent_id: str, kind: tuple[str, ...]):
    """The artefact ``name`` if an earlier attempt registered it from ``parent_id``."""
    from sqlalchemy import select

    art = _artifact_or_none(reg, name)
    if art is None or art.name != name or art.kind not in kind:
        return None
    with reg.session() as s:
        edge = s.scalar(select(Lineage.id).where(Lineage.parent_id == parent_id, Lineage.child_id == art.id))
    return art if edge is not None else None


# ---- the worker loop -------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """Everything a worker needs to join a batch (plain values: it crosses processes)."""

    url: str
    home: str
    batch_id: str
    lease_s: float
    run_id: str | None = None
    threads: int | None = None
    step_hook: str | None = None
    pipeline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_worker(spec: WorkerSpec, worker_token: str, *, poll_s: float = 0.5) -> dict[str, int]:
    """Work on batch ``spec.batch_id`` until no item is queued or running; returns counts.

    Idle workers wait while other workers hold items (an item whose worker dies comes back
    when its lease expires). ``spec.pipeline`` ("module:function", default: the batch
    command's pipeline) is called as ``fn(ctx: ItemContext) -> list of artefact ids``.
    """
    url, home, batch_id, lease_s, run_id = spec.url, spec.home, spec.batch_id, spec.lease_s, spec.run_id
    pipeline, step_hook = spec.pipeline, spec.step_hook
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    reg = Registry(url=url, home=home)
    worker_id = f"{worker_token}@{socket.gethostname()}:{os.getpid()}"
    with reg.session() as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise AdaptError(f"batch {batch_id} does not exist")
        params, command = dict(batch.params), batch.command
    fn = load_callable(pipeline or PIPELINES[command])
    hook_path = step_hook if step_hook is not None else os.environ.get(HOOK_ENV)
    hook = load_callable(hook_path) if hook_path else None
    stats = {"done": 0, "failed": 0, "lost": 0}
    try:
        while True:
            queue.reap_expired(reg, batch_id)
            claim = queue.claim(reg, batch_id, worker_id, lease_s)
            if claim is None:
                left, soonest = queue.outstanding(reg, batch_id)
                if left == 0:
                    break
                wait = poll_s
                if soonest is not None:
                    wait = min(max((soonest - utcnow()).total_seconds() + 0.05, 0.05), poll_s * 4)
                time.sleep(wait)
                continue
            t_item = time.monotonic()
            stats[_work_on(reg, claim, params, fn, hook, lease_s, run_id)] += 1
            # Free the item's models before the next one loads its own; a full collection
            # costs ~0.1-1 s with torch imported, so cheap items (no model) skip it.
            if "torch" in sys.modules and time.monotonic() - t_item > 2.0:
                gc.collect()
    finally:
        reg.close()
    return stats


def _work_on(reg, claim: queue.Claim, params, fn, hook, lease_s, run_id) -> str:
    with Heartbeat(reg, claim, lease_s) as hb:
        ctx = ItemContext(reg, claim, params, hb, hook, run_id)
        try:
            artifact_ids = fn(ctx)
            ctx.check()
            return "done" if queue.complete(reg, claim, artifact_ids, run_id) else "lost"
        except LeaseLost:
            return "lost"
        except KeyboardInterrupt:
            queue.release_claim(reg, claim, "interrupted", count_attempt=False)
            raise
        except Exception as e:  # noqa: BLE001 - one failing item never stops the batch
            return "failed" if queue.fail(reg, claim, one_line(e), run_id) else "lost"


# ---- the convert pipeline ---------------------------------------------------------------
SOURCE_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def parse_source(source: str) -> tuple[str, str, str | None]:
    """``org/repo[@revision]`` → ("hub", repo, revision); ``artifact:NAME`` → ("artifact", NAME, None)."""
    source = source.strip()
    if source.startswith("artifact:"):
        return "artifact", source[len("artifact:"):], None
    repo, _, revision = source.partition("@")
    if not SOURCE_RE.match(repo):
        raise UsageError(f"{source!r} is not a Hub repo id (org/name[@revision]) or artifact:NAME")
    return "hub", repo, revision or None


def repo_slug(name: str) -> str:
    """An artefact name as a Hub repo name: [A-Za-z0-9._-] without "--" or "..", at most 96 characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    slug = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", slug)).strip("-.")
    return slug[:96].rstrip("-.") or "adapter"


def convert_pipeline(ctx: ItemContext) -> list[str]:
    """pull → convert → pack → evaluate → push for one item; returns the artefact ids.

    Each step records what it made, so a re-run of the item skips the steps already done."""
    variant, base = _item_variant(ctx)
    src = _pull_step(ctx, variant, base)
    conv = _convert_step(ctx, src, variant)
    pack = _pack_step(ctx, conv) if ctx.params.get("pack") else None
    final = pack or conv
    if ctx.params.get("evaluate") and ctx.outputs.get("evaluate") is None:
        _evaluate_step(ctx, variant, conv, final)
    if ctx.params.get("push") and ctx.outputs.get("push") is None:
        _push_step(ctx, final)
    return [a.id for a in (src, conv, pack) if a is not None]


def _item_variant(ctx: ItemContext) -> tuple[Variant, BaseModel]:
    """The batch's variant and its base (UsageError if the variant was removed)."""
    with ctx.reg.session() as s:
        variant = s.get(Variant, ctx.params["variant"])
        if variant is None:
            raise UsageError(f"the batch's variant {ctx.params['variant']} no longer exists")
        return variant, s.get(BaseModel, variant.base_id)


def _pull_step(ctx: ItemContext, variant: Variant, base: BaseModel) -> Artifact:
    """The item's source adapter: pulled from the Hub (once), or a registered artefact; of the variant's base."""
    reg = ctx.reg
    kind, ref, revision = parse_source(ctx.source)
    if kind == "hub":
        src = ctx.recorded_artifact("pull")
        if src is None:
            with ctx.step("pull"):
                src, created = pull_adapter(reg, ref, revision=revision)
            ctx.record("pull", {"id": src.id, "name": src.name, "created": bool(created)})
    else:
        src = _artifact_or_none(reg, ref)
        if src is None:
            raise UsageError(f"unknown artefact {ref!r}")
    if src.base_id != variant.base_id:
        with reg.session() as s:
            other = s.get(BaseModel, src.base_id)
        raise UsageError(f"{src.name!r} is an adapter of {other.name if other else src.base_id!r}, "
                         f"not of {base.name!r} (the base of variant {variant.name!r})")
    return src


def _convert_step(ctx: ItemContext, src: Artifact, variant: Variant) -> Artifact:
    """The source converted to the variant with the batch's ConvertOptions (or the one an earlier attempt made)."""
    conv = ctx.recorded_artifact("convert")
    if conv is not None:
        return conv
    name = ctx.reserve_name("convert", f"{src.name}-{variant.name}")
    conv = _adoptable(ctx.reg, name, src.id, ("recovered-lora", "lora"))  # lora: --recover lowrank
    report: dict = {}
    if conv is None:
        with ctx.step("convert"):
            options = ConvertOptions.from_params(ctx.params.get("convert") or {})
            conv, report = convert_adapter(ctx.reg, src.id, variant.id, options, name=name)
    rows = {r["row"]: {k: v for k, v in r.items() if k in QUALITY_METRICS} for r in report.get("rows", [])}
    ctx.record("convert", {"id": conv.id, "name": conv.name, "gap_closed": report.get("gap_closed"),
                           "eval_data": report.get("eval_data"), "rows": rows})
    return conv


def _pack_step(ctx: ItemContext, conv: Artifact) -> Artifact:
    """The converted adapter packed with the batch's pack options (once)."""
    pack = ctx.recorded_artifact("pack")
    if pack is not None:
        return pack
    opts = dict(ctx.params["pack"])
    name = ctx.reserve_name("pack", f"{conv.name}-k{opts['density']:g}")
    pack = _adoptable(ctx.reg, name, conv.id, PACK_KINDS)
    if pack is None:
        with ctx.step("pack"):
            pack, _report = pack_artifact(ctx.reg, conv.id, name=name, device=ctx.params.get("device", "cpu"),
                                          **opts)
    ctx.record("pack", {"id": pack.id, "name": pack.name, "size_bytes": pack.size_bytes,
                        "source_bytes": conv.size_bytes})
    return pack


def _evaluate_step(ctx: ItemContext, variant: Variant, conv: Artifact, final: Artifact) -> None:
    """The result measured: convert measured the converted adapter already; a pack is measured here, on the
    same data."""
    p, conv_out = ctx.params, ctx.outputs.get("convert") or {}
    if final is conv:
        ctx.record("evaluate", {"artifact": conv.name, "data": conv_out.get("eval_data"),
                                **(conv_out.get("rows") or {}).get("variant + converted", {})})
        return
    c, conv_eval = p.get("convert", {}), (conv.metrics or {}).get("eval") or {}
    data = p["evaluate"].get("data") or conv_out.get("eval_data") or conv_eval.get("data") or DEFAULT_CORPUS
    with ctx.step("evaluate"):
        res = run_eval(ctx.reg, variant.id, data, conv_eval.get("split") or "test", adapter=final.id,
                       max_tokens=c.get("max_eval_tokens", DEFAULT_EVAL_TOKENS),
                       max_examples=c.get("max_eval_examples", DEFAULT_EVAL_EXAMPLES),
                       device=p.get("device", "cpu"))
    ctx.record("evaluate", {"artifact": final.name, "data": data,
                            **{k: v for k, v in res.items() if k in QUALITY_METRICS}})


def _push_step(ctx: ItemContext, final: Artifact) -> None:
    """The result pushed to ``<org>/<its name as a repo name>``."""
    opts = ctx.params["push"]
    repo_id = f"{opts['org']}/{repo_slug(final.name)}"
    with ctx.step("push"):
        res = push_artifact(ctx.reg, final.name, repo_id, private=bool(opts.get("private")))
    ctx.record("push", {"repo": repo_id, **{k: v for k, v in (res or {}).items()
                                              if isinstance(v, (str, int, float, bool)) or v is None}})
