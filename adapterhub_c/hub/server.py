"""A local Hub-compatible server (FastAPI + uvicorn) that the real ``huggingface_hub`` client talks to.

It implements the part of the Hub HTTP API that ``huggingface_hub`` uses for downloads,
uploads (``uploadMode: regular``, so no LFS/Xet storage is needed), repo management and
model search. Repos live under ``root`` (see :mod:`adapterhub_c.hub.store`).

Authentication: when a token is set, writes need ``Authorization: Bearer <token>`` and
private repos are visible only with it; public reads need nothing. Tokens are never logged.

Hostile input: repo ids, revisions and paths from URLs are validated before any handler uses
them, request bodies are bounded (``max_body_bytes`` for JSON, ``max_upload_bytes`` for
commits, which carry file contents) and parsed off the event loop, and every malformed request
gets a 4xx with the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers. Nothing taken from a
request is put into a header unescaped.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub_c.httpserve import ThreadedServer, bind, endpoint_of, serve_forever
from adapterhub_c.hub.cards import card_tags, parse_front_matter
from adapterhub_c.hub.faults import FaultInjector
from adapterhub_c.hub.store import (
    DEFAULT_BRANCH,
    BadPath,
    RepoStore,
    StoreError,
    check_repo_id,
    check_repo_path,
    check_revision,
    file_entry_json,
    git_blob_oid,
)

DEFAULT_USER = "local"
_CHUNK = 1 << 16
# JSON bodies (create, settings, preupload, paths-info, validate-yaml) are metadata: a
# preupload batch of 256 files is ~200 KB. Commits carry whole files base64-encoded (this
# server offers no LFS storage) and are held in memory while parsed: up to ~4x the body for
# one large file (the body, that line, its JSON string and the decoded bytes).
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30
CARD_MAX_BYTES = 1 << 20            # README bytes read for card metadata / validate-yaml
# An oversized body is read on and dropped (up to these bounds) before the 413 goes out: a
# server that closes with unread bytes in its socket sends a TCP reset, which can destroy
# the 413 before the client (still uploading) reads it. Past the bounds: answer and close.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 5.0
_CARD_CACHE_SIZE = 1024
_COMMIT_ROUTE_RE = re.compile(r"^/api/models/[^/]+/[^/]+/commit/")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NOT_HEADER_SAFE_RE = re.compile(r"[^\x20-\x7e]")


class HubError(Exception):
    """An HTTP error answer with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _bad_request(message: str) -> HubError:
    return HubError(400, message, "BadRequest")


def _too_large(limit: int, drained: bool) -> HubError:
    # without the whole body read, Connection: close (the unread rest is not a next request)
    return HubError(413, f"request body larger than {limit} bytes", "PayloadTooLarge",
                    None if drained else {"Connection": "close"})


async def _drain(chunks, already: int = 0) -> bool:
    """Read and drop the rest of a request body within DRAIN_MAX_BYTES / DRAIN_MAX_S; True if it ended."""
    deadline = time.monotonic() + DRAIN_MAX_S
    size = already
    async for chunk in chunks:
        size += len(chunk)
        if size > DRAIN_MAX_BYTES or time.monotonic() > deadline:
            return False
    return True


def _header_safe(text: str, limit: int = 500) -> str:
    """``text`` as printable ASCII for a header value: newlines become spaces, any other
    character outside printable ASCII is escaped (``\\r``, ``\\x00``, ``\\u65e5``)."""
    text = text[:limit].replace("\n", " ")
    return _NOT_HEADER_SAFE_RE.sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text)[:limit]


