"""Repo management: create, delete, settings (writes: the token is required when set)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from adapterhub_c.hubserver.http import bad_request, base_url, checked, json_body, optional, visibility
from adapterhub_c.hubserver.state import Hub, HubState
from adapterhub_c.hubserver.store import check_repo_id

router = APIRouter()
_EXISTS = "You already created this model repo"


def _repo_id_from_body(hub: HubState, body: dict) -> str:
    if body.get("type") not in (None, "model"):
        raise bad_request("only model repos are supported by this server")
    name = optional(body, "name", str) or ""
    org = optional(body, "organization", str) or hub.user
    repo_id = f"{org}/{name}"
    check_repo_id(repo_id)
    return repo_id


@router.post("/api/repos/create")
async def create_repo(request: Request, hub: Hub):
    """Create a repo (409 if it exists)."""
    hub.require_write(request)
    body = await json_body(request, hub.max_body_bytes)
    repo_id = _repo_id_from_body(hub, body)
    private = visibility(body)
    url = f"{base_url(request)}/{repo_id}"
    if hub.store.exists(repo_id):
        return JSONResponse({"error": _EXISTS, "url": url}, status_code=409, headers={"X-Error-Message": _EXISTS})
    hub.store.create_repo(repo_id, private=bool(private))
    return {"url": url, "name": repo_id, "id": repo_id}


@router.delete("/api/repos/delete")
async def delete_repo(request: Request, hub: Hub):
    """Delete a repo."""
    hub.require_write(request)
    repo_id = _repo_id_from_body(hub, await json_body(request, hub.max_body_bytes))
    hub.store.delete_repo(repo_id)
    return Response(status_code=200)


@router.put("/api/models/{ns}/{name}/settings")
async def repo_settings(ns: str, name: str, request: Request, hub: Hub):
    """Change a repo's visibility."""
    hub.require_write(request)
    repo_id = checked(ns, name)
    hub.readable(request, repo_id)
    private = visibility(await json_body(request, hub.max_body_bytes))
    if private is not None:
        hub.store.set_private(repo_id, bool(private))
    return {}
