"""``adapt push``: an adapter artefact (or a variant) to a Hub repo, recorded in the registry.

An adapter goes as a PEFT folder + ``adapterhub_c.json`` + model card, built
deterministically so an unchanged artefact pushed again uploads nothing; a pack can go as
its pack file (``--format pack``) or both. A variant goes as its ``hf`` export with a card.
The network side is :mod:`adapterhub_c.hub.client`; tokens go to it and nowhere else.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from adapterhub_c.adapters.lora import CONFIG_NAME
from adapterhub_c.errors import IntegrityError, NotFoundError, UsageError
from adapterhub_c.hub import client
from adapterhub_c.hub.cards import model_card, variant_card
from adapterhub_c.progress import Progress
from adapterhub_c.registry.kinds import ADAPTER_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.registry.views import lineage_tree
from adapterhub_c.workflows.exports import decoded_peft_folder, export_refusal, write_adapter_gguf, write_export
from adapterhub_c.workflows.ggufvariants import MODELFILE
from adapterhub_c.workflows.hubcommon import CARD_NAME, META_NAME, checked_repo_id, hub_label, listing, sha256_file
from adapterhub_c.workflows.variants import variant_summary

META_FORMAT = 1
PUSH_FORMATS = ("peft", "pack", "both", "gguf")


# ---- what an adapter's repo says ------------------------------------------------------------------
def _latest_evaluations(s, art: Artifact, names: dict) -> dict[tuple, dict]:
    rows = s.scalars(select(Evaluation).where(Evaluation.artifact_id == art.id)
                     .order_by(Evaluation.created_at, Evaluation.id)).all()
    latest: dict[tuple, dict] = {}
    for e in rows:
        key = (e.dataset, e.split, e.metric, names.get(e.variant_id), e.prompt_id is not None)
        latest[key] = {"dataset": e.dataset, "split": e.split, "metric": e.metric, "value": e.value,
                       "variant": names.get(e.variant_id), "with_prompt": e.prompt_id is not None}
    return latest


def _baselines(s, art: Artifact, names: dict, datasets: set) -> dict[tuple, dict]:
    rows = s.scalars(select(Evaluation).where(Evaluation.base_id == art.base_id,
                                              Evaluation.artifact_id.is_(None),
                                              Evaluation.prompt_id.is_(None))
                     .order_by(Evaluation.created_at, Evaluation.id)).all()
    baseline: dict[tuple, dict] = {}
    for e in rows:
        key = (e.dataset, e.split, e.metric, names.get(e.variant_id))
        if key in datasets:
            baseline[key] = {"dataset": e.dataset, "split": e.split, "metric": e.metric,
                             "value": e.value, "variant": names.get(e.variant_id)}
    return baseline


def _metric_order(d: dict) -> tuple:
    return d["dataset"], d["split"], d["metric"], d["variant"] or ""


def _evaluations(s, art: Artifact) -> tuple[list[dict], list[dict]]:
    """(this artefact's latest measurements, the same datasets measured without it)."""
    names = {v.id: v.name for v in s.scalars(select(Variant))}
    latest = _latest_evaluations(s, art, names)
    baseline = _baselines(s, art, names, {(k[0], k[1], k[2], k[3]) for k in latest})
    return sorted(latest.values(), key=_metric_order), sorted(baseline.values(), key=_metric_order)


def _metric_key(m: dict, suffix: str = "") -> str:
    where = f"{m['dataset']}/{m['split']}" + (f", {m['variant']}" if m.get("variant") else "")
    return f"{m['metric']} ({where}){suffix}"


def _describe(reg: Registry, art: Artifact) -> dict[str, Any]:
    """Everything the card and ``adapterhub_c.json`` say about ``art`` (deterministic)."""
    with reg.session() as s:
        base = s.get(BaseModel, art.base_id)
        variant = s.get(Variant, art.variant_id) if art.variant_id else None
        metrics, baselines = _evaluations(s, art)
        parents = [{"role": role, "parent": p.name} for role, p in reg.parents(s, art)]
    config = {k: v for k, v in (art.config or {}).items() if k != "pushes"}
    return {
        "format_version": META_FORMAT,
        "name": art.name,
        "kind": art.kind,
        "base": {"name": base.name, "hub_id": base.hub_id, "revision": base.revision,
                 "commit_sha": base.commit_sha},
        "variant": ({"name": variant.name, "recipe": json.loads(variant.recipe)} if variant else None),
        "source": art.source,
        "source_sha": art.source_sha,
        "config": config,
        "lineage": lineage_tree(reg, art.id)["parents"],
        "parents": parents,
        "metrics": metrics,
        "baselines": baselines,
        "_base_label": hub_label(base),
    }


# ---- the folder an adapter push uploads --------------------------------------------------------
def _write_decoded_pack(reg: Registry, art: Artifact, stage: Path, base_label: str) -> list[str]:
    """A pack artefact decoded into PEFT files (+ recovery) in ``stage``; returns the names written."""
    decoded_peft_folder(reg, art, stage / ".peft", base_label)
    written = []
    for p in sorted((stage / ".peft").iterdir()):
        shutil.move(str(p), stage / p.name)
        written.append(p.name)
    (stage / ".peft").rmdir()
    return written


def _copy_stored(reg: Registry, art: Artifact, stage: Path, check_collisions: bool = False) -> list[str]:
    """The artefact's stored files (card and meta aside) copied, verified, into ``stage``."""
    written = []
    for rel, digest in sorted(art.files.items()):
        if rel in (CARD_NAME, META_NAME):
            continue
        target = stage / rel
        if check_collisions and target.exists():
            raise IntegrityError(f"pack file {rel!r} of {art.name!r} collides with a PEFT file")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reg.blobs.verified_path(digest), target)
        written.append(rel)
    return written


