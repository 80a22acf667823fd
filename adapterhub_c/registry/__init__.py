"""The registry: SQLAlchemy models, sessions, Alembic migrations and the blob store."""
from .store import Registry

__all__ = ["Registry"]
