"""The registry handle: database sessions, the blob store, lookups and lineage."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import or_, select
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.registry.blobs import STALE_AFTER_S, BlobStore, pid_alive
from adapterhub_c.registry.db import default_home, default_url, make_engine, upgrade
from adapterhub_c.registry.db import describe_url as _safe_url
from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Lineage, Run, Variant

KINDS = {"base": BaseModel, "variant": Variant, "artifact": Artifact}
MIN_ID_PREFIX = 4
_STAGING_RE = re.compile(r"^[a-z]+-(?P<pid>\d+)@(?P<host>[^/]+?)-[^-]+$")
# folders of earlier versions (tempfile's tmpXXXX, pull-/push-/base-/variant-XXXX): no pid, so by age
_LEGACY_STAGING_RE = re.compile(r"^(tmp|pull-|push-|base-|variant-)[A-Za-z0-9_]+$")


def kind_of(obj) -> str:
    """'base', 'variant' or 'artifact' for a registry object."""
    for kind, cls in KINDS.items():
        if isinstance(obj, cls):
            return kind
    raise TypeError(type(obj))


class Registry:
    """One registry: a database (SQLite by default) plus a blob store in the home folder."""

    def __init__(self, url: str | None = None, home: str | os.PathLike | None = None):
        self.home = Path(home) if home else default_home()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot use --home {self.home}: {e.strerror or e}") from None
        self.url = url or default_url(self.home)
        try:
            self.engine = make_engine(self.url)
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise UsageError(f"--db {_safe_url(self.url)}: not a database URL sqlalchemy can open "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        upgrade(self.engine, self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.blobs = BlobStore(self.home)

    @property
    def cache_dir(self) -> Path:
        """Scratch space for materialised folders and converted weights."""
        path = self.home / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def staging(self, purpose: str) -> Iterator[Path]:
        """A scratch folder in the cache for one command's files, removed when the block ends.

        Its name carries the writer's pid and host (``push-1234@host-…``), so that ``adapt gc``
        can remove the folders of processes that were killed before they could clean up."""
        with tempfile.TemporaryDirectory(dir=self.cache_dir,
                                         prefix=f"{purpose}-{os.getpid()}@{socket.gethostname()}-") as tmp:
            yield Path(tmp)

    def stale_staging(self) -> list[Path]:
        """Staging folders of dead writers on this host, and unnamed ones older than a day."""
        host, now, out = socket.gethostname(), time.time(), []
        for p in self.cache_dir.iterdir():
            m = _STAGING_RE.match(p.name)
            if m is not None:
                if m["host"] == host and not pid_alive(int(m["pid"])):
                    out.append(p)
            elif _LEGACY_STAGING_RE.match(p.name) and now - p.stat().st_mtime > STALE_AFTER_S:
                out.append(p)
        return sorted(out)

    def checkpoint_dir(self, key: str) -> Path:
        """``cache/checkpoints/<key>`` (created): what a training run keeps for ``--resume``."""
        path = self.cache_dir / "checkpoints" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def empty_checkpoints(self, in_use: set[str]) -> list[Path]:
        """Checkpoint folders that hold nothing (their run died before its first save), but ``in_use``.

        A folder with files is kept: ``--resume`` continues from it."""
        root = self.cache_dir / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir()
                      if p.is_dir() and str(p) not in in_use and not any(p.iterdir()))

    def remove_staging(self, paths: list[Path]) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error or interrupt."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()

    # ---- lookups ---------------------------------------------------------------------
    def resolve(self, s: Session, ref: str, kind: str | None = None):
        """Find an object by name (bases also by Hub id) or by id prefix.

        ``kind`` limits the search to 'base', 'variant' or 'artifact'. Unknown names raise
        ``NotFoundError`` listing the closest names; ambiguous ones a ``UsageError``.
        """
        kinds = [kind] if kind else list(KINDS)
        for k in kinds:
            cls = KINDS[k]
            obj = s.scalar(select(cls).where(cls.name == ref))
            if obj is None and cls is BaseModel:
                obj = s.scalar(select(cls).where(cls.hub_id == ref))
            if obj is not None:
                return obj
        matches = []
        if len(ref) >= MIN_ID_PREFIX and all(c in "0123456789abcdef" for c in ref):
            for k in kinds:
                matches += s.scalars(select(KINDS[k]).where(KINDS[k].id.startswith(ref))).all()
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UsageError(f"id prefix {ref!r} is ambiguous ({len(matches)} matches); give more characters")
        known = [n for k in kinds for n in s.scalars(select(KINDS[k].name))]
        raise NotFoundError(kind or "name", ref, known)

    def get(self, ref: str, kind: str | None = None):
        """``resolve`` in a session of its own; the object is detached but fully loaded."""
        with self.session() as s:
            return self.resolve(s, ref, kind)

    def find_base(self, s: Session, name: str) -> BaseModel | None:
        """A base by name or Hub id, or None."""
        return s.scalar(select(BaseModel).where(or_(BaseModel.name == name, BaseModel.hub_id == name)))

    # ---- lineage -------------------------------------------------------------------------
    def add_lineage(self, s: Session, parent, child, role: str) -> None:
        """Record that ``child`` derives from ``parent`` in the given role."""
        s.add(Lineage(parent_id=parent.id, parent_type=kind_of(parent),
                      child_id=child.id, child_type=kind_of(child), role=role))

    def parents(self, s: Session, obj) -> list[tuple[str, object]]:
        """[(role, parent object)] of ``obj``."""
        out = []
        for edge in s.scalars(select(Lineage).where(Lineage.child_id == obj.id).order_by(Lineage.id)):
            parent = s.get(KINDS[edge.parent_type], edge.parent_id)
            if parent is not None:
                out.append((edge.role, parent))
        return out

    def children(self, s: Session, obj) -> list[tuple[str, object]]:
        """[(role, child object)] that derive from ``obj`` (lineage, plus variants of a base)."""
        out = []
        for edge in s.scalars(select(Lineage).where(Lineage.parent_id == obj.id).order_by(Lineage.id)):
            child = s.get(KINDS[edge.child_type], edge.child_id)
            if child is not None:
                out.append((edge.role, child))
        seen = {c.id for _, c in out}
        if isinstance(obj, BaseModel):
            for v in s.scalars(select(Variant).where(Variant.base_id == obj.id)):
                if v.id not in seen:
                    out.append(("variant-of", v))
            for a in s.scalars(select(Artifact).where(Artifact.base_id == obj.id)):
                if a.id not in seen:
                    out.append(("adapter-of", a))
        if isinstance(obj, Variant):
            for a in s.scalars(select(Artifact).where(Artifact.variant_id == obj.id)):
                if a.id not in seen:
                    out.append(("targets", a))
        return out

    # ---- blobs -------------------------------------------------------------------------
    def referenced_digests(self) -> set[str]:
        """Every digest some row points at (a variant's rows list the base weight blobs it needs)."""
        refs: set[str] = set()
        with self.session() as s:
            for cls in KINDS.values():
                for files in s.scalars(select(cls.files)):
                    refs.update((files or {}).values())
        return refs

    def materialize(self, obj, dest: str | os.PathLike | None = None) -> Path:
        """Lay out an object's files in a folder (verified symlinks into the blob store)."""
        dest = Path(dest) if dest else self.cache_dir / "views" / obj.id
        return self.blobs.materialize(obj.files, dest)


def delete_object(reg: Registry, s: Session, obj, cascade: bool = False) -> list[str]:
    """Delete ``obj`` (and, with ``cascade``, everything deriving from it); returns names.

    Refuses while other objects derive from it unless ``cascade``. Blobs stay until ``gc``.
    """
    children = reg.children(s, obj)
    if children and not cascade:
        names = ", ".join(sorted({c.name for _, c in children})[:5])
        variants = [c for _, c in children if isinstance(c, Variant)]
        if isinstance(obj, BaseModel) and variants:
            raise UsageError(f"base {obj.name!r} is needed by {len(variants)} variant(s) stored over its weight blobs "
                             f"({names}); remove them first or use --cascade")
        raise UsageError(f"{obj.name!r} has {len(children)} derived object(s) ({names}); use --cascade")
    removed = []
    for _, child in children:
        if s.get(type(child), child.id) is not None:
            removed += delete_object(reg, s, child, cascade=True)
    for ev in s.scalars(select(Evaluation).where(or_(
            Evaluation.artifact_id == obj.id, Evaluation.variant_id == obj.id,
            Evaluation.prompt_id == obj.id, Evaluation.base_id == obj.id))):
        s.delete(ev)
    for edge in s.scalars(select(Lineage).where(or_(Lineage.parent_id == obj.id, Lineage.child_id == obj.id))):
        s.delete(edge)
    s.flush()
    s.delete(obj)
    s.flush()
    removed.append(obj.name)
    return removed


__all__ = ["Registry", "delete_object", "kind_of", "Run", "Evaluation"]
