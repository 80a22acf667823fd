"""Read-only views of the registry as plain, JSON-ready dicts (for ls / show / lineage)."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import or_, select

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import LISTABLE
from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Run, Variant
from adapterhub_c.registry.runs import mark_dead_runs, record_run
from adapterhub_c.registry.store import KINDS, Registry, delete_object, kind_of


def iso_time(value: dt.datetime | None) -> str | None:
    """A timestamp as ISO 8601 to the second (None stays None): how every view shows times."""
    return value.isoformat(timespec="seconds") if value else None


def base_row(b: BaseModel) -> dict[str, Any]:
    return {"id": b.id, "name": b.name, "hub_id": b.hub_id, "revision": b.revision, "commit_sha": b.commit_sha,
            "architecture": b.architecture, "params": b.params, "size_bytes": b.size_bytes,
            "reference_only": b.is_reference, "created_at": iso_time(b.created_at)}


def variant_row(v: Variant, base_name: str) -> dict[str, Any]:
    import json

    return {"id": v.id, "name": v.name, "base": base_name, "recipe": json.loads(v.recipe),
            "sparsity": v.sparsity, "size_bytes": v.size_bytes, "stats": v.stats, "created_at": iso_time(v.created_at)}


def artifact_row(a: Artifact, base_name: str, variant_name: str | None) -> dict[str, Any]:
    return {"id": a.id, "kind": a.kind, "name": a.name, "base": base_name, "variant": variant_name,
            "source": a.source, "source_sha": a.source_sha, "size_bytes": a.size_bytes, "metrics": a.metrics,
            "created_at": iso_time(a.created_at)}


def run_row(r: Run) -> dict[str, Any]:
    return {"id": r.id, "command": r.command, "status": r.status, "started_at": iso_time(r.started_at),
            "duration_s": r.duration_s, "parameters": r.parameters, "output": r.output, "error": r.error}


def list_objects(reg: Registry, what: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of one table: bases, variants, artifacts or runs (newest runs first)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a positive integer (got {limit!r})")
    with reg.session() as s:
        names = {b.id: b.name for b in s.scalars(select(BaseModel))}
        if what == "bases":
            return [base_row(b) for b in s.scalars(select(BaseModel).order_by(BaseModel.created_at))]
        if what == "variants":
            return [variant_row(v, names.get(v.base_id, "?"))
                    for v in s.scalars(select(Variant).order_by(Variant.created_at))]
        if what == "artifacts":
            vnames = {v.id: v.name for v in s.scalars(select(Variant))}
            return [artifact_row(a, names.get(a.base_id, "?"), vnames.get(a.variant_id))
                    for a in s.scalars(select(Artifact).order_by(Artifact.created_at))]
        if what == "runs":
            q = select(Run).order_by(Run.started_at.desc())
            if limit:
                q = q.limit(limit)
            return [run_row(r) for r in s.scalars(q)]
    raise ValueError(what)


def show_object(reg: Registry, ref: str) -> dict[str, Any]:
    """Everything about one object: its row, files, lineage and evaluations."""
    with reg.session() as s:
        obj = reg.resolve(s, ref)
        kind = kind_of(obj)
        names = {b.id: b.name for b in s.scalars(select(BaseModel))}
        vnames = {v.id: v.name for v in s.scalars(select(Variant))}
        if kind == "base":
            row = base_row(obj)
        elif kind == "variant":
            row = variant_row(obj, names.get(obj.base_id, "?"))
        else:
            row = artifact_row(obj, names.get(obj.base_id, "?"), vnames.get(obj.variant_id))
            row["config"] = obj.config
        row["type"] = kind
        row["files"] = obj.files
        row["parents"] = [{"role": role, "type": kind_of(p), "name": p.name, "id": p.id}
                          for role, p in reg.parents(s, obj)]
        row["children"] = [{"role": role, "type": kind_of(c), "name": c.name, "id": c.id}
                           for role, c in reg.children(s, obj)]
        col = {"base": Evaluation.base_id, "variant": Evaluation.variant_id, "artifact": Evaluation.artifact_id}[kind]
        evs = s.scalars(select(Evaluation).where(or_(col == obj.id, Evaluation.prompt_id == obj.id))
                        .order_by(Evaluation.created_at))
        row["evaluations"] = [{"dataset": e.dataset, "split": e.split, "metric": e.metric, "value": e.value,
                               "variant": vnames.get(e.variant_id), "with_adapter": e.artifact_id,
                               "with_prompt": e.prompt_id, "at": iso_time(e.created_at)} for e in evs]
        return row


def lineage_tree(reg: Registry, ref: str) -> dict[str, Any]:
    """Ancestors and descendants of an object, as nested dicts."""
    with reg.session() as s:
        obj = reg.resolve(s, ref)

        def up(o, seen):
            return [{"role": role, "type": kind_of(p), "name": p.name, "parents": up(p, seen | {p.id})}
                    for role, p in reg.parents(s, o) if p.id not in seen]

        def down(o, seen):
            return [{"role": role, "type": kind_of(c), "name": c.name, "children": down(c, seen | {c.id})}
                    for role, c in reg.children(s, o) if c.id not in seen]

        if kind_of(obj) == "variant":
            ancestors = [{"role": "variant-of", "type": "base", "name": s.get(BaseModel, obj.base_id).name,
                          "parents": []}] + up(obj, {obj.id})
        else:
            ancestors = up(obj, {obj.id})
        return {"name": obj.name, "type": kind_of(obj), "parents": ancestors, "children": down(obj, {obj.id})}


def remove(reg: Registry, ref: str, cascade: bool = False) -> list[str]:
    """Delete an object (see ``delete_object``); returns the names removed."""
    with record_run(reg, "rm", {"name": ref, "cascade": cascade}) as run:
        with reg.session() as s:
            obj = reg.resolve(s, ref)
            removed = delete_object(reg, s, obj, cascade=cascade)
        run.output = {"removed": removed}
        return removed


def _checkpoints_in_use(reg: Registry, dead: list[str]) -> set[str]:
    """The checkpoint folders that living running runs name (their ``output["checkpoint"]``)."""
    with reg.session() as s:
        rows = s.execute(select(Run.id, Run.output).where(Run.status == "running")).all()
    return {str(out["checkpoint"]) for run_id, out in rows
            if run_id not in dead and isinstance(out, dict) and out.get("checkpoint")}


def collect_garbage(reg: Registry, dry_run: bool = False) -> dict[str, Any]:
    """Clean up after dead writers, then remove blobs no row references.

    Runs left ``running`` by a process of this host that is gone (``kill -9``) are closed
    as ``interrupted``; staging folders of such processes (``cache/push-<pid>@<host>-…``)
    and empty checkpoint folders no running run names (a training run killed before its
    first save) are removed; then unreferenced blobs and dead writers' temp files."""
    dead = mark_dead_runs(reg, dry_run=dry_run)
    staging = reg.stale_staging() + reg.empty_checkpoints(_checkpoints_in_use(reg, dead))
    if not dry_run:
        reg.remove_staging(staging)
    with record_run(reg, "gc", {"dry_run": dry_run}) as run:
        result = reg.blobs.gc(reg.referenced_digests(), dry_run=dry_run)
        result.update(runs_interrupted=dead, staging_removed=[p.name for p in staging])
        run.output = result
        return result


__all__ = ["LISTABLE", "list_objects", "show_object", "lineage_tree", "remove", "collect_garbage", "KINDS"]
