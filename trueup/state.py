"""trueup's own state database: connecting and migrating schema ``trueup``.

Migrations run automatically when trueup opens its state. Two processes starting at once are
safe: the whole migration runs in one transaction holding a transaction-level advisory lock,
so the second waits, then finds nothing left to do.
"""

from __future__ import annotations

from typing import Any

import psycopg

from trueup.db import connect, first_line, redact
from trueup.errors import StateError
from trueup.log import get_logger
from trueup.queries import migrations

#: pg_advisory_xact_lock key of the migration lock ("trueup" as ASCII in an int8).
MIGRATION_LOCK_KEY = 0x7472756575700001

log = get_logger(__name__)


def open_state(dsn: str, *, migrate_schema: bool = True) -> psycopg.Connection[dict[str, Any]]:
    """Connect to the state database (config field ``state``), migrating it when needed."""
    conn = connect(dsn, what="state")
    if migrate_schema:
        try:
            migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StateError(
                f"state: cannot migrate schema trueup in {redact(dsn)}: {first_line(exc)}"
            ) from exc
    return conn


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied."""
    if _up_to_date(conn):
        return []
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS trueup")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS trueup.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = conn.execute("SELECT version FROM trueup.schema_migrations").fetchall()
        done = {_first(row) for row in rows}
        for migration in migrations():
            if migration.version in done:
                continue
            conn.execute(migration.text.encode())
            conn.execute(
                "INSERT INTO trueup.schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    if applied_now:
        log.info("state.migrated", versions=applied_now)
    return applied_now


def _up_to_date(conn: psycopg.Connection[Any]) -> bool:
    """Every migration applied already: then no lock is taken and no DDL runs (so a sensor
    asking every minute stays cheap, and a user who may only read can run status)."""
    with conn.transaction():
        found = conn.execute("SELECT to_regclass('trueup.schema_migrations') AS t").fetchone()
        if found is None or _first(found) is None:
            return False
        rows = conn.execute("SELECT version FROM trueup.schema_migrations").fetchall()
    return {m.version for m in migrations()} <= {_first(row) for row in rows}


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]
