"""The adapter server as an object: load the target once, wrap its layers, run the engine.

``AdapterServer(reg, target, ...)`` loads the base or variant, wraps its linear layers
(``layers.wrap_linears``), builds the adapter cache and the engine, and exposes the
FastAPI app (``app.create_app``). ``serve`` runs it until interrupted; ``BackgroundServer``
runs it on a loopback port in a thread of this process (tests, benchmarks, the demo).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from adapterhub_c.errors import UsageError
from adapterhub_c.httpserve import ThreadedServer, bind, endpoint_of, is_loopback, serve_forever
from adapterhub_c.models.arch import context_length, describe
from adapterhub_c.models.device import resolve_device
from adapterhub_c.options.serve import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HOST, DEFAULT_MAX_BODY_BYTES, TOKEN_ENV
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.stack import load_stack, resolve_stack
from adapterhub_c.runtime.variants import variant_kept_indices
from adapterhub_c.serve.adapters import AdapterCache, Target
from adapterhub_c.serve.engine import Engine
from adapterhub_c.serve.layers import GATHER_MIN, Router, wrap_linears
from adapterhub_c.serve.metrics import Metrics

GRACEFUL_SHUTDOWN_S = 2


@dataclass
class ServeOptions:
    """Everything ``adapt serve`` takes beyond the registry and the target."""

    adapters: list[str] | None = None      # servable (and, with preload, resident from the start)
    preload: bool = True
    all: bool = False                      # every adapter and prompt of the target's base
    max_resident: int | None = None
    max_resident_mb: float | None = None
    token: str | None = None               # None: $ADAPTERHUB_SERVE_TOKEN, "" : no auth
    device: str | None = "cpu"
    allow_pull: bool = False
    log_requests: bool = False
    max_batch: int = 64
    batch_window_ms: float = 5.0
    gather_min: int = GATHER_MIN
    default_max_tokens: int = 16           # /v1/completions without max_tokens (OpenAI's default)
    default_chat_max_tokens: int = 256     # /v1/chat/completions without max_tokens (capped by the context)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 (httpserve.read_limited)
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S  # a body not complete by then: 408, connection closed


def resolve_token(token: str | None) -> str | None:
    """``--token``, else ``$ADAPTERHUB_SERVE_TOKEN``, else no auth."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None


class AdapterServer:
    """One loaded target, its adapter cache, its engine and its app."""

    def __init__(self, reg: Registry, target: str, options: ServeOptions | None = None):
        self.reg = reg
        self.options = opts = options or ServeOptions()
        if opts.adapters and opts.all:
            raise UsageError("give --adapters or --all, not both")
        if opts.max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1 (got {opts.max_batch})")
        if opts.batch_window_ms < 0:
            raise UsageError("--batch-window-ms must not be negative")
        if opts.max_body_bytes < 1 or (opts.body_timeout_s is not None and not opts.body_timeout_s > 0):
            raise UsageError("the request body limit and the body timeout must be positive")
        self.token = resolve_token(opts.token)
        spec = resolve_stack(reg, target)
        if spec.adapter is not None or spec.prompt is not None:
            raise UsageError(f"{target!r} is an artefact; serve a base or a variant and name adapters per request")
        self.device = resolve_device(opts.device)
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_stack(reg, spec, str(self.device))
        self.model.requires_grad_(False)
        self.load_seconds = time.perf_counter() - t0
        self.metrics = Metrics()
        self.router = Router()
        # described before the linears are wrapped: the MLP pairing slices base LoRAs on ffn-channels variants
        arch = describe(self.model, warn=False)
        wrapped = wrap_linears(self.model, self.router)
        embed = self.model.get_input_embeddings()
        self.target = Target(
            name=spec.variant.name if spec.variant else spec.base.name, base=spec.base, variant=spec.variant,
            linears={n: (int(w.in_features), int(w.out_features)) for n, w in wrapped.items()},
            context=context_length(self.model.config), hidden=int(embed.weight.shape[1]),
            kept_indices=variant_kept_indices(reg, spec.variant) if spec.variant else None, device=self.device,
            arch=arch)
        max_bytes = int(opts.max_resident_mb * 2 ** 20) if opts.max_resident_mb is not None else None
        self.cache = AdapterCache(reg, self.target, self.metrics, opts.max_resident, max_bytes)
        if opts.all:
            self.cache.add_all()
        for name in opts.adapters or []:
            self.cache.add(name)
        self.engine = Engine(self.model, self.tokenizer, self.router, self.metrics, max_batch=opts.max_batch,
                             window_s=opts.batch_window_ms / 1000.0, device=self.device,
                             gather_min=opts.gather_min)
        self.engine.start()
        self.started = time.time()
        for name in (opts.adapters or []) if opts.preload else []:  # resident from the start, within the budget
            if "+" not in name:
                self.cache.release(self.cache.acquire(self.cache.resolve(name)))
        from adapterhub_c.serve.app import create_app

        self.app = create_app(self)

    def close(self) -> None:
        self.engine.stop()


def serve(reg: Registry, target: str, options: ServeOptions | None = None, host: str = DEFAULT_HOST,
          port: int = 8000, ready: Callable[[str, AdapterServer], None] | None = None,
          warn: Callable[[str], None] | None = None, log_level: str = "warning") -> None:
    """Serve ``target`` until interrupted (blocking). ``ready(endpoint, server)`` once listening."""
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"--port {port}: out of range")
    options = options or ServeOptions()
    if not is_loopback(host) and not resolve_token(options.token) and warn is not None:
        warn(f"serving on {host} without a token: anyone who can reach it can use the model")
    sock = bind(host, int(port))
    server = AdapterServer(reg, target, options)
    try:
        if ready is not None:
            ready(endpoint_of(sock), server)
        serve_forever(server.app, sock, log_level, GRACEFUL_SHUTDOWN_S)
    finally:
        server.close()
        sock.close()


class BackgroundServer:
    """``with BackgroundServer(reg, target, options) as srv:`` → ``srv.endpoint`` (``…/v1`` for openai)."""

    def __init__(self, reg: Registry, target: str, options: ServeOptions | None = None,
                 host: str = DEFAULT_HOST, port: int = 0, log_level: str = "critical"):
        self.server = AdapterServer(reg, target, options)
        self._http = ThreadedServer(self.server.app, host, port, log_level, GRACEFUL_SHUTDOWN_S,
                                    start_timeout_s=20, stop_timeout_s=10, name="adapter server")
        self.endpoint = self._http.endpoint

    @property
    def base_url(self) -> str:
        return self.endpoint + "/v1"

    def start(self) -> "BackgroundServer":
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()
        self.server.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["AdapterServer", "BackgroundServer", "ServeOptions", "serve", "resolve_token", "TOKEN_ENV"]
