"""The registry: SQLAlchemy models, sessions, Alembic migrations and the blob store."""
from adapterhub_c.registry.store import Registry

__all__ = ["Registry"]
