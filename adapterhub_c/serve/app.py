"""The HTTP app, in the OpenAI shape (what the ``openai`` client and vLLM users expect).

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
with server-sent events), ``POST /v1/load_adapter`` / ``/v1/unload_adapter`` (vLLM's
names and body: ``{"lora_name": …}``), ``GET /health`` (never behind the token),
``GET /metrics`` (Prometheus text). Every error is ``{"error": {message, type, param,
code}}`` with its status (see :mod:`.errors`).

The handlers live in :mod:`.routes` (routers), :mod:`.generation` (one request's flow) and
:mod:`.bodies` (request bodies); they share a :class:`~.state.ServeState`.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub_c.serve.bodies import (  # noqa: F401 - re-exported (the request bodies' old home)
    AdapterRequest,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    parse_body,
)
from adapterhub_c.serve.errors import APIError, from_exception
from adapterhub_c.serve.routes import OWNER, admin, generation, public  # noqa: F401 - OWNER re-exported
from adapterhub_c.serve.state import ServeState


async def _api_error(request: Request, e: APIError, headers: dict | None = None) -> JSONResponse:
    request.app.state.serve.metrics.inc("errors_total", status=str(e.status))
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's errors and the body refusals of ``httpserve.read_limited`` (413, 408: their
    Connection: close kept, so uvicorn closes a connection whose body was not read)."""
    err = APIError(e.status_code, str(e.detail), "invalid_request_error", None, None)
    return await _api_error(request, err, dict(e.headers or {}))


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    return await _api_error(request, from_exception(e))


def create_app(srv) -> FastAPI:
    """The FastAPI app of an ``AdapterServer``: its :class:`~.state.ServeState`, the routers and
    the error handlers (every error in OpenAI's shape, counted in ``errors_total``)."""
    app = FastAPI(title="adapt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.state.serve = ServeState.of(srv)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    for router in (public, admin, generation):
        app.include_router(router)
    return app
