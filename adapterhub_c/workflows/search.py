"""``adapt search``: adapters of a base on the Hub, marked with what the registry already holds."""
from __future__ import annotations

from sqlalchemy import select

from adapterhub_c.errors import UsageError
from adapterhub_c.hub import client
from adapterhub_c.registry.models import Artifact
from adapterhub_c.registry.store import Registry
from adapterhub_c.workflows.hubcommon import hub_label


def _pulled_by_repo(s) -> dict[str, list[tuple[str, str]]]:
    """{repo id: [(artefact name, commit sha)]} of every artefact pulled from the Hub."""
    pulled: dict[str, list[tuple[str, str]]] = {}
    for art in s.scalars(select(Artifact).where(Artifact.source_sha.isnot(None))):
        repo_id, _, sha = (art.source or "").partition("@")
        if sha == art.source_sha:
            pulled.setdefault(repo_id, []).append((art.name, sha))
    return pulled


def search_adapters_for(reg: Registry, base: str, limit: int = 50, token: str | None = None,
                        endpoint: str | None = None) -> list[dict]:
    """Adapters of ``base`` on the Hub, each marked ``pulled`` (and as what) if in the registry.

    ``base`` may be a registered base (its hub id is searched) or any hub id
    (``list_models(filter="base_model:adapter:<base>")``).
    """
    if limit is None or limit < 1:
        raise UsageError("--limit must be at least 1")
    with reg.session() as s:
        row = reg.find_base(s, base)
        hub_base = hub_label(row) if row is not None else base
        pulled = _pulled_by_repo(s)
    found = client.search_adapters(hub_base, limit=limit, token=token, endpoint=endpoint)
    for m in found:
        mine = pulled.get(m["id"], [])
        m["pulled"] = bool(mine)
        m["pulled_as"] = [n for n, _ in mine]
        m["pulled_latest"] = any(sha == m.get("sha") for _, sha in mine)
    return found


__all__ = ["search_adapters_for"]
