"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a request can meet becomes an :class:`APIError` with its HTTP status; the
app turns it into that JSON body. Registry errors map onto it in :func:`from_exception`:
unknown names 404, bad input 400, corrupt data 500 (for that request only).
"""
from __future__ import annotations

import difflib
from typing import Iterable

from adapterhub_c.errors import AdaptError, IntegrityError, NotFoundError, UsageError


class APIError(Exception):
    """A request failed with ``status``; ``param`` names the offending field when there is one."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 in the OpenAI error shape, naming the offending parameter."""
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: str, known: Iterable[str], hint: str = "") -> APIError:
    """404 naming the closest servable names (``difflib``, as the CLI's suggestions)."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    msg = f"the model {name!r} does not exist"
    if close:
        msg += f"; closest: {', '.join(close)}"
    if hint:
        msg += f" ({hint})"
    return APIError(404, msg, "invalid_request_error", "model", "model_not_found")


def unauthorized() -> APIError:
    """A 401 that echoes nothing the client sent."""
    # never echo what the client sent: it may be a real key meant for another server
    return APIError(401, "missing or invalid API key (send 'Authorization: Bearer <token>')",
                    "authentication_error", None, "invalid_api_key")


def from_exception(e: BaseException, param: str | None = None) -> APIError:
    """An APIError for an exception raised while resolving, loading or running a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, NotFoundError):
        return APIError(404, str(e), "invalid_request_error", param, "model_not_found")
    if isinstance(e, UsageError):
        return bad_request(str(e), param)
    if isinstance(e, IntegrityError):
        return APIError(500, f"corrupt adapter data: {e}", "server_error", param, "corrupt_artifact")
    if isinstance(e, AdaptError):
        return APIError(500, str(e), "server_error", param, None)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error", param, None)
