"""``trueup backfill`` by upsert into a Postgres table: scopes, guards, dry run, one active."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.integration.test_backfill_support import (
    drift,
    make_tables,
    planned,
    repairs,
    source_rows,
    target_rows,
    write_config,
)
from trueup import metrics
from trueup.backfill import (
    BackfillOptions,
    WorkerOptions,
    cancel_backfill,
    planner,
    resume_backfill,
    runner,
    start_backfill,
    upsert,
)
from trueup.backfill.chunks import Chunk
from trueup.backfill.model import record_text
from trueup.backfill.planner import plan
from trueup.backfill.runner import backfill_of, load
from trueup.backfill.upsert import UpsertWriter
from trueup.cli import main
from trueup.config import Config, load_config
from trueup.diff import diff
from trueup.errors import Conflict, NotFound
from trueup.pacing import Pacer
from trueup.retry import RetryPolicy
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

ROWS = 1000


def _drifted(new_db: Callable[[], str], state_db: str, tmp_path: Path
             ) -> tuple[str, str, Config, dict[str, list[int]]]:
    """Source and target tables of ROWS rows, the target drifted (the keys of each class
    made: see drift), and the config of reconciliation ``orders`` between them."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    return source, target, write_config(tmp_path, state_db, source, target), made


def _all(**kw: object) -> BackfillOptions:
    return BackfillOptions(scope=BackfillScope.ALL, **kw)  # type: ignore[arg-type]


def test_backfill_all_repairs_every_class_once_and_a_new_diff_finds_only_the_ahead_row(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    _source, target, config, made = _drifted(new_db, state_db, tmp_path)

    summary = start_backfill(config, "orders", _all(chunk_size=128, workers=2),
                             WorkerOptions(workers=2))

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    # 8 chunks of the source's keys, and one of the 2 orphans after its last key
    assert summary.chunks == 9 and summary.chunks_done == 9
    assert summary.rows_planned == ROWS + 2
    fixed = len(made["missing"]) + len(made["stale"]) + len(made["mismatch"]) + 2
    assert (summary.rows_repaired, summary.rows_skipped) == (fixed, 1)
    actions = {json.dumps(k): a for k, a, _ in repairs(state_db)}
    assert len(actions) == len(repairs(state_db)) == fixed + 1, "one repairs row per key"
    assert {actions[f"[{k}]"] for k in made["missing"]} == {"insert"}
    assert {actions[f"[{k}]"] for k in made["stale"] + made["mismatch"]} == {"update"}
    assert {actions[f"[{k}]"] for k in made["orphan"]} == {"delete"}
    assert actions["[8]"] == "skipped"  # the target's newer row is never overwritten
    after = diff(config, "orders")
    assert (after.missing, after.orphan, after.stale, after.mismatch, after.ahead) == (
        0, 0, 0, 0, 1)
    ahead = [r for r in target_rows(target) if r[0] == 8]
    assert ahead == [(8, 3, "refunded", 10.0)]


@pytest.mark.parametrize("in_source", [1000, 0])
def test_target_keys_beyond_the_source_s_come_in_chunks_of_chunk_size(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, in_source: int) -> None:
    """The first and last ranges were open and nothing else: every target key before the
    source's first or after its last fell into one chunk, read whole into memory and deleted
    in one statement, paced as if it held chunk_size rows."""
    source, target = new_db(), new_db()
    make_tables(source, target, in_source)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.copy SELECT g, 1, 'ghost', 0 "
                     "FROM generate_series(-449, 0) g")   # 450 before the source's keys
        conn.execute("INSERT INTO public.copy SELECT g, 1, 'ghost', 0 "
                     "FROM generate_series(1001, 2200) g")  # 1,200 after them
    config = write_config(tmp_path, state_db, source, target)
    summary = start_backfill(config, "orders", _all(chunk_size=200))
    assert summary.status is BackfillStatus.SUCCEEDED, summary
    with psycopg.connect(state_db) as conn:
        planned = [r[0] for r in conn.execute(
            "SELECT rows_planned FROM trueup.chunks WHERE backfill_id = %s ORDER BY chunk",
            (summary.backfill_id,))]
    # 450 before: 200, 200, 50; the source's 1,000; 1,200 after: 6 x 200. Without a source
    # key, the target's 1,650 are cut alone: 8 x 200 and 50.
    assert planned == ([200, 200, 50, *([200] * 5), *([200] * 6)] if in_source else
                       [*([200] * 8), 50]), planned
    deleted = 450 + 1200
    assert (summary.rows_planned, summary.rows_repaired) == (in_source + deleted, deleted)
    assert target_rows(target) == source_rows(source)
    assert diff(config, "orders").consistent