def _write_peft_part(reg: Registry, art: Artifact, stage: Path, base_label: str) -> list[str]:
    """The PEFT files of ``art`` in ``stage`` (packs decoded); returns the names written."""
    if art.kind in PACK_KINDS:
        return _write_decoded_pack(reg, art, stage, base_label)
    # LoRA kinds: the stored bytes as they are (bit-exact round trips), card and meta rebuilt
    written = _copy_stored(reg, art, stage)
    cfg_path = stage / CONFIG_NAME
    if not cfg_path.is_file():
        raise IntegrityError(f"artefact {art.name!r} has no {CONFIG_NAME}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("base_model_name_or_path") != base_label:
        cfg["base_model_name_or_path"] = base_label
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return written


def _check_push_format(art: Artifact, fmt: str) -> None:
    if fmt not in PUSH_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; pick one of {', '.join(PUSH_FORMATS)}")
    if art.kind not in ADAPTER_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}; only adapters "
                         f"({', '.join(ADAPTER_KINDS)}) can be pushed")
    if fmt in ("pack", "both") and art.kind not in PACK_KINDS:
        raise UsageError(f"--format {fmt} needs a pack artefact; {art.name!r} is a {art.kind}")


def _adapter_card(art: Artifact, info: dict, base_label: str, fmt: str) -> str:
    metrics = {_metric_key(m): m["value"] for m in info["metrics"]}
    metrics.update({_metric_key(m, " without adapter"): m["value"] for m in info["baselines"]})
    lineage = info["parents"] or ([{"role": "pulled-from", "parent": info["source"]}] if info["source"] else [])
    recipe = info["variant"]["recipe"] if info["variant"] else None
    return model_card(base_label, art.name, recipe=recipe, lineage=lineage, metrics=metrics,
                      extra_tags=(art.kind,) + (("gguf",) if fmt == "gguf" else ()),
                      peft_loadable=fmt in ("peft", "both"))


def build_push_folder(reg: Registry, art: Artifact, dest: str | Path, fmt: str = "peft") -> list[dict]:
    """Write what ``push`` uploads for ``art`` into the empty folder ``dest``.

    ``fmt``: ``peft`` (PEFT folder), ``pack`` (the pack file only; pack artefacts),
    ``both`` (PEFT folder and pack file), ``gguf`` (the GGUF LoRA llama.cpp loads, with the GGUF
    of the model it runs on and an ollama Modelfile: ``exports.write_adapter_gguf``). Always adds
    ``adapterhub_c.json`` and README.md.
    Content is a function of the registry rows only (no timestamps), so an unchanged
    artefact gives byte-identical files. Returns [{path, size, sha256}] sorted by path.
    """
    _check_push_format(art, fmt)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    info = _describe(reg, art)
    base_label = info.pop("_base_label")
    written = []
    if fmt == "gguf":
        info["gguf"] = write_adapter_gguf(reg, art, dest)
        written += [info["gguf"]["lora_file"], info["gguf"]["model_file"], MODELFILE]
    if fmt in ("peft", "both"):
        written += _write_peft_part(reg, art, dest, base_label)
    if fmt in ("pack", "both"):
        written += _copy_stored(reg, art, dest, check_collisions=True)
    info["format"] = fmt
    info["files"] = {rel: sha256_file(dest / rel) for rel in sorted(written)}
    (dest / META_NAME).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    (dest / CARD_NAME).write_text(_adapter_card(art, info, base_label, fmt))
    return listing(dest)


