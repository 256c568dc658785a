"""``trueup diff`` between Postgres tables: every class, on every key shape, exactly."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.conftest import PG_ADMIN_DSN, drop_database, dsn_for, terminate_diff
from trueup import cli, segments
from trueup.backfill import BackfillOptions, start_backfill
from trueup.config import Config, load_config
from trueup.diff import DiffFailed, diff
from trueup.errors import TrueupError
from trueup.runs import Difference, differences_of
from trueup.sides import column_types, shared_types, table_side
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

KEY_SHAPES: dict[str, dict[str, Any]] = {
    "bigint": {"ddl": "id bigint PRIMARY KEY", "cols": ["id"],
               "keys": [1, 2, 3, 4, 5, 6, 10**12, 10**15, 10**15 + 1, 9 * 10**18],
               "orphan": [777]},
    "text": {"ddl": "id text PRIMARY KEY", "cols": ["id"],
             "keys": ["a", "B", "b", "é", "zz", "a b", "0", "~", "Z", "日本"],
             "orphan": ["orphan"]},
    "uuid": {"ddl": "id uuid PRIMARY KEY", "cols": ["id"],
             "keys": [f"00000000-0000-0000-0000-{i:012d}" for i in (1, 2, 3, 9, 10, 99, 100,
                                                                   10**6, 10**9, 10**11)],
             "orphan": ["ffffffff-0000-0000-0000-000000000000"]},
    "composite": {"ddl": "region text, id bigint, PRIMARY KEY (region, id)",
                  "cols": ["region", "id"],
                  "keys": [("eu", 1), ("eu", 2), ("us", 1), ("us", 2), ("eu", 10**12),
                           ("ap", 5), ("ap", 6), ("us", 3), ("eu", 3), ("ap", 7)],
                  "orphan": [("zz", 1)]},
}


def _key_values(shape: dict[str, Any], key: Any) -> list[Any]:
    return list(key) if isinstance(key, tuple) else [key]


def _make_tables(source_dsn: str, target_dsn: str, shape: dict[str, Any]) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.orders ({shape['ddl']}, version bigint NOT NULL, "
                     "status text, amount numeric(12,2), placed_at timestamptz, "
                     "updated_at timestamptz NOT NULL DEFAULT now() - interval '1 day')")
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        # other names and types on purpose: bigint cents vs numeric, text vs varchar
        target_key = shape["ddl"].replace("id ", "order_id ", 1).replace(
            "(region, id)", "(region, order_id)")
        if shape["ddl"].startswith("id uuid"):
            target_key = "order_id uuid PRIMARY KEY"
        conn.execute("CREATE SCHEMA billing")
        conn.execute(f"CREATE TABLE billing.invoices ({target_key}, order_version integer, "
                     "state varchar(20), total double precision, placed timestamptz)")


def _config(tmp_path: Path, state: str, source: str, target: str, shape: dict[str, Any],
            **extra: Any) -> Config:
    target_key = [c if c != "id" else "order_id" for c in shape["cols"]]
    raw = {
        "state": state,
        "connections": {"shop": {"postgres": source}, "billing": {"postgres": target}},
        "reconciliations": {"orders": {
            "source": {"connection": "shop", "table": "public.orders", "key": shape["cols"],
                       "version": "version", "updated_at": "updated_at",
                       "columns": ["status", "amount", "placed_at"]},
            "target": {"connection": "billing", "table": "billing.invoices", "key": target_key,
                       "version": "order_version",
                       "columns": {"status": "state", "amount": "total", "placed_at": "placed"}},
            **extra,
        }},
    }
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _insert(dsn: str, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        names = ", ".join(columns)
        marks = ", ".join(["%s"] * len(columns))
        cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


def _found(differences: list[Difference]) -> set[tuple[tuple[Any, ...], str]]:
    return {(tuple(d.key), d.cls.value) for d in differences}


def _diff_found(config: Config, name: str) -> set[tuple[tuple[Any, ...], str]]:
    """What a new whole-table run of ``name`` finds."""
    summary = diff(config, name)
    with psycopg.connect(config.state) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return _found(differences_of(conn, summary.run_id))


def _expected_key(key: Any) -> tuple[Any, ...]:
    return tuple(key) if isinstance(key, tuple) else (key,)


@pytest.mark.parametrize("shape_name", list(KEY_SHAPES))
def test_every_class_is_found_exactly_on_every_key_shape(
        shape_name: str, new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    shape = KEY_SHAPES[shape_name]
    source, target = new_db(), new_db()
    _make_tables(source, target, shape)
    keys = shape["keys"]
    at = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    # source rows: some with NULLs in compared columns
    source_rows = [(*_key_values(shape, k), 5, "paid" if i % 2 else None,
                    None if i == 3 else 10.5 + i, at + dt.timedelta(minutes=i))
                   for i, k in enumerate(keys)]
    _insert(source, "public.orders", [*shape["cols"], "version", "status", "amount",
                                      "placed_at"], source_rows)
    target_cols = [c if c != "id" else "order_id" for c in shape["cols"]]
    n = len(shape["cols"])
    target_rows = []
    for i, row in enumerate(source_rows):
        key, (version, status, amount, placed) = row[:n], row[n:]
        if i == 0:
            continue                                  # missing
        if i == 1:
            version -= 1                              # stale
        if i == 2:
            version += 1                              # ahead
        if i == 4:
            amount = 999.25                           # mismatch
        if i == 5:
            status = "paid" if status is None else None  # mismatch: NULL vs value
        # the same instant written in another time zone is not a difference
        placed_other_zone = placed.astimezone(dt.timezone(dt.timedelta(hours=-7)))
        target_rows.append((*key, version, status, amount, placed_other_zone))
    target_rows.append((*_key_values(shape, shape["orphan"][0]), 1, "x", 1.0, at))  # orphan
    _insert(target, "billing.invoices", [*target_cols, "order_version", "state", "total",
                                         "placed"], target_rows)

    config = _config(tmp_path, state_db, source, target, shape)
    summary = diff(config, "orders")

    expected = {
        (_expected_key(keys[0]), "missing"), (_expected_key(keys[1]), "stale"),
        (_expected_key(keys[2]), "ahead"), (_expected_key(keys[4]), "mismatch"),
        (_expected_key(keys[5]), "mismatch"), (_expected_key(shape["orphan"][0]), "orphan"),
    }
    with psycopg.connect(state_db) as conn:
        conn.row_factory = psycopg.rows.dict_row
        stored = differences_of(conn, summary.run_id)
    assert _found(stored) == expected
    assert (summary.missing, summary.orphan, summary.stale, summary.ahead, summary.mismatch,
            summary.in_flight, summary.unreadable) == (1, 1, 1, 1, 2, 0, 0)
    assert (summary.source_rows, summary.target_rows) == (len(keys), len(keys))
    assert not summary.consistent


def _simple(new_db: Callable[[], str], state_db: str, tmp_path: Path,
            source_rows: list[tuple[Any, ...]], target_rows: list[tuple[Any, ...]],
            **extra: Any) -> Config:
    shape = KEY_SHAPES["bigint"]
    source, target = new_db(), new_db()
    _make_tables(source, target, shape)
    _insert(source, "public.orders", ["id", "version", "status", "amount", "updated_at"],
            source_rows)
    _insert(target, "billing.invoices", ["order_id", "order_version", "state", "total"],
            target_rows)
    return _config(tmp_path, state_db, source, target, shape, **extra)


def test_an_empty_target_makes_every_row_missing_and_an_empty_source_every_row_orphan(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [(i, 1, "s", i, old) for i in range(1, 501)]
    config = _simple(new_db, state_db, tmp_path, rows, [])
    summary = diff(config, "orders")
    assert (summary.missing, summary.orphan, summary.source_rows, summary.target_rows) == (
        500, 0, 500, 0)
    config = _simple(new_db, state_db, tmp_path, [], [(i, 1, "s", i) for i in range(1, 501)])
    summary = diff(config, "orders")
    assert (summary.missing, summary.orphan) == (0, 500)
    config = _simple(new_db, state_db, tmp_path, [], [])
    assert diff(config, "orders").consistent


def test_large_table_with_sparse_drift_reads_only_differing_segments(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    shape = KEY_SHAPES["bigint"]
    source, target = new_db(), new_db()
    _make_tables(source, target, shape)
    fill = ("INSERT INTO {} SELECT g * 7, 1, 's' || (g % 5), g % 1000, "
            "'2026-01-01'::timestamptz FROM generate_series(1, 100000) g")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(fill.format("public.orders (id, version, status, amount, placed_at)"))
        conn.execute("ANALYZE public.orders")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(fill.format("billing.invoices"))
        conn.execute("DELETE FROM billing.invoices WHERE order_id IN (7, 350000, 700000)")
        conn.execute("UPDATE billing.invoices SET total = -1 WHERE order_id = 69993")
        conn.execute("INSERT INTO billing.invoices VALUES (3, 1, 's', 1, now())")
        conn.execute("ANALYZE billing.invoices")
    config = _config(tmp_path, state_db, source, target, shape)
    summary = diff(config, "orders")
    assert (summary.missing, summary.orphan, summary.mismatch, summary.stale) == (3, 1, 1, 0)
    assert summary.source_rows == 100000


def test_partition_run_covers_one_day_of_updated_at(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    day1 = dt.datetime(2026, 2, 1, 10, tzinfo=dt.UTC)
    day2 = dt.datetime(2026, 2, 2, 10, tzinfo=dt.UTC)
    source_rows = [(1, 1, "a", 1, day1), (2, 1, "a", 1, day1), (3, 1, "a", 1, day2),
                   (4, 1, "a", 1, day2)]
    target_rows = [(2, 1, "b", 1), (4, 1, "b", 1), (99, 1, "orphan", 1)]
    config = _simple(new_db, state_db, tmp_path, source_rows, target_rows,
                     partitions={"daily": {"start": "2026-01-01"}})
    summary = diff(config, "orders", partition="2026-02-01")
    assert summary.partition == "2026-02-01"
    assert (summary.source_rows, summary.target_rows) == (2, 1)
    assert (summary.missing, summary.mismatch, summary.orphan) == (1, 1, 0)
    with pytest.raises(TrueupError, match="before the first partition 2026-01-01"):
        diff(config, "orders", partition="2025-12-31")
    with pytest.raises(TrueupError, match="expected a day like 2026-01-31"):
        diff(config, "orders", partition="feb")


def test_a_target_that_kept_rows_far_beyond_the_source_keys_is_read_in_bounded_batches(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The source purged orders 1-5000, its copy kept them: cut on the source's keys alone,
    # they all fell into the one open-ended segment below the source's first key, read at once.
    monkeypatch.setattr(segments, "FETCH_BATCH_ROWS", 1000)
    largest: list[int] = [0]
    select = segments._select_segments

    def measured(*args: Any, **kwargs: Any) -> list[Any]:
        rows = select(*args, **kwargs)
        largest[0] = max(largest[0], len(rows))
        return rows

    monkeypatch.setattr(segments, "_select_segments", measured)
    shape = KEY_SHAPES["bigint"]
    source, target = new_db(), new_db()
    _make_tables(source, target, shape)
    fill = ("INSERT INTO {} SELECT g, 1, 's', 1, '2026-01-01'::timestamptz "
            "FROM generate_series({}, 10000) g")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(fill.format("public.orders (id, version, status, amount, placed_at)", 5001))
        conn.execute("ANALYZE public.orders")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(fill.format("billing.invoices", 1))
        conn.execute("ANALYZE billing.invoices")
    summary = diff(_config(tmp_path, state_db, source, target, shape), "orders")
    assert (summary.orphan, summary.missing, summary.mismatch) == (5000, 0, 0)
    assert largest[0] <= 2 * 1000, f"one read held {largest[0]} rows"


def test_a_target_row_without_a_key_is_an_orphan_not_a_failed_run(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    # A unique index, unlike a primary key, lets a NULL key in: such a row matches no source
    # row. Its segment was NULL, and every run failed on it.
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [(i, 1, "s", i, old) for i in range(1, 2001)]
    config = _simple(new_db, state_db, tmp_path, rows, [(i, 1, "s", i) for i in range(1, 2001)])
    target = config.connections["billing"].postgres
    assert target is not None
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE billing.invoices DROP CONSTRAINT invoices_pkey")
        conn.execute("ALTER TABLE billing.invoices ALTER COLUMN order_id DROP NOT NULL")
        conn.execute("CREATE UNIQUE INDEX invoices_order_id ON billing.invoices (order_id)")
        conn.execute("INSERT INTO billing.invoices VALUES (NULL, 1, 'ghost', 0)")
        conn.execute("ANALYZE billing.invoices")
    summary = diff(config, "orders")
    assert (summary.orphan, summary.missing, summary.mismatch) == (1, 0, 0)
    with psycopg.connect(state_db) as conn:
        conn.row_factory = psycopg.rows.dict_row
        assert [d.key for d in differences_of(conn, summary.run_id)] == [[None]]


def test_rows_changed_within_grace_are_in_flight_and_do_not_fail(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    source_rows = [(1, 2, "new", 5, now), (2, 1, "old", 5, now - dt.timedelta(hours=2))]
    target_rows = [(1, 1, "new", 5), (2, 1, "old", 5)]
    config = _simple(new_db, state_db, tmp_path, source_rows, target_rows, grace="1h")
    summary = diff(config, "orders")
    assert (summary.in_flight, summary.stale) == (1, 0)
    assert summary.consistent


@pytest.mark.parametrize("column_type", ["timestamp", "date"])
def test_grace_works_with_an_updated_at_without_time_zone_on_a_server_in_another_zone(
        column_type: str, new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    source_rows = [(1, 2, "new", 5, now), (2, 2, "old", 5, now - dt.timedelta(days=5)),
                   (3, 1, "same", 5, now - dt.timedelta(days=5))]
    target_rows = [(1, 1, "new", 5), (2, 1, "old", 5), (3, 1, "same", 5)]
    config = _simple(new_db, state_db, tmp_path, source_rows, target_rows, grace="2d")
    source, target = config.connections["shop"].postgres, config.connections["billing"].postgres
    assert source is not None and target is not None
    for dsn in (source, target):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dsn.rsplit("/", 1)[1]}" SET timezone = '
                         "'America/Los_Angeles'")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET placed_at = '2026-03-01 12:00+00'")
        # UTC wall times without a zone, as an application writing UTC keeps them
        conn.execute(f"ALTER TABLE public.orders ALTER COLUMN updated_at TYPE {column_type} "
                     "USING updated_at AT TIME ZONE 'UTC'")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE billing.invoices SET placed = '2026-03-01 12:00+00'")
        conn.execute("ALTER TABLE billing.invoices ALTER COLUMN placed TYPE timestamp "
                     "USING placed AT TIME ZONE 'UTC'")
    summary = diff(config, "orders")
    assert (summary.in_flight, summary.stale, summary.mismatch) == (1, 1, 0)


def test_an_interrupted_run_is_marked_failed_not_left_running(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    config = _simple(new_db, state_db, tmp_path, [(1, 2, "s", 1, old)], [(1, 1, "s", 1)])

    def ctrl_c(difference: Difference) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diff(config, "orders", on_difference=ctrl_c)
    with psycopg.connect(state_db) as conn:
        runs = conn.execute("SELECT status, error FROM trueup.runs").fetchall()
    assert runs == [("failed", "interrupted (KeyboardInterrupt)")]
    assert diff(config, "orders").stale == 1


def test_a_connection_dropped_mid_run_fails_the_run_and_the_next_run_works(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    config = _simple(new_db, state_db, tmp_path, [(i, 1, "s", i, old) for i in range(1, 2001)],
                     [(i, 1, "s", i) for i in range(1, 2001)])
    source = config.connections["shop"].postgres
    assert source is not None
    with psycopg.connect(source, autocommit=True) as conn:
        # a slow view in front of the table: its scan lasts long enough to be cut
        conn.execute("ALTER TABLE public.orders RENAME TO orders_data")
        conn.execute("CREATE FUNCTION slow(x bigint) RETURNS bigint LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(0.002); RETURN x; END $$")
        conn.execute("CREATE VIEW public.orders AS SELECT slow(id) AS id, version, status, "
                     "amount, placed_at, updated_at FROM orders_data")
    killed: list[int] = []

    def kill_when_active() -> None:
        deadline = time.monotonic() + 30
        with psycopg.connect(source, autocommit=True) as admin:
            while time.monotonic() < deadline and not killed:
                row = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'trueup diff "
                    "orders' AND state = 'active' AND datname = current_database()").fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    killed.append(row[0])
                time.sleep(0.02)

    killer = threading.Thread(target=kill_when_active)
    killer.start()
    with pytest.raises(TrueupError) as caught:
        diff(config, "orders")
    killer.join()
    assert killed, "the diff's source connection was never seen active"
    with psycopg.connect(state_db) as conn:
        status, error = conn.execute(
            "SELECT status, error FROM trueup.runs ORDER BY run_id DESC LIMIT 1").fetchone()
    assert status == "failed"
    assert "terminat" in error.lower() or "connection" in error.lower(), error
    assert "failed" in str(caught.value)

    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE VIEW public.orders AS SELECT id, version, status, "
                      "amount, placed_at, updated_at FROM orders_data")
    summary = diff(config, "orders")
    assert summary.consistent and summary.source_rows == 2000


def _copy_config(tmp_path: Path, state: str, source: str, target: str,
                 columns: list[str], **extra: Any) -> Config:
    """Reconciliation ``orders``: public.orders of ``source`` into public.copy of ``target``
    (key ``id``, version ``version``, ``columns`` of the same names), repaired by upsert;
    ``extra`` fields of the reconciliation (``updated_at`` goes to the source)."""
    ends = {"key": ["id"], "version": "version", "columns": columns}
    updated_at = {"updated_at": extra.pop("updated_at")} if "updated_at" in extra else {}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"orders": {
            "source": {"connection": "a", "table": "orders", **ends, **updated_at},
            "target": {"connection": "b", "table": "copy", **ends},
            "repair": "upsert", **extra}}}))
    return load_config(path)


def test_columns_of_different_number_types_compare_without_rounding(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version int, "
                     "status varchar(10), amount bigint, price real, rate float8)")
        conn.execute("INSERT INTO public.orders VALUES (1, 1, 'a', 11, 1, 0.1::float8 + 0.2), "
                     "(2, 1, 'b', 20, 1.0000001, 1), (3, 1, 'c', 30, 1, 1)")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id numeric PRIMARY KEY, version bigint, "
                     "status text, amount numeric(12,2), price numeric, rate numeric)")
        # 10.5 would round to the source's 11 if cast to bigint; 20.00 equals 20; the real
        # 1.0000001 is 1.00000 as numeric by its own cast (6 digits), and the double
        # 0.30000000000000004 (repaired in row 1) 0.3 (15 digits)
        conn.execute("INSERT INTO public.copy VALUES (1, 1, 'a', 10.5, 1, 0.3), "
                     "(2, 1, 'b', 20.00, 1.0000001, 1), (3, 1, 'c ', 30, 1, 1)")
    config = _copy_config(tmp_path, state_db, source, target,
                          ["status", "amount", "price", "rate"])
    assert _diff_found(config, "orders") == {((1,), "mismatch"), ((3,), "mismatch")}
    # a backfill compares as the diff does: it repairs 10.5, which as a bigint would be 11
    done = start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 2)
    assert diff(config, "orders").consistent


def test_a_text_version_column_is_guarded_as_its_source_s_numbers(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.orders VALUES (1, 10, 'new'), (2, 2, 'old'), "
                     "(3, 5, 'same')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version text, "
                     "status text)")
        # as text '9' sorts after '10' and '11' before '2': as numbers 9 < 10 and 11 > 2
        conn.execute("INSERT INTO public.copy VALUES (1, '9', 'old'), (2, '11', 'newer'), "
                     "(3, '5', 'same')")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    assert _diff_found(config, "orders") == {((1,), "stale"), ((2,), "ahead")}
    done = start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 1)
    with psycopg.connect(target) as conn:
        rows = conn.execute("SELECT id, version, status FROM public.copy ORDER BY id").fetchall()
    # the stale row is repaired; the newer one is never overwritten by an older version
    assert rows == [(1, "10", "new"), (2, "11", "newer"), (3, "5", "same")]
    assert _diff_found(config, "orders") == {((2,), "ahead")}


def test_a_version_or_updated_at_that_cannot_be_ordered_is_refused_before_any_write(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Text versions on both sides passed: '9' is newer than '10' as text, so a diff called
    the target's version 10 stale and a backfill overwrote it with the source's 9. Only
    `trueup validate` refused them. A text updated_at failed on a cast of its first value."""
    source, target = new_db(), new_db()
    for dsn, table in ((source, "orders"), (target, "copy")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.{table} (id bigint PRIMARY KEY, version text, "
                         f"status text, at text)")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders VALUES (1, '9', 'old', 'soon')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.copy VALUES (1, '10', 'new', 'soon')")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    refused = (r"column 'version' of public\.orders is text, which cannot be ordered as a "
               r"version \(expected an integer, numeric, timestamp or date column\)$")
    with pytest.raises(TrueupError, match=refused):
        diff(config, "orders")
    with pytest.raises(TrueupError, match=refused):
        start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.ALL))
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT version, status FROM public.copy").fetchall() == [
            ("10", "new")]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders ALTER COLUMN version TYPE bigint "
                     "USING version::bigint")
    with pytest.raises(TrueupError, match=r"column 'at' of public\.orders is text, not a time a "
                                          r"row was updated at \(expected a timestamp or date "
                                          r"column\)$"):
        diff(_copy_config(tmp_path, state_db, source, target, ["status"], updated_at="at"),
             "orders")


