"""HTTP edges of the local Hub: error answers, request bodies and URL parts validated on arrival.

Every malformed request gets a 4xx with the Hub's ``X-Error-Code`` / ``X-Error-Message``
headers; nothing taken from a request is put into a header unescaped. Bodies are read
within a limit (413 past it) and parsed off the event loop.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapterhub_c.httpserve import (  # noqa: F401 - DRAIN_* and drain re-exported (their old home)
    DRAIN_MAX_BYTES,
    DRAIN_MAX_S,
    BodyTooLarge,
    drain,
    read_limited,
)
from adapterhub_c.hubserver.store import check_repo_id, check_repo_path, check_revision

# JSON bodies (create, settings, preupload, paths-info, validate-yaml) are metadata: a
# preupload batch of 256 files is ~200 KB. Commits carry whole files base64-encoded (this
# server offers no LFS storage) and are held in memory while parsed: up to ~4x the body for
# one large file (the body, that line, its JSON string and the decoded bytes).
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_UPLOAD_BYTES = 2 << 30
_NOT_HEADER_SAFE_RE = re.compile(r"[^\x20-\x7e]")
_TRUE = ("true", "True", "1")


class HubError(Exception):
    """An HTTP error answer with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def bad_request(message: str) -> HubError:
    """A 400 BadRequest answer."""
    return HubError(400, message, "BadRequest")


def too_large(limit: int, drained: bool) -> HubError:
    """A 413 answer; without the whole body read, with Connection: close (the rest is no next request)."""
    return HubError(413, f"request body larger than {limit} bytes", "PayloadTooLarge",
                    None if drained else {"Connection": "close"})


def header_safe(text: str, limit: int = 500) -> str:
    """``text`` as printable ASCII for a header value: newlines become spaces, any other
    character outside printable ASCII is escaped (``\\r``, ``\\x00``, ``\\u65e5``)."""
    text = text[:limit].replace("\n", " ")
    return _NOT_HEADER_SAFE_RE.sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text)[:limit]


def content_disposition(filename: str) -> str:
    """An attachment header naming ``filename``: an ASCII fallback and the RFC 5987 UTF-8 form."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def error_response(status: int, message: str, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """A JSON error answer with the Hub's error headers (the message made header-safe)."""
    h = {"X-Error-Message": header_safe(message)}
    if code:
        h["X-Error-Code"] = code
    h.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=h)


def iso(ts: float) -> str:
    """A UTC timestamp as the Hub writes it (millisecond ISO 8601 with ``Z``)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def flag(request: Request, name: str) -> bool:
    """Whether query parameter ``name`` is set to true (``true``, ``True`` or ``1``)."""
    return request.query_params.get(name) in _TRUE


def base_url(request: Request) -> str:
    """The server's URL as the client reached it, without a trailing slash."""
    return str(request.base_url).rstrip("/")


# ---- request input: validated at the edge ---------------------------------------------------
def checked(ns: str, name: str, revision: str | None = None, path: str | None = None) -> str:
    """Validate the repo id, revision and file path taken from a URL (400 if any is malformed);
    returns the repo id."""
    repo_id = f"{ns}/{name}"
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    if path is not None:
        check_repo_path(path)
    return repo_id


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes (the reading
    shared with ``adapt serve``: :func:`adapterhub_c.httpserve.read_limited`)."""
    try:
        return await read_limited(request, limit)
    except BodyTooLarge as e:
        raise too_large(limit, e.drained) from None


async def json_body(request: Request, limit: int) -> dict:
    """The request body as a JSON object: read within ``limit``, parsed off the event loop."""
    return await run_in_threadpool(json_object, await read_body(request, limit))


def json_object(raw: bytes) -> dict:
    """``raw`` parsed as a JSON object (400 if it is not one)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 too
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def optional(body: dict, key: str, kind: type):
    """``body[key]`` when it is a ``kind``, None when absent or null; 400 otherwise."""
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"{key!r} must be a {kind.__name__}")
    return value


def list_of(body: dict, key: str, kind: type) -> list:
    """``body[key]`` when it is a list of ``kind`` ([] when absent); 400 otherwise."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise bad_request(f"{key!r} must be a list of {kind.__name__}")
    return value


def visibility(body: dict) -> bool | None:
    """``private`` / ``visibility`` of a create or settings body: True, False or None (unset)."""
    private = optional(body, "private", bool)
    seen = optional(body, "visibility", str)
    if seen is not None:
        if seen not in ("public", "private"):
            raise bad_request("'visibility' must be 'public' or 'private'")
        private = seen == "private"
    return private
