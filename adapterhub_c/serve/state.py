"""What the HTTP handlers of one server share: a typed state object, and the token check.

One :class:`ServeState` per app (``app.state.serve``); handlers receive it through the
:func:`get_state` dependency, never through closures.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from adapterhub_c.registry.store import Registry
from adapterhub_c.serve.adapters import AdapterCache
from adapterhub_c.serve.engine import Engine
from adapterhub_c.serve.errors import unauthorized
from adapterhub_c.serve.loading import Target
from adapterhub_c.serve.metrics import Metrics

if TYPE_CHECKING:
    from adapterhub_c.serve.server import AdapterServer, ServeOptions


@dataclass
class ServeState:
    """The engine, the adapter cache, the metrics and the settings of one server."""

    reg: Registry
    target: Target
    tokenizer: Any
    engine: Engine
    cache: AdapterCache
    metrics: Metrics
    options: ServeOptions
    token: str | None
    started: float

    @classmethod
    def of(cls, srv: AdapterServer) -> "ServeState":
        """The state of a loaded :class:`~.server.AdapterServer`."""
        return cls(reg=srv.reg, target=srv.target, tokenizer=srv.tokenizer, engine=srv.engine, cache=srv.cache,
                   metrics=srv.metrics, options=srv.options, token=srv.token, started=srv.started)


def get_state(request: Request) -> ServeState:
    """FastAPI dependency: the app's :class:`ServeState`."""
    return request.app.state.serve


def auth(request: Request) -> None:
    """FastAPI dependency: APIError 401 unless the request carries the server's bearer token."""
    token = get_state(request).token
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise unauthorized()


__all__ = ["ServeState", "get_state", "auth"]
