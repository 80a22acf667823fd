"""Alembic environment: runs on the connection the registry hands over."""
from alembic import context

from adapterhub_c.registry.models import Base

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
