"""Registry operations on bases: add a built-in base (Hub bases: see ``hub``)."""
from __future__ import annotations

from pathlib import Path

from adapterhub_c.errors import NotFoundError
from adapterhub_c.models.builtin import BUILTINS, builtin_for
from adapterhub_c.models.weights import count_params
from adapterhub_c.registry.models import BaseModel
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry


def _describe_folder(folder: Path) -> dict:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    return {"architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0], "config": cfg}


def register_base_folder(reg: Registry, name: str, folder: Path, hub_id: str | None, revision: str | None,
                         commit_sha: str | None, run_id: str | None) -> tuple[BaseModel, bool]:
    """Store a folder of HF files as blobs, then register (or complete) the base row."""
    files = reg.blobs.put_folder(folder)
    info = _describe_folder(folder)
    params = count_params(folder)
    size = sum((folder / p).stat().st_size for p in files)
    with reg.session() as s:
        base = s.query(BaseModel).filter_by(name=name).one_or_none()
        created = base is None or base.is_reference
        if base is None:
            base = BaseModel(name=name)
            s.add(base)
        base.hub_id, base.revision, base.commit_sha = hub_id, revision, commit_sha
        base.architecture, base.config, base.params = info["architecture"], info["config"], params
        base.files, base.size_bytes, base.run_id = files, size, run_id
        s.flush()
        return base, created


def add_builtin_base(reg: Registry, name: str, progress=None) -> tuple[BaseModel, bool]:
    """Register a built-in base (idempotent); returns (base, whether it was added now)."""
    builtin = builtin_for(name)
    if builtin is None:
        raise NotFoundError("built-in base", name, BUILTINS)
    with reg.session() as s:
        existing = s.query(BaseModel).filter_by(name=builtin.name).one_or_none()
        if existing is not None and not existing.is_reference:
            return existing, False
    with record_run(reg, "base add", {"name": builtin.name}) as run:
        if progress:
            progress(f"building {builtin.name}", 0, 1)
        with reg.staging("base") as tmp:
            builtin.export(Path(tmp))
            base, created = register_base_folder(reg, builtin.name, Path(tmp), builtin.hub_id, None, None, run.id)
        run.output = {"base": base.name, "id": base.id, "params": base.params}
        if progress:
            progress(f"building {builtin.name}", 1, 1)
        return base, created
