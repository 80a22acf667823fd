"""Registry: schema via Alembic, lookups, uniqueness, corrupt and foreign databases."""
from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from adapterhub_c.errors import AdaptError, NotFoundError, UsageError
from adapterhub_c.registry import Registry
from adapterhub_c.registry.artifacts import check_new_name, register_artifact, unique_name
from adapterhub_c.registry.models import Base, BaseModel
from adapterhub_c.registry.runs import record_run


def test_migrations_create_schema_matching_models(tmp_path):
    reg = Registry(home=tmp_path)
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    with reg.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is not None


def test_sqlite_uses_wal(reg):
    con = sqlite3.connect(reg.home / "registry.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_lookup_by_name_hub_id_and_id_prefix(reg):
    with reg.session() as s:
        s.add(BaseModel(name="builtin:x", hub_id="Org/X"))
    b = reg.get("builtin:x")
    assert reg.get("Org/X").id == b.id
    assert reg.get(b.id[:6]).id == b.id
    with pytest.raises(NotFoundError, match="did you mean: builtin:x"):
        reg.get("builtin:y")


def test_artifact_names_unique(reg, tiny_base, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("x")
    register_artifact(reg, kind="lora", name="a", base_id=tiny_base.id, folder=tmp_path / "f")
    with pytest.raises(UsageError, match="already exists"):
        register_artifact(reg, kind="lora", name="a", base_id=tiny_base.id, folder=tmp_path / "f")
    assert unique_name(reg, "a") == "a-2"


def test_check_new_name_refuses_empty_and_taken_names(reg, tiny_base, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("x")
    register_artifact(reg, kind="lora", name="a", base_id=tiny_base.id, folder=tmp_path / "f")
    check_new_name(reg, None)  # the tool makes one up
    check_new_name(reg, "b")
    for bad in ("", "  "):
        with pytest.raises(UsageError, match="must not be empty"):
            check_new_name(reg, bad)
    with pytest.raises(UsageError, match="'a' already exists"):
        check_new_name(reg, "a")


def test_artifact_kinds_are_one_list():
    from adapterhub_c.registry.kinds import ADAPTER_KINDS, ARTIFACT_KINDS, LORA_KINDS, PACK_KINDS, PROMPT_KINDS

    assert set(ARTIFACT_KINDS) == {"lora", "recovered-lora", "merged", "composed", "pack", "prompt"}
    assert ADAPTER_KINDS == LORA_KINDS + PACK_KINDS and set(ARTIFACT_KINDS) - set(ADAPTER_KINDS) == set(PROMPT_KINDS)
    with pytest.raises(ValueError, match="unknown artefact kind"):
        register_artifact(None, kind="adapter", name="x", base_id="b")


def test_corrupt_database_is_a_clear_error(tmp_path):
    (tmp_path / "registry.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(AdaptError, match="cannot open registry"):
        Registry(home=tmp_path)


def test_foreign_database_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / "registry.db")
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(AdaptError, match="not an adapterhub-c registry"):
        Registry(home=tmp_path)


def test_newer_schema_is_refused(tmp_path):
    Registry(home=tmp_path).close()
    con = sqlite3.connect(tmp_path / "registry.db")
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    with pytest.raises(AdaptError, match="newer"):
        Registry(home=tmp_path)


def test_run_records_status_and_hides_secrets(reg):
    with record_run(reg, "demo", {"token": "hf_secret", "max_tokens": 5}) as run:
        run.output = {"ok": 1}
    with pytest.raises(RuntimeError):
        with record_run(reg, "demo", {}):
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with record_run(reg, "demo", {}):
            raise KeyboardInterrupt
    from adapterhub_c.registry.views import list_objects

    runs = list_objects(reg, "runs")
    assert sorted(r["status"] for r in runs) == ["failed", "interrupted", "succeeded"]
    ok = next(r for r in runs if r["status"] == "succeeded")
    assert ok["parameters"] == {"max_tokens": 5} and ok["output"] == {"ok": 1}
    assert "boom" in next(r for r in runs if r["status"] == "failed")["error"]


def test_the_script_head_is_alembics_head():
    from adapterhub_c.registry.db import head_revision, script_head

    assert script_head() == head_revision()


def test_opening_an_up_to_date_registry_needs_no_alembic(home):
    """The first open migrates (alembic); a later one reads the revision with one query and imports none of it."""
    import subprocess
    import sys

    code = ("import sys; from adapterhub_c.registry import Registry; Registry(home=sys.argv[1]).close(); "
            "print('alembic' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True, text=True, check=True)
            for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["True", "False"]
