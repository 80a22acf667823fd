"""The HTTP routes, in the OpenAI shape (what the ``openai`` client and vLLM users expect).

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
with server-sent events), ``POST /v1/load_adapter`` / ``/v1/unload_adapter`` (vLLM's
names and body: ``{"lora_name": …}``), ``GET /health`` (never behind the token),
``GET /metrics`` (Prometheus text). Every error is ``{"error": {message, type, param,
code}}`` with its status (see :mod:`.errors`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub_c.errors import NotFoundError
from adapterhub_c.registry.runs import record_run
from adapterhub_c.serve.adapters import Acquired, Route
from adapterhub_c.serve.engine import Job, SamplingParams
from adapterhub_c.serve.errors import APIError, bad_request, from_exception, model_not_found, unauthorized

OWNER = "adapterhub-c"
MAX_STOP = 4
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "function-after", "function-before"}


# ---- request bodies -----------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = None
    user: str | None = None
    return_token_ids: bool | None = None  # ours (as vLLM's): the generated ids in x_adapterhub.token_ids
    ignore_eos: bool | None = None        # vLLM's: generate max_tokens tokens whatever comes


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    lora_name: str
    lora_path: str | None = None


def _param(loc: tuple) -> str | None:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and (p in _TYPE_TAGS or "[" in p):
            continue  # pydantic's union-branch tags, not field names
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or None


def parse_body(cls: type[BaseModel], body: bytes) -> Any:
    """The body as ``cls``; APIError 400 naming the field (or saying the JSON is malformed)."""
    try:
        return cls.model_validate_json(body or b"")
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] in ("json_invalid", "json_type"):
            raise bad_request(f"the request body is not valid JSON ({err['msg']})", None, "invalid_json") from None
        param = _param(tuple(err.get("loc", ())))
        if err["type"] == "missing":
            raise bad_request(f"missing required parameter '{param}'", param, "missing_parameter") from None
        raise bad_request(f"invalid type for '{param}': {err['msg']}", param, "invalid_type") from None


def _sampling(req: _Common, max_tokens: int | None) -> tuple[SamplingParams, bool]:
    """Checked sampling parameters, and whether ``max_tokens`` was given."""
    if req.n not in (None, 1):
        raise bad_request("only n = 1 is supported", "n")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1 (got {max_tokens})", "max_tokens")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be between 0 and 2 (got {temperature})", "temperature")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1] (got {top_p})", "top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad_request(f"stop takes up to {MAX_STOP} non-empty strings", "stop")
    params = SamplingParams(max_tokens or 1, temperature, top_p, stop, req.seed, bool(req.ignore_eos))
    return params, max_tokens is not None


def _message_text(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("only text content parts are supported", f"messages[{i}].content")
        texts.append(part["text"])
    return "".join(texts)


# ---- the app --------------------------------------------------------------------------------
def create_app(srv) -> FastAPI:
    """The FastAPI app of an ``AdapterServer``."""
    app = FastAPI(title="adapt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    metrics = srv.metrics
    tokenizer = srv.tokenizer

    def auth(request: Request) -> None:
        if srv.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), srv.token.encode()):
            raise unauthorized()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.inc("errors_total", status=str(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), "invalid_request_error", None, None)
        return await _api_error(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return await _api_error(request, from_exception(e))

    # ---- plain endpoints ------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "target": srv.target.name, "active_sequences": srv.engine.active,
                "resident": len(srv.cache.resident_names())}

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        created = int(srv.started)
        data = [{"id": srv.target.name, "object": "model", "created": created, "owned_by": OWNER,
                 "root": srv.target.name, "parent": None, "kind": "variant" if srv.target.variant else "base"}]
        for m in srv.cache.listing():
            data.append({"id": m["id"], "object": "model", "created": created, "owned_by": OWNER,
                         "root": m["id"], "parent": m["parent"], "kind": m["kind"], "resident": m["resident"]})
        return {"object": "list", "data": data}

    @app.post("/v1/load_adapter", dependencies=[Depends(auth)])
    async def load_adapter(request: Request):
        req = parse_body(AdapterRequest, await request.body())
        name = req.lora_name
        t0 = time.perf_counter()

        def load():
            try:
                art = srv.cache.add(name)
            except APIError as e:
                if e.status != 404 or not srv.options.allow_pull or "/" not in name:
                    raise
                from adapterhub_c.workflows.pull import pull_adapter

                pulled, _ = pull_adapter(srv.reg, name)
                art = srv.cache.add(pulled.name)
            srv.cache.release(srv.cache.acquire(srv.cache.resolve(art.name)))
            return art

        try:
            art = await asyncio.to_thread(load)
        except BaseException as e:  # noqa: BLE001
            raise from_exception(e, "lora_name") from None
        return {"status": "loaded", "model": art.name, "kind": art.kind,
                "load_ms": round((time.perf_counter() - t0) * 1000, 3)}

    @app.post("/v1/unload_adapter", dependencies=[Depends(auth)])
    async def unload_adapter(request: Request):
        req = parse_body(AdapterRequest, await request.body())
        art = srv.cache.remove(req.lora_name)
        return {"status": "unloaded", "model": art.name}

    # ---- generation ------------------------------------------------------------------------
    async def resolve(model: str) -> Route:
        try:
            return await asyncio.to_thread(srv.cache.resolve, model)
        except NotFoundError as e:
            raise model_not_found(model, srv.cache.target_names()) from e

    def check_context(n_prompt: int, k: int, params: SamplingParams, given: bool, field: str, default: int):
        context = srv.target.context
        total = n_prompt + k
        soft = f" + {k} soft prompt tokens" if k else ""
        if context is not None and total >= context:
            raise bad_request(f"the prompt has {n_prompt} tokens{soft}, the context is {context} tokens",
                              field, "context_length_exceeded")
        if not given:
            params.max_tokens = default if context is None else max(1, min(default, context - total))
        elif context is not None and total + params.max_tokens > context:
            raise bad_request(f"{n_prompt} prompt tokens{soft} + max_tokens {params.max_tokens} exceed the "
                              f"context of {context} tokens", "max_tokens", "context_length_exceeded")

    def log_request(endpoint: str, model: str, text: str, params: SamplingParams, job: Job | None,
                    status: str, seconds: float) -> None:
        p = {"endpoint": endpoint, "model": model, "max_tokens": params.max_tokens,
             "temperature": params.temperature, "top_p": params.top_p, "stop": params.stop, "seed": params.seed}
        with record_run(srv.reg, "serve request", p) as run:
            run.output = {"status": status, "prompt": text, "seconds": round(seconds, 4),
                          "completion": job.text if job else None,
                          "finish_reason": job.finish_reason if job else None,
                          "completion_tokens": len(job.tokens) if job else 0}

    async def generate(request: Request, endpoint: str, req: _Common, text: str, field: str,
                       max_tokens: int | None, default_max: int):
        t_start = time.perf_counter()
        params, given = _sampling(req, max_tokens)
        route = await resolve(req.model)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if route.prompt is None:  # fail before loading anything
            check_context(len(ids), 0, params, given, field, default_max)
        try:
            acquired: Acquired = await asyncio.to_thread(srv.cache.acquire, route)
        except BaseException as e:  # noqa: BLE001 - a failing adapter fails this request only
            metrics.inc("requests_total", endpoint=endpoint, model=req.model, status="error")
            raise from_exception(e, "model") from None
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                srv.cache.release(acquired)

        try:
            metrics.observe("switch_seconds", acquired.switch_s, resident="yes" if acquired.hit else "no")
            if route.prompt is not None:
                check_context(len(ids), acquired.prompt.num_virtual_tokens, params, given, field, default_max)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def emit(event):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the loop is gone (server shutting down)
                    pass

            job = Job(ids, params, acquired.adapter, acquired.prompt, emit)
            srv.engine.submit(job)
            info = {"switch_ms": round(acquired.switch_s * 1000, 4), "cache": "hit" if acquired.hit else "miss"}
            meta = dict(id=("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                        created=int(time.time()), model=req.model)
            def usage():
                return {"prompt_tokens": len(ids), "completion_tokens": len(job.tokens),
                        "total_tokens": len(ids) + len(job.tokens)}

            def finish(status: str):
                """Count the request; log it (when asked) in a worker thread, returning its future."""
                metrics.inc("requests_total", endpoint=endpoint, model=req.model, status=status)
                if status == "ok":
                    metrics.inc("prompt_tokens_total", len(ids), model=req.model)
                if not srv.options.log_requests:
                    return None
                return loop.run_in_executor(None, log_request, endpoint, req.model, text, params, job, status,
                                            time.perf_counter() - t_start)

            if req.stream:
                released = True  # the stream releases
                include_usage = bool((req.stream_options or {}).get("include_usage"))
                return StreamingResponse(
                    _stream(endpoint, meta, job, queue, info, usage, include_usage, finish,
                            lambda: srv.cache.release(acquired)),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            parts: list[str] = []
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        finish("disconnected")
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "delta":
                    parts.append(event[1])
                elif event[0] == "error":
                    await _settle(finish("error"))
                    raise event[1]
                else:
                    break
            await _settle(finish("ok"))
            body_text = "".join(parts)
            if endpoint == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": body_text},
                          "finish_reason": job.finish_reason, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": body_text, "finish_reason": job.finish_reason, "logprobs": None}
                obj = "text_completion"
            info["first_token_ms"] = _ms(job.first_token_s)
            if req.return_token_ids:
                info["token_ids"] = list(job.tokens)
            return {**meta, "object": obj, "choices": [choice], "usage": usage(), "x_adapterhub": info}
        finally:
            if not released:
                release()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await request.body())
        for field, bad in (("echo", req.echo), ("logprobs", req.logprobs), ("suffix", req.suffix)):
            if bad:
                raise bad_request(f"{field} is not supported", field)
        if req.best_of not in (None, 1):
            raise bad_request("only best_of = 1 is supported", "best_of")
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request("give one prompt (a string, or a list of one string)", "prompt")
            prompt = prompt[0]
        return await generate(request, "completions", req, prompt, "prompt", req.max_tokens,
                              srv.options.default_max_tokens)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(request: Request):
        req = parse_body(ChatRequest, await request.body())
        if req.logprobs:
            raise bad_request("logprobs is not supported", "logprobs")
        if not req.messages:
            raise bad_request("messages must not be empty", "messages")
        if not tokenizer.chat_template:
            raise bad_request(f"{srv.target.name} has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(req.messages)]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template rejects the conversation
            raise bad_request(f"the chat template rejects these messages: {e}", "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await generate(request, "chat", req, text, "messages", max_tokens,
                              srv.options.default_chat_max_tokens)

    return app


async def _settle(future) -> None:
    if future is not None:
        await future


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _stream(endpoint, meta, job: Job, queue: asyncio.Queue, info, usage, include_usage, finish, release):
    """Server-sent events; a client that goes away cancels its sequence (the slot is freed)."""
    chat = endpoint == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None = None, first: bool = False):
        if chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return _sse({**meta, "object": obj, "choices": [choice]})

    status = "disconnected"
    try:
        if chat:
            yield chunk(None, first=True)
        while True:
            event = await queue.get()
            if event[0] == "delta":
                yield chunk(event[1])
            elif event[0] == "error":
                status = "error"
                yield _sse(event[1].body())
                break
            else:
                yield chunk(None, job.finish_reason)
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": usage(),
                                "x_adapterhub": info})
                status = "ok"
                break
        yield b"data: [DONE]\n\n"
    finally:
        # no await here: a cancelled stream (client gone) would be cancelled again at any await
        if status != "ok":
            job.cancel()
        release()
        finish(status)
