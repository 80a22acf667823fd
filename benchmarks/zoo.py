"""The shared zoo of "community" task LoRAs on SmolLM2, served from a local Hub.

``benchmarks/make_zoo.py`` builds it; the convert, pack, merge and compose benchmarks
consume it exactly like a user pulling community LoRAs::

    from zoo import serve_zoo, pull_zoo          # benchmarks/ on sys.path
    with serve_zoo() as endpoint:
        names = pull_zoo(reg, endpoint, ["reverse-words", "uppercase"])   # {task: artefact name}

Layout of ``ZOO_DIR`` (``$ADAPTERHUB_ZOO``, default ``<repo>/benchmarks/.zoo``, git-ignored):

- ``hub/``: a local Hub store (served by ``adapterhub_c.hubserver``), one repo
  ``zoo/smollm2-135m-<task>`` per LoRA;
- ``home/``: the registry the zoo was trained in;
- ``zoo.json``: the manifest, rewritten atomically after each LoRA is pushed::

    {"base": "builtin:smollm2-135m",
     "loras": [{"task": "reverse-words", "data": "builtin:task/reverse-words",
                "repo": "zoo/smollm2-135m-reverse-words", "commit": "...", "steps": 150,
                "metrics": {...}}, ...]}
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The local hub speaks plain HTTP uploads/downloads only (no Xet storage).
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ZOO_DIR = Path(os.environ.get("ADAPTERHUB_ZOO", REPO_ROOT / "benchmarks" / ".zoo"))
MANIFEST = "zoo.json"


def manifest_path(zoo_dir: str | Path = ZOO_DIR) -> Path:
    """``<zoo_dir>/zoo.json``."""
    return Path(zoo_dir) / MANIFEST


def load_manifest(zoo_dir: str | Path = ZOO_DIR) -> dict:
    """The zoo manifest; a clear error if the zoo is not built yet."""
    path = manifest_path(zoo_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no zoo at {Path(zoo_dir)} (no {MANIFEST}); run python benchmarks/make_zoo.py")
    return json.loads(path.read_text())


def write_manifest(manifest: dict, zoo_dir: str | Path = ZOO_DIR) -> None:
    """Rewrite the manifest atomically (readers never see a half-written file)."""
    from adapterhub_c.fsutil import atomic_write_json

    Path(zoo_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path(zoo_dir), manifest)


@contextlib.contextmanager
def serve_zoo(zoo_dir: str | Path = ZOO_DIR) -> Iterator[str]:
    """Serve ``zoo_dir/hub`` on a random loopback port in a thread; yields the endpoint URL."""
    from adapterhub_c.hubserver.server import BackgroundServer

    root = Path(zoo_dir) / "hub"
    root.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(root, token=None) as srv:
        yield srv.endpoint


def pull_zoo(reg, endpoint: str, tasks: Sequence[str] | None = None,
             zoo_dir: str | Path = ZOO_DIR) -> dict[str, str]:
    """Pull the zoo LoRAs of ``tasks`` (default: all in the manifest) into ``reg``.

    Registers the zoo's base (a built-in) first when it is missing, so the pulled LoRAs
    attach to it. Idempotent: a LoRA already pulled (same repo@commit) is reused.
    Returns ``{task: artefact name}``.
    """
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.pull import pull_adapter

    manifest = load_manifest(zoo_dir)
    by_task = {entry["task"]: entry for entry in manifest.get("loras", [])}
    wanted = list(tasks) if tasks is not None else list(by_task)
    missing = [t for t in wanted if t not in by_task]
    if missing:
        raise KeyError(f"zoo has no LoRA for {missing} (has {sorted(by_task)}); "
                       "run python benchmarks/make_zoo.py or wait for it to finish")
    add_builtin_base(reg, manifest["base"])
    out = {}
    for task in wanted:
        entry = by_task[task]
        # main, not the manifest's commit: the artefact is then named plainly after the repo
        art, _ = pull_adapter(reg, entry["repo"], endpoint=endpoint)
        out[task] = art.name
    return out


__all__ = ["ZOO_DIR", "load_manifest", "write_manifest", "serve_zoo", "pull_zoo", "manifest_path"]
