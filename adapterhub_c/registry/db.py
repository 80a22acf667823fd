"""Opening a registry database: engine, SQLite pragmas, migrations on open.

SQLite (the default, ``$ADAPTERHUB_HOME/registry.db``) runs in WAL mode with a busy
timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so that concurrent
writers queue on the lock instead of failing with "database is locked" when a reader
upgrades to a writer. Any other SQLAlchemy URL (PostgreSQL for shared use) works too.
Migrations are applied under an exclusive lock (a lock file for SQLite, an advisory
lock for PostgreSQL) so that many processes may open a new registry at once. Opening a
registry that is up to date reads its revision with one query and does not import alembic
(a third of a listing command's start-up); alembic runs only when there is work for it.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError

if TYPE_CHECKING:
    from alembic.config import Config

from adapterhub_c.errors import AdaptError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 60


def default_home() -> Path:
    """``$ADAPTERHUB_HOME``, or ``~/.cache/adapterhub_c``."""
    return Path(os.environ.get("ADAPTERHUB_HOME") or Path.home() / ".cache" / "adapterhub_c")


def default_url(home: Path) -> str:
    """``$ADAPTERHUB_DB_URL``, or the SQLite file in the home folder."""
    return os.environ.get("ADAPTERHUB_DB_URL") or f"sqlite:///{home / 'registry.db'}"


def _alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest migration this code knows (alembic's reading of the migration scripts)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


_REVISION_RE = re.compile(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", re.M)
_DOWN_RE = re.compile(r"^down_revision\s*=\s*['\"]([^'\"]+)['\"]", re.M)


@functools.lru_cache(maxsize=1)
def script_head() -> str | None:
    """The newest migration read off the scripts' ``revision`` / ``down_revision`` lines without
    importing alembic; None when they do not form one chain (then alembic decides). A test
    checks it equals :func:`head_revision`."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        text_ = path.read_text(encoding="utf-8")
        if (rev := _REVISION_RE.search(text_)) is not None:
            revisions.add(rev.group(1))
        if (down := _DOWN_RE.search(text_)) is not None:
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


@contextlib.contextmanager
def _migration_lock(engine: Engine, url: str):
    if url.startswith("sqlite") and engine.url.database not in (None, "", ":memory:"):
        lock_path = Path(engine.url.database).with_suffix(".migrate.lock")
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(727272)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(727272)"))
                conn.commit()
    else:
        yield


def _current_revision(engine: Engine) -> tuple[str | None, bool]:
    """(alembic revision or None, whether the database has any other tables)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    return rev, bool(tables)


def _stored_revision(engine: Engine) -> str | None:
    """The revision the database records, by one plain query (None: no version table, or none set)."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError):  # no such table: a new or foreign database
            return None


def upgrade(engine: Engine, url: str) -> None:
    """Bring the schema to the newest migration, refusing foreign or newer databases."""
    try:
        quick_head = script_head()
        if quick_head is not None and _stored_revision(engine) == quick_head:
            return  # up to date: alembic is not needed (nor imported)
        head = head_revision()
        rev, has_tables = _current_revision(engine)
        if rev == head:
            return
        with _migration_lock(engine, url):
            rev, has_tables = _current_revision(engine)
            if rev == head:
                return
            if rev is None and has_tables:
                raise AdaptError(f"{_describe(url)} is not an adapterhub-c registry (it has foreign tables)")
            if rev is not None and not _known_revision(rev):
                raise AdaptError(f"{_describe(url)} was written by a newer adapterhub-c (schema {rev})")
            from alembic import command

            cfg = _alembic_config()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except (DatabaseError, OperationalError) as e:
        raise AdaptError(f"cannot open registry {_describe(url)}: {str(e.orig).splitlines()[0]}") from None


def _known_revision(rev: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(rev) is not None
    except CommandError:
        return False


def describe_url(url: str) -> str:
    """A database URL safe to print: the password, if any, is hidden (the text before '://'
    only, when sqlalchemy cannot parse it)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse: show its scheme only
        return url.split("://", 1)[0] + "://…" if "://" in url else "<unparsable URL>"


_describe = describe_url


@contextlib.contextmanager
def scratch_postgres_database(admin_url: str, prefix: str = "adapt_scratch"):
    """A fresh, empty PostgreSQL database on the server ``admin_url`` names, dropped on exit.

    Yields its URL (password included, for the workers it is handed to). For tests and
    benchmarks that need a registry on a real server without touching existing databases.
    """
    import uuid

    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
