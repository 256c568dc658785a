"""trueup's state schema: migrations, schema.sql, enums and concurrent starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from trueup.backfill.keyspace import repairs_text
from trueup.queries import migrations, schema_text
from trueup.state import migrate
from trueup.statuses import STATUS_COLUMNS

pytestmark = pytest.mark.postgres

# Everything a schema is made of, in a form that compares equal whatever built it.
CATALOG = """
SELECT 'column' AS what, c.table_name || '.' || c.column_name AS name,
       concat_ws(' ', c.data_type, c.collation_name, c.is_nullable, c.column_default,
                 c.is_identity) AS definition
FROM information_schema.columns c
WHERE c.table_schema = 'trueup' AND c.table_name <> 'schema_migrations'
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint
WHERE connamespace = 'trueup'::regnamespace
  AND conrelid <> 'trueup.schema_migrations'::regclass
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes
WHERE schemaname = 'trueup' AND tablename <> 'schema_migrations'
UNION ALL
SELECT 'sequence', schemaname || '.' || sequencename, 'cache ' || cache_size FROM pg_sequences
WHERE schemaname = 'trueup'
UNION ALL
SELECT 'schema', nspname, '' FROM pg_namespace WHERE nspname LIKE 'trueup%'
ORDER BY 1, 2
"""


def _catalog(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(CATALOG).fetchall()


def test_migrations_and_schema_sql_build_the_same_schema(
        empty_db: str, state_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute(schema_text().encode())
        # schema.sql has no bookkeeping table; add it so the catalogs line up
        conn.execute("CREATE TABLE trueup.schema_migrations (version integer PRIMARY KEY)")
    from_schema, from_migrations = _catalog(empty_db), _catalog(state_db)
    assert len(from_migrations) > 40
    missing = set(from_migrations) - set(from_schema)
    extra = set(from_schema) - set(from_migrations)
    assert not missing and not extra, f"schema.sql lacks {missing}; has extra {extra}"


def test_migrate_is_idempotent_and_records_every_version(state_db: str) -> None:
    with psycopg.connect(state_db) as conn:
        assert migrate(conn) == []
        versions = [r[0] for r in conn.execute(
            "SELECT version FROM trueup.schema_migrations ORDER BY version")]
    assert versions == [m.version for m in migrations()]


def test_every_status_enum_matches_its_check_constraint(state_db: str) -> None:
    with psycopg.connect(state_db) as conn:
        for (table, column), enum in STATUS_COLUMNS.items():
            definition = conn.execute(
                """SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
                   WHERE c.conrelid = %s::regclass AND c.contype = 'c'
                     AND pg_get_constraintdef(c.oid) LIKE %s""",
                (f"trueup.{table}", f"%({column} = ANY%")).fetchone()
            assert definition is not None, f"no CHECK constraint on trueup.{table}.{column}"
            allowed = set(re.findall(r"'([^']+)'::text", definition[0]))
            assert allowed == {m.value for m in enum}, (
                f"trueup.{table}.{column} allows {sorted(allowed)}, "
                f"{enum.__name__} has {sorted(m.value for m in enum)}")


def test_status_columns_reject_unknown_values(state_db: str) -> None:
    with psycopg.connect(state_db) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO trueup.runs (reconciliation, status) VALUES ('r', 'weird')")


def test_one_active_backfill_per_reconciliation_is_enforced(state_db: str) -> None:
    insert = ("INSERT INTO trueup.backfills (reconciliation, scope, status, chunk_size) "
              "VALUES ('orders', 'all', %s, 100)")
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute(insert, ("succeeded",))
        conn.execute(insert, ("running",))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, ("planning",))


def test_several_processes_migrating_at_once_all_succeed(empty_db: str) -> None:
    script = ("import sys, psycopg; from trueup.state import migrate; "
              "c = psycopg.connect(sys.argv[1]); print(migrate(c))")
    processes = [subprocess.Popen([sys.executable, "-c", script, empty_db],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    results = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in results]
    applied = sorted(out.strip() for out, _ in results)
    everything = str([m.version for m in migrations()])
    assert applied == sorted(["[]", "[]", "[]", everything]), applied
    with psycopg.connect(empty_db) as conn:
        count = conn.execute("SELECT count(*) FROM trueup.schema_migrations").fetchone()
    assert count is not None and count[0] == len(migrations())


def _migrated_before(conn: psycopg.Connection[Any], version: int) -> None:
    """The state schema as the migrations before ``version`` left it (the next migrate()
    applies ``version`` and what follows)."""
    conn.execute("CREATE SCHEMA trueup")
    conn.execute("CREATE TABLE trueup.schema_migrations (version integer PRIMARY KEY, "
                 "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    for migration in migrations():
        if migration.version < version:
            conn.execute(migration.text.encode())
            conn.execute("INSERT INTO trueup.schema_migrations VALUES (%s, %s)",
                         (migration.version, migration.name))


def test_migration_0013_keeps_each_repairs_key_as_the_text_writers_render(
        empty_db: str) -> None:
    """Repairs keys written as jsonb before 0013 become the text every writer renders now
    (trueup.backfill.keyspace.repairs_text): numbers without trailing zeros, the rest as
    jsonb prints it."""
    keys = [[7], [9.5], ["v1.0", 9.0], ["é", True, None], [1e-7], [{"b": 1, "a": 2.50}]]
    with psycopg.connect(empty_db) as conn:
        _migrated_before(conn, 13)
        for chunk, key in enumerate(keys):
            # as a writer before 0013 stored it: a numeric(12,2) key 9.00 prints 9.00
            conn.execute("INSERT INTO trueup.repairs (reconciliation, key, backfill_id, chunk, "
                         "action) VALUES ('r', %s::jsonb, 1, %s, 'insert')",
                         (json.dumps(key).replace("9.0", "9.00"), chunk))
        conn.commit()
        assert migrate(conn)[0] == 13
        stored = [r[0] for r in conn.execute("SELECT key FROM trueup.repairs ORDER BY chunk")]
    assert stored == [repairs_text(key) for key in keys] == [
        "[7]", "[9.5]", '["v1.0", 9]', '["é", true, null]', "[0.0000001]",
        '[{"a": 2.5, "b": 1}]']


def test_migration_0014_keeps_one_active_backfill_but_those_asked_to_run_alongside(
        empty_db: str) -> None:
    """After 0014 the unique index still refuses a second active backfill of a
    reconciliation, unless it runs alongside (and an existing active one stays valid)."""
    with psycopg.connect(empty_db) as conn:
        _migrated_before(conn, 14)
        insert = ("INSERT INTO trueup.backfills (reconciliation, scope, status, chunk_size) "
                  "VALUES ('r', 'all', 'running', 10)")
        conn.execute(insert)
        conn.commit()
        assert migrate(conn) == [14]
        conn.execute(insert.replace("chunk_size)", "chunk_size, alongside)").replace(
            "10)", "10, true)"))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert)
