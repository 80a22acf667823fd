"""Running the local Hub: in the foreground (``adapt hub serve``) or in a daemon thread (tests, embedding)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.httpserve import ThreadedServer, bind, endpoint_of, is_loopback, serve_forever
from adapterhub_c.hubserver.app import create_app
from adapterhub_c.hubserver.http import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from adapterhub_c.hubserver.store import RepoStore

GRACEFUL_SHUTDOWN_S = 1
MIN_LIMIT_BYTES = 1024


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          ready: Callable[[str], None] | None = None, log_level: str = "warning", **app_options: Any) -> None:
    """Serve the repos under ``root`` until interrupted (blocking).

    Binds loopback by default; ``port=0`` picks a free port. ``ready(endpoint)`` is called
    once the socket is bound, with the endpoint URL (e.g. ``http://127.0.0.1:54321``).
    ``app_options`` (``user``, ``max_body_bytes``, ``max_upload_bytes``, ``middleware``): see
    :func:`~adapterhub_c.hubserver.app.create_app`.
    """
    sock = bind(host, port, backlog=128)
    app = create_app(root, token, **app_options)
    if ready is not None:
        ready(endpoint_of(sock))
    serve_forever(app, sock, log_level, GRACEFUL_SHUTDOWN_S)


def _limits(max_body_bytes: int | None, max_upload_bytes: int | None) -> dict[str, int]:
    limits = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes,
              "max_upload_bytes": DEFAULT_MAX_UPLOAD_BYTES if max_upload_bytes is None else max_upload_bytes}
    for flag, value in limits.items():
        if not isinstance(value, int) or value < MIN_LIMIT_BYTES:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be at least {MIN_LIMIT_BYTES} bytes")
    return limits


def serve_hub(root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
              ready: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
              max_body_bytes: int | None = None, max_upload_bytes: int | None = None) -> None:
    """Run the local Hub-compatible server on ``root`` until interrupted (blocking): ``adapt hub serve``.

    ``ready(endpoint)`` is called once listening. Binding a non-loopback interface without a
    token is allowed but reported through ``warn``: anyone who can connect could write.
    ``max_body_bytes`` (JSON bodies) / ``max_upload_bytes`` (commits): request size limits,
    answered with 413 (defaults: the server's). UsageError on bad arguments.
    """
    limits = _limits(max_body_bytes, max_upload_bytes)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--root {root}: not a folder")
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"--port {port}: out of range")
    if not is_loopback(host) and not token and warn is not None:
        warn(f"serving on {host} without a token: anyone who can reach it can create and push repos")
    root.mkdir(parents=True, exist_ok=True)
    try:
        serve(root, host=host, port=int(port), token=token or None, ready=ready, **limits)
    except OSError as e:
        raise AdaptError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


class BackgroundServer:
    """A server running in a daemon thread of this process (for tests and embedding).

    ``with BackgroundServer(root, token) as srv: srv.endpoint; srv.store``. ``app_options``
    (``user``, ``max_body_bytes``, ``max_upload_bytes``, ``middleware``): see
    :func:`~adapterhub_c.hubserver.app.create_app`.
    """

    def __init__(self, root: str | Path, token: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, log_level: str = "critical", **app_options: Any):
        self.app = create_app(root, token, **app_options)
        self._http = ThreadedServer(self.app, host, port, log_level, GRACEFUL_SHUTDOWN_S, backlog=128,
                                    name="local hub server")
        self.endpoint = self._http.endpoint

    @property
    def store(self) -> RepoStore:
        """The repos this server serves."""
        return self.app.state.hub.store

    def start(self) -> "BackgroundServer":
        """Start serving; returns once listening."""
        self._http.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._http.stop()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["serve", "serve_hub", "BackgroundServer", "GRACEFUL_SHUTDOWN_S"]
