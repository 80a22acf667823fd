"""``/api/whoami-v2`` and ``/api/validate-yaml``."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapterhub_c.hubserver import cardcache
from adapterhub_c.hubserver.http import HubError, bad_request, header_safe, json_body, optional
from adapterhub_c.hubserver.state import Hub

router = APIRouter()


@router.get("/api/whoami-v2")
def whoami(request: Request, hub: Hub):
    """The one local user (401 with a wrong token when the server has one)."""
    if hub.token is not None and not hub.authorized(request):
        raise HubError(401, "Invalid credentials in Authorization header")
    return {"type": "user", "id": hub.user, "name": hub.user, "fullname": hub.user,
            "email": None, "emailVerified": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local", "role": "write"}}}


@router.post("/api/validate-yaml")
async def validate_yaml(request: Request, hub: Hub):
    """Check a README's front matter (parsed off the event loop)."""
    body = await json_body(request, hub.max_body_bytes)
    content = optional(body, "content", str) or ""
    if len(content) > cardcache.CARD_MAX_BYTES:
        raise bad_request(f"content is longer than {cardcache.CARD_MAX_BYTES} characters")
    problem = await run_in_threadpool(cardcache.yaml_problem, content)
    if problem:
        return JSONResponse({"errors": [{"message": problem}], "warnings": []},
                            status_code=400, headers={"X-Error-Message": header_safe(problem)})
    return {"errors": [], "warnings": []}
