"""Read-only repo routes: search, model info, tree, paths-info, refs, commits."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from adapterhub_c.hubserver.commits import paths_info as _paths_info
from adapterhub_c.hubserver.http import HubError, bad_request, checked, flag, iso, read_body
from adapterhub_c.hubserver.state import Hub, HubState
from adapterhub_c.hubserver.store import DEFAULT_BRANCH, StoreError

router = APIRouter()


@dataclass(frozen=True)
class _Search:
    """The query of ``GET /api/models``."""

    filters: list[str]
    search: str
    author: str | None
    limit: int
    with_card: bool
    full: bool

    @classmethod
    def of(cls, request: Request) -> "_Search":
        q = request.query_params
        try:
            limit = int(q.get("limit") or 1000)
        except ValueError:
            raise bad_request(f"invalid limit {q.get('limit')[:40]!r}") from None
        full = flag(request, "full")
        return cls(q.getlist("filter"), (q.get("search") or "").lower(), q.get("author"), limit,
                   flag(request, "cardData") or full, full)

    def admits(self, repo_id: str) -> bool:
        """Whether ``repo_id`` passes the author and search terms."""
        if self.author and repo_id.split("/")[0] != self.author:
            return False
        return not self.search or self.search in repo_id.lower()


def _listed(hub: HubState, request: Request, query: _Search, repo_id: str) -> dict | None:
    """``repo_id``'s entry in a search answer, or None when the query (or visibility) leaves it out."""
    try:
        meta = hub.store.repo_meta(repo_id)
        commit = hub.store.resolve(repo_id, DEFAULT_BRANCH)
    except StoreError:
        return None
    if (meta.get("private") and not hub.authorized(request)) or not query.admits(repo_id):
        return None
    item = hub.model_json(repo_id, meta, commit, siblings=query.full, card=query.with_card)
    if any(f not in item["tags"] and f != repo_id for f in query.filters):
        return None
    return item


@router.get("/api/models")
def list_models(request: Request, hub: Hub):
    """Search repos (``filter`` tags, ``search``, ``author``, ``limit``), newest first."""
    query = _Search.of(request)
    out = [item for repo_id in hub.store.list_repos()
           if (item := _listed(hub, request, query, repo_id)) is not None]
    out.sort(key=lambda m: m["lastModified"], reverse=True)
    return out[:max(query.limit, 0)]


def _info(hub: HubState, request: Request, ns: str, name: str, revision: str | None):
    repo_id = checked(ns, name, revision)
    meta = hub.readable(request, repo_id)
    commit = hub.store.resolve(repo_id, revision)
    return hub.model_json(repo_id, meta, commit, blobs=flag(request, "blobs"))


@router.get("/api/models/{name}")
@router.get("/api/models/{name}/revision/{revision}")
def model_info_no_namespace(name: str, request: Request, revision: str | None = None):
    """Ids without a namespace are not found (the Hub's answer for them)."""
    raise HubError(404, f"Repository not found: {name} (ids are namespace/name)", "RepoNotFound")


@router.get("/api/models/{ns}/{name}")
def model_info(ns: str, name: str, request: Request, hub: Hub):
    """A repo at its default branch."""
    return _info(hub, request, ns, name, None)


@router.get("/api/models/{ns}/{name}/revision/{revision}")
def model_info_rev(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """A repo at ``revision``."""
    return _info(hub, request, ns, name, revision)


def _tree(hub: HubState, request: Request, ns: str, name: str, revision: str, path: str):
    repo_id = checked(ns, name, revision, path.strip("/") or None)
    hub.readable(request, repo_id)
    commit = hub.store.resolve(repo_id, revision)
    return hub.store.tree(commit, path, recursive=flag(request, "recursive"))


@router.get("/api/models/{ns}/{name}/tree/{revision}")
def tree_root(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """The repo's top folder at ``revision``."""
    return _tree(hub, request, ns, name, revision, "")


@router.get("/api/models/{ns}/{name}/tree/{revision}/{path:path}")
def tree_path(ns: str, name: str, revision: str, path: str, request: Request, hub: Hub):
    """A folder of the repo at ``revision``."""
    return _tree(hub, request, ns, name, revision, path)


@router.post("/api/models/{ns}/{name}/paths-info/{revision}")
async def paths_info(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """Entries for the requested paths (JSON or form body)."""
    repo_id = checked(ns, name, revision)
    hub.readable(request, repo_id)
    commit = hub.store.resolve(repo_id, revision)
    raw = await read_body(request, hub.max_body_bytes)
    is_json = request.headers.get("content-type", "").startswith("application/json")
    return await run_in_threadpool(_paths_info, hub.store, commit, raw, is_json)


@router.get("/api/models/{ns}/{name}/refs")
def refs(ns: str, name: str, request: Request, hub: Hub):
    """The repo's branches."""
    repo_id = checked(ns, name)
    hub.readable(request, repo_id)
    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                for b, sha in sorted(hub.store.refs(repo_id).items())]
    return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}


@router.get("/api/models/{ns}/{name}/commits/{revision}")
def commits(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """The history of ``revision``, newest first."""
    repo_id = checked(ns, name, revision)
    hub.readable(request, repo_id)
    return [{"id": c.id, "title": c.message, "message": c.description,
             "authors": [{"user": hub.user}], "date": iso(c.timestamp)}
            for c in hub.store.history(repo_id, revision)]
