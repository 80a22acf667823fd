"""Request bodies of the OpenAI-shaped routes, parsed and checked (APIError 400 naming the field)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from adapterhub_c.serve.engine import GREEDY_BELOW, SamplingParams
from adapterhub_c.serve.errors import bad_request

MAX_STOP = 4
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "function-after", "function-before"}


# ---- request bodies -----------------------------------------------------------------------
class GenerationBody(BaseModel):
    """Fields every generation request shares (OpenAI's, and vLLM's extras)."""

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


class CompletionRequest(GenerationBody):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict] | None = None


class ChatRequest(GenerationBody):
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


def sampling_params(req: GenerationBody, max_tokens: int | None) -> tuple[SamplingParams, bool]:
    """Checked sampling parameters, and whether ``max_tokens`` was given."""
    if req.n not in (None, 1):
        raise bad_request("only n = 1 is supported", "n")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1 (got {max_tokens})", "max_tokens")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be between 0 and 2 (got {temperature})", "temperature")
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # greedy: what sampling at a vanishing temperature tends to
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1] (got {top_p})", "top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad_request(f"stop takes up to {MAX_STOP} non-empty strings", "stop")
    params = SamplingParams(max_tokens or 1, temperature, top_p, stop, req.seed, bool(req.ignore_eos))
    return params, max_tokens is not None


def message_text(m: ChatMessage, i: int) -> str:
    """The text of chat message ``m`` (number ``i``): a string, or its text parts joined."""
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("only text content parts are supported", f"messages[{i}].content")
        texts.append(part["text"])
    return "".join(texts)


__all__ = ["GenerationBody", "CompletionRequest", "ChatRequest", "ChatMessage", "AdapterRequest", "parse_body",
           "sampling_params", "message_text", "MAX_STOP", "GREEDY_BELOW"]
