"""The local Hub-compatible ASGI app (FastAPI) that the real ``huggingface_hub`` client talks to.

It implements the part of the Hub HTTP API that ``huggingface_hub`` uses for downloads,
uploads (``uploadMode: regular``, so no LFS/Xet storage is needed), repo management and
model search (routes: :mod:`adapterhub_c.hubserver.routes`). Repos live under ``root`` (see
:mod:`adapterhub_c.hubserver.store`); authentication and limits: :mod:`~adapterhub_c.hubserver.state`.

Hostile input: repo ids, revisions and paths from URLs are validated before any handler uses
them, request bodies are bounded (``max_body_bytes`` for JSON, ``max_upload_bytes`` for
commits, which carry file contents) and parsed off the event loop, and every malformed request
gets a 4xx with the Hub's ``X-Error-Code`` / ``X-Error-Message`` headers (:mod:`~adapterhub_c.hubserver.http`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from adapterhub_c.hubserver.http import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DRAIN_MAX_BYTES,
    HubError,
    drain,
    error_response,
    too_large,
)
from adapterhub_c.hubserver.routes import ROUTERS
from adapterhub_c.hubserver.state import DEFAULT_USER, HubState
from adapterhub_c.hubserver.store import RepoStore, StoreError

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


async def _hub_error(request: Request, exc: HubError):
    return error_response(exc.status, exc.message, exc.code, exc.headers)


async def _store_error(request: Request, exc: StoreError):
    return error_response(exc.status, str(exc), exc.code)


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), None, dict(exc.headers or {}))


async def _edge_checks(request: Request, call_next):
    """Refuse control characters in the URL and declared oversized bodies before anything else runs."""
    if _CONTROL_RE.search(request.scope["path"]):
        return error_response(400, "control characters are not allowed in URLs", "BadRequest")
    declared = request.headers.get("content-length", "")
    limit = request.app.state.hub.body_limit(request.method, request.scope["path"])
    if declared.isdigit() and (len(declared) > 19 or int(declared) > limit):
        drained = int(declared) <= DRAIN_MAX_BYTES and await drain(request.stream())
        exc = too_large(limit, drained)
        return error_response(exc.status, exc.message, exc.code, exc.headers)
    return await call_next(request)


def create_app(root: str | Path, token: str | None = None, user: str = DEFAULT_USER,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               middleware: Iterable[Middleware] = ()) -> FastAPI:
    """The Hub-compatible ASGI app serving the repos stored under ``root``.

    ``app.state.hub`` is the :class:`~adapterhub_c.hubserver.state.HubState` (store, user,
    limits). Request bodies over ``max_upload_bytes`` (commits) or ``max_body_bytes`` (every
    other endpoint) are refused with 413. ``middleware``: Starlette middleware run inside the
    edge checks (URL and body-size refusals come first), around the routes, in the order given
    (the first is outermost); for embedding, e.g. request logging or a test's fault injection.
    """
    hub = HubState(RepoStore(Path(root)), token, user, max_body_bytes=max_body_bytes,
                   max_upload_bytes=max_upload_bytes)
    app = FastAPI(title="adapterhub-c local hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for m in reversed(list(middleware)):  # add_middleware puts each outside those added before
        app.add_middleware(m.cls, *m.args, **m.kwargs)
    app.middleware("http")(_edge_checks)  # added last, so it runs first: nothing else sees these requests
    for router in ROUTERS:
        app.include_router(router)
    return app


__all__ = ["create_app", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_USER"]
