"""What the pull and push workflows share: repo ids, hub labels, file digests, pickle loading, staging."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from adapterhub_c.errors import UsageError
from adapterhub_c.hub.names import BadName, check_repo_id, shown
from adapterhub_c.registry.models import BaseModel

META_NAME = "adapterhub_c.json"
CARD_NAME = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def split_repo(repo: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → (``owner/name``, ``rev``); ``revision`` must agree with ``@rev``."""
    repo = (repo or "").strip()
    if "://" in repo:  # split at its "@", a URL's password would reach messages as a "revision"
        raise UsageError(f"{shown(repo)} is a URL; give a hub repo id such as owner/name[@revision] "
                         "(HF_ENDPOINT names the server)")
    repo_id, at, rev = repo.partition("@")
    if not repo_id:
        raise UsageError("give a hub repo id such as owner/name[@revision]")
    if at and not rev:
        raise UsageError(f"{shown(repo)}: empty revision after '@'")
    if rev and revision and rev != revision:
        raise UsageError(f"{shown(repo)} names revision {shown(rev)} but --revision says {shown(revision)}")
    return repo_id, (rev or revision or None)


def checked_repo_id(repo_id: str) -> str:
    """``repo_id`` stripped and checked against the Hub's rules (UsageError if it breaks them)."""
    repo_id = (repo_id or "").strip()
    try:
        check_repo_id(repo_id)
    except BadName as e:
        raise UsageError(str(e)) from None
    return repo_id


def hub_label(base: BaseModel) -> str:
    """The base's name on the Hub (its hub id; the registry name for bases that have none)."""
    return base.hub_id or base.name


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def listing(folder: Path) -> list[dict]:
    """[{path, size, sha256}] of every file under ``folder``, sorted by path."""
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def relabel(message: str, folder: Path, label: str) -> str:
    """``message`` with the staging ``folder`` replaced by what the user knows (``repo@sha``)."""
    return message.replace(str(folder), label)


def load_pickle_tensors(path: Path, what: str) -> dict:
    """Tensors of a pickle file via torch's restricted ``weights_only`` loader (opt-in only)."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"{what}: cannot read pickle weights {path.name} with the safe loader "
                         f"({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what}: {path.name} is not a flat dict of tensors")
    # safetensors refuses shared storage; clone so tied tensors are written separately
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def stage_links(src: Path, names: Iterable[str], dest: Path) -> None:
    """Link ``names`` from ``src`` into ``dest`` (symlinks; the blob store copies content)."""
    for rel in names:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((src / rel).resolve(), target)
