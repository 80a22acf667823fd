"""A local Hub-compatible server (FastAPI + uvicorn) that the real ``huggingface_hub`` client talks to.

It implements the part of the Hub HTTP API that ``huggingface_hub`` uses for downloads,
uploads (``uploadMode: regular``, so no LFS/Xet storage is needed), repo management and
model search. Repos live under ``root`` (see :mod:`adapterhub_c.hub.store`).

Authentication: when a token is set, writes need ``Authorization: Bearer <token>`` and
private repos are visible only with it; public reads need nothing. Tokens are never logged.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapterhub_c.hub.cards import card_tags, parse_front_matter
from adapterhub_c.hub.faults import FaultInjector
from adapterhub_c.hub.store import (
    DEFAULT_BRANCH,
    BadPath,
    RepoStore,
    StoreError,
    check_repo_id,
    check_repo_path,
    file_entry_json,
    git_blob_oid,
)

DEFAULT_USER = "local"
_CHUNK = 1 << 16


class HubError(Exception):
    """An HTTP error answer with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _error_response(status: int, message: str, code: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    h = {"X-Error-Message": message.replace("\n", " ")[:500]}
    if code:
        h["X-Error-Code"] = code
    h.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=h)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubApp:
    """Request handlers bound to one store, token and fault injector."""

    def __init__(self, root: Path, token: str | None, user: str = DEFAULT_USER):
        self.store = RepoStore(root)
        self._token = token
        self.user = user
        self.faults = FaultInjector()

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
    def card_data(self, commit) -> dict:
        entry = commit.files.get("README.md")
        if entry is None:
            return {}
        try:
            return parse_front_matter(self.store.read(entry).decode("utf-8", "replace"))
        except Exception:
            return {}

    def model_json(self, repo_id: str, meta: dict, commit, blobs: bool = False,
                   siblings: bool = True, card: bool = True) -> dict:
        data = self.card_data(commit)
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


