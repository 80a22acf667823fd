"""One generation request, from its body to its answer (JSON, or server-sent events).

:func:`generate` checks the sampling parameters, resolves the model, checks the context,
pins the adapter and prompt (:meth:`~.adapters.AdapterCache.acquire`), submits a
:class:`~.engine.Job` and either collects its events into one JSON body or streams them.
Each request is counted once in ``requests_total`` (status ok / error / disconnected) and,
with ``--log-requests``, written as a ``runs`` row in a worker thread.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from adapterhub_c.errors import NotFoundError
from adapterhub_c.registry.runs import record_run
from adapterhub_c.serve.adapters import Acquired, Route
from adapterhub_c.serve.bodies import GenerationBody, sampling_params
from adapterhub_c.serve.engine import Job, SamplingParams
from adapterhub_c.serve.errors import bad_request, from_exception, model_not_found
from adapterhub_c.serve.state import ServeState

POLL_S = 0.25  # how often a waiting (non-streaming) request checks that its client is still there


@dataclass
class Call:
    """What a handler asks :func:`generate` for."""

    endpoint: str            # "completions" or "chat"
    body: GenerationBody
    text: str                # the prompt as the model reads it (chat: the template applied)
    field: str               # the body field a context error names
    max_tokens: int | None   # as given (None: choose from the context)
    default_max: int


@dataclass
class Run:
    """A submitted request: its job, where its events arrive, and what its answer carries."""

    state: ServeState
    call: Call
    ids: list[int]
    params: SamplingParams
    acquired: Acquired
    job: Job
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    t_start: float
    meta: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def usage(self) -> dict:
        """The OpenAI ``usage`` object."""
        n, k = len(self.ids), len(self.job.tokens)
        return {"prompt_tokens": n, "completion_tokens": k, "total_tokens": n + k}

    def finish(self, status: str):
        """Count the request; log it (when asked) in a worker thread, returning its future."""
        model = self.call.body.model
        self.state.metrics.inc("requests_total", endpoint=self.call.endpoint, model=model, status=status)
        if status == "ok":
            self.state.metrics.inc("prompt_tokens_total", len(self.ids), model=model)
        if not self.state.options.log_requests:
            return None
        return self.loop.run_in_executor(None, log_request, self, status, time.perf_counter() - self.t_start)


def log_request(run: Run, status: str, seconds: float) -> None:
    """A ``serve request`` runs row: the parameters, the prompt and what came back."""
    params, job = run.params, run.job
    p = {"endpoint": run.call.endpoint, "model": run.call.body.model, "max_tokens": params.max_tokens,
         "temperature": params.temperature, "top_p": params.top_p, "stop": params.stop, "seed": params.seed}
    with record_run(run.state.reg, "serve request", p) as row:
        row.output = {"status": status, "prompt": run.call.text, "seconds": round(seconds, 4),
                      "completion": job.text if job else None,
                      "finish_reason": job.finish_reason if job else None,
                      "completion_tokens": len(job.tokens) if job else 0}


def check_context(context: int | None, n_prompt: int, k: int, params: SamplingParams, given: bool,
                  call: Call) -> None:
    """APIError 400 when prompt + soft prompt (+ max_tokens) exceed the context; without
    ``max_tokens`` given, choose it (the default, capped by what the context leaves)."""
    total = n_prompt + k
    soft = f" + {k} soft prompt tokens" if k else ""
    if context is not None and total >= context:
        raise bad_request(f"the prompt has {n_prompt} tokens{soft}, the context is {context} tokens",
                          call.field, "context_length_exceeded")
    if not given:
        params.max_tokens = call.default_max if context is None else max(1, min(call.default_max, context - total))
    elif context is not None and total + params.max_tokens > context:
        raise bad_request(f"{n_prompt} prompt tokens{soft} + max_tokens {params.max_tokens} exceed the "
                          f"context of {context} tokens", "max_tokens", "context_length_exceeded")


async def resolve(state: ServeState, model: str) -> Route:
    """The request's route (in a worker thread: it may read the registry)."""
    try:
        return await asyncio.to_thread(state.cache.resolve, model)
    except NotFoundError as e:
        raise model_not_found(model, state.cache.target_names()) from e


async def acquire(state: ServeState, route: Route, call: Call) -> Acquired:
    """Pin the route's parts (loading them when needed); a failing adapter fails this request only."""
    try:
        return await asyncio.to_thread(state.cache.acquire, route)
    except BaseException as e:  # noqa: BLE001
        state.metrics.inc("requests_total", endpoint=call.endpoint, model=call.body.model, status="error")
        raise from_exception(e, "model") from None


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[tuple], None]:
    def emit(event):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass
    return emit