# ---- the folder a variant push uploads ----------------------------------------------------------
def _variant_metrics(row: Variant) -> dict:
    st = row.stats or {}
    metrics = {}
    if st.get("perplexity") is not None:
        label = f"perplexity ({st.get('eval_data', 'builtin:pydoc:test')}, {st.get('eval_tokens')} tokens)"
        metrics[label] = st["perplexity"]
        if st.get("base_perplexity") is not None:
            metrics[label.replace("perplexity", "base perplexity", 1)] = st["base_perplexity"]
    return metrics


def build_variant_push_folder(reg: Registry, row: Variant, dest: str | Path, fmt: str = "hf") -> list[dict]:
    """Write what ``push`` uploads for a variant into the empty folder ``dest``: its ``fmt`` export (hf, or
    gguf: the .gguf + ollama Modelfile) + README.md.

    Returns [{path, size, sha256}] sorted by path.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with reg.session() as s:
        base = s.get(BaseModel, row.base_id)
    reason = export_refusal(row, fmt)
    if reason is not None:
        raise UsageError(f"cannot push {row.name!r} as {fmt}: {reason}")
    write_export(reg, row, base, dest, fmt)
    summary = variant_summary(row, base)
    weights = sum(p.stat().st_size for p in dest.iterdir() if p.name.endswith((".safetensors", ".gguf")))
    sizes = {"stored_bytes": summary["stored_bytes"], "loaded_bytes": summary["loaded_bytes"],
             "export_bytes": weights, "base_fp16_bytes": summary["base_fp16_bytes"]}
    recipe = summary["recipe_json"]
    quant, prune = recipe.get("quant", "none"), recipe.get("prune", "none")
    quantized = quant != "none" or "origin" in recipe
    tags = [f"quant:{quant}"] if quant != "none" else []
    tags += [f"prune:{prune}"] if prune != "none" else []
    gguf = next((p.name for p in dest.glob("*.gguf")), None)
    card = variant_card(hub_label(base), row.name, recipe, quantized=quantized, sizes=sizes,
                        metrics=_variant_metrics(row), extra_tags=tags, gguf_file=gguf)
    (dest / CARD_NAME).write_text(card)
    return listing(dest)


# ---- pushing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Upload:
    """How the folder goes up: the client's arguments."""

    private: bool = False
    commit_message: str | None = None
    token: str | None = None
    progress: Progress | None = None
    endpoint: str | None = None

    def send(self, stage: Path, repo_id: str):
        return client.push_folder(stage, repo_id, private=self.private, commit_message=self.commit_message,
                                  token=self.token, endpoint=self.endpoint, progress=self.progress)


@dataclass(frozen=True)
class _PushJob:
    """One push: what (``what``: artifact / variant, ``name``), where, how the folder is built and recorded."""

    what: str
    name: str
    repo_id: str
    fmt: str
    endpoint: str | None                    # as recorded (never a token)
    params: dict
    build: Callable[[Path], list[dict]]
    remember: Callable[[dict], None]


def _merged_pushes(previous: list, record: dict) -> list:
    key = (record["repo_id"], record["commit_sha"], record["endpoint"])
    return [p for p in previous if (p.get("repo_id"), p.get("commit_sha"), p.get("endpoint")) != key] + [record]


def _remember_on_artifact(reg: Registry, art_id: str, record: dict) -> None:
    with reg.session() as s:
        row = s.get(Artifact, art_id)
        row.config = {**(row.config or {}), "pushes": _merged_pushes((row.config or {}).get("pushes", []), record)}


def _remember_on_variant(reg: Registry, variant_id: str, record: dict) -> None:
    with reg.session() as s:
        r = s.get(Variant, variant_id)
        r.stats = {**(r.stats or {}), "pushes": _merged_pushes((r.stats or {}).get("pushes", []), record)}