def create_app(root: str | Path, token: str | None = None, user: str = DEFAULT_USER) -> FastAPI:
    """The Hub-compatible ASGI app serving the repos stored under ``root``.

    ``app.state.hub`` is the :class:`HubApp` (store, user); ``app.state.faults`` is a
    :class:`~adapterhub_c.hub.faults.FaultInjector` that tests may arm in-process.
    """
    hub = HubApp(Path(root), token, user)
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

    @app.middleware("http")
    async def _inject_status_faults(request: Request, call_next):
        fault = hub.faults.take(("status",), request.method, request.url.path)
        if fault is not None:
            return _error_response(fault.status, f"injected fault: HTTP {fault.status}")
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
        try:
            body = await request.json()
            parse_front_matter(body.get("content", ""))
        except Exception as e:  # yaml errors
            return JSONResponse({"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []},
                                status_code=400)
        return {"errors": [], "warnings": []}

    # ---- repos ----------------------------------------------------------------------
    def _repo_id_from_body(body: dict) -> str:
        if body.get("type") not in (None, "model"):
            raise HubError(400, "only model repos are supported by this server")
        name = body.get("name") or ""
        org = body.get("organization") or hub.user
        repo_id = f"{org}/{name}"
        check_repo_id(repo_id)
        return repo_id

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        hub.require_write(request)
        body = await request.json()
        repo_id = _repo_id_from_body(body)
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] == "private"
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
        repo_id = _repo_id_from_body(await request.json())
        store.delete_repo(repo_id)
        return Response(status_code=200)

    @app.put("/api/models/{ns}/{name}/settings")
    async def repo_settings(ns: str, name: str, request: Request):
        hub.require_write(request)
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        body = await request.json()
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] == "private"
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
            raise HubError(400, f"invalid limit {q.get('limit')!r}") from None
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
        repo_id = f"{ns}/{name}"
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
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        recursive = request.query_params.get("recursive") in ("true", "True", "1")
        return store.tree(commit, path, recursive=recursive)

    @app.post("/api/models/{ns}/{name}/paths-info/{revision}")
    async def paths_info(ns: str, name: str, revision: str, request: Request):
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        body = (await request.body()).decode()
        if request.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(file_entry_json(p, commit.files[p]))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.extend(e for e in store.tree(commit, "", recursive=True)
                           if e["path"] == p and e["type"] == "directory")
        return out

    @app.get("/api/models/{ns}/{name}/refs")
    def refs(ns: str, name: str, request: Request):
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in sorted(store.refs(repo_id).items())]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    @app.get("/api/models/{ns}/{name}/commits/{revision}")
    def commits(ns: str, name: str, revision: str, request: Request):
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        return [{"id": c.id, "title": c.message, "message": c.description,
                 "authors": [{"user": hub.user}], "date": _iso(c.timestamp)}
                for c in store.history(repo_id, revision)]

    # ---- uploads -----------------------------------------------------------------------
    @app.post("/api/models/{ns}/{name}/preupload/{revision}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        hub.require_write(request)
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        body = await request.json()
        files = []
        for f in body.get("files", []):
            path = check_repo_path(str(f.get("path", "")))
            existing = commit.files.get(path)
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                          "oid": existing["oid"] if existing else None})
        return {"files": files, "commitOid": commit.id}

    @app.post("/api/models/{ns}/{name}/commit/{revision}")
    async def create_commit(ns: str, name: str, revision: str, request: Request):
        hub.require_write(request)
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        if request.query_params.get("create_pr") in ("1", "true"):
            raise HubError(400, "pull requests are not supported by this server")
        if revision not in store.refs(repo_id):
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)",
                           "RevisionNotFound")
        header, add, delete, delete_folders = _parse_commit_body(await request.body(), store)
        commit, _created = store.commit(
            repo_id, message=header.get("summary") or "update", branch=revision,
            description=header.get("description") or "", add=add, delete=delete,
            delete_folders=delete_folders, parent_commit=header.get("parentCommit"))
        return {"commitUrl": f"{base_url(request)}/{repo_id}/commit/{commit.id}",
                "commitOid": commit.id, "pullRequestUrl": None, "success": True}

    # ---- downloads ---------------------------------------------------------------------
    @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(ns: str, name: str, revision: str, path: str, request: Request):
        repo_id = f"{ns}/{name}"
        hub.readable(request, repo_id)
        commit = store.resolve(repo_id, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound",
                           {"X-Repo-Commit": commit.id})
        size = entry["size"]
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry["sha256"]}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}"'}
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("range")
        if rng and request.method == "GET":
            parsed = _parse_range(rng, size)
            if parsed is None:
                raise HubError(416, f"Range not satisfiable: {rng}", None,
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


def _parse_commit_body(raw: bytes, store: RepoStore):
    """Parse the ndjson commit payload → (header, additions, deletions, folder deletions)."""
    header: dict = {}
    add: dict = {}
    delete: list[str] = []
    delete_folders: list[str] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise HubError(400, f"commit payload line {n} is not a valid operation") from None
        if key == "header":
            header = value
        elif key == "file":
            path = check_repo_path(value.get("path", ""))
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
            try:
                add[path] = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, ValueError):
                raise HubError(400, f"{path}: content is not valid base64") from None
        elif key == "lfsFile":
            path = check_repo_path(value.get("path", ""))
            oid = value.get("oid", "")
            if not store.has_blob(oid):
                raise HubError(400, f"{path}: LFS object {oid} was never uploaded "
                                    "(this server only accepts regular uploads)")
            data_size = store.blob_path(oid).stat().st_size
            add[path] = {"sha256": oid, "size": data_size,
                         "oid": _git_oid_of_blob(store, oid)}
        elif key == "deletedFile":
            delete.append(check_repo_path(value.get("path", "")))
        elif key == "deletedFolder":
            folder = value.get("path", "").rstrip("/")
            delete_folders.append(check_repo_path(folder))
        else:
            raise HubError(400, f"commit payload line {n}: unknown operation {key!r}")
    if not header:
        raise HubError(400, "commit payload has no header line")
    return header, add, delete, delete_folders


def _git_oid_of_blob(store: RepoStore, sha256: str) -> str:
    return git_blob_oid(store.blob_path(sha256).read_bytes())


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range → inclusive (start, end); None if unsatisfiable."""
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            return None
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
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
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _uvicorn_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1)
    return uvicorn.Server(config)


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          ready: Callable[[str], None] | None = None, log_level: str = "warning",
          user: str = DEFAULT_USER, configure: Callable[[FastAPI], None] | None = None) -> None:
    """Serve the repos under ``root`` until interrupted (blocking).

    Binds loopback by default; ``port=0`` picks a free port. ``ready(endpoint)`` is called
    once the socket is bound, with the endpoint URL (e.g. ``http://127.0.0.1:54321``);
    ``configure(app)`` runs before serving (in-process set-up such as test fault injection).
    """
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    endpoint = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    app = create_app(root, token, user=user)
    if configure is not None:
        configure(app)
    server = _uvicorn_server(app, log_level)
    if ready is not None:
        ready(endpoint)
    server.run(sockets=[sock])


class BackgroundServer:
    """A server running in a daemon thread of this process (for tests and embedding).

    ``with BackgroundServer(root, token) as srv: srv.endpoint; srv.app.state.faults``.
    """

    def __init__(self, root: str | Path, token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, log_level: str = "critical"):
        self.app = create_app(root, token)
        self._sock = _bind(host, port)
        h, p = self._sock.getsockname()[:2]
        self.endpoint = f"http://{h}:{p}"
        self._server = _uvicorn_server(self.app, log_level)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def faults(self) -> FaultInjector:
        return self.app.state.faults

    @property
    def store(self) -> RepoStore:
        return self.app.state.hub.store

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("local hub server failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["create_app", "serve", "BackgroundServer", "BadPath"]