#: Source columns and, per row, (source values, the target's text): rows 1 to 5 hold the same
#: values (plain, then forms only the type's input reads: spaces, exponents, braces, other
#: zones, day 31; numbers an integer's input refuses; JSON null; doubles past 2^53), every later
#: row one value its column's type refuses, against a value or a NULL, or another number. Row 6
#: is repaired with a double a cast to text writes as 1.152921504606847e+18.
TYPED = ("n int4, a numeric, u uuid, b bool, d date, ts timestamptz, j jsonb, f float8")
TYPED_COLUMNS = ["n", "a", "u", "b", "d", "ts", "j", "f"]


def _typed(**values: Any) -> tuple[Any, ...]:
    return tuple(values.get(c) for c in TYPED_COLUMNS)


TYPED_ROWS: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    1: (_typed(n=5, a="1.5", u="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b=True, d="2024-01-15",
               ts="2024-01-15T08:00:00Z", j='{"a": 1}', f=2.0**60),
        _typed(n="5", a="1.50", u="A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", b="true",
               d="2024-01-15", ts="2024-01-15 10:00:00+02", j='{"a":1}',
               f="1152921504606846976")),
    2: (_typed(n=7, a="100", u="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b=True, d="2024-02-29",
               ts="2024-01-31T10:00:00.5Z", j='"x"', f=0.1),
        _typed(n=" 7 ", a="1e2", u="{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", b="yes",
               d="2024-02-29", ts="2024-01-31 10:00:00.5 UTC", j='"x"', f=" 1e-1 ")),
    3: (_typed(), _typed()),
    4: (_typed(n=1, j="null"), _typed(n="1.0", j="null")),
    5: (_typed(n=1000), _typed(n="1e3", j="null")),
    6: (_typed(n=1, f=2.0**60), _typed(n="abc", f="1152921504606846976")),
    7: (_typed(), _typed(n="x1")),
    8: (_typed(), _typed(a="1..2")),
    9: (_typed(u="a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), _typed(u="not-a-uuid")),
    10: (_typed(b=True), _typed(b="maybe")),
    11: (_typed(), _typed(d="2024-02-30")),
    12: (_typed(ts="2024-01-01T00:00:00Z"), _typed(ts="2024-13-01 00:00:00")),
    13: (_typed(), _typed(j="{bad")),
    14: (_typed(n=2), _typed(n="1.5")),
    15: (_typed(f=2.5), _typed(f="1.5")),
}
TYPED_EQUAL = 5  # rows 1 to 5


def _t_config(tmp_path: Path, state: str, source: str, target: str, columns: list[str],
              **extra: Any) -> Config:
    """A reconciliation ``t`` of ``public.t`` (key id, version, ``columns``) between two
    databases, with the same names on both sides."""
    side = {"table": "public.t", "key": ["id"], "version": "version", "columns": columns}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"t": {"source": {"connection": "a", **side},
                                  "target": {"connection": "b", **side}, **extra}}}))
    return load_config(path)


