"""The Hub's naming rules and ids, shared by the client and the local server.

Repo ids are ``namespace/name`` with each part 1-96 characters of ``[A-Za-z0-9._-]``,
starting alphanumeric, no ``--`` or ``..``, not ending in ``-``, ``.`` or ``.git``
(``huggingface_hub.utils.validate_repo_id``). A regular file's ``oid`` is its git blob id.
"""
from __future__ import annotations

import hashlib
import re

from adapterhub_c.fsutil import redact_url

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class BadName(ValueError):
    """A repo id that breaks the Hub's naming rules (the Hub answers 400 BadRequest)."""

    code, status = "BadRequest", 400


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages: the one way input is
    echoed. Credentials in anything that looks like a URL (``scheme://user:password@``) are
    removed first, so neither they nor a cut piece of them is ever shown."""
    text = redact_url(repr(value))
    return text if len(text) <= limit else text[:limit] + "..."


def valid_name_part(part: str) -> bool:
    """Whether ``part`` is a valid namespace or repo name on the Hub."""
    return (bool(_NAME_RE.match(part)) and "--" not in part and ".." not in part
            and not part.endswith(("-", ".", ".git")))


def check_repo_id(repo_id: str) -> tuple[str, str]:
    """Split ``namespace/name`` and validate both parts (BadName if either is invalid)."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(valid_name_part(p) for p in parts):
        raise BadName(f"invalid repo id {shown(repo_id)} (expected namespace/name)")
    return parts[0], parts[1]


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub calls a regular file's ``oid``)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()
