"""What every route of the local Hub works on: the store, the token, the user, the limits.

One :class:`HubState` per app (``app.state.hub``); handlers receive it through the
:data:`Hub` dependency. Authentication: when a token is set, writes need
``Authorization: Bearer <token>`` and private repos are visible only with it; public reads
need nothing. Tokens are never logged.
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from adapterhub_c.hub.cards import card_tags
from adapterhub_c.hubserver.cardcache import CardCache
from adapterhub_c.hubserver.http import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES, HubError, iso
from adapterhub_c.hubserver.store import RepoStore, StoreError, file_entry_json

DEFAULT_USER = "local"
_COMMIT_ROUTE_RE = re.compile(r"^/api/models/[^/]+/[^/]+/commit/")


@dataclass
class HubState:
    """The store and settings one app serves (``token`` None: no authentication)."""

    store: RepoStore
    token: str | None = None
    user: str = DEFAULT_USER
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    cards: CardCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cards = CardCache(self.store)

    def body_limit(self, method: str, path: str) -> int:
        """The most bytes a request body may have: commits carry file contents, the rest is JSON."""
        if method == "POST" and _COMMIT_ROUTE_RE.match(path):
            return self.max_upload_bytes
        return self.max_body_bytes

    # ---- auth -----------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        """Whether the request carries the token (always, when the server has none)."""
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def require_write(self, request: Request) -> None:
        """401 unless the request may write."""
        if not self.authorized(request):
            raise HubError(401, "Invalid credentials in Authorization header")

    def readable(self, request: Request, repo_id: str) -> dict:
        """The repo's metadata if the caller may read it; RepoNotFound (401/404) otherwise."""
        try:
            meta = self.store.repo_meta(repo_id)
        except StoreError as e:
            raise HubError(401 if not self.authorized(request) else 404,
                           f"Repository not found: {repo_id}", "RepoNotFound") from e
        if meta.get("private") and not self.authorized(request):
            raise HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return meta

    # ---- answers --------------------------------------------------------------
    def model_json(self, repo_id: str, meta: dict, commit, blobs: bool = False,
                   siblings: bool = True, card: bool = True) -> dict:
        """A repo as ``/api/models`` describes it (``ModelInfo``)."""
        data = self.cards.get(repo_id, commit)
        out = {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.id, "private": bool(meta.get("private")), "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": card_tags(data),
            "library_name": data.get("library_name"), "pipeline_tag": data.get("pipeline_tag"),
            "lastModified": iso(commit.timestamp), "createdAt": iso(meta["created_at"]),
        }
        if card:
            out["cardData"] = data
        if siblings:
            out["siblings"] = [_sibling(path, e, blobs) for path, e in sorted(commit.files.items())]
        return out


def _sibling(path: str, entry: dict, blobs: bool) -> dict:
    item = {"rfilename": path}
    if blobs:
        item.update(size=entry["size"], blobId=entry["oid"])
        if file_entry_json(path, entry).get("lfs"):
            item["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": 134}
    return item


def hub_state(request: Request) -> HubState:
    """The app's :class:`HubState` (a FastAPI dependency)."""
    return request.app.state.hub


Hub = Annotated[HubState, Depends(hub_state)]
