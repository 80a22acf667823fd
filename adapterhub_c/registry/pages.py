"""What the registry web page (``adapt ui``) shows, as plain JSON-ready dicts.

Every function here is a read-only query of the registry (no run is recorded, nothing is
written); ``adapterhub_c.api`` re-exports them, so the page, its JSON twin and scripts read
the same figures from one place. Sizes are named for what they measure:

- ``stored_bytes``: what an object adds to the blob store (a variant: only the blobs it does
  not share with its base; an artefact: its own files);
- ``loaded_bytes``: what a loaded variant holds in memory;
- ``export_bytes``: a standalone export of a variant;
- ``referenced_bytes``: every blob a row points at, shared base blobs included.
"""
from __future__ import annotations

import difflib
import json
import shlex
from collections import defaultdict
from typing import Any, Callable, Iterable

from sqlalchemy import func, or_, select
from sqlalchemy.orm import aliased

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import ARTIFACT_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Lineage, Run, Variant
from adapterhub_c.registry.store import KINDS, Registry, kind_of
from adapterhub_c.registry.views import artifact_row, iso_time, run_row

PER_PAGE = 50
MAX_PER_PAGE = 500
RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")
QUALITY_METRICS = ("exact_match", "completion_ppl", "perplexity")
"""Quality measures of Compare's scatter, in order of preference (higher is better for the first)."""


def page_bounds(page: int, per_page: int = PER_PAGE) -> tuple[int, int]:
    """(offset, limit) of 1-based ``page``; UsageError for a page or size out of range."""
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise UsageError(f"page must be a positive integer (got {page!r})")
    if isinstance(per_page, bool) or not isinstance(per_page, int) or not 1 <= per_page <= MAX_PER_PAGE:
        raise UsageError(f"per_page must be between 1 and {MAX_PER_PAGE} (got {per_page!r})")
    return (page - 1) * per_page, per_page