@pytest.mark.parametrize("scope", [BackfillScope.ALL, BackfillScope.RUN])
def test_orphans_of_a_target_key_rendering_otherwise_are_asked_of_the_source_as_it_renders(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, scope: BackfillScope) -> None:
    """A numeric(12,2) target key under a bigint source key renders 100001.00: the source is
    asked for 100001, and the repairs rows name the key as the diff does."""
    _source, target, config, made = _drifted(new_db, state_db, tmp_path)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy ALTER order_id TYPE numeric(12, 2)")
    run = diff(config, "orders")
    assert (run.orphan, run.missing) == (2, 3)
    summary = start_backfill(config, "orders", BackfillOptions(
        scope=scope, run_id=run.run_id if scope is BackfillScope.RUN else None,
        chunk_size=400))

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    actions = {json.dumps(k): a for k, a, _ in repairs(state_db)}
    assert {actions[f"[{k}]"] for k in made["orphan"]} == {"delete"}
    assert {actions[f"[{k}]"] for k in made["missing"]} == {"insert"}
    after = diff(config, "orders")
    assert (after.missing, after.orphan, after.stale, after.mismatch) == (0, 0, 0, 0), after


@pytest.mark.parametrize("in_memory", [True, False], ids=["intent-in-memory", "intent-piped"])
def test_a_target_write_between_comparing_and_writing_is_kept_and_recorded_as_skipped(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, in_memory: bool) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    with psycopg.connect(target, autocommit=True) as conn:  # a narrower key than the source's
        conn.execute("ALTER TABLE public.copy ALTER order_id TYPE integer")
    config = write_config(tmp_path, state_db, source, target)
    if not in_memory:
        monkeypatch.setattr(upsert, "INTENT_IN_MEMORY_ROWS", 0)
    write = UpsertWriter._write

    def projection_writes_first(self: UpsertWriter) -> Any:
        # After the chunk compared the rows, before it writes: the projection catches up
        # with a newer version of a missing key (3) and of a stale one (7).
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("INSERT INTO public.copy VALUES (3, 9, 'shipped', 3.75) "
                         "ON CONFLICT DO NOTHING")
            conn.execute("UPDATE public.copy SET order_version = 9, state = 'shipped' "
                         "WHERE order_id = 7")
        return write(self)

    monkeypatch.setattr(UpsertWriter, "_write", projection_writes_first)
    summary = start_backfill(config, "orders", _all(chunk_size=2000))

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    actions = {json.dumps(k): a for k, a, _ in repairs(state_db)}
    assert (actions["[3]"], actions["[7]"]) == ("skipped", "skipped")
    assert {actions[f"[{k}]"] for k in made["missing"] if k != 3} == {"insert"}
    assert {actions[f"[{k}]"] for k in made["mismatch"] + [60]} == {"update"}
    assert [r for r in target_rows(target) if r[0] in (3, 7)] == [
        (3, 9, "shipped", 3.75), (7, 9, "shipped", 8.75)]
    assert (summary.rows_repaired, summary.rows_skipped) == (7, 3)


