"""Uploads: preupload (every file goes ``regular``: no LFS storage) and commits."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from adapterhub_c.hubserver.commits import apply_commit
from adapterhub_c.hubserver.http import HubError, bad_request, base_url, checked, json_body, list_of, read_body
from adapterhub_c.hubserver.state import Hub
from adapterhub_c.hubserver.store import check_repo_path

router = APIRouter()


@router.post("/api/models/{ns}/{name}/preupload/{revision}")
async def preupload(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """How each file is to be uploaded, with the oid of the file already there (if any)."""
    hub.require_write(request)
    repo_id = checked(ns, name, revision)
    hub.readable(request, repo_id)
    commit = hub.store.resolve(repo_id, revision)
    body = await json_body(request, hub.max_body_bytes)
    files = []
    for f in list_of(body, "files", dict):
        path = check_repo_path(f.get("path"))
        existing = commit.files.get(path)
        files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                      "oid": existing["oid"] if existing else None})
    return {"files": files, "commitOid": commit.id}


@router.post("/api/models/{ns}/{name}/commit/{revision}")
async def create_commit(ns: str, name: str, revision: str, request: Request, hub: Hub):
    """Apply an ndjson commit payload to branch ``revision`` (no pull requests)."""
    hub.require_write(request)
    repo_id = checked(ns, name, revision)
    hub.readable(request, repo_id)
    if request.query_params.get("create_pr") in ("1", "true"):
        raise bad_request("pull requests are not supported by this server")
    if revision not in hub.store.refs(repo_id):
        raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
    raw = await read_body(request, hub.max_upload_bytes)
    commit = await run_in_threadpool(apply_commit, hub.store, repo_id, revision, raw)
    return {"commitUrl": f"{base_url(request)}/{repo_id}/commit/{commit.id}",
            "commitOid": commit.id, "pullRequestUrl": None, "success": True}
