"""Error types that the CLI turns into one-line messages and exit codes.

UsageError  -> exit 2 (bad input: unknown name, invalid option value, wrong file)
AdaptError  -> exit 1 (the operation failed: corrupt data, network, training)
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

# scheme://userinfo@ : userinfo runs to the last "@" before the host's "/" (a password may hold "@")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def redact_url(text: str | None) -> str | None:
    """``text`` (a URL, or a message holding URLs) with any ``user:password@`` removed from
    every ``scheme://`` URL in it: use before storing or printing an endpoint, a URL, or any
    input echoed in a message (``fsutil`` and ``hub.names.shown`` re-use it)."""
    return text if not text else _USERINFO.sub(r"\1", text)


class AdaptError(Exception):
    """An operation failed; the CLI prints the message and exits with 1."""

    exit_code = 1


class UsageError(AdaptError):
    """The user asked for something invalid; the CLI exits with 2."""

    exit_code = 2


class NotFoundError(UsageError):
    """A name or id matched nothing; suggests the closest known names."""

    def __init__(self, what: str, name: str, known: Iterable[str] = ()):
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        super().__init__(f"unknown {what} {redact_url(repr(name))}{hint}")
        self.name = name


class IntegrityError(AdaptError):
    """Stored data does not match its digest, or a file is corrupt/truncated."""


class AdaptWarning(UserWarning):
    """Something the user should know about a result that still succeeded.

    Workflows raise it through :mod:`warnings` and also list its message in the returned
    report's ``warnings``; the CLI prints those as ``warning: …`` lines.
    """
