"""Starting ``adapt ui``: open the registry first (a registry that cannot be opened fails here,
in one line, before anything listens), then bind, say where, and serve until interrupted."""
from __future__ import annotations

import os
from typing import Callable

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.httpserve import ThreadedServer, bind, endpoint_of, is_loopback, serve_forever
from adapterhub_c.registry import Registry

TOKEN_ENV = "ADAPTERHUB_UI_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def resolve_token(token: str | None) -> str | None:
    """``token``, else ``$ADAPTERHUB_UI_TOKEN``, else none ("" also means none)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None


def check_bind(host: str, token: str | None) -> None:
    """Anywhere but loopback needs a token: the page shows the whole registry."""
    if not is_loopback(host) and not token:
        raise UsageError(f"adapt ui on {host} needs a token (--token or ${TOKEN_ENV}); "
                         "loopback (127.0.0.1) needs none")


def open_checked(home: str | None = None, db: str | None = None) -> Registry:
    """The registry, opened and read once; AdaptError (one line, no password) if that fails."""
    from adapterhub_c.registry import pages
    from adapterhub_c.registry.db import describe_url

    try:
        reg = Registry(url=db, home=home)
        pages.summary(reg, runs=1)
    except AdaptError:
        raise
    except Exception as e:  # noqa: BLE001 - any driver error becomes one line
        where = describe_url(db) if db else (home or "the default home")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdaptError(f"cannot open the registry {where}: {first}") from None
    return reg


def serve_ui(reg: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
             ready: Callable[[str, bool], None] | None = None) -> None:
    """Serve the page over ``reg`` on ``host:port`` until interrupted; ``ready(url, needs_token)`` once bound."""
    from adapterhub_c.ui.app import create_app

    token = resolve_token(token)
    check_bind(host, token)
    app = create_app(reg, token=token)
    sock = bind(host, port)
    if ready is not None:
        ready(endpoint_of(sock) + "/", token is not None)
    serve_forever(app, sock, log_level="warning", graceful_shutdown_s=1)


def background_ui(reg: Registry, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None) -> ThreadedServer:
    """The page served from a daemon thread (tests, benchmarks): ``.start()``, ``.endpoint``, ``.stop()``."""
    from adapterhub_c.ui.app import create_app

    token = resolve_token(token)
    check_bind(host, token)
    return ThreadedServer(create_app(reg, token=token), host=host, port=port, name="registry page")


__all__ = ["serve_ui", "background_ui", "open_checked", "resolve_token", "TOKEN_ENV", "DEFAULT_HOST", "DEFAULT_PORT"]
