"""Segment checksums between two tables: even cuts of integer keys and the native row hash."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.conftest import ProgressLog
from trueup import segments
from trueup.config import load_config
from trueup.diff import diff
from trueup.fingerprint import ColumnType
from trueup.runs import differences_of
from trueup.sides import table_side

pytestmark = pytest.mark.postgres


def _keys_table(dsn: str, ids: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int4 PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO t SELECT g, 'x' FROM ({ids}) AS s (g)")
        conn.execute("ANALYZE t")


def _plan(dsn: str) -> tuple[segments.Segmentation, psycopg.Connection[Any]]:
    conn = psycopg.connect(dsn, autocommit=True, row_factory=psycopg.rows.dict_row)
    side = table_side(label="source", dsn=dsn, table="public.t", key=["id"], version=None,
                      columns=["v"], conn=conn)
    rows = segments.estimate_rows(conn, side, sql.SQL("true"))
    return segments.plan_segments(conn, side, sql.SQL("true"), rows), conn


def test_an_even_key_is_cut_arithmetically_into_the_segments_width_bucket_gives(
        new_db: Callable[[], str]) -> None:
    dsn = new_db()
    _keys_table(dsn, "SELECT g * 3 - 3000 FROM generate_series(1, 20000) g")
    plan, conn = _plan(dsn)
    with conn:
        assert plan.step is not None and plan.count > 100
        low, width = plan.step
        assert plan.bounds == list(range(low + width, plan.bounds[-1] + 1, width))
        # keys far below, on and around every kind of bound, and far above the range (int4)
        probes = [-2**31, -3001, low - 1, low, low + 1, plan.bounds[0] - 1, plan.bounds[0],
                  plan.bounds[1], plan.bounds[-1] - 1, plan.bounds[-1],
                  plan.bounds[-1] + width - 1, plan.bounds[-1] + width, 2**31 - 1]
        rows = conn.execute(sql.SQL(
            "SELECT k, {} AS computed, width_bucket(k, %(bounds)s::int4[]) AS searched "
            "FROM unnest(%(probes)s::int4[]) AS u (k)").format(
                plan.segment_of(sql.Identifier("k"))),
            {"bounds": plan.bounds, "probes": probes}).fetchall()
        assert [(r["k"], r["computed"]) for r in rows] == [
            (r["k"], r["searched"]) for r in rows]
        assert {r["computed"] for r in rows} >= {0, 1, 2, len(plan.bounds)}


def test_a_key_far_out_that_the_histogram_missed_does_not_stretch_even_cuts(
        new_db: Callable[[], str]) -> None:
    """ANALYZE's sample missed one key far from the rest (written after it, here): the real
    maximum stretched the even cuts over its range, and nearly every row fell in segment 0,
    which a differing row then read whole (431 MB for 1M rows, in review)."""
    dsn = new_db()
    _keys_table(dsn, "SELECT g FROM generate_series(1, 20000) g")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2000000000, 'far')")
    plan, conn = _plan(dsn)
    with conn:
        fullest = conn.execute(sql.SQL(
            "SELECT max(n) AS n FROM (SELECT {} AS seg, count(*) AS n FROM t GROUP BY 1) s"
        ).format(plan.segment_of(sql.Identifier("id"))), {"bounds": plan.bounds}).fetchone()
    assert plan.step is None
    assert fullest is not None and fullest["n"] <= 1000, fullest


def test_a_skewed_key_is_cut_by_its_histogram(new_db: Callable[[], str]) -> None:
    dsn = new_db()
    # nine tenths of the rows in the first thousandth of the range
    _keys_table(dsn, "SELECT g FROM generate_series(1, 18000) g UNION ALL "
                     "SELECT 20000000 + g * 10000 FROM generate_series(1, 2000) g")
    plan, conn = _plan(dsn)
    conn.close()
    assert plan.step is None
    below = sum(1 for b in plan.bounds if b <= 18000)
    assert below > len(plan.bounds) * 0.8  # the dense part gets most of the segments


def _pair(new_db: Callable[[], str], tmp_path: Path, ddl: str, source_rows: str,
          target_rows: str, columns: list[str], target_zone: str = "UTC", *,
          source_version: str | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Diff table ``t`` of two new databases; ``source_version`` is a column (``name type``)
    only the source has, filled with 7, and compared as its version."""
    source, target = new_db(), new_db()
    for dsn, rows in ((source, source_rows), (target, target_rows)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE t ({ddl})")
            if dsn == source and source_version:
                conn.execute(f"ALTER TABLE t ADD COLUMN {source_version} DEFAULT 7")
            conn.execute(f"INSERT INTO t VALUES {rows}")
            conn.execute("ANALYZE t")
    with psycopg.connect(target, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None
        conn.execute(sql.SQL("ALTER DATABASE {} SET timezone = {}").format(
            sql.Identifier(name[0]), sql.Literal(target_zone)))
    versioned = {"version": source_version.split()[0]} if source_version else {}
    return _diff_t(new_db, tmp_path, source, target, ["id"], columns, progress,
                   source_extra=versioned)


def _diff_t(new_db: Callable[[], str], tmp_path: Path, source: str, target: str,
            key: list[str], columns: list[str],
            progress: Callable[[str, int, int], None] | None = None, *,
            source_extra: dict[str, Any] | None = None) -> Any:
    """Diff table ``t`` of ``source`` and ``target`` (keyed by ``key``) with a new state."""
    side = {"table": "public.t", "key": key, "columns": columns}
    raw = {"state": new_db(), "connections": {"a": {"postgres": source},
                                              "b": {"postgres": target}},
           "reconciliations": {"t": {"source": {"connection": "a", **side,
                                                **(source_extra or {})},
                                     "target": {"connection": "b", **side}}}}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    from trueup.state import migrate
    with psycopg.connect(raw["state"]) as conn:
        migrate(conn)
    return diff(load_config(path), "t", progress=progress)


def test_values_swapped_between_rows_or_columns_of_one_segment_are_mismatches(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    summary = _pair(new_db, tmp_path, "id int8 PRIMARY KEY, a text, b text",
                    "(1, 'x', 'y'), (2, 'p', 'q'), (3, 'm', NULL), (4, NULL, 'm')",
                    # 1: a and b swapped; 2 and 3: their a swapped; 4 as in the source
                    "(1, 'y', 'x'), (2, 'm', 'q'), (3, 'p', NULL), (4, NULL, 'm')",
                    ["a", "b"])
    assert (summary.mismatch, summary.missing, summary.orphan) == (3, 0, 0)


def test_equal_values_written_differently_hash_alike_in_any_session_time_zone(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    at = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    ddl = ("id int8 PRIMARY KEY, n numeric, f float8, ts timestamptz, d date, ok bool, "
           "j jsonb, c char(5)")
    source = (f"(1, 1.0, 0.0, '{at.isoformat()}', '2026-03-01', true, "
              "'{\"a\": 1, \"b\": [1, 2]}', 'ab'), "
              "(2, NULL, NULL, NULL, NULL, NULL, 'null', NULL), "
              "(3, 2.5, 1.5, '1999-12-31 23:59:59.999999+00', '1999-12-31', false, '{}', 'x'), "
              "(4, 0, 0, 'infinity', '-infinity', true, '[]', '')")
    target = (f"(1, 1.000, -0.0, '{at.astimezone(dt.timezone(dt.timedelta(hours=9))).isoformat()}"
              "', '2026-03-01', true, '{\"b\": [1, 2], \"a\": 1}', 'ab   '), "
              "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL), "
              "(3, 2.50, 1.5, '2000-01-01 08:59:59.999999+09', '1999-12-31', false, '{}', 'x'), "
              "(4, 0, 0, 'infinity', '-infinity', true, '[]', '')")
    columns = ["n", "f", "ts", "d", "ok", "j", "c"]
    summary = _pair(new_db, tmp_path, ddl, source, target, columns,
                    target_zone="America/Los_Angeles")
    assert summary.consistent, summary
    changed = target.replace("true, '{\"b\"", "false, '{\"b\"")
    summary = _pair(new_db, tmp_path, ddl, source, changed, columns,
                    target_zone="America/Los_Angeles")
    assert (summary.mismatch, summary.missing, summary.orphan) == (1, 0, 0)


def test_a_version_only_the_source_has_leaves_equal_segments_equal(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    rows = ", ".join(f"({i}, 'v{i}')" for i in range(1, 2001))
    progress = ProgressLog()
    summary = _pair(new_db, tmp_path, "id int8 PRIMARY KEY, a text", rows, rows, ["a"],
                    source_version="version bigint", progress=progress)
    assert summary.consistent and summary.source_rows == 2000, summary
    assert progress.segments_read == set()
    changed = rows.replace("(700, 'v700')", "(700, 'w')")
    summary = _pair(new_db, tmp_path, "id int8 PRIMARY KEY, a text", rows, changed, ["a"],
                    source_version="version bigint", progress=progress)
    assert (summary.mismatch, summary.stale, summary.ahead) == (1, 0, 0)
    assert progress.segments_read == {1}


def test_every_compared_type_has_a_native_hash() -> None:
    from trueup.fingerprint import _KINDS
    from trueup.sides import native_hash

    for name in _KINDS:
        native_hash([(sql.Identifier("c"), ColumnType.of(name))])
    native_hash([(sql.Identifier("c"), ColumnType.of("mood", "e"))])  # an enum


def test_padded_char_keys_missing_or_orphaned_are_found(new_db: Callable[[], str],
                                                        tmp_path: Path) -> None:
    # the second stage asks for suspect keys as Python read them: 'ab  ' must find 'ab'
    summary = _pair(new_db, tmp_path, "id char(4) PRIMARY KEY, a text",
                    "('ab', 'x'), ('cd', 'y'), ('gh', 'w')",
                    "('cd', 'y'), ('ef', 'z'), ('gh', 'v')", ["a"])
    assert (summary.missing, summary.orphan, summary.mismatch) == (1, 1, 1)


KEY_TYPES: dict[str, tuple[str, Callable[[int], Any]]] = {
    "int4": ("id int4", lambda i: i * 3 - 3000),
    "int8 sparse": ("id int8", lambda i: i * i * 1000),
    "numeric": ("id numeric", lambda i: f"{i * 1.5:.1f}"),
    "text": ("id text", lambda i: f"k{i:05d}{'é' if i % 7 == 0 else ''}"),
    "char": ("id char(8)", lambda i: f"c{i}"),
    "varchar": ("id varchar(20)", lambda i: f"v{i % 97}-{i}"),
    "uuid": ("id uuid", lambda i: str(uuid.UUID(int=i * 7919))),
    "date": ("id date", lambda i: (dt.date(2000, 1, 1) + dt.timedelta(days=i)).isoformat()),
    "timestamptz": ("id timestamptz", lambda i: (dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                                                  + dt.timedelta(minutes=i)).isoformat()),
}


@pytest.mark.parametrize("key_type", list(KEY_TYPES))
def test_drift_over_many_segments_is_found_exactly_for_every_key_type(
        key_type: str, new_db: Callable[[], str], tmp_path: Path) -> None:
    column, key_of = KEY_TYPES[key_type]
    rng = random.Random(key_type)
    n = 3000
    keys = [key_of(i) for i in range(n)]
    missing = set(rng.sample(range(n), 20))
    changed = set(rng.sample(sorted(set(range(n)) - missing), 20))
    orphans = [key_of(i) for i in range(n, n + 10)]

    def row(key: Any, value: str) -> str:
        return "(" + ", ".join(psycopg.sql.quote(v) for v in (key, value)) + ")"

    source = ", ".join(row(k, f"v{i}") for i, k in enumerate(keys))
    target = ", ".join([row(k, f"w{i}" if i in changed else f"v{i}")
                        for i, k in enumerate(keys) if i not in missing]
                       + [row(k, "orphan") for k in orphans])
    summary = _pair(new_db, tmp_path, f"{column} PRIMARY KEY, a text", source, target, ["a"],
                    target_zone="Asia/Kolkata")
    assert (summary.missing, summary.orphan, summary.mismatch) == (20, 10, 20)


def test_same_server_tells_clusters_apart_and_survives_a_refused_probe(
        new_db: Callable[[], str]) -> None:
    from trueup.db import same_server

    first, second = new_db(), new_db()
    with psycopg.connect(first) as a, psycopg.connect(second) as b:
        assert same_server(a, b)
    # A managed server may deny pg_control_system(): the answer is then "not known to be the
    # same", and the caller's transaction stays usable.
    role = f"trueup_probe_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(first, autocommit=True) as admin:
        admin.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        limited = psycopg.conninfo.make_conninfo(first, user=role)
        with psycopg.connect(limited) as a, psycopg.connect(second) as b:
            a.execute("SELECT 1")  # inside a transaction, as diff's connections are
            assert not same_server(a, b)
            assert a.execute("SELECT 2").fetchone() == (2,)
    finally:
        with psycopg.connect(second, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _checksum_plans(new_db: Callable[[], str], tmp_path: Path, source_sql: list[str],
                    target_sql: list[str], *, ddl: str = "id int8 PRIMARY KEY, a text",
                    key: tuple[str, ...] = ("id",)) -> tuple[Any, list[int]]:
    """Diff ``t`` of two new databases set up by the given statements; return the summary and
    the segment counts of its checksum passes, as progress reports them."""
    source, target = new_db(), new_db()
    for dsn, statements in ((source, source_sql), (target, target_sql)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE t ({ddl})")
            for statement in statements:
                conn.execute(statement)
    progress = ProgressLog()
    return _diff_t(new_db, tmp_path, source, target, list(key), ["a"], progress), \
        progress.plans


FILL = "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20000) g"


def test_an_empty_source_still_cuts_a_full_target_into_segments(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    # every target row is an orphan: read in segments, never as one 20,000-row piece
    summary, plans = _checksum_plans(new_db, tmp_path, ["ANALYZE t"], [FILL, "ANALYZE t"])
    assert (summary.orphan, summary.missing) == (20000, 0)
    assert plans[-1] >= 20000 // segments.SEGMENT_ROWS // 2


def test_stale_statistics_are_corrected_by_the_counts_of_the_first_pass(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    # analyzed at 10 rows, 20,000 now: planned for one segment, cut again by the true count
    stale = ["ALTER TABLE t SET (autovacuum_enabled = false)",  # stale until the diff runs
             "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g", "ANALYZE t",
             "INSERT INTO t SELECT g, 'v' || g FROM generate_series(11, 20000) g"]
    summary, plans = _checksum_plans(new_db, tmp_path, stale, stale)
    assert summary.consistent and summary.source_rows == 20000
    assert plans[0] == 1 and plans[-1] >= 20000 // segments.SEGMENT_ROWS // 2


@pytest.mark.parametrize("first", ["tenant int4", "region text"])
def test_a_composite_key_with_few_first_values_is_cut_into_small_segments(
        first: str, new_db: Callable[[], str], tmp_path: Path) -> None:
    """(tenant, id) keys: the first column alone gives two segments of 10,000 rows each, read
    whole when anything in them differs. They are cut by a hash of the whole key instead."""
    column = first.split()[0]
    value = "g % 2" if first.endswith("int4") else "CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END"
    fill = f"INSERT INTO t SELECT {value}, g, 'v' || g FROM generate_series(1, 20000) g"
    drift = ["UPDATE t SET a = 'changed' WHERE id IN (5, 500, 5000)",
             "DELETE FROM t WHERE id IN (7, 7777)",
             f"INSERT INTO t SELECT {value}, g, 'x' FROM generate_series(30001, 30001) g"]
    summary, plans = _checksum_plans(
        new_db, tmp_path, [fill, "ANALYZE t"], [fill, *drift, "ANALYZE t"],
        ddl=f"{first}, id int8, a text, PRIMARY KEY ({column}, id)", key=(column, "id"))
    assert (summary.mismatch, summary.missing, summary.orphan) == (3, 2, 1)
    assert plans[-1] >= 20000 // segments.SEGMENT_ROWS // 2


def test_a_double_compared_with_a_numeric_keeps_every_digit(new_db: Callable[[], str],
                                                           tmp_path: Path) -> None:
    """A double and a numeric compare as numeric: the double's own cast keeps 15 digits, so
    0.1 + 0.2 (0.30000000000000004) would equal a numeric 0.3 and differ from its exact
    copy."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, x double precision)")
        conn.execute("INSERT INTO t VALUES (1, 0.1::float8 + 0.2), (2, 0.1::float8 + 0.2), "
                     "(3, 19.99), (4, 1e16), (5, 'NaN'), (6, 2::float8 ^ 60), "
                     "(7, '-Infinity'), (8, '-0')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, x numeric)")
        conn.execute("INSERT INTO t VALUES (1, 0.30000000000000004), (2, 0.3), (3, 19.990), "
                     "(4, 10000000000000000), (5, 'NaN'), (6, 1152921504606846976), "
                     "(7, '-Infinity'), (8, 0)")
    summary = _diff_t(new_db, tmp_path, source, target, ["id"], ["x"])
    assert (summary.mismatch, summary.missing, summary.orphan) == (1, 0, 0)
    with psycopg.connect(load_config(tmp_path / "trueup.yaml").state,
                         row_factory=psycopg.rows.dict_row) as conn:
        (found,) = differences_of(conn, summary.run_id)
    assert found.key == [2]


def test_a_parallel_pass_runs_with_workers_and_sums_as_a_serial_one(
        new_db: Callable[[], str]) -> None:
    """The planner guesses a group per row, so it never found gathering partial groups worth
    a worker: ``parallel=True`` asked for workers and ran without any."""
    dsn = new_db()
    _keys_table(dsn, "SELECT g * 2 FROM generate_series(1, 50000) g")
    plan, conn = _plan(dsn)
    plans: list[str] = []
    with conn:
        side = table_side(label="source", dsn=dsn, table="public.t", key=["id"], version=None,
                          columns=["v"], conn=conn)
        # plans come back as notices; with no setup cost, a table this small is worth workers
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0; SET auto_explain.log_level = "
                     "notice; SET client_min_messages = notice; "
                     "SET min_parallel_table_scan_size = 0; SET parallel_setup_cost = 0")
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        serial = segments.checksums(conn, side, sql.SQL("true"), plan, parallel=False)
        parallel = segments.checksums(conn, side, sql.SQL("true"), plan, parallel=True)
    summed = [p for p in plans if "bit_xor" in p]
    assert len(summed) == 2, plans
    assert "Gather" not in summed[0] and "Gather" in summed[1], summed[1]
    assert parallel == serial and sum(n for n, _ in serial.values()) == 50000


def test_a_null_first_key_is_never_a_bound_of_a_sampled_plan(new_db: Callable[[], str]) -> None:
    """A unique index lets NULL keys in; sorting last, one became the last bound whenever the
    sampled keys fell just so, and width_bucket refused the plan ("thresholds array must not
    contain NULLs"): every such run failed."""
    dsn = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id numeric UNIQUE, v text)")
        # 100 distinct keys and NULL: 101 values, cut every 10th from the 10th on
        conn.execute("INSERT INTO t SELECT g / 4.0, 'x' FROM generate_series(1, 100) g")
        conn.execute("INSERT INTO t SELECT NULL, 'null key' FROM generate_series(1, 3)")
        conn.row_factory = psycopg.rows.dict_row
        side = table_side(label="source", dsn=dsn, table="public.t", key=["id"], version=None,
                          columns=["v"], conn=conn)
        # (an estimate of 1 row reads every key: no sample)
        plan = segments._first_key_plan(conn, side, sql.SQL("true"), 1, 10)
        assert None not in plan.bounds and len(plan.bounds) == 9
        sums = segments.checksums(conn, side, sql.SQL("true"), plan)
        assert sum(n for n, _ in sums.values()) == 103
        assert sums[0][0] == 3 + 10  # the NULL keys go with the lowest ones
