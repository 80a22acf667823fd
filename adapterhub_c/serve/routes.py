"""The routers of ``adapt serve``: small handlers over the :class:`~.state.ServeState`.

- :data:`public`: ``GET /health`` (never behind the token);
- :data:`admin`: ``GET /metrics``, ``GET /v1/models``, ``POST /v1/load_adapter`` /
  ``/v1/unload_adapter`` (vLLM's names and body: ``{"lora_name": …}``);
- :data:`generation`: ``POST /v1/completions``, ``POST /v1/chat/completions``.
"""
from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from adapterhub_c.httpserve import read_limited
from adapterhub_c.registry.models import Artifact
from adapterhub_c.serve.bodies import AdapterRequest, ChatRequest, CompletionRequest, message_text, parse_body
from adapterhub_c.serve.errors import APIError, bad_request, from_exception
from adapterhub_c.serve.generation import Call, generate
from adapterhub_c.serve.state import ServeState, auth, get_state

OWNER = "adapterhub-c"
State = Annotated[ServeState, Depends(get_state)]  # what every handler receives

public = APIRouter()
admin = APIRouter(dependencies=[Depends(auth)])
generation = APIRouter(dependencies=[Depends(auth)])


# ---- plain endpoints ----------------------------------------------------------------------
@public.get("/health")
async def health(state: State):
    """Liveness, the target, and how busy the server is."""
    return {"status": "ok", "target": state.target.name, "active_sequences": state.engine.active,
            "resident": len(state.cache.resident_names())}


@admin.get("/metrics")
async def prometheus(state: State):
    """The metrics as Prometheus text."""
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _model_row(state: ServeState, row: dict) -> dict:
    return {"id": row["id"], "object": "model", "created": int(state.started), "owned_by": OWNER,
            "root": row["id"], "parent": row["parent"], "kind": row["kind"], "resident": row["resident"]}


@admin.get("/v1/models")
async def models(state: State):
    """The target, then every servable adapter and prompt (with its parent and residency)."""
    name = state.target.name
    data = [{"id": name, "object": "model", "created": int(state.started), "owned_by": OWNER, "root": name,
             "parent": None, "kind": "variant" if state.target.variant else "base"}]
    data += [_model_row(state, m) for m in state.cache.listing()]
    return {"object": "list", "data": data}


async def read_body(request: Request) -> bytes:
    """The request body within the server's limit and deadline (413 / 408 as the Hub server's,
    :func:`adapterhub_c.httpserve.read_limited`; a client gone mid-upload ends quietly)."""
    options = get_state(request).options
    return await read_limited(request, options.max_body_bytes, options.body_timeout_s)


def load_or_pull(state: ServeState, name: str) -> Artifact:
    """Make ``name`` servable and resident; with ``--allow-pull``, pull a Hub repo id first."""
    try:
        art = state.cache.add(name)
    except APIError as e:
        if e.status != 404 or not state.options.allow_pull or "/" not in name:
            raise
        from adapterhub_c.workflows.pull import pull_adapter

        pulled, _ = pull_adapter(state.reg, name)
        art = state.cache.add(pulled.name)
    state.cache.release(state.cache.acquire(state.cache.resolve(art.name)))
    return art


@admin.post("/v1/load_adapter")
async def load_adapter(request: Request, state: State):
    """vLLM's ``load_adapter``: serve a registered adapter (or pull one) and make it resident."""
    req = parse_body(AdapterRequest, await read_body(request))
    t0 = time.perf_counter()
    try:
        art = await asyncio.to_thread(load_or_pull, state, req.lora_name)
    except BaseException as e:  # noqa: BLE001
        raise from_exception(e, "lora_name") from None
    return {"status": "loaded", "model": art.name, "kind": art.kind,
            "load_ms": round((time.perf_counter() - t0) * 1000, 3)}


@admin.post("/v1/unload_adapter")
async def unload_adapter(request: Request, state: State):
    """vLLM's ``unload_adapter``: stop serving a name and drop it from memory."""
    req = parse_body(AdapterRequest, await read_body(request))
    art = state.cache.remove(req.lora_name)
    return {"status": "unloaded", "model": art.name}


# ---- generation ------------------------------------------------------------------------------
def _completion_prompt(req: CompletionRequest) -> str:
    """The one prompt of a completions body; APIError 400 for what we do not support."""
    for name, bad in (("echo", req.echo), ("logprobs", req.logprobs), ("suffix", req.suffix)):
        if bad:
            raise bad_request(f"{name} is not supported", name)
    if req.best_of not in (None, 1):
        raise bad_request("only best_of = 1 is supported", "best_of")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("give one prompt (a string, or a list of one string)", "prompt")
        prompt = prompt[0]
    return prompt


@generation.post("/v1/completions")
async def completions(request: Request, state: State):
    """OpenAI's ``/v1/completions`` (one prompt, n = 1)."""
    req = parse_body(CompletionRequest, await read_body(request))
    call = Call("completions", req, _completion_prompt(req), "prompt", req.max_tokens,
                state.options.default_max_tokens)
    return await generate(state, request, call)


def _chat_text(state: ServeState, req: ChatRequest) -> str:
    """The conversation through the tokenizer's chat template; APIError 400 naming what is wrong."""
    if req.logprobs:
        raise bad_request("logprobs is not supported", "logprobs")
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    if not state.tokenizer.chat_template:
        raise bad_request(f"{state.target.name} has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(req.messages)]
    try:
        return state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template rejects the conversation
        raise bad_request(f"the chat template rejects these messages: {e}", "messages") from None


@generation.post("/v1/chat/completions")
async def chat(request: Request, state: State):
    """OpenAI's ``/v1/chat/completions`` (text content parts only, n = 1)."""
    req = parse_body(ChatRequest, await read_body(request))
    text = _chat_text(state, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    call = Call("chat", req, text, "messages", max_tokens, state.options.default_chat_max_tokens)
    return await generate(state, request, call)


__all__ = ["public", "admin", "generation", "load_or_pull", "OWNER"]
