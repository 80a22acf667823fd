"""The registry: SQLAlchemy models, sessions, Alembic migrations and the blob store.

``Registry`` loads on first use, so that light modules (``kinds``) can be imported without
SQLAlchemy: the CLI's help reads them at start-up.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Registry"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from adapterhub_c.registry.store import Registry

        return Registry
    raise AttributeError(f"module 'adapterhub_c.registry' has no attribute {name!r}")