def _typed_tables(source: str, target: str) -> None:
    for side, (dsn, ddl) in enumerate(((source, TYPED),
                                       (target, ", ".join(f"{c} text" for c in TYPED_COLUMNS)))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, {ddl})")
            with conn.cursor().copy("COPY public.t FROM STDIN") as copy:
                # each row alone in its segment among equal ones, which only its hash can
                # make differ
                for i in range(1, (len(TYPED_ROWS) + 1) * 1000):
                    alike = (i, str(i), *(None,) * (len(TYPED_COLUMNS) - 2))
                    row = TYPED_ROWS[i // 1000][side] if i % 1000 == 0 else alike
                    copy.write_row((i, 1, *row))
            conn.execute("ANALYZE public.t")


def test_a_text_target_is_read_as_the_source_s_types_and_a_value_they_refuse_is_a_mismatch(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A text column against an integer one compares 7 with ' 7 '; its 'abc' is one mismatch,
    not a failed run, even against a NULL (the read gives NULL for it). After a backfill the
    target holds the source's values and a new diff finds nothing."""
    source, target = new_db(), new_db()
    _typed_tables(source, target)
    config = _t_config(tmp_path, state_db, source, target, TYPED_COLUMNS, repair="upsert")
    assert _diff_found(config, "t") == {((i * 1000,), "mismatch") for i in TYPED_ROWS
                                        if i > TYPED_EQUAL}

    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert done.status is BackfillStatus.SUCCEEDED
    assert diff(config, "t").consistent
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT n, b FROM public.t WHERE id = 6000").fetchone() == ("1", None)


def test_a_json_target_holds_numbers_as_a_message_does_and_documents_as_text_does(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """JSON 1.0 and "2" against integers 1 and 2 are equal, as in a message; 3.5 is not 3, a
    string no number reads is a mismatch, against a NULL too. A backfill writes a number as
    JSON and a text as the document it holds, which the next diff finds equal."""
    source, target = new_db(), new_db()
    doc = '{"k": 1}'
    rows = {1: ((1, doc), ("1.0", doc)), 2: ((2, doc), ('"2"', doc)),
            3: ((3, doc), ("3.5", doc)), 4: ((None, doc), ('"abc"', doc)),
            5: ((None, None), ("null", "null")), 6: ((4, doc), ('{"n": 4}', doc)),
            7: ((5, '{"k": [2]}'), ("5", '["f"]'))}
    for side, (dsn, types) in enumerate(((source, ("int4", "text")),
                                         (target, ("jsonb", "jsonb")))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, "
                         f"n {types[0]}, s {types[1]})")
            for i, pair in rows.items():
                conn.execute("INSERT INTO public.t VALUES (%s, 1, %s, %s)", (i, *pair[side]))
    config = _t_config(tmp_path, state_db, source, target, ["n", "s"], repair="upsert")
    assert _diff_found(config, "t") == {((i,), "mismatch") for i in (3, 4, 6, 7)}
    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 4)
    assert diff(config, "t").consistent
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT n, s FROM public.t WHERE id IN (3, 7) ORDER BY id"
                            ).fetchall() == [(3, {"k": 1}), (5, {"k": [2]})]


def test_a_number_target_against_a_json_source_is_compared_as_its_json(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """An integer column against a jsonb one has no cast: it is read as its JSON (5 is 5, not
    the string "5"), and a backfill writes the JSON's number into it."""
    source, target = new_db(), new_db()
    rows = {1: ("5", 5), 2: ('"6"', 6), 3: ("7", 8), 4: (None, None), 5: ("null", None)}
    for side, (dsn, kind) in enumerate(((source, "jsonb"), (target, "int4"))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, j {kind})")
            for i, pair in rows.items():
                conn.execute("INSERT INTO public.t VALUES (%s, 1, %s)", (i, pair[side]))
    config = _t_config(tmp_path, state_db, source, target, ["j"], repair="upsert")
    assert _diff_found(config, "t") == {((2,), "mismatch"), ((3,), "mismatch")}
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("""UPDATE public.t SET j = '6' WHERE id = 2""")
    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 1)
    assert diff(config, "t").consistent


def test_json_text_that_json_takes_and_jsonb_refuses_is_a_mismatch(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A json source is compared as jsonb: a text target's JSON with a \\u0000 or a number past
    numeric's range is read as json but refused as jsonb, a mismatch and not a failed run."""
    source, target = new_db(), new_db()
    rows = {1: ('{"a": 1}', '{"a":1}'), 2: ("1", '"\\u0000"'), 3: (None, "1e1000000")}
    for side, (dsn, kind) in enumerate(((source, "json"), (target, "text"))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, j {kind})")
            for i, pair in rows.items():
                conn.execute("INSERT INTO public.t VALUES (%s, 1, %s)", (i, pair[side]))
    config = _t_config(tmp_path, state_db, source, target, ["j"])
    assert _diff_found(config, "t") == {((2,), "mismatch"), ((3,), "mismatch")}


def test_a_target_session_that_cannot_create_readers_reads_by_plain_casts(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A read-only session (a standby's) cannot create its readers: the run goes on with plain
    casts, which read every form the type takes (a value it refuses would fail the run), and
    says so."""
    source, target = new_db(), new_db()
    _typed_tables(source, target)
    for dsn in (source, target):  # the values a type refuses go; the other forms stay
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM public.t WHERE id %% 1000 = 0 AND id > %s",
                         (TYPED_EQUAL * 1000,))
    read_only = f"{target}?options=-c%20default_transaction_read_only%3Don"
    config = _t_config(tmp_path, state_db, source, read_only, TYPED_COLUMNS)
    warnings: list[logging.LogRecord] = []
    handler, logger = logging.Handler(logging.WARNING), logging.getLogger("trueup.sides")
    handler.emit = warnings.append  # type: ignore[assignment,method-assign]
    logger.addHandler(handler)
    try:
        summary = diff(config, "t")
    finally:
        logger.removeHandler(handler)
    assert summary.consistent
    assert summary.source_rows == summary.target_rows == (len(TYPED_ROWS) + 1) * 1000 - 1 - (
        len(TYPED_ROWS) - TYPED_EQUAL)
    assert [(r.getMessage(), r.fields) for r in warnings] == [  # type: ignore[attr-defined]
        ("compare.plain_casts", {"table": "public.t", "reason": "cannot execute CREATE FUNCTION "
                                                            "in a read-only transaction"})]


def test_a_partition_run_finds_padded_char_keys_in_the_target(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Source keys arrive padded ('ab  '); the target's are looked up unpadded."""
    shape = {"ddl": "id char(4) PRIMARY KEY", "cols": ["id"]}
    source, target = new_db(), new_db()
    _make_tables(source, target, shape)
    day = dt.datetime(2026, 2, 1, 10, tzinfo=dt.UTC)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders VALUES ('ab', 1, 'a', 1, %(d)s, %(d)s), "
                     "('cd', 1, 'a', 1, %(d)s, %(d)s), ('ef', 1, 'a', 1, %(d)s, %(d)s)",
                     {"d": day})
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO billing.invoices VALUES ('ab', 1, 'a', 1, %(d)s), "
                     "('cd', 1, 'b', 1, %(d)s)", {"d": day})
    config = _config(tmp_path, state_db, source, target, shape,
                     partitions={"daily": {"start": "2026-01-01"}})
    summary = diff(config, "orders", partition="2026-02-01")
    assert (summary.source_rows, summary.target_rows) == (3, 2)
    assert (summary.missing, summary.mismatch) == (1, 1)


def test_a_side_that_fails_in_a_streamed_comparison_fails_the_run_with_its_own_reason(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Text keys' segments are streamed from both sides at once: when one side failed, the
    other's generator was closed while still running, and the run's recorded reason was
    "generator already executing" rather than the failure."""
    source, target = new_db(), new_db()
    for dsn, name in ((source, "orders"), (target, "copy")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.{name} (id text PRIMARY KEY, version bigint, "
                         "status text)")
            conn.execute(f"INSERT INTO public.{name} SELECT 'k' || g, 1, "
                         f"{'$$a$$' if name == 'orders' else '$$b$$'} "
                         "FROM generate_series(1, 50) g")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    segment_rows = segments.segment_rows

    def failing_source(conn: Any, side: Any, *args: Any, **kwargs: Any) -> Any:
        if side.label == "source":
            raise psycopg.OperationalError("the source went away")
        time.sleep(0.5)  # the target is still reading when the source fails
        yield from segment_rows(conn, side, *args, **kwargs)

    monkeypatch.setattr(segments, "segment_rows", failing_source)
    with pytest.raises(TrueupError, match="the source went away"):
        diff(config, "orders")
    with psycopg.connect(state_db) as conn:
        row = conn.execute("SELECT status, error FROM trueup.runs").fetchone()
    assert row == ("failed", "the source went away")


def test_a_diff_stopped_by_sigterm_records_its_run_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """SIGTERM (a supervisor's stop, timeout, Kubernetes) killed the process without a word:
    its run stayed running for good."""
    source, target = new_db(), new_db()
    for dsn, name in ((source, "orders"), (target, "copy")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.{name} (id bigint PRIMARY KEY, version bigint, "
                         "status text)")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    with psycopg.connect(target) as lock:
        lock.execute("LOCK TABLE public.copy IN ACCESS EXCLUSIVE MODE")  # the diff waits
        # 1 s into its first query, on the locked table
        status, err, _ = terminate_diff(config.path, "orders", state_db, settle=1.0)
    assert status == 143, err
    assert err.splitlines()[-1] == "trueup: terminated"
    with psycopg.connect(state_db) as conn:
        row = conn.execute("SELECT status, error FROM trueup.runs").fetchone()
    assert row == ("failed", "interrupted (Terminated)")


def test_integer_keys_of_other_widths_are_compared_as_they_are(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A bigint source key against an int target key was read as numeric on both sides: a
    cast the key index cannot serve, so each differing segment's rows took a full scan of
    each table (200,000 rows, every 50th differing: over 300 s against 1 s)."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'a' FROM generate_series(1, 300) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id int PRIMARY KEY, version smallint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy SELECT g, 1, CASE WHEN g % 50 = 0 THEN 'b' "
                     "ELSE 'a' END FROM generate_series(2, 301) g")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    assert _diff_found(config, "orders") == {((1,), "missing"), ((301,), "orphan"), *(
        ((k,), "mismatch") for k in range(50, 301, 50))}
    with psycopg.connect(source) as src, psycopg.connect(target) as dst:
        source_types = column_types(src, "public.orders")
        shared = shared_types(dst, "public.copy", columns=["status"], key=["id"],
                              version="version", source_columns=[source_types["status"]],
                              source_key=[source_types["id"]],
                              source_version=source_types["version"])
        side = table_side(label="target", dsn=target, table="public.copy", key=["id"],
                          version="version", columns=["status"], as_types=shared.columns,
                          key_as=shared.keys, version_as=shared.version, conn=dst)
    assert [k.name for k in shared.keys] == ["int8"]
    assert side.key == [sql.Identifier("id")], "the key is cast: its index cannot serve it"


def test_a_text_target_key_the_source_s_key_type_refuses_fails_runs_with_what_to_do(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Keys are compared as the source's type, in its order: a text target key holding digits
    is read as the bigint it spells, but 'abc' has no place in that order. The run failed
    with Postgres's bare cast error, and a backfill of the whole table with an unexpected
    error and a traceback."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'a' FROM generate_series(1, 30) g")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id text PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy SELECT g::text, 1, CASE WHEN g = 7 THEN 'b' "
                     "ELSE 'a' END FROM generate_series(2, 31) g")
    config = _copy_config(tmp_path, state_db, source, target, ["status"])
    assert _diff_found(config, "orders") == {((1,), "missing"), ((31,), "orphan"),
                                             ((7,), "mismatch")}

    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.copy VALUES ('abc', 1, 'a')")
    refused = (r"target public\.copy holds a key the source's key type cannot hold \(invalid input "
               r"syntax for type bigint: \"abc\"\): key id \(text; the source's is bigint\)\. "
               r"Both sides' keys are read as the source's type, in its order; give the "
               r"target's key that type, or reconcile against a view of the target that "
               r"converts or leaves out such keys$")
    with pytest.raises(TrueupError, match=r"^diff orders: run \d+ failed: " + refused) as failed:
        diff(config, "orders")
    with psycopg.connect(state_db) as conn:
        row = conn.execute("SELECT status, error FROM trueup.runs WHERE run_id = %s",
                           (int(str(failed.value).split()[3]),)).fetchone()
    assert row is not None and row[0] == "failed"
    assert re.fullmatch(refused, row[1]), row[1]
    # `trueup status` shows it below the runs (too long for a column)
    assert cli.main(["--config", str(tmp_path / "trueup.yaml"), "status"]) == 0
    printed = capsys.readouterr().out.splitlines()
    shown = [line for line in printed if line.startswith("  run ")]
    assert len(shown) == 1 and re.fullmatch(r"  run \d+: " + refused, shown[0]), shown
    # the failed run's counts are unknown, not 0 (the run before found 3 differences)
    rows = {line.split()[3]: line.split()[-7:] for line in printed
            if re.match(r"  \d+ +orders ", line)}
    assert rows == {"failed": ["-"] * 7, "succeeded": ["1", "1", "0", "0", "1", "0", "0"]}, rows
    with pytest.raises(TrueupError, match="^" + refused):
        start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.ALL))
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT count(*) FROM trueup.backfills").fetchone() == (0,)

    # a value the version's type refuses is not blamed on the keys
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE id = 'abc'")
        conn.execute("ALTER TABLE public.copy ALTER COLUMN version TYPE text")
        conn.execute("UPDATE public.copy SET version = 'v2' WHERE id = '5'")
    with pytest.raises(TrueupError, match=r'^diff orders: run \d+ failed: invalid input syntax '
                                          r'for type bigint: "v2"$'):
        diff(config, "orders")


def test_text_in_a_database_that_is_not_utf8_is_refused_in_one_line(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        unique: Callable[[str], str]) -> None:
    """Lengths and hashes of text are of the server's bytes: a LATIN1 'café' against a UTF-8
    one was a mismatch, and so was every row holding a character past ASCII."""
    source, name = new_db(), unique("latin1")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' "
                              "LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Identifier(name)))
    try:
        target = dsn_for(name)
        for dsn, table in ((source, "orders"), (target, "copy")):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"CREATE TABLE public.{table} (id bigint PRIMARY KEY, "
                             "version bigint, status text, qty int)")
                conn.execute(f"INSERT INTO public.{table} VALUES (1, 1, 'café', 2)")
        config = _copy_config(tmp_path, state_db, source, target, ["status", "qty"])
        with pytest.raises(TrueupError, match=r"^diff orders: run \d+ failed: "
                                              r"target public\.copy: its database's encoding "
                                              r"is LATIN1; trueup compares text as UTF-8, so "
                                              r"text and JSON columns \(text here\) need a "
                                              r"UTF8 database$"):
            diff(config, "orders")
        # numbers compare alike in any encoding
        assert diff(_copy_config(tmp_path, state_db, source, target, ["qty"]),
                    "orders").consistent
    finally:
        drop_database(name)


def test_a_partition_run_compares_rows_changed_meanwhile_as_they_are_now(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The day is read as it was when the run began, the target as it is when each batch
    gets there: a row updated in both since (its copy caught up) was reported ahead, and its
    old updated_at kept it from being in flight."""
    source, target = new_db(), new_db()
    day = dt.datetime(2026, 2, 1, 10, tzinfo=dt.UTC)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'a', %s "
                     "FROM generate_series(1, 12000) g", (day,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy SELECT g, 1, CASE WHEN g = 11500 THEN 'x' "
                     "ELSE 'a' END FROM generate_series(1, 12000) g")
    config = _copy_config(tmp_path, state_db, source, target, ["status"],
                          updated_at="updated_at", grace="60s",
                          partitions={"daily": {"start": "2026-01-01"}})
    changed: list[int] = []

    def meanwhile(phase: str, done: int, total: int) -> None:
        if changed:
            return
        # after the first batch: 11000 is updated (now: another day) and 11001 too (its
        # updated_at left alone), and both copied to the target
        changed.append(done)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("UPDATE public.orders SET version = 2, status = 'b', "
                         "updated_at = CASE WHEN id = 11000 THEN now() ELSE updated_at END "
                         "WHERE id IN (11000, 11001)")
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("UPDATE public.copy SET version = 2, status = 'b' "
                         "WHERE id IN (11000, 11001)")

    found: list[Difference] = []
    summary = diff(config, "orders", partition="2026-02-01", on_difference=found.append,
                   progress=meanwhile)
    assert changed, "the run read the day in one batch"
    assert [(d.key, d.cls.value) for d in found] == [([11500], "mismatch")]
    assert (summary.ahead, summary.mismatch) == (0, 1)


@pytest.mark.parametrize("version_type", ["numeric", "double precision"])
def test_a_nan_version_is_ordered_as_postgres_orders_it_above_every_number(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, version_type: str) -> None:
    """A numeric NaN failed the run (Python's Decimal refuses to order it); a double NaN
    made a row ahead that the upsert's guard, ordering as Postgres does, overwrites."""
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [(i, 1, "s", i, old) for i in range(1, 201)]
    config = _simple(new_db, state_db, tmp_path, rows, [(i, 1, "s", i) for i in range(1, 201)])
    source = config.connections["shop"].postgres
    target = config.connections["billing"].postgres
    assert source is not None and target is not None
    for dsn, table, column in ((source, "public.orders", "version"),
                               (target, "billing.invoices", "order_version")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {version_type}")
            # 1: NaN over 1; 2: 1 under NaN; 3: NaN on both sides; 4: NaN over Infinity
            versions = {1: ("NaN", 1), 2: (1, "NaN"), 3: ("NaN", "NaN"),
                        4: ("NaN", "Infinity")}
            for key, pair in versions.items():
                conn.execute(f"UPDATE {table} SET {column} = %s::{version_type} "
                             f"WHERE {'id' if dsn == source else 'order_id'} = %s",
                             (str(pair[0 if dsn == source else 1]), key))
    summary = diff(config, "orders")
    assert (summary.stale, summary.ahead, summary.mismatch) == (2, 1, 0), summary
    with psycopg.connect(state_db) as conn:
        conn.row_factory = psycopg.rows.dict_row
        found = {d.key[0]: d.cls.value for d in differences_of(conn, summary.run_id)}
    assert found == {1: "stale", 2: "ahead", 4: "stale"}


@pytest.mark.parametrize("key_type", ["text", "bigint"])
def test_text_in_a_nondeterministic_collation_is_compared_by_its_bytes(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, key_type: str) -> None:
    """A target column in a case-insensitive collation (``deterministic=false``): the
    fingerprint and row hash hashed its text in that collation, which hashes the sort key and
    not the bytes, so every row of a partition run was a mismatch and one real difference
    ('Hello' against 'hello') made every row of its hash bucket one."""
    source, target = new_db(), new_db()
    day = dt.datetime(2026, 2, 1, 10, tzinfo=dt.UTC)
    key = "k::text" if key_type == "text" else "k"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.orders (id {key_type} PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        conn.execute(f"INSERT INTO public.orders SELECT {key}, 1, CASE WHEN k = 7 THEN "
                     "'Hello' ELSE 'v' || k END, %s FROM generate_series(1, 2000) k", (day,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', "
                     "deterministic = false)")
        conn.execute(f"CREATE TABLE public.copy (id {key_type} PRIMARY KEY, version bigint, "
                     "status text COLLATE ci)")
        conn.execute(f"INSERT INTO public.copy SELECT {key}, 1, CASE WHEN k = 7 THEN "
                     "'hello' ELSE 'v' || k END FROM generate_series(1, 2000) k")
    config = _copy_config(tmp_path, state_db, source, target, ["status"],
                          updated_at="updated_at", partitions={"daily": {"start": "2026-01-01"}})
    seven = ("7",) if key_type == "text" else (7,)
    assert _diff_found(config, "orders") == {(seven, "mismatch")}
    found: list[Difference] = []
    summary = diff(config, "orders", partition="2026-02-01", on_difference=found.append)
    assert [(tuple(d.key), d.cls.value) for d in found] == [(seven, "mismatch")]
    assert summary.source_rows == summary.target_rows == 2000


def _lossy_tables(source: str, target: str, columns: dict[str, tuple[str, str]],
                  rows: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]]) -> None:
    """``public.t`` (id, version, ``columns``: name -> (source type, target type)) on both
    sides, holding ``rows`` (id -> (source values, target values))."""
    for side, dsn in enumerate((source, target)):
        ddl = ", ".join(f"{name} {types[side]}" for name, types in columns.items())
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, {ddl})")
            marks = ", ".join(["%s"] * len(columns))
            for i, pair in rows.items():
                conn.execute(f"INSERT INTO public.t VALUES (%s, 1, {marks})", (i, *pair[side]))


def test_a_timestamp_target_against_a_date_source_is_equal_only_at_midnight_utc(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A target timestamp was read as the source's date by a plain cast, which drops its time
    of day: 13:45 on the source's day was equal. It equals the date only at midnight (UTC for
    a timestamptz, whatever the session's zone); any other time renders as `!<its text>`, one
    mismatch."""
    source, target = new_db(), new_db()
    rows = {
        1: (("2026-01-01", "2026-01-01"), ("2026-01-01 00:00+00", "2026-01-01 00:00")),
        2: (("2026-01-01", "2026-01-01"), ("2026-01-01 13:45+00", "2026-01-01 00:00")),
        3: (("2026-01-01", "2026-01-01"), ("2026-01-01 00:00+00", "2026-01-01 00:00:00.000001")),
        4: (("2026-01-02", "2026-01-02"), ("2026-01-01 19:00-05", "2026-01-02 00:00")),
        5: (("2026-01-01", "2026-01-01"), ("2026-01-01 23:00-05", "2026-01-01 00:00")),
        6: (("infinity", "-infinity"), ("infinity", "-infinity")),
        7: ((None, None), (None, None)),
        8: ((None, "2026-01-01"), ("2026-01-01 00:00+00", "2026-01-01 00:00")),
    }
    _lossy_tables(source, target, {"d": ("date", "timestamptz"), "e": ("date", "timestamp")},
                  rows)
    config = _t_config(tmp_path, state_db, source, target, ["d", "e"], repair="upsert")
    assert _diff_found(config, "t") == {((i,), "mismatch") for i in (2, 3, 5, 8)}
    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 4)
    assert diff(config, "t").consistent


def test_a_number_target_against_a_bool_source_is_true_only_as_1_and_false_as_0(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A target integer 5 was read as the source's bool by its cast, true, and so equal to
    true; a message's 5 is unreadable as a bool. Only 1 and 0 (of any number type) read as
    true and false; any other number renders as `!<its text>`, one mismatch (numeric and
    double precision have no cast to bool: such a column failed the run)."""
    source, target = new_db(), new_db()
    rows = {
        1: ((True, False, True, False), (1, 0, 1, 0)),
        2: ((True, True, True, True), (5, 1, 1, 1)),
        3: ((False, True, True, True), (-1, 1.00, 1, 1)),
        4: ((True, True, True, True), (1, 2.5, 1.0, 1)),
        5: ((True, True, True, False), (1, 1, 0.5, 0)),
        6: ((None, None, False, None), (None, None, -0.0, None)),
        7: ((True, None, None, None), (1, "NaN", None, None)),
        8: ((True, True, True, True), (1, 1, 1, 2)),
    }
    _lossy_tables(source, target, {"a": ("bool", "int"), "b": ("bool", "numeric"),
                                   "c": ("bool", "float8"), "s": ("bool", "smallint")}, rows)
    config = _t_config(tmp_path, state_db, source, target, ["a", "b", "c", "s"],
                       repair="upsert")
    assert _diff_found(config, "t") == {((i,), "mismatch") for i in (2, 3, 4, 5, 7, 8)}
    # repaired as 1 and 0 (bool has a cast to integer alone: the chunk failed on the others)
    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.status, done.rows_repaired) == (BackfillStatus.SUCCEEDED, 6)
    assert diff(config, "t").consistent


@pytest.mark.parametrize(("source_key", "target_key", "values", "cut"), [
    ("date", "timestamptz", (["'2026-01-01'"], ["'2026-01-01 00:00+00'", "'2026-01-01 13:00+00'"]),
     r"the times of one day are one key \(00:00 and 13:00 of 2026-01-01 are both "
     r"2026-01-01\)"),
    ("boolean", "integer", (["true"], ["1", "5"]),
     r"every number but 0 is true \(1 and 5 are one key\)"),
], ids=["date-timestamptz", "bool-int"])
def test_a_target_key_its_source_s_key_type_would_cut_is_refused_before_the_run_compares(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], source_key: str, target_key: str,
        values: tuple[list[str], list[str]], cut: str) -> None:
    """A date source key against a timestamptz target key read the target's keys as dates:
    its keys 00:00 and 13:00 of one day became one, one of them hidden and matched as equal.
    Keys are compared in the source's type and order, where such keys have no place of their
    own: the run is refused in one line, with what to do."""
    source, target = new_db(), new_db()
    for dsn, (key_type, rows) in ((source, (source_key, values[0])),
                                  (target, (target_key, values[1]))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id {key_type} PRIMARY KEY, version int, "
                         "status text)")
            conn.execute(f"INSERT INTO public.t (id) VALUES ({'), ('.join(rows)})")
    config = _t_config(tmp_path, state_db, source, target, ["status"], repair="upsert")
    names = {"timestamptz": "timestamp with time zone"}
    refused = (rf"target public\.t: key id \({names.get(target_key, target_key)}; the source's "
               rf"is {source_key}\) cannot be compared exactly: keys are read as the source's "
               rf"type, and as {source_key} {cut}\. Give the target's key the source's type, or "
               rf"reconcile against a view of the target whose key is {source_key}")
    with pytest.raises(TrueupError, match=r"^diff t: run \d+ failed: " + refused + "$"):
        diff(config, "t")
    capsys.readouterr()
    assert cli.main(["--config", str(tmp_path / "trueup.yaml"), "diff", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"diff t: run \d+ failed: " + refused, err), err
    with pytest.raises(TrueupError, match=refused):
        start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))


def test_a_timestamp_version_against_a_date_version_compares_as_the_timestamp(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A target timestamptz version was read as the source's date: 13:45 of the source's day
    was the same version (a mismatch, never ahead), and printed as the bare day."""
    source, target = new_db(), new_db()
    for dsn, version in ((source, "date"), (target, "timestamptz")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version {version}, "
                         f"note text)")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO public.t VALUES (1, '2026-01-01', 'a'), (2, '2026-01-01', "
                     "'b'), (3, '2026-01-01', 'c'), (4, '2026-01-01', 'd')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.t VALUES (1, '2026-01-01 13:45+00', 'x'), "
                     "(2, '2026-01-01 00:00+00', 'x'), (3, '2025-12-31 23:00+00', 'x'), "
                     "(4, '2026-01-01 00:00+00', 'd')")
    config = _t_config(tmp_path, state_db, source, target, ["note"], repair="upsert")
    found: list[Difference] = []
    diff(config, "t", on_difference=found.append)
    assert {(d.key[0], d.cls.value) for d in found} == {
        (1, "ahead"), (2, "mismatch"), (3, "stale")}
    (ahead,) = [d for d in found if d.key[0] == 1]
    assert ahead.target_version == "2026-01-01T13:45:00+00:00"
    done = start_backfill(config, "t", BackfillOptions(scope=BackfillScope.ALL))
    assert (done.rows_repaired, done.rows_skipped) == (2, 1)  # the newer target row stays
    assert _diff_found(config, "t") == {((1,), "ahead")}


def test_a_bool_version_stays_refused_against_a_number_target_version(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Comparing versions as the target's type is for a timestamp under a date alone: a bool
    source version against an integer one was taken for an integer (no refusal at all)."""
    source, target = new_db(), new_db()
    for dsn, version in ((source, "boolean"), (target, "integer")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version {version}, "
                         f"note text)")
    config = _t_config(tmp_path, state_db, source, target, ["note"])
    with pytest.raises(DiffFailed, match="is boolean, which cannot be ordered as a version"):
        diff(config, "t")
