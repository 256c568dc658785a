"""Helpers for the backfill tests: a source table, a drifted target table and their config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import yaml

from trueup.config import Config, load_config

SOURCE_DDL = ("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint NOT NULL, "
              "status text, amount numeric(12,2), "
              "updated_at timestamptz NOT NULL DEFAULT '2026-02-01 12:00+00')")
TARGET_DDL = ("CREATE TABLE IF NOT EXISTS public.copy (order_id bigint PRIMARY KEY, "
              "order_version integer, state varchar(20), total double precision)")
#: The target with its source columns' own types: a chunk it holds no row of goes in by COPY.
SAME_TYPES_DDL = ("CREATE TABLE IF NOT EXISTS public.copy (order_id bigint PRIMARY KEY, "
                  "order_version bigint, state text, total numeric(12,2))")


def make_tables(source: str, target: str, rows: int, *, same_types: bool = False) -> None:
    """``rows`` source rows and their copy in the target (see :func:`drift` to damage it),
    whose columns have other types than the source's unless ``same_types``."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        conn.execute("INSERT INTO public.orders (id, version, status, amount) "
                     "SELECT g, 2, 'paid', g * 1.25 FROM generate_series(1, %s) g", (rows,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(SAME_TYPES_DDL if same_types else TARGET_DDL)
        conn.execute("INSERT INTO public.copy SELECT g, 2, 'paid', g * 1.25 "
                     "FROM generate_series(1, %s) g", (rows,))


def drift(target: str) -> dict[str, list[int]]:
    """Damage the target: returns the keys of each difference class made."""
    made = {"missing": [3, 50, 99], "stale": [7, 60], "ahead": [8], "mismatch": [9, 70],
            "orphan": [100_001, 100_002]}
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id = ANY(%s)", (made["missing"],))
        conn.execute("UPDATE public.copy SET order_version = 1, state = 'new' "
                     "WHERE order_id = ANY(%s)", (made["stale"],))
        conn.execute("UPDATE public.copy SET order_version = 3, state = 'refunded' "
                     "WHERE order_id = ANY(%s)", (made["ahead"],))
        conn.execute("UPDATE public.copy SET total = -1 WHERE order_id = ANY(%s)",
                     (made["mismatch"],))
        conn.execute("INSERT INTO public.copy SELECT g, 1, 'ghost', 0 FROM unnest(%s::bigint[]) g",
                     (made["orphan"],))
    return made


def write_config(tmp_path: Path, state: str, source: str, target: str,
                 **extra: Any) -> Config:
    raw = {
        "state": state,
        "connections": {"shop": {"postgres": source}, "copy": {"postgres": target}},
        "reconciliations": {"orders": {
            "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                       "version": "version", "updated_at": "updated_at",
                       "columns": ["status", "amount"]},
            "target": {"connection": "copy", "table": "public.copy", "key": ["order_id"],
                       "version": "order_version",
                       "columns": {"status": "state", "amount": "total"}},
            "repair": "upsert", **extra,
        }},
    }
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def planned(tmp_path: Path, state: str, source: str, target: str, rows: int,
            chunk_size: int) -> tuple[Config, int]:
    """Drifted tables of ``rows`` orders, their config, and an --all backfill of them planned
    in chunks of ``chunk_size`` (running, no worker serving it yet)."""
    from trueup.backfill import BackfillOptions
    from trueup.backfill.planner import plan
    from trueup.state import open_state
    from trueup.statuses import BackfillScope

    make_tables(source, target, rows)
    drift(target)
    config = write_config(tmp_path, state, source, target)
    with open_state(state) as conn:
        conn.autocommit = True
        return config, plan(config, "orders", BackfillOptions(
            scope=BackfillScope.ALL, chunk_size=chunk_size), conn)


def table_rows(dsn: str, sql_text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(sql_text).fetchall()]


def source_rows(dsn: str) -> list[tuple[Any, ...]]:
    return table_rows(dsn, "SELECT id, version, status, amount::float8 FROM public.orders "
                           "ORDER BY id")


def target_rows(dsn: str) -> list[tuple[Any, ...]]:
    return table_rows(dsn, "SELECT order_id, order_version, state::text, total::float8 "
                           "FROM public.copy ORDER BY order_id")


def repairs(state: str) -> list[tuple[Any, ...]]:
    """(key, action, chunk) of every repairs row."""
    return table_rows(state, "SELECT key::jsonb AS key, action, chunk FROM trueup.repairs "
                             "ORDER BY backfill_id, chunk, key")


#: A composite (text, bigint) key: regions by number.
SALES_DDL = ("CREATE TABLE {} (region text, id bigint, v bigint, note text, "
             "PRIMARY KEY (region, id))")


def make_sales(source: str, target: str, regions: list[str], per_region: int) -> None:
    """Source table ``sales`` of ``per_region`` rows per region; target ``sales_copy`` empty."""
    for dsn, table in ((source, "sales"), (target, "sales_copy")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SALES_DDL.format(table))
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO sales SELECT r, g, 1, r || g FROM unnest(%s::text[]) r, "
                     "generate_series(1, %s) g", (regions, per_region))


def write_sales_config(tmp_path: Path, state: str, source: str, target: str) -> Config:
    raw = {"state": state,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"sales": {
               "source": {"connection": "a", "table": "sales", "key": ["region", "id"],
                          "version": "v", "columns": ["note"]},
               "target": {"connection": "b", "table": "sales_copy", "key": ["region", "id"],
                          "version": "v", "columns": ["note"]},
               "repair": "upsert"}}}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)