def _run_push(reg: Registry, job: _PushJob, upload: _Upload, dry_run: bool) -> dict:
    """Build the folder, upload it (unless ``dry_run``) and record the push; returns what happened."""
    head = {job.what: job.name, "repo_id": job.repo_id, "format": job.fmt}
    with reg.staging("push") as tmp:
        stage = Path(tmp) / "repo"
        if dry_run:
            return {**head, "dry_run": True, "files": job.build(stage)}
        with record_run(reg, "push", job.params) as run:
            files = job.build(stage)
            res = upload.send(stage, job.repo_id)
            job.remember({"repo_id": job.repo_id, "commit_sha": res.commit_sha, "url": res.url,
                          "format": job.fmt, "endpoint": job.endpoint})
            out = {**head, "dry_run": False, "commit_sha": res.commit_sha, "url": res.url,
                   "uploaded": res.uploaded, "files": files}
            run.output = {k: v for k, v in out.items() if k != "files"} | {"files": [f["path"] for f in files]}
            return out


def push_artifact(reg: Registry, name: str, repo_id: str, *, private: bool = False, fmt: str = "peft",
                  commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
                  progress: Progress | None = None, endpoint: str | None = None) -> dict:
    """Push an adapter artefact (or a variant: see `push_variant`) to ``repo_id``; returns what happened.

    The result has ``repo_id``, ``files`` ([{path, size, sha256}]) and, unless ``dry_run``,
    ``commit_sha``, ``url`` and ``uploaded`` (False when the repo already held this content:
    no commit is made then). The pushed repo and commit are recorded in the artefact's
    config under ``pushes``.
    """
    art = _artifact_or_variant(reg, name)
    upload = _Upload(private, commit_message, token, progress, endpoint)
    if isinstance(art, Variant):
        if fmt not in ("peft", "hf", "gguf"):
            raise UsageError(f"{art.name!r} is a variant: it is pushed as its hf export, or with --format gguf as "
                             f"its GGUF (--format {fmt} is for adapters)")
        return _push_variant_row(reg, art, repo_id, upload, dry_run, "gguf" if fmt == "gguf" else "hf")
    repo_id = checked_repo_id(repo_id)
    public = client.public_endpoint(endpoint)
    params = dict(artifact=art.name, repo_id=repo_id, private=private, format=fmt,
                  commit_message=commit_message, endpoint=public)
    job = _PushJob("artifact", art.name, repo_id, fmt, public, params,
                   build=lambda stage: build_push_folder(reg, art, stage, fmt),
                   remember=partial(_remember_on_artifact, reg, art.id))
    return _run_push(reg, job, upload, dry_run)


def _artifact_or_variant(reg: Registry, name: str):
    """The artefact named ``name``, else the variant (artefacts first: names are unique per kind)."""
    try:
        return reg.get(name, "artifact")
    except NotFoundError:
        try:
            return reg.get(name, "variant")
        except NotFoundError:
            pass
    with reg.session() as s:
        known = [n for cls in (Artifact, Variant) for n in s.scalars(select(cls.name))]
    raise NotFoundError("adapter or variant", name, known)


def _push_variant_row(reg: Registry, row: Variant, repo_id: str, upload: _Upload, dry_run: bool,
                      fmt: str = "hf") -> dict:
    repo_id = checked_repo_id(repo_id)
    recorded = client.resolve_endpoint(upload.endpoint)
    params = dict(variant=row.name, repo_id=repo_id, private=upload.private, format=fmt,
                  commit_message=upload.commit_message, endpoint=recorded)
    job = _PushJob("variant", row.name, repo_id, fmt, recorded, params,
                   build=lambda stage: build_variant_push_folder(reg, row, stage, fmt),
                   remember=partial(_remember_on_variant, reg, row.id))
    return _run_push(reg, job, upload, dry_run)


def push_variant(reg: Registry, variant: str | Variant, repo_id: str, *, private: bool = False,
                 commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
                 progress: Progress | None = None, endpoint: str | None = None, fmt: str = "hf") -> dict:
    """Push a variant's `hf` (or ``fmt="gguf"``: GGUF + Modelfile) export with a model card to ``repo_id``
    (created if needed).

    Same result shape as `push_artifact` (``variant`` instead of ``artifact``); the push is
    recorded in the variant's stats under ``pushes``.
    """
    row = variant if isinstance(variant, Variant) else reg.get(variant, "variant")
    return _push_variant_row(reg, row, repo_id, _Upload(private, commit_message, token, progress, endpoint),
                             dry_run, fmt)


__all__ = ["push_artifact", "push_variant", "build_push_folder", "build_variant_push_folder", "PUSH_FORMATS"]
