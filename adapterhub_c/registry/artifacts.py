"""Registering artefacts: blobs first, then the row and its lineage in one transaction."""
from __future__ import annotations

import os
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


def check_new_name(reg: Registry, name: str | None) -> None:
    """Refuse a user-given name for a new artefact: empty, or taken (UsageError). ``None`` passes.

    ``None`` means "make one up" (see :func:`unique_name`); the check runs before any
    work so a bad ``--name`` fails fast. ``register_artifact`` checks again, atomically.
    """
    if name is None:
        return
    if not name.strip():
        raise UsageError("--name must not be empty")
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
