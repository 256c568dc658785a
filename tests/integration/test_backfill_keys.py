"""Chunk key ranges on composite and text keys, and the partition scope."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from trueup.backfill import BackfillOptions, start_backfill
from trueup.config import load_config
from trueup.diff import diff
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres


def test_composite_text_keys_are_cut_into_ranges_that_cover_every_row_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    regions = ["eu", "EU", "us", "ap", "é", "zz z"]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE sales (region text, id bigint, v int, note text, "
                     "PRIMARY KEY (region, id))")
        conn.execute("INSERT INTO sales SELECT r, g, 1, r || g FROM unnest(%s::text[]) r, "
                     "generate_series(1, 50) g", (regions,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE sales_copy (region text, id bigint, v int, note text, "
                     "PRIMARY KEY (region, id))")
        conn.execute("INSERT INTO sales_copy SELECT r, g, 1, r || g "
                     "FROM unnest(%s::text[]) r, generate_series(1, 50) g WHERE g %% 7 <> 0",
                     (regions,))
        conn.execute("INSERT INTO sales_copy VALUES ('a', 1, 1, 'x'), ('zzzz', 9, 1, 'y')")
        conn.execute("UPDATE sales_copy SET note = 'bad' WHERE id = 11")
    raw = {"state": state_db,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"sales": {
               "source": {"connection": "a", "table": "sales", "key": ["region", "id"],
                          "version": "v", "columns": ["note"]},
               "target": {"connection": "b", "table": "sales_copy", "key": ["region", "id"],
                          "version": "v", "columns": ["note"]},
               "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    before = diff(config, "sales")
    summary = start_backfill(config, "sales", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=17))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.chunks == 18 and summary.rows_planned == 300
    assert summary.rows_repaired == before.missing + before.mismatch + before.orphan == 50
    assert diff(config, "sales").consistent


def test_partition_scope_repairs_that_days_rows_and_nothing_else(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, version int, s text, "
                     "updated_at timestamptz)")
        conn.execute("INSERT INTO t SELECT g, 1, 's', '2026-01-01T00:00Z'::timestamptz "
                     "+ (g % 3) * interval '1 day' FROM generate_series(1, 300) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, version int, s text)")
        conn.execute("INSERT INTO t VALUES (999, 1, 'orphan')")
    raw = {"state": state_db,
           "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
           "reconciliations": {"t": {
               "source": {"connection": "a", "table": "t", "key": ["id"], "version": "version",
                          "updated_at": "updated_at", "columns": ["s"]},
               "target": {"connection": "b", "table": "t", "key": ["id"], "version": "version",
                          "columns": ["s"]},
               "partitions": {"daily": {"start": "2026-01-01"}}, "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    summary = start_backfill(config, "t", BackfillOptions(
        scope=BackfillScope.PARTITION, partition="2026-01-02", chunk_size=30))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_planned, summary.rows_repaired, summary.chunks) == (100, 100, 4)
    day = diff(config, "t", partition="2026-01-02")
    assert day.consistent
    whole = diff(config, "t")
    assert (whole.missing, whole.orphan) == (200, 1)  # other days and the orphan untouched