def _content_disposition(filename: str) -> str:
    """An attachment header naming ``filename``: an ASCII fallback and the RFC 5987 UTF-8 form."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _error_response(status: int, message: str, code: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    h = {"X-Error-Message": _header_safe(message)}
    if code:
        h["X-Error-Code"] = code
    h.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=h)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubApp:
    """Request handlers bound to one store, token and fault injector."""

    def __init__(self, root: Path, token: str | None, user: str = DEFAULT_USER,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.store = RepoStore(root)
        self._token = token
        self.user = user
        self.faults = FaultInjector()
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self._cards: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._cards_lock = threading.Lock()

    def body_limit(self, method: str, path: str) -> int:
        """The most bytes a request body may have: commits carry file contents, the rest is JSON."""
        if method == "POST" and _COMMIT_ROUTE_RE.match(path):
            return self.max_upload_bytes
        return self.max_body_bytes

    # ---- auth -----------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return bool(given) and hmac.compare_digest(given.encode(), self._token.encode())

    def require_write(self, request: Request) -> None:
        if not self.authorized(request):
            raise HubError(401, "Invalid credentials in Authorization header")

    def readable(self, request: Request, repo_id: str) -> dict:
        """The repo's metadata if the caller may read it; RepoNotFound (401/404) otherwise."""
        try:
            meta = self.store.repo_meta(repo_id)
        except StoreError as e:
            raise HubError(401 if not self.authorized(request) else 404,
                           f"Repository not found: {repo_id}", "RepoNotFound") from e
        if meta.get("private") and not self.authorized(request):
            raise HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return meta

    # ---- helpers ----------------------------------------------------------------
    def card_data(self, repo_id: str, commit) -> dict:
        """The README front matter at ``commit`` ({} if none or invalid), parsed once per commit."""
        key = (repo_id, commit.id)
        with self._cards_lock:
            if key in self._cards:
                self._cards.move_to_end(key)
                return self._cards[key]
        data = self._parse_card(commit)
        with self._cards_lock:
            self._cards[key] = data
            while len(self._cards) > _CARD_CACHE_SIZE:
                self._cards.popitem(last=False)
        return data

    def _parse_card(self, commit) -> dict:
        entry = commit.files.get("README.md")
        if entry is None:
            return {}
        try:
            text = self.store.read(entry, max_bytes=CARD_MAX_BYTES).decode("utf-8", "replace")
            return parse_front_matter(text)
        except Exception:  # a broken card has no metadata; it must not break listings
            return {}

    def model_json(self, repo_id: str, meta: dict, commit, blobs: bool = False,
                   siblings: bool = True, card: bool = True) -> dict:
        data = self.card_data(repo_id, commit)
        out = {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.id, "private": bool(meta.get("private")), "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": card_tags(data),
            "library_name": data.get("library_name"), "pipeline_tag": data.get("pipeline_tag"),
            "lastModified": _iso(commit.timestamp), "createdAt": _iso(meta["created_at"]),
        }
        if card:
            out["cardData"] = data
        if siblings:
            sib = []
            for path, e in sorted(commit.files.items()):
                item = {"rfilename": path}
                if blobs:
                    item.update(size=e["size"], blobId=e["oid"])
                    lfs = file_entry_json(path, e).get("lfs")
                    if lfs:
                        item["lfs"] = {"size": e["size"], "sha256": e["sha256"], "pointerSize": 134}
                sib.append(item)
            out["siblings"] = sib
        return out


