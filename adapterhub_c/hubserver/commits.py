"""Request bodies that touch repo contents: the ndjson commit payload and paths-info.

Both run off the event loop (they parse and hash whole files); every malformed line or
path is a 400 naming it, and so is a README.md whose metadata no answer could carry
(broken YAML, ``.nan``, ``!!binary``: :func:`~adapterhub_c.hubserver.cardcache.readme_problem`).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from adapterhub_c.hub.names import git_blob_oid
from adapterhub_c.hubserver.cardcache import CARD_MAX_BYTES, README, readme_problem
from adapterhub_c.hubserver.http import bad_request, json_object, list_of, optional
from adapterhub_c.hubserver.store import RepoStore, check_repo_path, file_entry_json


@dataclass
class CommitOps:
    """What one commit payload asks for."""

    header: dict = field(default_factory=dict)
    add: dict = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    delete_folders: list[str] = field(default_factory=list)


def apply_commit(store: RepoStore, repo_id: str, branch: str, raw: bytes):
    """Parse an ndjson commit payload and apply it to ``branch``; returns the commit."""
    ops = parse_commit_body(raw, store)
    _check_readme(ops, store)
    commit, _created = store.commit(
        repo_id, message=ops.header.get("summary") or "update", branch=branch,
        description=ops.header.get("description") or "", add=ops.add, delete=ops.delete,
        delete_folders=ops.delete_folders, parent_commit=ops.header.get("parentCommit"))
    return commit


def _check_readme(ops: CommitOps, store: RepoStore) -> None:
    """400 if the commit adds a README.md whose front matter is broken or not JSON-safe."""
    added = ops.add.get(README)
    if added is None:
        return
    data = store.read(added, max_bytes=CARD_MAX_BYTES) if isinstance(added, dict) else added
    problem = readme_problem(data)
    if problem:
        raise bad_request(problem)


def parse_commit_body(raw: bytes, store: RepoStore) -> CommitOps:
    """Parse the ndjson commit payload (400 on the first bad line)."""
    ops = CommitOps()
    for n, line in _ndjson_lines(raw):
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise bad_request(f"commit payload line {n} is not a valid operation") from None
        if not isinstance(value, dict):
            raise bad_request(f"commit payload line {n}: the value must be an object")
        handler = _OPERATIONS.get(key) if isinstance(key, str) else None
        if handler is None:
            raise bad_request(f"commit payload line {n}: unknown operation {str(key)[:64]!r}")
        handler(ops, value, store)
    if not ops.header:
        raise bad_request("commit payload has no header line")
    return ops


def _ndjson_lines(raw: bytes):
    """(line number, line) for each non-blank line of ``raw``, copying one line at a time."""
    start, n = 0, 0
    while start < len(raw):
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        n += 1
        line = raw[start:end]
        start = end + 1
        if line.strip():
            yield n, line


def _header(ops: CommitOps, value: dict, store: RepoStore) -> None:
    for key in ("summary", "description", "parentCommit"):
        optional(value, key, str)
    ops.header = value


def _regular_file(ops: CommitOps, value: dict, store: RepoStore) -> None:
    path = check_repo_path(value.get("path"))
    if value.get("encoding", "base64") != "base64":
        raise bad_request(f"{path}: unsupported encoding {str(value.get('encoding'))[:40]!r}")
    content = value.get("content", "")
    if not isinstance(content, str):
        raise bad_request(f"{path}: content must be a base64 string")
    try:
        ops.add[path] = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{path}: content is not valid base64") from None


def _lfs_file(ops: CommitOps, value: dict, store: RepoStore) -> None:
    path = check_repo_path(value.get("path"))
    oid = value.get("oid", "")
    if not isinstance(oid, str) or not store.has_blob(oid):
        raise bad_request(f"{path}: LFS object {str(oid)[:64]} was never uploaded "
                          "(this server only accepts regular uploads)")
    blob = store.blob_path(oid)
    ops.add[path] = {"sha256": oid, "size": blob.stat().st_size, "oid": git_blob_oid(blob.read_bytes())}


def _deleted_file(ops: CommitOps, value: dict, store: RepoStore) -> None:
    ops.delete.append(check_repo_path(value.get("path")))


def _deleted_folder(ops: CommitOps, value: dict, store: RepoStore) -> None:
    folder = value.get("path")
    ops.delete_folders.append(check_repo_path(folder.rstrip("/") if isinstance(folder, str) else folder))


_OPERATIONS = {"header": _header, "file": _regular_file, "lfsFile": _lfs_file,
               "deletedFile": _deleted_file, "deletedFolder": _deleted_folder}


# ---- paths-info ---------------------------------------------------------------------------------
def requested_paths(raw: bytes, is_json: bool) -> list[str]:
    """The ``paths`` of a paths-info body (JSON or form-encoded), each a valid repo path."""
    if is_json:
        paths = list_of(json_object(raw), "paths", str)
    else:
        try:
            paths = parse_qs(raw.decode("utf-8"), errors="strict").get("paths", [])
        except ValueError:
            raise bad_request("the form body is not valid UTF-8") from None
    return [check_repo_path(p.strip("/")) for p in paths]


def paths_info(store: RepoStore, commit, raw: bytes, is_json: bool) -> list[dict]:
    """The paths-info answer: an entry for each requested path that is a file or a folder."""
    out, folders = [], None
    for p in requested_paths(raw, is_json):
        if p in commit.files:
            out.append(file_entry_json(p, commit.files[p]))
            continue
        if folders is None:  # once per request, however many paths are asked for
            folders = {e["path"]: e for e in store.tree(commit, "", recursive=True)
                       if e["type"] == "directory"}
        if p in folders:
            out.append(folders[p])
    return out
