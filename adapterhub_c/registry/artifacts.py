"""Registering artefacts: blobs first, then the row and its lineage in one transaction."""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

from sqlalchemy import select

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import ARTIFACT_KINDS
from adapterhub_c.registry.models import Artifact
from adapterhub_c.registry.store import Registry


def name_taken(reg: Registry, name: str) -> bool:
    """Whether an artefact already has this name."""
    with reg.session() as s:
        return s.scalar(select(Artifact.id).where(Artifact.name == name)) is not None


NAME_PART_MAX = 96
_NAME_PART = re.compile(r"[A-Za-z0-9._-]+")


def check_name_syntax(name: object, what: str = "--name", *, namespace: bool = True) -> str:
    """The one rule for a new name of any kind (artefact, variant, batch); returns it.

    Hub-like: parts of ``[A-Za-z0-9._-]``, at most NAME_PART_MAX characters each, joined by
    ``/`` only where it means a namespace (``namespace=True``); never empty, never ``.`` or
    ``..``, no leading or trailing ``/``. UsageError otherwise. Only new names are checked:
    rows already stored under other names still load.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{what} must not be empty")
    parts = name.split("/") if namespace else [name]
    if len(parts) > 2 or any(
            not _NAME_PART.fullmatch(p) or p in (".", "..") or len(p) > NAME_PART_MAX for p in parts):
        shown = ascii(name[:NAME_PART_MAX]) + ("..." if len(name) > NAME_PART_MAX else "")
        raise UsageError(f"invalid {what} {shown}: use letters, digits, '.', '_', '-' (at most "
                         f"{NAME_PART_MAX} each){', one / for a namespace' if namespace else ''}, "
                         "and no '..'")
    return name


def check_new_name(reg: Registry, name: str | None) -> None:
    """Refuse a user-given name for a new artefact: against the name rule
    (:func:`check_name_syntax`), or taken (UsageError). ``None`` passes.

    ``None`` means "make one up" (see :func:`unique_name`); the check runs before any
    work so a bad ``--name`` fails fast. ``register_artifact`` checks again, atomically.
    """
    if name is None:
        return
    check_name_syntax(name)
    if name_taken(reg, name):
        raise UsageError(f"an artefact named {name!r} already exists; pick another --name")


def unique_name(reg: Registry, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``… if taken (for names the tool makes up)."""
    name, i = stem, 1
    while name_taken(reg, name):
        i += 1
        name = f"{stem}-{i}"
    return name


def register_artifact(reg: Registry, *, kind: str, name: str, base_id: str, folder: str | os.PathLike | None = None,
                      files: dict[str, str] | None = None, variant_id: str | None = None, source: str | None = None,
                      source_sha: str | None = None, config: dict[str, Any] | None = None,
                      metrics: dict[str, Any] | None = None, parents: Iterable[tuple[Any, str]] = (),
                      run_id: str | None = None) -> Artifact:
    """Store ``folder`` as blobs (complete before anything points at them), then add the row.

    ``parents`` is a list of (registry object, role) lineage edges. Raises UsageError if the
    name is taken; nothing is registered then (the blobs stay until ``gc``).
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artefact kind {kind}")
    stored = dict(files or {})
    if folder is not None:
        stored.update(reg.blobs.put_folder(folder))
    size = sum(reg.blobs.path_for(d).stat().st_size for d in stored.values())
    with reg.session() as s:
        if s.scalar(select(Artifact.id).where(Artifact.name == name)) is not None:
            raise UsageError(f"an artefact named {name!r} already exists; pick another --name")
        art = Artifact(kind=kind, name=name, base_id=base_id, variant_id=variant_id, source=source,
                       source_sha=source_sha, files=stored, config=config or {}, metrics=metrics or {},
                       size_bytes=size, run_id=run_id)
        s.add(art)
        s.flush()
        for parent, role in parents:
            reg.add_lineage(s, parent, art, role)
        return art