def create_app(root: str | Path, token: str | None = None, user: str = DEFAULT_USER,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> FastAPI:
    """The Hub-compatible ASGI app serving the repos stored under ``root``.

    ``app.state.hub`` is the :class:`HubApp` (store, user); ``app.state.faults`` is a
    :class:`~adapterhub_c.hub.faults.FaultInjector` that tests may arm in-process.
    Request bodies over ``max_upload_bytes`` (commits) or ``max_body_bytes`` (every other
    endpoint) are refused with 413.
    """
    hub = HubApp(Path(root), token, user, max_body_bytes=max_body_bytes,
                 max_upload_bytes=max_upload_bytes)
    app = FastAPI(title="adapterhub-c local hub", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.hub = hub
    app.state.faults = hub.faults
    store = hub.store

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, exc: HubError):
        return _error_response(exc.status, exc.message, exc.code, exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return _error_response(exc.status, str(exc), exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))

    @app.middleware("http")
    async def _inject_status_faults(request: Request, call_next):
        fault = hub.faults.take(("status",), request.method, request.url.path)
        if fault is not None:
            return _error_response(fault.status, f"injected fault: HTTP {fault.status}")
        return await call_next(request)

    @app.middleware("http")
    async def _edge_checks(request: Request, call_next):
        # registered last, so it runs first: nothing else sees these requests
        if _CONTROL_RE.search(request.scope["path"]):
            return _error_response(400, "control characters are not allowed in URLs",
                                   "BadRequest")
        declared = request.headers.get("content-length", "")
        limit = hub.body_limit(request.method, request.scope["path"])
        if declared.isdigit() and (len(declared) > 19 or int(declared) > limit):
            drained = int(declared) <= DRAIN_MAX_BYTES and await _drain(request.stream())
            exc = _too_large(limit, drained)
            return _error_response(exc.status, exc.message, exc.code, exc.headers)
        return await call_next(request)

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # ---- account ------------------------------------------------------------------
    @app.get("/api/whoami-v2")
    def whoami(request: Request):
        if hub._token is not None and not hub.authorized(request):
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "id": hub.user, "name": hub.user, "fullname": hub.user,
                "email": None, "emailVerified": False, "isPro": False, "orgs": [],
                "auth": {"type": "access_token",
                         "accessToken": {"displayName": "local", "role": "write"}}}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        body = await _json_body(request, hub.max_body_bytes)
        content = _optional(body, "content", str) or ""
        if len(content) > CARD_MAX_BYTES:
            raise _bad_request(f"content is longer than {CARD_MAX_BYTES} characters")
        problem = await run_in_threadpool(_yaml_problem, content)
        if problem:
            return JSONResponse({"errors": [{"message": problem}], "warnings": []},
                                status_code=400, headers={"X-Error-Message": _header_safe(problem)})
        return {"errors": [], "warnings": []}

    # ---- repos ----------------------------------------------------------------------
    def _repo_id_from_body(body: dict) -> str:
        if body.get("type") not in (None, "model"):
            raise _bad_request("only model repos are supported by this server")
        name = _optional(body, "name", str) or ""
        org = _optional(body, "organization", str) or hub.user
        repo_id = f"{org}/{name}"
        check_repo_id(repo_id)
        return repo_id

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        hub.require_write(request)
        body = await _json_body(request, hub.max_body_bytes)
        repo_id = _repo_id_from_body(body)
        private = _visibility(body)
        url = f"{base_url(request)}/{repo_id}"
        if store.exists(repo_id):
            return JSONResponse({"error": "You already created this model repo", "url": url},
                                status_code=409,
                                headers={"X-Error-Message": "You already created this model repo"})
        store.create_repo(repo_id, private=bool(private))
        return {"url": url, "name": repo_id, "id": repo_id}

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        hub.require_write(request)
        repo_id = _repo_id_from_body(await _json_body(request, hub.max_body_bytes))
        store.delete_repo(repo_id)
        return Response(status_code=200)

    @app.put("/api/models/{ns}/{name}/settings")
    async def repo_settings(ns: str, name: str, request: Request):
        hub.require_write(request)
        repo_id = _checked(ns, name)
        hub.readable(request, repo_id)
        private = _visibility(await _json_body(request, hub.max_body_bytes))
        if private is not None:
            store.set_private(repo_id, bool(private))
        return {}

    # ---- listing -----------------------------------------------------------------------
    @app.get("/api/models")
    def list_models(request: Request):
        q = request.query_params
        filters = q.getlist("filter")
        search = (q.get("search") or "").lower()
        author = q.get("author")
        try:
            limit = int(q.get("limit") or 1000)
        except ValueError:
            raise _bad_request(f"invalid limit {q.get('limit')[:40]!r}") from None
        with_card = q.get("cardData") in ("true", "True", "1") or q.get("full") in ("true", "True", "1")
        full = q.get("full") in ("true", "True", "1")
        out = []
        for repo_id in store.list_repos():
            try:
                meta = store.repo_meta(repo_id)
                commit = store.resolve(repo_id, DEFAULT_BRANCH)
            except StoreError:
                continue
            if meta.get("private") and not hub.authorized(request):
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            if search and search not in repo_id.lower():
                continue
            item = hub.model_json(repo_id, meta, commit, siblings=full, card=with_card)
            if any(f not in item["tags"] and f != repo_id for f in filters):
                continue
            out.append(item)
        out.sort(key=lambda m: m["lastModified"], reverse=True)
        return out[:max(limit, 0)]

    def _info(request: Request, ns: str, name: str, revision: str | None):
        repo_id = _checked(ns, name, revision)
        meta = hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        blobs = request.query_params.get("blobs") in ("true", "True", "1")
        return hub.model_json(repo_id, meta, commit, blobs=blobs)

    @app.get("/api/models/{name}")
    @app.get("/api/models/{name}/revision/{revision}")
    def model_info_no_namespace(name: str, request: Request, revision: str | None = None):
        raise HubError(404, f"Repository not found: {name} (ids are namespace/name)",
                       "RepoNotFound")

    @app.get("/api/models/{ns}/{name}")
    def model_info(ns: str, name: str, request: Request):
        return _info(request, ns, name, None)

    @app.get("/api/models/{ns}/{name}/revision/{revision}")
    def model_info_rev(ns: str, name: str, revision: str, request: Request):
        return _info(request, ns, name, revision)

    @app.get("/api/models/{ns}/{name}/tree/{revision}")
    def tree_root(ns: str, name: str, revision: str, request: Request):
        return _tree(request, ns, name, revision, "")

    @app.get("/api/models/{ns}/{name}/tree/{revision}/{path:path}")
    def tree_path(ns: str, name: str, revision: str, path: str, request: Request):
        return _tree(request, ns, name, revision, path)

    def _tree(request: Request, ns: str, name: str, revision: str, path: str):
        repo_id = _checked(ns, name, revision, path.strip("/") or None)
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        recursive = request.query_params.get("recursive") in ("true", "True", "1")
        return store.tree(commit, path, recursive=recursive)

    @app.post("/api/models/{ns}/{name}/paths-info/{revision}")
    async def paths_info(ns: str, name: str, revision: str, request: Request):
        repo_id = _checked(ns, name, revision)
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        raw = await _read_body(request, hub.max_body_bytes)
        is_json = request.headers.get("content-type", "").startswith("application/json")
        return await run_in_threadpool(_paths_info, store, commit, raw, is_json)

    @app.get("/api/models/{ns}/{name}/refs")
    def refs(ns: str, name: str, request: Request):
        repo_id = _checked(ns, name)
        hub.readable(request, repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in sorted(store.refs(repo_id).items())]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    @app.get("/api/models/{ns}/{name}/commits/{revision}")
    def commits(ns: str, name: str, revision: str, request: Request):
        repo_id = _checked(ns, name, revision)
        hub.readable(request, repo_id)
        return [{"id": c.id, "title": c.message, "message": c.description,
                 "authors": [{"user": hub.user}], "date": _iso(c.timestamp)}
                for c in store.history(repo_id, revision)]

    # ---- uploads -----------------------------------------------------------------------
    @app.post("/api/models/{ns}/{name}/preupload/{revision}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        hub.require_write(request)
        repo_id = _checked(ns, name, revision)
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        body = await _json_body(request, hub.max_body_bytes)
        files = []
        for f in _list_of(body, "files", dict):
            path = check_repo_path(f.get("path"))
            existing = commit.files.get(path)
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                          "oid": existing["oid"] if existing else None})
        return {"files": files, "commitOid": commit.id}

    @app.post("/api/models/{ns}/{name}/commit/{revision}")
    async def create_commit(ns: str, name: str, revision: str, request: Request):
        hub.require_write(request)
        repo_id = _checked(ns, name, revision)
        hub.readable(request, repo_id)
        if request.query_params.get("create_pr") in ("1", "true"):
            raise _bad_request("pull requests are not supported by this server")
        if revision not in store.refs(repo_id):
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)",
                           "RevisionNotFound")
        raw = await _read_body(request, hub.max_upload_bytes)
        commit = await run_in_threadpool(_apply_commit, store, repo_id, revision, raw)
        return {"commitUrl": f"{base_url(request)}/{repo_id}/commit/{commit.id}",
                "commitOid": commit.id, "pullRequestUrl": None, "success": True}

    # ---- downloads ---------------------------------------------------------------------
    @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(ns: str, name: str, revision: str, path: str, request: Request):
        repo_id = _checked(ns, name, revision, path)
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound",
                           {"X-Repo-Commit": commit.id})
        size = entry["size"]
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry["sha256"]}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Disposition": _content_disposition(path.rsplit("/", 1)[-1])}
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("range")
        if rng and request.method == "GET":
            parsed = _parse_range(rng, size)
            if parsed is None:
                raise HubError(416, f"Range not satisfiable: {rng[:100]}", None,
                               {"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        fault = hub.faults.take(("drop_body", "slow_body"), "GET", request.url.path)
        blob = store.blob_path(entry["sha256"])
        return StreamingResponse(_stream(blob, start, length, fault), status_code=status,
                                 headers=headers)

    @app.api_route("/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve_no_namespace(name: str, revision: str, path: str, request: Request):
        raise HubError(404, f"Repository not found: {name} (ids are namespace/name)",
                       "RepoNotFound")

    return app


# ---- request input: validated at the edge ---------------------------------------------------
def _checked(ns: str, name: str, revision: str | None = None, path: str | None = None) -> str:
    """Validate the repo id, revision and file path taken from a URL (400 if any is malformed);
    returns the repo id."""
    repo_id = f"{ns}/{name}"
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    if path is not None:
        check_repo_path(path)
    return repo_id


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes."""
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, await _drain(stream, size))
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> dict:
    """The request body as a JSON object: read within ``limit``, parsed off the event loop."""
    return await run_in_threadpool(_json_object, await _read_body(request, limit))


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 too
        raise _bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the request body must be a JSON object")
    return body


def _optional(body: dict, key: str, kind: type):
    """``body[key]`` when it is a ``kind``, None when absent or null; 400 otherwise."""
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise _bad_request(f"{key!r} must be a {kind.__name__}")
    return value


def _list_of(body: dict, key: str, kind: type) -> list:
    """``body[key]`` when it is a list of ``kind`` ([] when absent); 400 otherwise."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise _bad_request(f"{key!r} must be a list of {kind.__name__}")
    return value


def _visibility(body: dict) -> bool | None:
    """``private`` / ``visibility`` of a create or settings body: True, False or None (unset)."""
    private = _optional(body, "private", bool)
    visibility = _optional(body, "visibility", str)
    if visibility is not None:
        if visibility not in ("public", "private"):
            raise _bad_request("'visibility' must be 'public' or 'private'")
        private = visibility == "private"
    return private


def _yaml_problem(content: str) -> str | None:
    """Why a README's front matter is invalid, or None if it is fine."""
    try:
        parse_front_matter(content)
    except Exception as e:  # yaml errors, RecursionError on deep nesting, not a mapping
        return f"invalid YAML: {e}"
    return None


def _requested_paths(raw: bytes, is_json: bool) -> list[str]:
    """The ``paths`` of a paths-info body (JSON or form-encoded), each a valid repo path."""
    if is_json:
        paths = _list_of(_json_object(raw), "paths", str)
    else:
        try:
            paths = parse_qs(raw.decode("utf-8"), errors="strict").get("paths", [])
        except ValueError:
            raise _bad_request("the form body is not valid UTF-8") from None
    return [check_repo_path(p.strip("/")) for p in paths]


def _paths_info(store: RepoStore, commit, raw: bytes, is_json: bool) -> list[dict]:
    """The paths-info answer: an entry for each requested path that is a file or a folder."""
    out, folders = [], None
    for p in _requested_paths(raw, is_json):
        if p in commit.files:
            out.append(file_entry_json(p, commit.files[p]))
            continue
        if folders is None:  # once per request, however many paths are asked for
            folders = {e["path"]: e for e in store.tree(commit, "", recursive=True)
                       if e["type"] == "directory"}
        if p in folders:
            out.append(folders[p])
    return out


def _apply_commit(store: RepoStore, repo_id: str, branch: str, raw: bytes):
    """Parse an ndjson commit payload and apply it to ``branch``; returns the commit."""
    header, add, delete, delete_folders = _parse_commit_body(raw, store)
    commit, _created = store.commit(
        repo_id, message=header.get("summary") or "update", branch=branch,
        description=header.get("description") or "", add=add, delete=delete,
        delete_folders=delete_folders, parent_commit=header.get("parentCommit"))
    return commit


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


def _commit_header(value: dict) -> dict:
    for key in ("summary", "description", "parentCommit"):
        _optional(value, key, str)
    return value


def _regular_file(value: dict) -> tuple[str, bytes]:
    path = check_repo_path(value.get("path"))
    if value.get("encoding", "base64") != "base64":
        raise _bad_request(f"{path}: unsupported encoding {str(value.get('encoding'))[:40]!r}")
    content = value.get("content", "")
    if not isinstance(content, str):
        raise _bad_request(f"{path}: content must be a base64 string")
    try:
        return path, base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_request(f"{path}: content is not valid base64") from None


def _lfs_file(value: dict, store: RepoStore) -> tuple[str, dict]:
    path = check_repo_path(value.get("path"))
    oid = value.get("oid", "")
    if not isinstance(oid, str) or not store.has_blob(oid):
        raise _bad_request(f"{path}: LFS object {str(oid)[:64]} was never uploaded "
                           "(this server only accepts regular uploads)")
    data_size = store.blob_path(oid).stat().st_size
    return path, {"sha256": oid, "size": data_size, "oid": _git_oid_of_blob(store, oid)}


def _parse_commit_body(raw: bytes, store: RepoStore):
    """Parse the ndjson commit payload → (header, additions, deletions, folder deletions)."""
    header: dict = {}
    add: dict = {}
    delete: list[str] = []
    delete_folders: list[str] = []
    for n, line in _ndjson_lines(raw):
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise _bad_request(f"commit payload line {n} is not a valid operation") from None
        if not isinstance(value, dict):
            raise _bad_request(f"commit payload line {n}: the value must be an object")
        if key == "header":
            header = _commit_header(value)
        elif key == "file":
            path, data = _regular_file(value)
            add[path] = data
        elif key == "lfsFile":
            path, entry = _lfs_file(value, store)
            add[path] = entry
        elif key == "deletedFile":
            delete.append(check_repo_path(value.get("path")))
        elif key == "deletedFolder":
            folder = value.get("path")
            delete_folders.append(check_repo_path(folder.rstrip("/") if isinstance(folder, str)
                                                  else folder))
        else:
            raise _bad_request(f"commit payload line {n}: unknown operation {str(key)[:64]!r}")
    if not header:
        raise _bad_request("commit payload has no header line")
    return header, add, delete, delete_folders


def _git_oid_of_blob(store: RepoStore, sha256: str) -> str:
    return git_blob_oid(store.blob_path(sha256).read_bytes())


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$", re.IGNORECASE)


def _range_number(digits: str, size: int) -> int:
    # more digits than any real offset has: "past the end" (int() of 5,000 digits raises)
    return size + 1 if len(digits) > 18 else int(digits)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
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


def _stream(blob: Path, start: int, length: int, fault):
    """Yield ``length`` bytes of ``blob`` from ``start``, honouring an injected body fault."""
    chunk = fault.chunk_size if fault is not None and fault.kind == "slow_body" else _CHUNK
    sent = 0
    with open(blob, "rb") as f:
        f.seek(start)
        while sent < length:
            if fault is not None and fault.kind == "drop_body":
                room = fault.after_bytes - sent
                if room <= 0:
                    raise ConnectionAbortedError("injected fault: connection dropped mid-body")
                data = f.read(min(chunk, length - sent, room))
            else:
                data = f.read(min(chunk, length - sent))
            if not data:
                break
            if fault is not None and fault.kind == "slow_body" and sent:
                time.sleep(fault.delay)
            sent += len(data)
            yield data


# ---- running -----------------------------------------------------------------------------
GRACEFUL_SHUTDOWN_S = 1


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          ready: Callable[[str], None] | None = None, log_level: str = "warning",
          user: str = DEFAULT_USER, configure: Callable[[FastAPI], None] | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
    """Serve the repos under ``root`` until interrupted (blocking).

    Binds loopback by default; ``port=0`` picks a free port. ``ready(endpoint)`` is called
    once the socket is bound, with the endpoint URL (e.g. ``http://127.0.0.1:54321``);
    ``configure(app)`` runs before serving (in-process set-up such as test fault injection).
    ``max_body_bytes`` / ``max_upload_bytes``: see :func:`create_app`.
    """
    sock = bind(host, port, backlog=128)
    app = create_app(root, token, user=user, max_body_bytes=max_body_bytes,
                     max_upload_bytes=max_upload_bytes)
    if configure is not None:
        configure(app)
    if ready is not None:
        ready(endpoint_of(sock))
    serve_forever(app, sock, log_level, GRACEFUL_SHUTDOWN_S)


class BackgroundServer:
    """A server running in a daemon thread of this process (for tests and embedding).

    ``with BackgroundServer(root, token) as srv: srv.endpoint; srv.app.state.faults``.
    """

    def __init__(self, root: str | Path, token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, log_level: str = "critical",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.app = create_app(root, token, max_body_bytes=max_body_bytes,
                              max_upload_bytes=max_upload_bytes)
        self._http = ThreadedServer(self.app, host, port, log_level, GRACEFUL_SHUTDOWN_S, backlog=128,
                                    name="local hub server")
        self.endpoint = self._http.endpoint

    @property
    def faults(self) -> FaultInjector:
        return self.app.state.faults

    @property
    def store(self) -> RepoStore:
        return self.app.state.hub.store

    def start(self) -> "BackgroundServer":
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["create_app", "serve", "BackgroundServer", "BadPath"]
