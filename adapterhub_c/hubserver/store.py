"""On-disk storage for the local Hub server: repos, commits, refs and content-addressed blobs.

Layout under ``root``::

    blobs/sha256/ab/abcd…            file contents, stored once whatever the repo
    repos/<namespace>/<name>/
        repo.json                    {"id", "private", "created_at"}
        refs.json                    {"main": "<commit sha>", …}
        commits/<sha>.json           {"id", "parent", "message", "description", "timestamp",
                                      "files": {path: {"sha256", "size", "oid"}}}

A commit id is the SHA-1 of the commit's canonical JSON (parent, message, timestamp, manifest),
so it is a 40-hex string like a git commit. ``oid`` is the git blob id (SHA-1 of
``blob <size>\\0<content>``), which the Hub reports for regular files and the client compares
to skip unchanged files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapterhub_c.fsutil import atomic_write_bytes, atomic_write_json
from adapterhub_c.hub.names import BadName, git_blob_oid, valid_name_part  # noqa: F401  (re-exported)
from adapterhub_c.hub.names import check_repo_id as _check_repo_id_name
from adapterhub_c.hub.names import shown as _shown

DEFAULT_BRANCH = "main"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_PREFIX_RE = re.compile(r"^[0-9a-f]{7,39}$")
# control characters, and lone surrogates (valid in JSON strings, not in UTF-8 file names)
_UNSAFE_CHAR_RE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \, "..", "@{" or "//".
_BAD_REF_RE = re.compile(r"[\x00-\x20\x7f\ud800-\udfff~^:?*\[\\]|\.\.|@\{|//")
# Path limits are ours (the Hub documents none): a component must fit NAME_MAX so that a
# pull can write it, and the whole path leaves room under PATH_MAX for the cache prefix.
MAX_PATH_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 1024
MAX_REVISION_BYTES = 255
# Files the real Hub would store with Git LFS; we report LFS metadata (sha256) for them.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf", ".onnx", ".h5",
                ".msgpack", ".npz", ".npy", ".zip", ".tar", ".gz", ".pack")
LFS_MIN_SIZE = 10 * 1024 * 1024


class StoreError(Exception):
    """Base class: ``code`` is the Hub's X-Error-Code, ``status`` the HTTP status."""

    code = "Error"
    status = 400


class RepoNotFound(StoreError):
    code, status = "RepoNotFound", 404


class RevisionNotFound(StoreError):
    code, status = "RevisionNotFound", 404


class EntryNotFound(StoreError):
    code, status = "EntryNotFound", 404


class RepoExists(StoreError):
    code, status = "RepoExists", 409


class BadPath(StoreError):
    code, status = "BadRequest", 400


class Conflict(StoreError):
    code, status = "Conflict", 412