def submit(state: ServeState, call: Call, ids: list[int], params: SamplingParams, acquired: Acquired,
           t_start: float) -> Run:
    """Hand the job to the engine; its events arrive on the returned run's queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(ids, params, acquired.adapter, acquired.prompt, _emitter(loop, queue))
    state.engine.submit(job)
    run = Run(state, call, ids, params, acquired, job, queue, loop, t_start)
    run.info = {"switch_ms": round(acquired.switch_s * 1000, 4), "cache": "hit" if acquired.hit else "miss"}
    run.meta = dict(id=("chatcmpl-" if call.endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                    created=int(time.time()), model=call.body.model)
    return run


def prompt_ids(state: ServeState, call: Call) -> list[int]:
    """The prompt's token ids; an empty prompt is the tokenizer's BOS token (APIError 400 naming
    the field when there is none: a row without tokens has no position to predict from)."""
    ids = state.tokenizer(call.text, add_special_tokens=False)["input_ids"]
    if not ids:
        bos = state.tokenizer.bos_token_id
        if bos is None:
            raise bad_request(f"the {call.field} is empty (no tokens) and the tokenizer has no BOS token",
                              call.field)
        ids = [int(bos)]
    return ids


async def generate(state: ServeState, request: Request, call: Call):
    """The answer to one completion or chat request (see the module docstring)."""
    t_start = time.perf_counter()
    params, given = sampling_params(call.body, call.max_tokens)
    route = await resolve(state, call.body.model)
    ids = prompt_ids(state, call)
    if route.prompt is None:  # fail before loading anything
        check_context(state.target.context, len(ids), 0, params, given, call)
    acquired = await acquire(state, route, call)
    streaming = False
    try:
        state.metrics.observe("switch_seconds", acquired.switch_s, resident="yes" if acquired.hit else "no")
        if route.prompt is not None:
            check_context(state.target.context, len(ids), acquired.prompt.num_virtual_tokens, params, given, call)
        run = submit(state, call, ids, params, acquired, t_start)
        if call.body.stream:
            streaming = True  # the stream releases
            return stream_response(run)
        return await collect(run, request)
    finally:
        if not streaming:
            state.cache.release(acquired)


async def collect(run: Run, request: Request):
    """Wait for the whole completion; 499 (and the job cancelled) when the client goes away."""
    parts: list[str] = []
    while True:
        try:
            event = await asyncio.wait_for(run.queue.get(), timeout=POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                run.job.cancel()
                run.finish("disconnected")
                return JSONResponse({}, status_code=499)
            continue
        if event[0] == "delta":
            parts.append(event[1])
        elif event[0] == "error":
            await _settle(run.finish("error"))
            raise event[1]
        else:
            break
    await _settle(run.finish("ok"))
    return completion_body(run, "".join(parts))


def completion_body(run: Run, text: str) -> dict:
    """The JSON answer: ``text_completion`` or ``chat.completion``, usage and ``x_adapterhub``."""
    job = run.job
    if run.call.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": job.finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}
        obj = "text_completion"
    run.info["first_token_ms"] = _ms(job.first_token_s)
    if run.call.body.return_token_ids:
        run.info["token_ids"] = list(job.tokens)
    return {**run.meta, "object": obj, "choices": [choice], "usage": run.usage(), "x_adapterhub": run.info}


def stream_response(run: Run) -> StreamingResponse:
    """Server-sent events of ``run``; the stream releases the pinned entries when it ends."""
    include_usage = bool((run.call.body.stream_options or {}).get("include_usage"))
    return StreamingResponse(_stream(run, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _settle(future) -> None:
    if future is not None:
        await future


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _chunk(run: Run, text: str | None, finish_reason: str | None = None, first: bool = False) -> bytes:
    """One streamed chunk (chat: a delta; completions: a text piece)."""
    if run.call.endpoint == "chat":
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return _sse({**run.meta, "object": obj, "choices": [choice]})


async def _stream(run: Run, include_usage: bool):
    """Server-sent events; a client that goes away cancels its sequence (the slot is freed)."""
    obj = "chat.completion.chunk" if run.call.endpoint == "chat" else "text_completion"
    status = "disconnected"
    try:
        if run.call.endpoint == "chat":
            yield _chunk(run, None, first=True)
        while True:
            event = await run.queue.get()
            if event[0] == "delta":
                yield _chunk(run, event[1])
                continue
            if event[0] == "error":
                status = "error"
                yield _sse(event[1].body())
                break
            yield _chunk(run, None, run.job.finish_reason)
            if include_usage:
                yield _sse({**run.meta, "object": obj, "choices": [], "usage": run.usage(), "x_adapterhub": run.info})
            status = "ok"
            break
        yield b"data: [DONE]\n\n"
    finally:
        # no await here: a cancelled stream (client gone) would be cancelled again at any await
        if status != "ok":
            run.job.cancel()
        run.state.cache.release(run.acquired)
        run.finish(status)


__all__ = ["Call", "Run", "generate", "check_context", "log_request", "completion_body", "stream_response"]
