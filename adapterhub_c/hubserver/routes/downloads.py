"""File downloads: ``/{repo}/resolve/{revision}/{path}`` with HEAD and single byte ranges."""
from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from adapterhub_c.hubserver.http import HubError, checked, content_disposition
from adapterhub_c.hubserver.state import Hub

router = APIRouter()
CHUNK = 1 << 16
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$", re.IGNORECASE)


def _range_number(digits: str, size: int) -> int:
    # more digits than any real offset has: "past the end" (int() of 5,000 digits raises)
    return size + 1 if len(digits) > 18 else int(digits)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range → inclusive (start, end); None if unsatisfiable."""
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = _range_number(m.group(2), size)
        if n == 0:
            return None
        return max(size - n, 0), size - 1
    start = _range_number(m.group(1), size)
    end = _range_number(m.group(2), size) if m.group(2) else size - 1
    end = min(end, size - 1)
    if start > end or start >= size:
        return None
    return start, end


def stream_file(blob: Path, start: int, length: int):
    """Yield ``length`` bytes of ``blob`` from ``start``, in chunks of at most CHUNK bytes."""
    sent = 0
    with open(blob, "rb") as f:
        f.seek(start)
        while sent < length:
            data = f.read(min(CHUNK, length - sent))
            if not data:
                break
            sent += len(data)
            yield data


def _byte_range(request: Request, headers: dict, size: int) -> tuple[int, int, int]:
    """(start, end inclusive, status) of the answer: the requested range (206) or the whole file (200)."""
    rng = request.headers.get("range")
    if not rng or request.method != "GET":
        return 0, size - 1, 200
    parsed = parse_range(rng, size)
    if parsed is None:
        raise HubError(416, f"Range not satisfiable: {rng[:100]}", None, {"Content-Range": f"bytes */{size}"})
    start, end = parsed
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return start, end, 206


@router.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve(ns: str, name: str, revision: str, path: str, request: Request, hub: Hub):
    """A file of the repo at ``revision`` (HEAD: its headers only)."""
    repo_id = checked(ns, name, revision, path)
    hub.readable(request, repo_id)
    commit = hub.store.resolve(repo_id, revision)
    entry = commit.files.get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
    headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry["sha256"]}"',
               "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
               "Content-Disposition": content_disposition(path.rsplit("/", 1)[-1])}
    start, end, status = _byte_range(request, headers, entry["size"])
    length = max(end - start + 1, 0)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers)
    blob = hub.store.blob_path(entry["sha256"])
    return StreamingResponse(stream_file(blob, start, length), status_code=status, headers=headers)


@router.api_route("/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_no_namespace(name: str, revision: str, path: str, request: Request):
    """Ids without a namespace are not found."""
    raise HubError(404, f"Repository not found: {name} (ids are namespace/name)", "RepoNotFound")