def is_lfs(path: str, size: int) -> bool:
    """Whether the real Hub would keep ``path`` in LFS (binary weights, or large files)."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def check_repo_path(path: str) -> str:
    """Validate a file path inside a repo; refuses absolute paths, ``..``, ``.git``, empty parts,
    control characters and names longer than the limits above."""
    if not isinstance(path, str) or not path or "\\" in path or _UNSAFE_CHAR_RE.search(path):
        raise BadPath(f"invalid file path {_shown(path)}")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise BadPath(f"file path {_shown(path)} is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise BadPath(f"absolute file path {path!r} is not allowed")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadPath(f"file path {path!r} has an empty, '.' or '..' component")
    if parts[0] == ".git":
        raise BadPath(f"file path {path!r} is inside .git")
    if any(len(p.encode()) > MAX_PATH_COMPONENT_BYTES for p in parts):
        raise BadPath(f"file path {_shown(path)} has a component longer than "
                      f"{MAX_PATH_COMPONENT_BYTES} bytes")
    return path


def check_repo_id(repo_id: str) -> tuple[str, str]:
    """Split ``namespace/name`` and validate both parts (BadPath if either is invalid)."""
    try:
        return _check_repo_id_name(repo_id)
    except BadName as e:
        raise BadPath(str(e)) from None


def check_revision(revision: str) -> str:
    """Validate a revision (a branch name or a commit sha) as git would a ref name."""
    if (not isinstance(revision, str) or not revision
            or len(revision.encode()) > MAX_REVISION_BYTES
            or _BAD_REF_RE.search(revision) or revision.startswith(("/", "-"))
            or revision.endswith(("/", ".", ".lock"))):
        raise BadPath(f"invalid revision {_shown(revision)}")
    return revision


@dataclass
class Commit:
    """One commit: its id, parent, message, time and full manifest (path → file entry)."""

    id: str
    parent: str | None
    message: str
    description: str
    timestamp: float
    files: dict[str, dict]

    def to_json(self) -> dict:
        return {"id": self.id, "parent": self.parent, "message": self.message,
                "description": self.description, "timestamp": self.timestamp, "files": self.files}


class RepoStore:
    """Repos with commit histories under one root folder; safe to share between threads."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # ---- blobs ------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> dict:
        """Store ``data`` once (content-addressed); returns its file entry (sha256, size, oid)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write_bytes(path, data)
        return {"sha256": digest, "size": len(data), "oid": git_blob_oid(data)}

    def has_blob(self, sha256: str) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{64}", sha256 or "")) and self.blob_path(sha256).is_file()

    # ---- repos ------------------------------------------------------------------
    def _repo_dir(self, repo_id: str) -> Path:
        ns, name = check_repo_id(repo_id)
        return self.root / "repos" / ns / name

    def exists(self, repo_id: str) -> bool:
        try:
            return (self._repo_dir(repo_id) / "repo.json").is_file()
        except BadPath:
            return False

    def repo_meta(self, repo_id: str) -> dict:
        """The repo's metadata (id, private, created_at); RepoNotFound if absent."""
        try:
            path = self._repo_dir(repo_id) / "repo.json"
        except BadPath:
            raise RepoNotFound(f"repository {repo_id!r} not found") from None
        if not path.is_file():
            raise RepoNotFound(f"repository {repo_id!r} not found")
        return json.loads(path.read_text())

    def list_repos(self) -> list[str]:
        out = []
        base = self.root / "repos"
        for ns in sorted(p for p in base.iterdir() if p.is_dir()):
            for repo in sorted(p for p in ns.iterdir() if p.is_dir()):
                if (repo / "repo.json").is_file():
                    out.append(f"{ns.name}/{repo.name}")
        return out

    def create_repo(self, repo_id: str, private: bool = False) -> dict:
        """Create an empty repo with an initial commit; RepoExists if it is already there."""
        with self._lock:
            d = self._repo_dir(repo_id)
            if (d / "repo.json").is_file():
                raise RepoExists(f"You already created this model repo: {repo_id}")
            (d / "commits").mkdir(parents=True, exist_ok=True)
            meta = {"id": repo_id, "private": bool(private), "created_at": time.time()}
            initial = self._make_commit(None, "initial commit", "", {})
            self._write_commit(d, initial)
            atomic_write_json(d / "refs.json", {DEFAULT_BRANCH: initial.id})
            atomic_write_json(d / "repo.json", meta)
            return meta

    def delete_repo(self, repo_id: str) -> None:
        """Delete a repo (its blobs stay: they may be shared)."""
        with self._lock:
            self.repo_meta(repo_id)
            d = self._repo_dir(repo_id)
            tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.deleted."))
            os.replace(d, tmp / d.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def set_private(self, repo_id: str, private: bool) -> None:
        with self._lock:
            meta = self.repo_meta(repo_id)
            meta["private"] = bool(private)
            atomic_write_json(self._repo_dir(repo_id) / "repo.json", meta)

    # ---- refs and commits ---------------------------------------------------------
    def refs(self, repo_id: str) -> dict[str, str]:
        self.repo_meta(repo_id)
        return json.loads((self._repo_dir(repo_id) / "refs.json").read_text())

    def get_commit(self, repo_id: str, sha: str) -> Commit:
        path = self._repo_dir(repo_id) / "commits" / f"{sha}.json"
        if not _SHA_RE.match(sha) or not path.is_file():
            raise RevisionNotFound(f"Invalid rev id: {sha}")
        return Commit(**json.loads(path.read_text()))

    def resolve(self, repo_id: str, revision: str | None) -> Commit:
        """A branch name, a full commit sha or a unique sha prefix (7+ hex) → the commit."""
        revision = revision or DEFAULT_BRANCH
        refs = self.refs(repo_id)
        if revision in refs:
            return self.get_commit(repo_id, refs[revision])
        if _SHA_RE.match(revision):
            return self.get_commit(repo_id, revision)
        if _PREFIX_RE.match(revision):
            commits = self._repo_dir(repo_id) / "commits"
            matches = [p.stem for p in commits.glob(f"{revision}*.json")]
            if len(matches) == 1:
                return self.get_commit(repo_id, matches[0])
        raise RevisionNotFound(f"Invalid rev id: {revision}")

    def history(self, repo_id: str, revision: str | None = None) -> list[Commit]:
        """Commits from ``revision`` back to the first one, newest first."""
        out, commit = [], self.resolve(repo_id, revision)
        while True:
            out.append(commit)
            if commit.parent is None:
                return out
            commit = self.get_commit(repo_id, commit.parent)

    def commit(self, repo_id: str, *, message: str, description: str = "",
               add: dict[str, bytes | dict] | None = None, delete: list[str] = (),
               delete_folders: list[str] = (), branch: str = DEFAULT_BRANCH,
               parent_commit: str | None = None, check_paths: bool = True) -> tuple[Commit, bool]:
        """Apply additions and deletions on top of ``branch``; returns (commit, created).

        ``add`` maps a path to its bytes, or to a file entry of a blob already stored.
        When the resulting manifest equals the parent's, no commit is made and the
        parent is returned with ``created=False``. ``check_paths=False`` lets tests plant
        paths that the HTTP API refuses.
        """
        add = add or {}
        if check_paths:
            for p in list(add) + list(delete) + list(delete_folders):
                check_repo_path(p.rstrip("/") if p in delete_folders else p)
        entries = {p: (v if isinstance(v, dict) else self.put_blob(v)) for p, v in add.items()}
        with self._lock:
            d = self._repo_dir(repo_id)
            refs = self.refs(repo_id)
            if branch not in refs:
                raise RevisionNotFound(f"Invalid rev id: {branch}")
            head = self.get_commit(repo_id, refs[branch])
            if parent_commit is not None and parent_commit != head.id:
                raise Conflict(f"A commit has happened since {parent_commit}; head is {head.id}")
            files = dict(head.files)
            for p in delete:
                if p not in files:
                    raise EntryNotFound(f"A file with this name doesn't exist: {p}")
                del files[p]
            for folder in delete_folders:
                prefix = folder.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise EntryNotFound(f"A folder with this name doesn't exist: {folder}")
                for p in gone:
                    del files[p]
            files.update(entries)
            if files == head.files:
                return head, False
            new = self._make_commit(head.id, message, description, files)
            self._write_commit(d, new)
            refs[branch] = new.id
            atomic_write_json(d / "refs.json", refs)
            return new, True

    def _make_commit(self, parent, message, description, files) -> Commit:
        ts = time.time()
        body = json.dumps({"parent": parent, "message": message, "description": description,
                           "timestamp": ts, "files": files}, sort_keys=True).encode()
        return Commit(hashlib.sha1(body).hexdigest(), parent, message, description, ts, files)

    @staticmethod
    def _write_commit(d: Path, commit: Commit) -> None:
        atomic_write_json(d / "commits" / f"{commit.id}.json", commit.to_json())

    # ---- reading files ------------------------------------------------------------
    def read(self, entry: dict, max_bytes: int | None = None) -> bytes:
        """The file's bytes; only the first ``max_bytes`` of them when given."""
        if max_bytes is None:
            return self.blob_path(entry["sha256"]).read_bytes()
        with open(self.blob_path(entry["sha256"]), "rb") as f:
            return f.read(max_bytes)

    @staticmethod
    def tree(commit: Commit, path: str = "", recursive: bool = False) -> list[dict]:
        """Tree entries under ``path`` at ``commit`` (files and, unless recursive-only, folders)."""
        prefix = path.strip("/")
        prefix = prefix + "/" if prefix else ""
        if prefix and prefix.rstrip("/") in commit.files:
            raise EntryNotFound(f"{path} is a file, not a folder")
        out: dict[str, dict] = {}
        for p, e in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            # folders on the way
            for i in range(1, len(parts)):
                if not recursive and i > 1:
                    break
                folder = prefix + "/".join(parts[:i])
                out.setdefault(folder, {"type": "directory", "path": folder})
            if recursive or len(parts) == 1:
                out[p] = file_entry_json(p, e)
        if prefix and not out:
            raise EntryNotFound(f"{path} does not exist")
        for entry in out.values():
            if entry["type"] == "directory":
                inner = sorted((p, e["oid"]) for p, e in commit.files.items()
                               if p.startswith(entry["path"] + "/"))
                entry["oid"] = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
                entry["size"] = 0
        return list(out.values())


def file_entry_json(path: str, entry: dict) -> dict:
    """A file as the Hub's tree / paths-info APIs describe it."""
    out = {"type": "file", "path": path, "oid": entry["oid"], "size": entry["size"]}
    if is_lfs(path, entry["size"]):
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
    return out