def _paging(total: int, page: int, per_page: int) -> dict[str, int]:
    return {"page": page, "per_page": per_page, "total": total, "pages": max(1, -(-total // per_page))}


# ---- home ----------------------------------------------------------------------------------


def blob_usage(reg: Registry) -> dict[str, int]:
    """Bytes and count of the blob store, and what ``adapt gc`` would free (computed, not run)."""
    used = count = 0
    for digest in reg.blobs.all_digests():
        try:
            used += reg.blobs.path_for(digest).stat().st_size
            count += 1
        except FileNotFoundError:  # removed by a concurrent gc
            continue
    reclaim = reg.blobs.gc(reg.referenced_digests(), dry_run=True)
    return {"used_bytes": used, "blobs": count, "reclaimable_bytes": reclaim["bytes_freed"],
            "reclaimable_blobs": reclaim["blobs_removed"], "reclaimable_temp": reclaim["temp_removed"]}


def summary(reg: Registry, runs: int = 10) -> dict[str, Any]:
    """The home page: counts per kind, disk use, the latest runs, the failed / interrupted ones."""
    with reg.session() as s:
        counts = {"bases": s.scalar(select(func.count()).select_from(BaseModel)),
                  "variants": s.scalar(select(func.count()).select_from(Variant))}
        kinds = dict(s.execute(select(Artifact.kind, func.count()).group_by(Artifact.kind)).all())
        statuses = dict(s.execute(select(Run.status, func.count()).group_by(Run.status)).all())
        latest = [run_row(r) for r in s.scalars(select(Run).order_by(Run.started_at.desc()).limit(runs))]
        troubled = [run_row(r) for r in s.scalars(select(Run).where(Run.status.in_(("failed", "interrupted")))
                                                  .order_by(Run.started_at.desc()).limit(runs))]
        evaluations = s.scalar(select(func.count()).select_from(Evaluation))
        bases = [{"name": b.name, "id": b.id} for b in s.scalars(select(BaseModel).order_by(BaseModel.name))]
    counts["artifacts"] = sum(kinds.values())
    return {"counts": counts, "artifact_kinds": dict(sorted(kinds.items())), "run_statuses": statuses,
            "evaluations": evaluations, "disk": blob_usage(reg), "latest_runs": latest,
            "failed_runs": troubled, "bases": bases}


# ---- model tree ----------------------------------------------------------------------------


def _node(obj, relation: str, base_name: str, vnames: dict[str, str]) -> dict[str, Any]:
    kind = kind_of(obj)
    out = {"type": kind, "kind": obj.kind if kind == "artifact" else kind, "name": obj.name, "id": obj.id,
           "relation": relation, "children": [], "more": 0}
    if kind == "artifact":
        out.update(artifact_row(obj, base_name, vnames.get(obj.variant_id)))
        out["relation"] = relation
        out["stored_bytes"] = obj.stored_bytes
        out["origin"] = artifact_origin(obj)
    return out


def artifact_origin(art: Artifact) -> str:
    """'pulled' (from a Hub repo), 'trained', 'converted' or the command that derived it."""
    source = art.source or ""
    if source.startswith("adapt train"):
        return "trained"
    if source.startswith("adapt convert") or art.kind == "recovered-lora":
        return "converted"
    if "@" in source and not source.startswith("adapt"):
        return "pulled"
    return {"pack": "packed", "merged": "merged", "composed": "composed", "prompt": "learned"}.get(art.kind, "derived")


def _children_of(s, ids: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """parent id → [(role, child type, child id)] in one query."""
    out: dict[str, list] = defaultdict(list)
    if ids:
        for e in s.scalars(select(Lineage).where(Lineage.parent_id.in_(ids)).order_by(Lineage.id)):
            out[e.parent_id].append((e.role, e.child_type, e.child_id))
    return out


def _grow(s, nodes: list[dict], ctx: dict, depth: int) -> None:
    """Attach lineage children (packs, merges, compositions, prompts) under ``nodes``, breadth first."""
    level = nodes
    for _ in range(depth):
        edges = _children_of(s, [n["id"] for n in level])
        nxt = []
        for n in level:
            kids = [(role, t, cid) for role, t, cid in edges.get(n["id"], []) if t == "artifact"]
            for role, _t, cid in kids[:ctx["per_node"]]:
                child = s.get(Artifact, cid)
                if child is None:
                    continue
                node = _node(child, role, ctx["base"], ctx["vnames"])
                node["seen"] = cid in ctx["seen"]
                ctx["seen"].add(cid)
                n["children"].append(node)
                if not node["seen"]:
                    nxt.append(node)
            n["more"] = max(0, len(kids) - ctx["per_node"])
        level = nxt
        if not level:
            return


def _relation_to(s, parent_id: str, child_ids: list[str]) -> dict[str, str]:
    """child id → role of its lineage edge from ``parent_id`` (one query)."""
    if not child_ids:
        return {}
    q = select(Lineage.child_id, Lineage.role).where(Lineage.parent_id == parent_id, Lineage.child_id.in_(child_ids))
    return dict(s.execute(q).all())


def _attached(s, base: BaseModel, variant: Variant | None, offset: int, limit: int) -> tuple[list, int]:
    """Artefacts of ``variant`` (of the base itself when None) that derive from no artefact of
    the same variant: converted, trained, pulled, prompts. Packs, merges and compositions
    hang under the artefacts they come from."""
    parent = aliased(Artifact)
    derived = select(Lineage.child_id).join(parent, parent.id == Lineage.parent_id)
    derived = derived.where(parent.variant_id == variant.id) if variant else derived.where(parent.variant_id.is_(None))
    q = select(Artifact).where(Artifact.base_id == base.id, Artifact.id.not_in(derived))
    q = q.where(Artifact.variant_id == variant.id) if variant else q.where(Artifact.variant_id.is_(None))
    total = s.scalar(select(func.count()).select_from(q.subquery()))
    rows = s.scalars(q.order_by(Artifact.created_at, Artifact.name).offset(offset).limit(limit)).all()
    return rows, total


def model_tree(reg: Registry, base_ref: str, page: int = 1, per_page: int = PER_PAGE, depth: int = 4,
               describe_variant: Callable[[Variant, BaseModel], dict] | None = None) -> dict[str, Any]:
    """Base → variants → adapters → packs / merges / compositions / prompts, each edge with its role.

    The adapters directly under the base and under each variant are paginated (``page``,
    ``per_page``); deeper levels show at most ``per_page`` children each and count the rest
    (``more``). ``describe_variant(row, base)`` adds a variant's recipe, sizes and perplexity."""
    offset, limit = page_bounds(page, per_page)
    with reg.session() as s:
        base = reg.resolve(s, base_ref, "base")
        variants = s.scalars(select(Variant).where(Variant.base_id == base.id).order_by(Variant.created_at)).all()
        vnames = {v.id: v.name for v in variants}
        ctx = {"base": base.name, "vnames": vnames, "seen": set(), "per_node": per_page}
        groups, largest = [], 0
        for v in [*variants, None]:  # variants first: a converted adapter shows in full under its variant
            rows, total = _attached(s, base, v, offset, limit)
            largest = max(largest, total)
            roles = _relation_to(s, v.id if v else base.id, [a.id for a in rows])
            nodes = [_node(a, roles.get(a.id, "targets" if v else "adapter-of"), base.name, vnames) for a in rows]
            ctx["seen"].update(a.id for a in rows)
            _grow(s, nodes, ctx, depth)
            groups.append(_variant_group(v, base, nodes, total, describe_variant))
        return {"base": _base_node(base), "variants": groups[:-1], "adapters": groups[-1]["children"],
                "adapters_total": groups[-1]["total"], **_paging(largest, page, per_page)}


def _base_node(base: BaseModel) -> dict[str, Any]:
    from adapterhub_c.registry.views import base_row

    row = base_row(base)
    row["stored_bytes"] = base.stored_bytes
    row["fp16_bytes"] = 2 * base.params if base.params else None
    return row


def _variant_group(v: Variant | None, base: BaseModel, nodes: list, total: int, describe) -> dict[str, Any]:
    if v is None:
        return {"children": nodes, "total": total}
    info = describe(v, base) if describe else {"name": v.name, "id": v.id, "recipe": json.loads(v.recipe),
                                               "stored_bytes": v.stored_bytes}
    return {**info, "type": "variant", "relation": "variant-of", "children": nodes, "total": total}


# ---- one artefact ----------------------------------------------------------------------------


def file_sizes(reg: Registry, files: dict[str, str]) -> list[dict[str, Any]]:
    """[{path, digest, bytes}] of an object's files (bytes None when the blob is missing)."""
    out = []
    for path, digest in sorted((files or {}).items()):
        try:
            size = reg.blobs.path_for(digest).stat().st_size
        except (FileNotFoundError, ValueError):
            size = None
        out.append({"path": path, "digest": digest, "bytes": size})
    return out


def _run_of(s, run_id: str | None) -> dict[str, Any] | None:
    run = s.get(Run, run_id) if run_id else None
    if run is None:
        return None
    row = run_row(run)
    row["finished_at"] = iso_time(run.finished_at)
    row["reproduce"] = reproduce_command(run.command, run.parameters or {})
    return row


def ci95_of(e: Evaluation) -> list[float] | None:
    """The 95% interval an evaluation recorded with its value (exact match: Wilson), or None."""
    details = e.details or {}
    ci = details.get(f"{e.metric}_ci95") or details.get("ci95")
    return [float(ci[0]), float(ci[1])] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def _evaluation_rows(s, obj, limit: int) -> tuple[list[dict], int]:
    """``show_object``'s evaluation rows (same filter, order and keys) plus ``ci95``, at most ``limit``."""
    col = {"base": Evaluation.base_id, "variant": Evaluation.variant_id, "artifact": Evaluation.artifact_id}
    q = select(Evaluation).where(or_(col[kind_of(obj)] == obj.id, Evaluation.prompt_id == obj.id))
    total = s.scalar(select(func.count()).select_from(q.subquery()))
    evs = s.scalars(q.order_by(Evaluation.created_at, Evaluation.id).limit(limit)).all()
    vnames = _names(s, Variant, {e.variant_id for e in evs})
    return [{"dataset": e.dataset, "split": e.split, "metric": e.metric, "value": e.value,
             "variant": vnames.get(e.variant_id), "with_adapter": e.artifact_id, "with_prompt": e.prompt_id,
             "at": iso_time(e.created_at), "ci95": ci95_of(e)} for e in evs], total


def _names(s, cls, ids) -> dict[str, str]:
    ids = [i for i in ids if i]
    return dict(s.execute(select(cls.id, cls.name).where(cls.id.in_(ids))).all()) if ids else {}


def _edge(role: str, obj) -> dict[str, Any]:
    return {"role": role, "type": kind_of(obj), "name": obj.name, "id": obj.id}


def _children_page(s, obj, limit: int) -> tuple[list[tuple[str, Any]], int]:
    """What derives from ``obj`` (as ``Registry.children``: lineage, plus a base's variants and
    adapters, a variant's adapters), at most ``limit``, and how many in all."""
    edges = select(Lineage).where(Lineage.parent_id == obj.id)
    out = [(e.role, s.get(KINDS[e.child_type], e.child_id))
           for e in s.scalars(edges.order_by(Lineage.id).limit(limit))]
    out = [(role, c) for role, c in out if c is not None]
    total = s.scalar(select(func.count()).select_from(edges.subquery()))
    seen = select(Lineage.child_id).where(Lineage.parent_id == obj.id)
    implicit = []
    if isinstance(obj, BaseModel):
        implicit = [("variant-of", Variant, Variant.base_id == obj.id), ("adapter-of", Artifact, Artifact.base_id == obj.id)]
    elif isinstance(obj, Variant):
        implicit = [("targets", Artifact, Artifact.variant_id == obj.id)]
    for role, cls, where in implicit:
        q = select(cls).where(where, cls.id.not_in(seen))
        total += s.scalar(select(func.count()).select_from(q.subquery()))
        room = limit - len(out)
        if room > 0:
            out += [(role, c) for c in s.scalars(q.order_by(cls.created_at).limit(room))]
    return out, total


def detail(reg: Registry, ref: str, limit: int = 200) -> dict[str, Any]:
    """One object's page: the row of ``adapt show --json`` (the same row functions and keys; children
    and evaluations cut at ``limit``, with ``children_total`` / ``evaluations_total``; evaluations
    with their 95% interval) plus file sizes, the run that made it (with the command that
    reproduces it) and its pictures."""
    from adapterhub_c.registry.views import base_row, variant_row

    with reg.session() as s:
        obj = reg.resolve(s, ref)
        kind = kind_of(obj)
        base = s.get(BaseModel, obj.base_id) if kind != "base" else obj
        if kind == "base":
            row = base_row(obj)
        elif kind == "variant":
            row = variant_row(obj, base.name if base else "?")
        else:
            variant = s.get(Variant, obj.variant_id) if obj.variant_id else None
            row = artifact_row(obj, base.name if base else "?", variant.name if variant else None)
            row["config"] = obj.config
        row["type"], row["files"] = kind, obj.files
        row["parents"] = [_edge(role, p) for role, p in reg.parents(s, obj)]
        children, row["children_total"] = _children_page(s, obj, limit)
        row["children"] = [_edge(role, c) for role, c in children]
        row["evaluations"], row["evaluations_total"] = _evaluation_rows(s, obj, limit)
        run = _run_of(s, obj.run_id)
    files = file_sizes(reg, row["files"])
    return {"object": row, "file_sizes": files, "run": run,
            "pictures": [f["path"] for f in files if f["path"].lower().endswith((".png", ".svg"))],
            "curves": find_curves({"metrics": row.get("metrics"), "config": row.get("config"),
                                   "output": (run or {}).get("output")})}


def lineage_graph(reg: Registry, ref: str, depth: int = 3, width: int = 12) -> dict[str, Any]:
    """``lineage_tree``'s shape (ancestors and descendants as nested dicts, with ``kind``), cut at
    ``depth`` levels each way and ``width`` neighbours per object (``more`` counts the rest)."""
    with reg.session() as s:
        obj = reg.resolve(s, ref)

        def up(o, level, seen):
            if level >= depth:
                return []
            parents = reg.parents(s, o)
            if isinstance(o, Variant):
                parents = [("variant-of", s.get(BaseModel, o.base_id)), *parents]
            return [{**_graph_node(role, p), "parents": up(p, level + 1, seen | {p.id})}
                    for role, p in parents[:width] if p is not None and p.id not in seen]

        def down(o, level, seen):
            if level >= depth:
                return []
            kids, total = _children_page(s, o, width)
            return [{**_graph_node(role, c), "children": down(c, level + 1, seen | {c.id}),
                     "more": max(0, total - width)} for role, c in kids if c.id not in seen]

        kids_total = _children_page(s, obj, 0)[1]
        return {"name": obj.name, "type": kind_of(obj), "kind": getattr(obj, "kind", kind_of(obj)),
                "parents": up(obj, 0, {obj.id}), "children": down(obj, 0, {obj.id}),
                "more": max(0, kids_total - width)}


def _graph_node(role: str, obj) -> dict[str, Any]:
    kind = kind_of(obj)
    return {"role": role, "type": kind, "kind": obj.kind if kind == "artifact" else kind, "name": obj.name}


def find_curves(tree: Any, path: str = "") -> list[dict[str, Any]]:
    """Numeric series stored in metrics / config / run output (losses, alpha searches, composition
    curves), as [{name, points: [[x, y], …]}]: what the page draws as line charts."""
    out: list[dict[str, Any]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += find_curves(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(tree, list) and len(tree) >= 2:
        points = _points(tree)
        if points:
            out.append({"name": path, "points": points})
    return out


def _points(seq: list) -> list[list[float]] | None:
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if all(num(x) for x in seq):
        return [[i, float(x)] for i, x in enumerate(seq)]
    if all(isinstance(x, (list, tuple)) and len(x) == 2 and num(x[0]) and num(x[1]) for x in seq):
        return [[float(x[0]), float(x[1])] for x in seq]
    if all(isinstance(x, dict) for x in seq):
        keys = [k for k in seq[0] if all(num(x.get(k)) for x in seq)]
        if len(keys) >= 2:
            return [[float(x[keys[0]]), float(x[keys[1]])] for x in seq]
    return None


POSITIONAL = {"adapt train": ("target", "data"), "adapt convert": ("adapter", "variant"), "pack": ("adapter",),
              "merge": ("inputs",), "compose": ("inputs",), "prompt learn": ("variant",),
              "prompt transfer": ("prompts",), "variant create": ("base",), "base add": ("name",),
              "pull": ("repo",), "eval": ("target", "data"), "push": ("name", "repo_id"), "export": ("variant", "out")}
SKIP_PARAMS = {"device", "n_examples", "completion_tokens"}


def reproduce_command(command: str, params: dict[str, Any]) -> str:
    """The ``adapt`` command line a run's recorded parameters spell (positional arguments first)."""
    verb = command if command.startswith("adapt ") else f"adapt {command}"
    flat = dict(params)
    for key, value in params.items():  # a recipe dict spells its own flags
        if isinstance(value, dict) and key not in POSITIONAL.get(command, ()):
            flat.pop(key)
            flat.update({k: v for k, v in value.items() if k not in flat})
    words = [verb]
    for key in POSITIONAL.get(command, ()):
        value = flat.pop(key, None)
        words += [shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]) if v is not None]
    for key, value in flat.items():
        if key in SKIP_PARAMS or value is None or value is False or value == [] or isinstance(value, dict):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [flag, shlex.quote(text)]
    return " ".join(words)


# ---- compare -----------------------------------------------------------------------------------


def _evals_for(s, artifact_ids: list[str]) -> dict[tuple[str, str | None], dict[str, dict]]:
    """(artifact id, evaluated-on variant id) → {"dataset · metric": latest evaluation}."""
    out: dict[tuple, dict] = defaultdict(dict)
    q = select(Evaluation).where(Evaluation.artifact_id.in_(artifact_ids)).order_by(Evaluation.created_at)
    for e in s.scalars(q):
        out[(e.artifact_id, e.variant_id)][f"{e.dataset} · {e.metric}"] = _eval_cell(e)
    return out


def _eval_cell(e: Evaluation) -> dict[str, Any]:
    return {"dataset": e.dataset, "split": e.split, "metric": e.metric, "value": e.value, "ci95": ci95_of(e)}


def _reference_evals(s, base_id: str, variant_id: str | None) -> dict[str, dict]:
    """The latest evaluations of the base (or the variant) alone: no adapter, no prompt."""
    q = select(Evaluation).where(Evaluation.base_id == base_id, Evaluation.artifact_id.is_(None),
                                 Evaluation.prompt_id.is_(None))
    q = q.where(Evaluation.variant_id == variant_id) if variant_id else q.where(Evaluation.variant_id.is_(None))
    return {f"{e.dataset} · {e.metric}": _eval_cell(e) for e in s.scalars(q.order_by(Evaluation.created_at))}


def _selection(s, reg: Registry, refs: Iterable[str], task: str | None, variant: str | None) -> list[Artifact]:
    arts = [reg.resolve(s, r, "artifact") for r in refs]
    if task or variant:
        q = select(Artifact)
        if variant:
            q = q.where(Artifact.variant_id == reg.resolve(s, variant, "variant").id)
        if task:
            ids = select(Evaluation.artifact_id).where(Evaluation.dataset.in_((task, f"builtin:task/{task}")))
            q = q.where(or_(Artifact.id.in_(ids), Artifact.name.contains(task)))
        arts += s.scalars(q.order_by(Artifact.created_at).limit(MAX_PER_PAGE)).all()
    unique = {a.id: a for a in arts}
    return list(unique.values())


def compare(reg: Registry, refs: Iterable[str] = (), task: str | None = None,
            variant: str | None = None) -> dict[str, Any]:
    """Artefacts side by side: one row per (artefact, variant it was evaluated on), the base and
    variant-alone rows as references, and the points of a size-against-quality scatter."""
    with reg.session() as s:
        arts = _selection(s, reg, refs, task, variant)
        vnames = {v.id: v.name for v in s.scalars(select(Variant))}
        bnames = {b.id: b.name for b in s.scalars(select(BaseModel))}
        evals = _evals_for(s, [a.id for a in arts])
        rows = [_compare_row(a, vid, cells, bnames, vnames) for a in arts
                for (aid, vid), cells in evals.items() if aid == a.id]
        rows += [_compare_row(a, a.variant_id, {}, bnames, vnames) for a in arts
                 if not any(aid == a.id for aid, _ in evals)]
        refs_out = _references(s, arts, bnames, vnames)
    columns = sorted({c for r in rows + refs_out for c in r["evaluations"]})
    column = _quality_column(rows, columns)
    metric = column.rsplit("· ", 1)[1] if column else None
    return {"rows": rows, "references": refs_out, "columns": columns, "quality_metric": metric,
            "scatter": _scatter(rows, refs_out, column, metric)}


def _compare_row(a: Artifact, vid: str | None, cells: dict, bnames: dict, vnames: dict) -> dict[str, Any]:
    return {"name": a.name, "id": a.id, "kind": a.kind, "base": bnames.get(a.base_id),
            "variant": vnames.get(a.variant_id), "evaluated_on": vnames.get(vid) or bnames.get(a.base_id),
            "stored_bytes": a.stored_bytes, "evaluations": cells}


def _references(s, arts: list[Artifact], bnames: dict, vnames: dict) -> list[dict[str, Any]]:
    pairs = sorted({(a.base_id, None) for a in arts} | {(a.base_id, a.variant_id) for a in arts if a.variant_id},
                   key=lambda p: (p[0], p[1] or ""))
    out = []
    for base_id, vid in pairs:
        cells = _reference_evals(s, base_id, vid)
        label = f"{vnames.get(vid)} alone" if vid else f"{bnames.get(base_id)} (base)"
        out.append({"name": label, "kind": "variant" if vid else "base", "evaluations": cells})
    return out


def _quality_column(rows: list, columns: list[str]) -> str | None:
    """The scatter's quality column: exact match, else completion perplexity, else perplexity; among
    those, the first where the artefacts differ (all-zero exact matches say nothing), else the first."""
    ranked = [c for m in QUALITY_METRICS for c in columns if c.endswith(f"· {m}")]
    for c in ranked:
        if len({r["evaluations"][c]["value"] for r in rows if c in r["evaluations"] and r["stored_bytes"]}) > 1:
            return c
    return ranked[0] if ranked else None


def _scatter(rows: list, refs: list, column: str | None, metric: str | None) -> dict[str, Any]:
    """Points (stored bytes, quality) of ``column``, the reference rows as lines."""
    if column is None:
        return {"column": None, "points": [], "references": []}
    points = [{"name": r["name"], "x": r["stored_bytes"], "y": r["evaluations"][column]["value"]}
              for r in rows if column in r["evaluations"] and r["stored_bytes"]]
    lines = [{"name": r["name"], "y": r["evaluations"][column]["value"]} for r in refs if column in r["evaluations"]]
    return {"column": column, "points": points, "references": lines,
            "higher_is_better": metric == "exact_match"}


# ---- runs and search -----------------------------------------------------------------------------


def list_runs(reg: Registry, command: str | None = None, status: str | None = None, page: int = 1,
              per_page: int = PER_PAGE) -> dict[str, Any]:
    """Runs newest first, filtered by command and status, one page at a time."""
    offset, limit = page_bounds(page, per_page)
    if status and status not in RUN_STATUSES:
        raise UsageError(f"status must be one of {', '.join(RUN_STATUSES)} (got {status!r})")
    q = select(Run)
    if command:
        q = q.where(Run.command == command)
    if status:
        q = q.where(Run.status == status)
    with reg.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        rows = [run_row(r) for r in s.scalars(q.order_by(Run.started_at.desc()).offset(offset).limit(limit))]
        commands = sorted(s.scalars(select(Run.command).distinct()))
    return {"runs": rows, "commands": commands, "statuses": list(RUN_STATUSES), "command": command,
            "status": status, **_paging(total, page, per_page)}


def search(reg: Registry, query: str = "", kind: str | None = None, base: str | None = None, page: int = 1,
           per_page: int = PER_PAGE) -> dict[str, Any]:
    """Bases, variants and artefacts whose name, Hub repo (source) or tags contain ``query``;
    ``kind``: base, variant or an artefact kind; ``base``: only objects of that base."""
    offset, limit = page_bounds(page, per_page)
    with reg.session() as s:
        base_id = reg.resolve(s, base, "base").id if base else None
        queries = _search_queries(query.strip(), kind, base_id)
        totals = [s.scalar(select(func.count()).select_from(q.subquery())) for _, q in queries]
        rows, skip, room = [], offset, limit
        bnames = {b.id: b.name for b in s.scalars(select(BaseModel))}
        for (what, q), total in zip(queries, totals, strict=True):
            if room and skip < total:
                for obj in s.scalars(q.order_by(_name_col(what)).offset(skip).limit(room)):
                    rows.append(_search_row(what, obj, bnames))
                room = limit - len(rows)
            skip = max(0, skip - total)
    return {"results": rows, "query": query, "kind": kind, "base": base, **_paging(sum(totals), page, per_page)}


def _name_col(what: str):
    return {"base": BaseModel.name, "variant": Variant.name, "artifact": Artifact.name}[what]


def _search_queries(text: str, kind: str | None, base_id: str | None) -> list[tuple[str, Any]]:
    like = f"%{text.replace(chr(92), chr(92) * 2).replace('%', chr(92) + '%').replace('_', chr(92) + '_')}%"
    out = []
    if kind in (None, "", "base"):
        q = select(BaseModel).where(or_(BaseModel.name.like(like, escape="\\"), BaseModel.hub_id.like(like, escape="\\")))
        out.append(("base", q.where(BaseModel.id == base_id) if base_id else q))
    if kind in (None, "", "variant"):
        q = select(Variant).where(Variant.name.like(like, escape="\\"))
        out.append(("variant", q.where(Variant.base_id == base_id) if base_id else q))
    if kind not in ("base", "variant"):
        q = select(Artifact).where(or_(Artifact.name.like(like, escape="\\"), Artifact.source.like(like, escape="\\"),
                                       _tags_like(like)))
        q = q.where(Artifact.kind == kind) if kind else q
        out.append(("artifact", q.where(Artifact.base_id == base_id) if base_id else q))
    return out


def _tags_like(like: str):
    from sqlalchemy import String, cast

    return cast(Artifact.config["tags"], String).like(like, escape="\\")


def _search_row(what: str, obj, bnames: dict) -> dict[str, Any]:
    base_id = obj.id if what == "base" else obj.base_id
    return {"type": what, "kind": obj.kind if what == "artifact" else what, "name": obj.name, "id": obj.id,
            "base": bnames.get(base_id), "source": getattr(obj, "source", None) or getattr(obj, "hub_id", None),
            "stored_bytes": obj.stored_bytes,
            "created_at": iso_time(obj.created_at)}


def kinds_of(reg: Registry, names: Iterable[str]) -> dict[str, str]:
    """name → kind ('base', 'variant' or the artefact's kind) of the known ``names``."""
    names = list(names)
    out: dict[str, str] = {}
    with reg.session() as s:
        out.update({n: "base" for n in s.scalars(select(BaseModel.name).where(BaseModel.name.in_(names)))})
        out.update({n: "variant" for n in s.scalars(select(Variant.name).where(Variant.name.in_(names)))})
        out.update(dict(s.execute(select(Artifact.name, Artifact.kind).where(Artifact.name.in_(names))).all()))
    return out


def closest_names(reg: Registry, name: str, n: int = 5) -> list[str]:
    """The known names (of every kind) closest to ``name``: what a 404 page suggests."""
    with reg.session() as s:
        known = [x for cls in KINDS.values() for x in s.scalars(select(cls.name))]
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.4)
    return close or [k for k in known if name.lower() in k.lower()][:n]


__all__ = ["PER_PAGE", "ARTIFACT_KINDS", "kinds_of", "ci95_of", "lineage_graph", "summary", "blob_usage", "model_tree", "detail", "file_sizes", "find_curves",
           "reproduce_command", "compare", "list_runs", "search", "closest_names", "artifact_origin"]