@pytest.mark.parametrize("in_memory", [True, False], ids=["intent-in-memory", "intent-piped"])
def test_an_insert_only_chunk_meeting_a_row_written_meanwhile_keeps_it_and_inserts_the_rest(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, in_memory: bool) -> None:
    """Every write of the chunk is an insert, so they go in by a plain INSERT; a row the
    projection wrote meanwhile makes it fail, and the guarded upsert takes them all."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id <= 40")
    config = write_config(tmp_path, state_db, source, target)
    if not in_memory:
        monkeypatch.setattr(upsert, "INTENT_IN_MEMORY_ROWS", 0)
    write, plain = UpsertWriter._write, UpsertWriter._insert_new
    went_in: list[bool] = []

    def projection_writes_first(self: UpsertWriter) -> Any:
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("INSERT INTO public.copy VALUES (3, 9, 'shipped', 3.75)")
        return write(self)

    def recorded(self: UpsertWriter, *args: Any) -> bool:
        went_in.append(plain(self, *args))
        return went_in[-1]

    monkeypatch.setattr(UpsertWriter, "_write", projection_writes_first)
    monkeypatch.setattr(UpsertWriter, "_insert_new", recorded)
    summary = start_backfill(config, "orders", _all(chunk_size=ROWS))

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert went_in == [False]
    actions = {k[0]: a for k, a, _ in repairs(state_db)}
    assert actions == {k: "skipped" if k == 3 else "insert" for k in range(1, 41)}
    assert (summary.rows_repaired, summary.rows_skipped) == (39, 1)
    assert [r for r in target_rows(target) if r[0] <= 40] == [
        (3, 9, "shipped", 3.75) if r[0] == 3 else r for r in source_rows(source) if r[0] <= 40]


def test_insert_only_chunks_go_in_by_a_plain_insert_and_a_trigger_s_veto_is_recorded(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id <= 40 OR order_id > 900")
        # a trigger keeps order 905 out, without an error
        conn.execute("CREATE FUNCTION veto() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     "RETURN CASE WHEN NEW.order_id = 905 THEN NULL ELSE NEW END; END $$")
        conn.execute("CREATE TRIGGER veto BEFORE INSERT ON public.copy "
                     "FOR EACH ROW EXECUTE FUNCTION veto()")
    config = write_config(tmp_path, state_db, source, target)
    plain = UpsertWriter._insert_new
    went_in: list[bool] = []

    def recorded(self: UpsertWriter, *args: Any) -> bool:
        went_in.append(plain(self, *args))
        return went_in[-1]

    monkeypatch.setattr(UpsertWriter, "_insert_new", recorded)
    summary = start_backfill(config, "orders", _all(chunk_size=ROWS // 2))

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert went_in == [True, False]  # the second chunk's insert was undone, then upserted
    actions = {k[0]: a for k, a, _ in repairs(state_db)}
    missing = [*range(1, 41), *range(901, ROWS + 1)]
    assert actions == {k: "skipped" if k == 905 else "insert" for k in missing}
    assert (summary.rows_repaired, summary.rows_skipped) == (len(missing) - 1, 1)
    assert [r[0] for r in target_rows(target)] == [k for k in range(1, ROWS + 1) if k != 905]


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_a_key_with_a_null_part_is_left_alone_and_never_inserted_twice(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, chunk_size: int) -> None:
    """Chunks of 1 make (1, NULL) a bound: the rows next to it must stay in a chunk."""
    source, target = new_db(), new_db()
    for dsn in (source, target):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE things (region int, id int, version bigint, "
                         "status text, UNIQUE (region, id))")
            conn.execute("INSERT INTO things VALUES (1, NULL, 1, 'a'), (1, 1, 1, 'a'), "
                         "(2, 2, 1, 'a')")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE things SET status = 'old' WHERE id IN (1, 2)")
    side = {"connection": "db", "table": "things", "key": ["region", "id"],
            "version": "version", "columns": ["status"]}
    raw = {"state": state_db, "connections": {"db": {"postgres": source},
                                              "copy": {"postgres": target}},
           "reconciliations": {"things": {"source": side, "target": {**side, "connection": "copy"},
                                          "repair": "upsert"}}}
    (tmp_path / "trueup.yaml").write_text(json.dumps(raw))
    config = load_config(tmp_path / "trueup.yaml")
    for _ in range(2):
        summary = start_backfill(config, "things", _all(chunk_size=chunk_size))
        assert summary.status is BackfillStatus.SUCCEEDED
        assert summary.rows_skipped == 0  # the target's (1, NULL) is no orphan
    with psycopg.connect(target) as conn:
        rows = conn.execute("SELECT region, id, status FROM things ORDER BY region, id").fetchall()
    assert rows == [(1, 1, "a"), (1, None, "a"), (2, 2, "a")]


@pytest.mark.parametrize("in_memory", [True, False], ids=["intent-in-memory", "intent-piped"])
def test_an_intent_that_fails_to_record_rolls_the_target_back_and_the_retry_repairs(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, in_memory: bool) -> None:
    source, target, config, made = _drifted(new_db, state_db, tmp_path)
    # the chunk's intent, recorded while the target writes (in memory) or before (piped)
    recorder = "record_text" if in_memory else "record_staged"
    if not in_memory:
        monkeypatch.setattr(upsert, "INTENT_IN_MEMORY_ROWS", 0)
    record, failed = getattr(upsert, recorder), []

    def failing_once(conn: psycopg.Connection[Any], *args: Any, **kw: Any) -> bool:
        if not failed:
            failed.append(True)
            raise psycopg.OperationalError("state database went away")
        return bool(record(conn, *args, **kw))

    monkeypatch.setattr(upsert, recorder, failing_once)
    fast = WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.05,
                                           max_seconds=0.1))
    summary = start_backfill(config, "orders", _all(chunk_size=2000), fast)

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    with psycopg.connect(state_db) as conn:
        attempts = conn.execute("SELECT attempts FROM trueup.chunks ORDER BY chunk").fetchall()
    assert attempts == [(2,), (1,)]  # the source's keys, then the orphans after them
    fixed = len(made["missing"]) + len(made["stale"]) + len(made["mismatch"]) + 2
    assert len(repairs(state_db)) == fixed + 1, "one repairs row per key"
    assert [r for r in target_rows(target) if r[0] != 8] == [
        r for r in source_rows(source) if r[0] != 8]


@pytest.mark.parametrize("scope", [BackfillScope.RUN, BackfillScope.ALL])
def test_intent_rows_given_as_copy_text_are_recorded_once_and_corrected_when_met_again(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, scope: BackfillScope) -> None:
    """record_text COPYs rows straight into trueup.repairs when their run is known (--run);
    otherwise (--all after a diff) each row is staged and named after the last run that found
    its key. Rows a chunk holds already are corrected in place."""
    _source, _target, config, _ = _drifted(new_db, state_db, tmp_path)
    run = diff(config, "orders")
    planned = start_backfill(config, "orders", BackfillOptions(  # nothing recorded: a dry run
        scope=scope, run_id=run.run_id if scope is BackfillScope.RUN else None, dry_run=True))
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        backfill = backfill_of(load(conn, planned.backfill_id))
        chunk = Chunk(backfill_id=planned.backfill_id, chunk=0, key_from=None, key_to=None,
                      keys=None, rows_planned=0, attempts=1)
        with conn.transaction():
            assert record_text(conn, backfill, chunk, b"[3]\tinsert\t\\N\t11\n"
                                                      b"[7]\tupdate\t5\t12\n")
        with conn.transaction():
            assert not record_text(conn, backfill, chunk, b"[7]\tskipped\t5\t5\n"
                                                          b"[1]\tinsert\t\\N\t13\n")
        rows = conn.execute(
            "SELECT key::jsonb AS key, action, fingerprint_before, fingerprint_after, run_id, "
            "reconciliation, "
            "chunk FROM trueup.repairs WHERE backfill_id = %s ORDER BY key",
            (planned.backfill_id,)).fetchall()
    found = run.run_id  # the run found 3 and 7; none found 1
    assert [tuple(r.values()) for r in rows] == [
        ([1], "insert", None, 13, found if scope is BackfillScope.RUN else None, "orders", 0),
        ([3], "insert", None, 11, found, "orders", 0),
        ([7], "skipped", 5, 5, found, "orders", 0)]


@pytest.mark.parametrize("diffed", [True, False], ids=["after-a-diff", "before-any-diff"])
def test_repairs_rows_of_a_whole_table_backfill_name_the_run_that_found_each_key(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, diffed: bool) -> None:
    _source, _target, config, _ = _drifted(new_db, state_db, tmp_path)
    runs = [diff(config, "orders").run_id, diff(config, "orders").run_id] if diffed else []
    summary = start_backfill(config, "orders", _all(chunk_size=500))
    assert summary.status is BackfillStatus.SUCCEEDED
    with psycopg.connect(state_db) as conn:
        named = conn.execute("SELECT DISTINCT run_id FROM trueup.repairs").fetchall()
    assert named == [(runs[-1] if diffed else None,)]  # the last run that found the key


def test_backfill_of_a_run_repairs_only_that_runs_differences(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    _source, target, config, _ = _drifted(new_db, state_db, tmp_path)
    run = diff(config, "orders")
    # found after the run: not part of its scope
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id = 500")
    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.RUN, run_id=run.run_id, chunk_size=3))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.rows_planned == 10 and summary.chunks == 4
    assert (summary.rows_repaired, summary.rows_skipped) == (9, 1)
    with psycopg.connect(state_db) as conn:
        found = conn.execute("SELECT DISTINCT run_id FROM trueup.repairs").fetchall()
    assert found == [(run.run_id,)]
    after = diff(config, "orders")
    assert (after.missing, after.ahead, after.orphan, after.stale, after.mismatch) == (
        1, 1, 0, 0, 0)


def test_a_key_a_run_lists_twice_is_planned_into_one_chunk_and_repaired_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    _source, _target, config, _ = _drifted(new_db, state_db, tmp_path)
    run = diff(config, "orders")
    with psycopg.connect(state_db) as conn:  # e.g. a target table holding a key twice
        conn.execute("""INSERT INTO trueup.differences (run_id, seq, reconciliation, key, class)
                        SELECT run_id, seq + 1000, reconciliation, key, class
                        FROM trueup.differences WHERE run_id = %s AND class = 'missing'
                        ORDER BY seq LIMIT 1""", (run.run_id,))
    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.RUN, run_id=run.run_id, chunk_size=1))
    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert summary.rows_planned == summary.chunks == 10
    keys = [json.dumps(k) for k, _, _ in repairs(state_db)]
    assert len(keys) == len(set(keys)) == 10, "one repairs row per key"


def test_shared_state_and_target_database_commit_repairs_with_the_target_writes(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source = new_db()
    make_tables(source, state_db, ROWS)
    drift(state_db)
    config = write_config(tmp_path, state_db, source, state_db)
    summary = start_backfill(config, "orders", _all(chunk_size=300))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (9, 1)
    assert len(repairs(state_db)) == 10
    assert diff(config, "orders").ahead == 1


def test_dry_run_plans_and_counts_but_writes_nothing(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)
    before = target_rows(target)
    config = write_config(tmp_path, state_db, source, target)
    counted = _rows_counted()
    summary = start_backfill(config, "orders", _all(chunk_size=256, dry_run=True))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.dry_run
    assert (summary.rows_repaired, summary.rows_skipped) == (9, 1)
    assert target_rows(target) == before
    assert repairs(state_db) == []
    # nor counts rows repaired in trueup_backfill_rows_total: it repaired none
    assert _rows_counted() == counted


def _rows_counted() -> tuple[float, float]:
    return tuple(metrics.BACKFILL_ROWS.labels(o)._value.get()  # type: ignore[return-value]
                 for o in ("repaired", "skipped"))


def test_chunks_failing_to_reach_the_target_are_counted_as_retried_then_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A worker that could not connect its writer failed the chunk without counting it (no
    trueup_backfill_chunks_total, no duration): the metrics of an outage showed nothing."""
    source, target = new_db(), new_db()
    config, backfill_id = planned(tmp_path, state_db, source, target, 10, 50)
    name = target.rsplit("/", 1)[1]
    with psycopg.connect(state_db, autocommit=True) as admin:  # the target closed meanwhile
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    chunks_before = {o: metrics.BACKFILL_CHUNKS.labels(o)._value.get()
                     for o in ("retry", "failed")}
    fast = WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.05,
                                           max_seconds=0.1))
    try:
        failed = resume_backfill(config, backfill_id, fast)
    finally:
        with psycopg.connect(state_db, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert failed.status is BackfillStatus.FAILED
    counted = {o: metrics.BACKFILL_CHUNKS.labels(o)._value.get() - n
               for o, n in chunks_before.items()}
    # each chunk's first two attempts retried, the third failing the backfill
    assert counted["failed"] == 1 and counted["retry"] >= 2, counted


def test_a_second_active_backfill_is_refused_with_a_line_naming_the_active_one(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 10)
    config = write_config(tmp_path, state_db, source, target)
    with open_state(state_db) as state:
        state.autocommit = True
        first = plan(config, "orders", _all(chunk_size=5), state)
    status = main(["--config", config.path, "backfill", "orders", "--all"])
    # stderr also carries structured log events (JSON lines); the user's message is one line
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if not line.startswith('{"at": '))
    assert status == 2
    assert len(err.splitlines()) == 1 and f"backfill {first} of orders is already running" in err
    # the planned one can be served by a resume, then a new one may start
    assert resume_backfill(config, first).status is BackfillStatus.SUCCEEDED
    assert main(["--config", config.path, "backfill", "orders", "--all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"backfill_id", "reconciliation", "status", "chunks", "rows_planned",
                        "rows_repaired", "rows_skipped", "seconds"}
    assert out["status"] == "succeeded" and out["backfill_id"] == first + 1
    # a cancelled one is not reopened while another is active
    with open_state(state_db) as state:
        state.autocommit = True
        third = plan(config, "orders", _all(chunk_size=5), state)
        cancel_backfill(config, third)
        fourth = plan(config, "orders", _all(chunk_size=5), state)
    assert main(["--config", config.path, "backfill", "--resume", str(third)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith('{"at": ')]
    assert len(err) == 1 and f"backfill {fourth} of orders is already running" in err[0]


def test_a_backfill_launched_while_another_is_planned_waits_to_name_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Launched while the first was still planning (its row not committed yet), the second
    said only "another backfill of orders is being planned": nothing to resume or cancel."""
    source, target = new_db(), new_db()
    make_tables(source, target, 10)
    config = write_config(tmp_path, state_db, source, target)
    plan_ranges = planner._plan_ranges
    planning, release = threading.Event(), threading.Event()

    def plan_when_released(*args: Any, **kwargs: Any) -> None:
        planning.set()  # the planning lock is held from here to the commit
        assert release.wait(60)
        plan_ranges(*args, **kwargs)

    monkeypatch.setattr(planner, "_plan_ranges", plan_when_released)
    planned: list[int] = []

    def first() -> None:
        with open_state(state_db) as state:
            state.autocommit = True
            planned.append(plan(config, "orders", _all(chunk_size=5), state))

    def second() -> str:
        with open_state(state_db) as state, pytest.raises(Conflict) as refused:
            state.autocommit = True
            plan(config, "orders", _all(chunk_size=5), state)
        return str(refused.value)

    # the first plan commits while the second waits for it (or before it asks): named
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert planning.wait(30)
        threading.Timer(0.5, release.set).start()
        refused = second()
    finally:
        release.set()
        thread.join(30)
    assert refused.startswith(
        f"backfill orders: backfill {planned[0]} of orders is already running; resume it")
    assert resume_backfill(config, planned[0]).status is BackfillStatus.SUCCEEDED

    # a plan that outlasts the wait: said so, and where to look
    monkeypatch.setattr(planner, "PLANNING_WAIT_SECONDS", 0.2)
    planning.clear()
    release.clear()
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert planning.wait(30)
        refused = second()  # the first holds the lock until released
    finally:
        release.set()
        thread.join(30)
    assert refused == ("backfill orders: another backfill of orders is still being planned "
                       "after 0.2 s; `trueup status` names it once planned")


def test_a_backfill_asked_to_run_alongside_runs_while_another_is_active(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """DESIGN: one active backfill per reconciliation, unless asked otherwise. An urgent
    repair waited for a long --all to end: --alongside plans and runs it meanwhile; any other
    launch is still refused, naming the active one."""
    source, target = new_db(), new_db()
    config, first = planned(tmp_path, state_db, source, target, 10, 5)  # running, unserved
    assert main(["--config", config.path, "backfill", "orders", "--all", "--alongside",
                 "--json"]) == 1  # the ahead row is skipped, as ever
    alongside = json.loads(capsys.readouterr().out)
    assert alongside["status"] == "succeeded" and alongside["backfill_id"] == first + 1
    assert diff(config, "orders").missing == 0
    assert main(["--config", config.path, "backfill", "orders", "--all"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith('{"at": ')]
    assert err == [f"backfill orders: backfill {first} of orders is already running; resume "
                   f"it with `trueup backfill --resume {first}` or cancel it with `trueup "
                   f"backfill --cancel {first}` (or plan this one --alongside it)"]
    # nor does it wait for another plan's lock (planning a big --all takes a while)
    with psycopg.connect(state_db) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (planner.lock_key("orders"),))
        started = time.monotonic()
        with open_state(state_db) as state:
            state.autocommit = True
            third = plan(config, "orders", _all(chunk_size=5, alongside=True), state)
        assert time.monotonic() - started < planner.PLANNING_WAIT_SECONDS
        holder.rollback()
    assert resume_backfill(config, third).status is BackfillStatus.SUCCEEDED
    assert resume_backfill(config, first).status is BackfillStatus.SUCCEEDED
    with psycopg.connect(state_db) as conn:
        one_each = conn.execute(
            "SELECT count(*) = count(DISTINCT (backfill_id, key)) FROM trueup.repairs "
            "WHERE backfill_id IN (%s, %s)", (first, first + 1)).fetchone()
    assert one_each == (True,)


def test_cancel_stops_pending_chunks_and_resume_finishes_them(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target, config, made = _drifted(new_db, state_db, tmp_path)
    with open_state(state_db) as state:
        state.autocommit = True
        backfill_id = plan(config, "orders", _all(chunk_size=100), state)
    cancelled = cancel_backfill(config, backfill_id)
    assert cancelled.status is BackfillStatus.CANCELLED and cancelled.chunks_done == 0
    assert target_rows(target) != source_rows(source)
    # a config without the reconciliation cannot serve it: the backfill stays cancelled (it
    # was reopened first, and then blocked every new backfill of orders as "running")
    other = tmp_path / "other.yaml"
    other.write_text(Path(config.path).read_text().replace("orders:", "others:", 1))
    with pytest.raises(NotFound, match=f"^backfill {backfill_id}: reconciliation 'orders' is "
                                       f"not in {re.escape(str(other))}$"):
        resume_backfill(load_config(other), backfill_id)
    with open_state(state_db) as state:
        assert load(state, backfill_id)["status"] == "cancelled"
    done = resume_backfill(config, backfill_id)
    # 10 chunks of the source's keys, one of the orphans after them
    assert done.status is BackfillStatus.SUCCEEDED and done.chunks_done == done.chunks == 11
    assert {k[0] for k, a, _ in repairs(state_db) if a == "insert"} == set(made["missing"])


def _refuse_orders_from_40(target: str) -> None:
    """A target that refuses every write of an order from 40 on (until no_big is dropped)."""
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy ADD CONSTRAINT no_big CHECK (order_id < 40)"
                     " NOT VALID")


def test_a_failing_chunk_retries_with_backoff_then_fails_the_backfill_and_resume_recovers(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)
    _refuse_orders_from_40(target)
    config = write_config(tmp_path, state_db, source, target)
    fast = WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.05,
                                           max_seconds=0.1))
    failed = start_backfill(config, "orders", _all(chunk_size=500), fast)
    assert failed.status is BackfillStatus.FAILED
    assert failed.error is not None and "no_big" in failed.error and "chunk" in failed.error
    with psycopg.connect(state_db) as conn:
        attempts = conn.execute("SELECT chunk, status, attempts FROM trueup.chunks "
                                "ORDER BY chunk").fetchall()
    assert (0, "failed", 3) in attempts
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy DROP CONSTRAINT no_big")
    resumed = resume_backfill(config, failed.backfill_id, fast)
    assert resumed.status is BackfillStatus.SUCCEEDED
    assert diff(config, "orders").missing == 0


def test_resume_gives_every_unfinished_chunk_its_attempts_again(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The chunks waiting for a retry when another failed for good kept their spent attempts:
    the resumed backfill failed at their first failure (and waited their backoff first); so
    did a chunk whose worker died holding it."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    config = write_config(tmp_path, state_db, source, target)
    fast = WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.05,
                                           max_seconds=0.1))
    failed = start_backfill(config, "orders", _all(chunk_size=50), fast)
    assert failed.status is BackfillStatus.FAILED
    with psycopg.connect(state_db) as conn:
        waiting = conn.execute("SELECT count(*) FROM trueup.chunks WHERE status = 'pending' "
                               "AND attempts > 0").fetchone()
    assert waiting is not None and waiting[0] > 0  # a retry or more spent
    with psycopg.connect(state_db, autocommit=True) as conn:  # a worker died holding one
        conn.execute("UPDATE trueup.chunks SET status = 'running', attempts = 2, "
                     "lease_owner = 'gone', lease_expires_at = now() - interval '1 second' "
                     "WHERE chunk = (SELECT max(chunk) FROM trueup.chunks)")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy DROP CONSTRAINT refuse_all")
    taken_over = metrics.REGISTRY.get_sample_value("trueup_leases_taken_over_total") or 0.0
    resumed = resume_backfill(config, failed.backfill_id, fast)
    assert resumed.status is BackfillStatus.SUCCEEDED
    with psycopg.connect(state_db) as conn:
        attempts = {a for (a,) in conn.execute("SELECT attempts FROM trueup.chunks")}
    assert attempts == {1}
    # the dead worker's chunk counts as taken over, though its next claim found it pending
    assert metrics.REGISTRY.get_sample_value("trueup_leases_taken_over_total") == taken_over + 1


class _Died(Exception):
    """The worker process dying at a chosen statement."""


def test_a_worker_killed_between_failing_a_chunk_and_the_backfill_leaves_one_resume_to_do(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)
    _refuse_orders_from_40(target)
    config = write_config(tmp_path, state_db, source, target)
    real_query = runner.query

    def dying(name: str) -> Any:
        if name == "finish_backfill":  # the chunk is marked failed; the backfill not yet
            raise _Died(name)
        return real_query(name)

    monkeypatch.setattr(runner, "query", dying)
    once = WorkerOptions(lease_seconds=1.0, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(_Died):
        start_backfill(config, "orders", _all(chunk_size=500), once)
    monkeypatch.setattr(runner, "query", real_query)
    with psycopg.connect(state_db) as conn:
        backfill_id, status = conn.execute(
            "SELECT backfill_id, status FROM trueup.backfills").fetchone()  # type: ignore[misc]
        statuses = conn.execute("SELECT status FROM trueup.chunks").fetchall()
    assert status == "running" and ("failed",) not in statuses
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.copy DROP CONSTRAINT no_big")
    resumed = resume_backfill(config, backfill_id, once)  # the dead worker's lease runs out
    assert resumed.status is BackfillStatus.SUCCEEDED
    assert diff(config, "orders").missing == 0


def test_rows_are_read_after_the_rate_limit_wait_so_a_write_during_it_is_not_undone(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)  # key 3, in the first chunk, is missing from the target
    config = write_config(tmp_path, state_db, source, target)

    class WriteDuringTheWait(Pacer):
        """The application writes key 3 while the first chunk waits for its turn."""

        written = False

        def __call__(self, units: int = 1) -> None:
            if not self.written:
                self.written = True
                with psycopg.connect(source, autocommit=True) as conn:
                    conn.execute("UPDATE public.orders SET version = 3, status = 'refunded' "
                                 "WHERE id = 3")
            super().__call__(units)

    monkeypatch.setattr(runner, "Pacer", WriteDuringTheWait)
    summary = start_backfill(config, "orders", _all(chunk_size=100, rate=100_000))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert [r for r in target_rows(target) if r[0] == 3] == [(3, 3, "refunded", 3.75)]
    assert [r for r in target_rows(target) if r[0] != 8] == [  # 8: the target's is newer
        r for r in source_rows(source) if r[0] != 8]


@pytest.mark.parametrize("written", ["new values", "the same values"])
def test_an_orphan_written_again_after_the_source_was_asked_is_not_deleted(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """Also when the row comes back with the values it had (a newer version only): the
    delete compared the values alone, and removed the row the source holds again."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)  # orphans 100001 and 100002, both (1, 'ghost', 0)
    config = write_config(tmp_path, state_db, source, target)
    delete = UpsertWriter._delete
    state, total = ("new", 1) if written == "new values" else ("ghost", 0)

    def key_comes_back(self: UpsertWriter, orphans: Sequence[Any], seen: Any) -> Any:
        # Between asking the source and deleting: the application creates key 100001 again
        # and its projection writes it to the target.
        if not orphans:
            return delete(self, orphans, seen)  # a chunk of the source's keys
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders (id, version, status, amount) "
                         "VALUES (100001, 5, %s, %s)", (state, total))
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("UPDATE public.copy SET order_version = 5, state = %s, total = %s "
                         "WHERE order_id = 100001", (state, total))
        return delete(self, orphans, seen)

    monkeypatch.setattr(UpsertWriter, "_delete", key_comes_back)
    summary = start_backfill(config, "orders", _all(chunk_size=2000))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert [r for r in target_rows(target) if r[0] > ROWS] == [(100001, 5, state, total)]
    actions = {json.dumps(k): a for k, a, _ in repairs(state_db)}
    assert (actions["[100001]"], actions["[100002]"]) == ("skipped", "delete")


def test_a_target_unreachable_when_workers_start_is_retried_then_fails_and_resume_recovers(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target, config, _ = _drifted(new_db, state_db, tmp_path)
    with open_state(state_db) as state:
        state.autocommit = True
        backfill_id = plan(config, "orders", _all(chunk_size=500), state)
    database = target.rsplit("/", 1)[1]
    with psycopg.connect(source.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" RENAME TO "{database}_away"')
        fast = WorkerOptions(retry=RetryPolicy(max_attempts=2, initial_seconds=0.05,
                                               max_seconds=0.1))
        try:
            failed = resume_backfill(config, backfill_id, fast)
        finally:
            admin.execute(f'ALTER DATABASE "{database}_away" RENAME TO "{database}"')
    assert failed.status is BackfillStatus.FAILED
    assert failed.error is not None and "cannot connect" in failed.error
    resumed = resume_backfill(config, backfill_id, fast)
    assert resumed.status is BackfillStatus.SUCCEEDED
    assert [r for r in target_rows(target) if r[0] != 8] == [
        r for r in source_rows(source) if r[0] != 8]


def test_repair_none_and_bad_scopes_are_user_errors(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 10)
    config = write_config(tmp_path, state_db, source, target)
    assert main(["--config", config.path, "backfill", "orders", "--run", "999"]) == 2
    assert "no run 999" in capsys.readouterr().err
    assert main(["--config", config.path, "backfill", "orders", "--partition", "x"]) == 2
    assert "no partitions" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    none = write_config(tmp_path / "none", state_db, source, target, repair="none")
    assert main(["--config", none.path, "backfill", "orders", "--all"]) == 2
    assert "repair: is none" in capsys.readouterr().err


def test_candidates_rendered_as_copy_text_equal_what_copy_itself_writes(new_db: Callable[[], str]
                                                                         ) -> None:
    """The intent's rows are rendered by string_agg, not COPY: escapes must agree."""
    with psycopg.connect(new_db(), autocommit=True, row_factory=dict_row) as conn:
        conn.execute("CREATE TEMP TABLE trueup_cand AS SELECT * FROM (VALUES "
                     "(jsonb_build_array(E'a\\\\b\\t\"c\\n\\r', 1), 'insert', NULL::bigint, "
                     "5::bigint), (jsonb_build_array('é ü', -2), 'update', 7::bigint, -9::bigint), "
                     "(jsonb_build_array(E'\\x01', 3.5), 'skipped', 11::bigint, 12::bigint)) "
                     "AS v (trueup_key, trueup_action, trueup_before, trueup_fp)")
        with conn.cursor() as cur, cur.copy(upsert.CANDIDATES_OUT) as copy:
            written = b"".join(copy)
        assert upsert.candidate_rows(conn) == written
        assert written.count(b"\n") == 3 and b"\tskipped\t11\t11\n" in written
        conn.execute("TRUNCATE trueup_cand")
        assert upsert.candidate_rows(conn) == b""
