"""Registering artefacts: blobs first, then the row and its lineage in one transaction."""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import ARTIFACT_KINDS
from adapterhub_c.registry.models import Artifact, Run
from adapterhub_c.registry.runs import sanitize
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


def check_new_name(reg: Registry, name: str | None, *, command: str | None = None) -> None:
    """Refuse a user-given name for a new artefact: against the name rule
    (:func:`check_name_syntax`), or taken (UsageError). ``None`` passes.

    ``None`` means "make one up" (a stem :func:`register_artifact` allocates); the check runs
    before any work so a bad ``--name`` fails fast. With ``command``, a name taken by an
    artefact that the same command made passes here: :func:`earlier_result` decides once the
    parameters are known whether this is a rerun of it. ``register_artifact`` checks again,
    atomically.
    """
    if name is None:
        return
    check_name_syntax(name)
    if name_taken(reg, name) and (command is None or _maker(reg, name)[0] != command):
        raise UsageError(f"an artefact named {name!r} already exists; pick another --name")


def _maker(reg: Registry, name: str) -> tuple[str | None, dict | None]:
    """(command, parameters) of the run that registered artefact ``name``."""
    with reg.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.name == name))
        run = s.get(Run, art.run_id) if art is not None and art.run_id else None
        return (run.command, run.parameters) if run is not None else (None, None)


def earlier_result(reg: Registry, name: str | None, command: str, params: dict[str, Any],
                   ignore: Iterable[str] = ()) -> Artifact | None:
    """The artefact ``name`` if the same command with the same parameters registered it.

    A rerun of a command that was killed after registering its artefact (or that simply
    finished) is "already done", like ``adapt base add``: the caller returns this artefact
    instead of doing the work again. None if ``name`` is free (or None); UsageError if it is
    taken by anything else. ``ignore``: parameters left out of the comparison (those that
    only change what is measured, ``Options.unkeyed()``).
    """
    if name is None or not name_taken(reg, name):
        return None
    made_by, made_with = _maker(reg, name)
    skip = set(ignore)
    if made_by == command and _without(made_with, skip) == _without(sanitize(params), skip):
        return reg.get(name, "artifact")
    raise UsageError(f"an artefact named {name!r} already exists (made by other options); pick another --name")


def _without(params: Any, skip: set[str]) -> Any:
    """``params`` minus the keys in ``skip`` (a recorded row that is not a dict stays as it is)."""
    return {k: v for k, v in params.items() if k not in skip} if isinstance(params, dict) else params


def already_done_report(art: Artifact) -> dict[str, Any]:
    """The report of a command that found its artefact registered by an identical earlier run."""
    return {"name": art.name, "id": art.id, "kind": art.kind, "already_done": True,
            "created_at": str(art.created_at), "run_id": art.run_id}


def unique_name(reg: Registry, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``… if taken (for names the tool makes up)."""
    name, i = stem, 1
    while name_taken(reg, name):
        i += 1
        name = f"{stem}-{i}"
    return name


def register_artifact(reg: Registry, *, kind: str, name: str | None = None, stem: str | None = None, base_id: str,  # noqa: PLR0913 - keyword-only columns of the row it writes
                      folder: str | os.PathLike | None = None, files: dict[str, str] | None = None,
                      variant_id: str | None = None, source: str | None = None, source_sha: str | None = None,
                      config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                      parents: Iterable[tuple[Any, str]] = (), run_id: str | None = None) -> Artifact:
    """Store ``folder`` as blobs (complete before anything points at them), then add the row.

    ``name``: the user's name; UsageError if it is taken, and nothing is registered then (the
    blobs stay until ``gc``). Or ``stem`` (``name`` None): the first free one of ``stem``,
    ``stem-2``, … is taken in the same transaction as the insert, and a name another process
    took in between (the unique constraint) moves on to the next, so concurrent commands with
    the same default name all succeed. ``parents`` is a list of (registry object, role)
    lineage edges.
    """
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artefact kind {kind}")
    stored = dict(files or {})
    if folder is not None:
        stored.update(reg.blobs.put_folder(folder))
    size = sum(reg.blobs.path_for(d).stat().st_size for d in stored.values())

    def insert(s: Session, candidate: str) -> Artifact:
        art = Artifact(kind=kind, name=candidate, base_id=base_id, variant_id=variant_id, source=source,
                       source_sha=source_sha, files=stored, config=config or {}, metrics=metrics or {},
                       size_bytes=size, run_id=run_id)
        s.add(art)
        s.flush()
        for parent, role in parents:
            reg.add_lineage(s, parent, art, role)
        return art

    return insert_named(reg, name, stem, insert)


def insert_named(reg: Registry, name: str | None, stem: str | None, insert: Callable[[Session, str], Any]):
    """Run ``insert(session, name)`` in one transaction under ``name``, or under the first free
    one of ``stem``, ``stem-2``, … (see :func:`register_artifact`); returns what it returns."""
    if (name is None) == (stem is None):
        raise ValueError("give exactly one of name and stem")
    taken = f"an artefact named {name!r} already exists; pick another --name"
    for candidate in ([name] if name is not None else _candidates(stem)):
        try:
            with reg.session() as s:
                if s.scalar(select(Artifact.id).where(Artifact.name == candidate)) is not None:
                    if name is not None:
                        raise UsageError(taken)
                    continue
                return insert(s, candidate)
        except sa_exc.IntegrityError:
            if not name_taken(reg, candidate):
                raise  # another constraint: a real failure
            if name is not None:
                raise UsageError(taken) from None
    raise UsageError(f"no free name left after {stem!r}-{MAX_NAME_SUFFIX}; pick a --name")


MAX_NAME_SUFFIX = 10_000


def _candidates(stem: str) -> Iterator[str]:
    yield stem
    for i in range(2, MAX_NAME_SUFFIX + 1):
        yield f"{stem}-{i}"
