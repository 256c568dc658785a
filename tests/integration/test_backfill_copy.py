"""Upsert chunks the target holds no row of go in by one ``COPY`` from the source: they record
what the compare path would, and every way out of that path (a row written meanwhile, a
trigger's veto, a crash after the intent) leaves the chunk to the compare path, repaired once."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.integration.test_backfill_support import (
    drift,
    make_sales,
    make_tables,
    source_rows,
    target_rows,
    write_config,
    write_sales_config,
)
from trueup.backfill import (
    BackfillOptions,
    WorkerOptions,
    resume_backfill,
    start_backfill,
    upsert,
)
from trueup.backfill.chunks import Heartbeat
from trueup.backfill.model import BackfillSummary
from trueup.backfill.planner import plan
from trueup.backfill.upsert import UpsertWriter
from trueup.config import Config
from trueup.db import connect
from trueup.diff import diff
from trueup.lineage import cmd_lineage, lineage
from trueup.retry import RetryPolicy
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

ROWS = 1000
#: The target keeps its rows up to this key: the source's chunks of 100 beyond it are fresh;
#: the orphans drift() makes, after the source's last key, are a chunk of their own (10).
KEPT = 400
FRESH_CHUNKS = [4, 5, 6, 7, 8, 9]
#: Statuses whose COPY text needs escapes, given to source rows of the fresh chunks.
ODD = ["a\tb", "line\nbreak\r", "back\\slash", 'quo"te', "é ü", "\\N"]
FAST = WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.05, max_seconds=0.1))


def _tables(new_db: Callable[[], str], state_db: str, tmp_path: Path, *,
            shared: bool = False) -> tuple[str, str, Config]:
    source = new_db()
    target = state_db if shared else new_db()
    make_tables(source, target, ROWS, same_types=True)
    drift(target)
    with psycopg.connect(source, autocommit=True) as conn:
        for i, status in enumerate(ODD):
            conn.execute("UPDATE public.orders SET status = %s WHERE id = %s",
                         (status, KEPT + 1 + i))
        conn.execute("UPDATE public.orders SET amount = NULL, status = NULL WHERE id = %s",
                     (KEPT + 10,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id > %s AND order_id <= %s",
                     (KEPT, ROWS))
    return source, target, write_config(tmp_path, state_db, source, target)


def _copied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(chunk, went in by COPY) of every chunk that asked, in order."""
    asked: list[tuple[int, bool]] = []
    copy_fresh = UpsertWriter._copy_fresh

    def spied(self: UpsertWriter, chunk: Any, *args: Any) -> Any:
        result = copy_fresh(self, chunk, *args)
        asked.append((chunk.chunk, result is not None))
        return result

    monkeypatch.setattr(UpsertWriter, "_copy_fresh", spied)
    return asked


class _NotFresh(logging.Handler):
    """The reasons chunks gave for leaving the COPY path (``backfill.chunk_not_fresh``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "backfill.chunk_not_fresh":
            self.reasons.append(record.fields["reason"])  # type: ignore[attr-defined]


@pytest.fixture
def not_fresh() -> Iterator[_NotFresh]:
    handler, logger = _NotFresh(), logging.getLogger("trueup.backfill.upsert")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _repairs(state: str, backfill_id: int, keys: range) -> set[tuple[Any, ...]]:
    """(key, action, fingerprints before and after, run) of the backfill's repairs of ``keys``."""
    with psycopg.connect(state) as conn:
        return {tuple(r) for r in conn.execute(
            "SELECT (key::jsonb ->> 0)::bigint, action, fingerprint_before, fingerprint_after, "
            "run_id FROM trueup.repairs WHERE backfill_id = %s AND (key::jsonb ->> 0)::bigint "
            "BETWEEN %s AND %s", (backfill_id, keys.start, keys.stop - 1))}


def _one_row_per_key(state: str) -> int:
    with psycopg.connect(state) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT (backfill_id, key)) "
                           "FROM trueup.repairs").fetchone()
    assert row is not None and row[0] == row[1], f"expected one repairs row per key, got {row}"
    return int(row[0])


def _all(chunk_size: int = 100) -> BackfillOptions:
    return BackfillOptions(scope=BackfillScope.ALL, chunk_size=chunk_size)


def _same_but_ahead(source: str, target: str) -> None:
    """The target equals the source but for the row drift() put ahead of it (key 8)."""
    assert [r for r in target_rows(target) if r[0] != 8] == [
        r for r in source_rows(source) if r[0] != 8]


@pytest.mark.parametrize(("diffed", "shared"), [
    (True, False), (False, False), (True, True), (False, True)], ids=[
    "after-a-diff", "before-any-diff", "state-in-the-target", "state-in-the-target-no-diff"])
def test_fresh_chunks_go_in_by_copy_and_record_what_the_compare_path_records(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, diffed: bool, shared: bool) -> None:
    source, target, config = _tables(new_db, state_db, tmp_path, shared=shared)
    monkeypatch.setattr(upsert, "SPLIT_BYTES", 300)  # a chunk's rows handed on in pieces
    if diffed:
        diff(config, "orders")
    asked = _copied(monkeypatch)
    copied = start_backfill(config, "orders", _all())

    assert copied.status is BackfillStatus.SUCCEEDED, copied
    assert [c for c, went_in in asked if went_in] == FRESH_CHUNKS
    _same_but_ahead(source, target)
    fresh = range(KEPT + 1, ROWS + 1)
    by_copy = _repairs(state_db, copied.backfill_id, fresh)
    assert {r[1] for r in by_copy} == {"insert"} and len(by_copy) == ROWS - KEPT
    assert all(r[4] is not None for r in by_copy) == diffed  # named after the run that found it

    # the same rows again through the compare path: the same repairs rows
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id BETWEEN %s AND %s",
                     (fresh.start, fresh.stop - 1))
    monkeypatch.setattr(UpsertWriter, "_copies_as_is", lambda self: False)
    compared = start_backfill(config, "orders", _all())
    assert compared.status is BackfillStatus.SUCCEEDED, compared
    assert asked[-1] == (9, False) and not any(went_in for _, went_in in asked[10:])
    assert _repairs(state_db, compared.backfill_id, fresh) == by_copy
    _same_but_ahead(source, target)
    _one_row_per_key(state_db)
    after = diff(config, "orders")
    assert (after.missing, after.orphan, after.stale, after.mismatch) == (0, 0, 0, 0), after


@pytest.mark.parametrize("shared", [False, True], ids=["state-apart", "state-in-the-target"])
def test_a_row_written_meanwhile_sends_a_fresh_chunk_to_the_compare_path_which_keeps_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, not_fresh: _NotFresh, shared: bool) -> None:
    source, target, config = _tables(new_db, state_db, tmp_path, shared=shared)
    fresh = UpsertWriter._fresh

    def projection_writes_then(self: UpsertWriter, chunk: Any, *args: Any) -> bool:
        answer = fresh(self, chunk, *args)
        if answer and chunk.chunk == 4:  # after the target was asked, before the COPY
            with psycopg.connect(target, autocommit=True) as conn:
                conn.execute("INSERT INTO public.copy VALUES (450, 9, 'shipped', 1)")
        return answer

    monkeypatch.setattr(UpsertWriter, "_fresh", projection_writes_then)
    asked = _copied(monkeypatch)
    summary = start_backfill(config, "orders", _all())

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert [c for c, went_in in asked if went_in] == FRESH_CHUNKS[1:]
    assert not_fresh.reasons == ["UniqueViolation"]
    actions = {r[0]: r[1] for r in _repairs(state_db, summary.backfill_id, range(401, 501))}
    assert actions == {k: "skipped" if k == 450 else "insert" for k in range(401, 501)}
    assert [r for r in target_rows(target) if r[0] == 450] == [(450, 9, "shipped", 1.0)]
    assert [r for r in target_rows(target) if r[0] not in (8, 450)] == [
        r for r in source_rows(source) if r[0] not in (8, 450)]
    _one_row_per_key(state_db)


def test_a_trigger_s_veto_sends_a_fresh_chunk_to_the_compare_path_which_records_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, not_fresh: _NotFresh) -> None:
    source, target, config = _tables(new_db, state_db, tmp_path)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION veto() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     "RETURN CASE WHEN NEW.order_id = 505 THEN NULL ELSE NEW END; END $$")
        conn.execute("CREATE TRIGGER veto BEFORE INSERT ON public.copy "
                     "FOR EACH ROW EXECUTE FUNCTION veto()")
    asked = _copied(monkeypatch)
    summary = start_backfill(config, "orders", _all())

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert [c for c, went_in in asked if went_in] == [4, 6, 7, 8, 9]
    assert not_fresh.reasons == ["_KeptOut"]
    actions = {r[0]: r[1] for r in _repairs(state_db, summary.backfill_id, range(501, 601))}
    assert actions == {k: "skipped" if k == 505 else "insert" for k in range(501, 601)}
    assert [r for r in target_rows(target) if r[0] != 8] == [
        r for r in source_rows(source) if r[0] not in (8, 505)]
    _one_row_per_key(state_db)


def test_a_fresh_chunk_grown_past_memory_with_the_state_in_the_target_is_compared(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, not_fresh: _NotFresh) -> None:
    """With the state in the target database, a COPY's repairs rows wait in memory: a chunk
    planned small that has grown since (rows inserted into its range) goes to the compare
    path, which pipes them, rather than holding them all."""
    source = new_db()
    make_tables(source, state_db, ROWS, same_types=True)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("TRUNCATE public.copy")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("DELETE FROM public.orders WHERE id % 10 <> 0")
    config = write_config(tmp_path, state_db, source, state_db)
    with open_state(state_db) as state:
        state.autocommit = True
        backfill_id = plan(config, "orders", _all(chunk_size=50), state)
    with psycopg.connect(source, autocommit=True) as conn:  # each chunk: 50 rows -> 500
        conn.execute("INSERT INTO public.orders (id, version, status, amount) "
                     "SELECT g, 2, 'late', 1 FROM generate_series(1, %s) g WHERE g %% 10 <> 0",
                     (ROWS,))
    monkeypatch.setattr(upsert, "INTENT_IN_MEMORY_ROWS", 100)  # planned chunks fit
    monkeypatch.setattr(upsert, "INTENT_IN_MEMORY_BYTES", 100 * 100)  # grown ones do not
    summary = resume_backfill(config, backfill_id)

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert not_fresh.reasons == ["_TooMany", "_TooMany"]
    assert _one_row_per_key(state_db) == ROWS == summary.rows_repaired
    assert target_rows(state_db) == source_rows(source)


def test_a_crash_after_the_intent_committed_leaves_the_retry_to_correct_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The repairs rows commit before the target does; a target lost in between leaves them
    to the chunk's retry, which sees them, takes the compare path and corrects them."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS, same_types=True)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("TRUNCATE public.copy")
    config = write_config(tmp_path, state_db, source, target)
    copy_rows, check = UpsertWriter._copy_rows, Heartbeat.check
    copies: list[int] = []

    def counted(self: UpsertWriter, *args: Any) -> int:
        copies.append(copy_rows(self, *args))
        return copies[-1]

    def target_lost_once(self: Heartbeat) -> None:
        if len(copies) == 1 and not getattr(target_lost_once, "done", False):
            target_lost_once.done = True  # type: ignore[attr-defined]
            raise psycopg.OperationalError("target went away")
        check(self)

    monkeypatch.setattr(UpsertWriter, "_copy_rows", counted)
    monkeypatch.setattr(Heartbeat, "check", target_lost_once)
    summary = start_backfill(config, "orders", _all(chunk_size=ROWS), FAST)

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert copies == [ROWS], "the retry found the intent and compared instead"
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT attempts FROM trueup.chunks").fetchall() == [(2,)]
    assert _one_row_per_key(state_db) == ROWS == summary.rows_repaired
    assert {r[1] for r in _repairs(state_db, summary.backfill_id, range(1, ROWS + 1))} == {
        "insert"}
    assert target_rows(target) == source_rows(source)


def test_lineage_marks_the_intent_of_a_chunk_that_failed_for_good_as_unconfirmed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A chunk whose target never commits keeps the intent rows it recorded first: lineage
    lists them with their chunk's status, and says they are not confirmed."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS, same_types=True)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("TRUNCATE public.copy")
    config = write_config(tmp_path, state_db, source, target)

    def target_lost(self: Heartbeat) -> None:
        if sys._getframe(1).f_code.co_name == "_run_chunk":
            return  # the worker's look at its lease before the writer starts: still held
        raise psycopg.OperationalError("target went away")

    monkeypatch.setattr(Heartbeat, "check", target_lost)
    summary = start_backfill(config, "orders", _all(chunk_size=ROWS), FAST)

    assert summary.status is BackfillStatus.FAILED, summary
    assert target_rows(target) == []
    with open_state(state_db) as conn:
        repairs = lineage(conn, "orders", [[1]])["repairs"]
    assert [(r["action"], r["chunk_status"], r["backfill_status"]) for r in repairs] == [
        ("insert", "failed", "failed")]
    assert cmd_lineage(config, argparse.Namespace(name="orders", key="1", json=False)) == 0
    shown = capsys.readouterr().out.splitlines()[-1]
    assert shown.endswith("  (intent only: chunk failed, not confirmed)"), shown
    assert "  insert  - -> " in shown, f"no fingerprint before an insert prints as -: {shown}"
    monkeypatch.undo()
    capsys.readouterr()
    assert resume_backfill(config, summary.backfill_id).status is BackfillStatus.SUCCEEDED
    with open_state(state_db) as conn:
        repairs = lineage(conn, "orders", [[1]])["repairs"]
    assert [(r["action"], r["chunk_status"]) for r in repairs] == [("insert", "done")]
    assert cmd_lineage(config, argparse.Namespace(name="orders", key="1", json=False)) == 0
    assert "not confirmed" not in capsys.readouterr().out


def test_a_dry_run_of_fresh_chunks_writes_nothing(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    _source, target, config = _tables(new_db, state_db, tmp_path)
    before = target_rows(target)
    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.ALL, chunk_size=100, dry_run=True))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.dry_run
    assert summary.rows_repaired == ROWS - KEPT + 9  # and drift's: 3 missing, 4 changed, 2 orphans
    assert target_rows(target) == before
    _assert_no_repairs(state_db)


def _assert_no_repairs(state: str) -> None:
    with psycopg.connect(state) as conn:
        assert conn.execute("SELECT count(*) FROM trueup.repairs").fetchone() == (0,)


def _wait_for_a_lock_wait(target: str) -> None:
    """Until the backfill's target session waits for another transaction (its row): not a
    session of another database, such as a lease renewal waiting in the state."""
    deadline = time.monotonic() + 30
    with psycopg.connect(target, autocommit=True) as watch:
        while True:
            waiting = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'trueup backfill%%' AND wait_event_type = 'Lock' "
                "AND wait_event = 'transactionid'").fetchone()
            if waiting and waiting[0]:
                return
            assert time.monotonic() < deadline, "the backfill never waited for the row"
            time.sleep(0.01)


def _backfill_meeting(target: str, config: Config, pending: tuple[Any, ...],
                      then: Callable[[psycopg.Connection[Any]], object]) -> BackfillSummary:
    """Backfill while a projection's transaction holds the target row ``pending``, not yet
    committed; once the backfill waits for it, ``then`` ends that transaction."""
    done: list[BackfillSummary] = []
    with psycopg.connect(target) as projection:
        projection.execute("INSERT INTO public.copy VALUES (%s, %s, %s, %s)", pending)
        backfill = threading.Thread(
            target=lambda: done.append(start_backfill(config, "orders", _all())))
        backfill.start()
        _wait_for_a_lock_wait(target)
        then(projection)
        backfill.join()
    return done[0]


@pytest.mark.parametrize("commits", [True, False], ids=["commits", "rolls-back"])
def test_a_copy_meeting_a_projection_s_uncommitted_row_waits_for_its_outcome(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, not_fresh: _NotFresh, commits: bool) -> None:
    """The probe cannot see a row not yet committed; the COPY waits for it, then meets it
    (the chunk is compared and the row kept) or, rolled back, goes in whole."""
    source, target, config = _tables(new_db, state_db, tmp_path)
    asked = _copied(monkeypatch)
    summary = _backfill_meeting(
        target, config, (450, 9, "shipped", 1),
        lambda projection: projection.commit() if commits else projection.rollback())

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert [c for c, went_in in asked if went_in] == (FRESH_CHUNKS[1:] if commits
                                                      else FRESH_CHUNKS)
    assert not_fresh.reasons == (["UniqueViolation"] if commits else [])
    actions = {r[0]: r[1] for r in _repairs(state_db, summary.backfill_id, range(450, 451))}
    assert actions == {450: "skipped" if commits else "insert"}
    kept = [(450, 9, "shipped", 1.0)] if commits else [
        r for r in source_rows(source) if r[0] == 450]
    assert [r for r in target_rows(target) if r[0] == 450] == kept
    _one_row_per_key(state_db)


def test_a_projection_taking_keys_in_another_order_deadlocks_the_copy_into_the_compare_path(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, not_fresh: _NotFresh) -> None:
    """The COPY holds 455 and waits for 460, which a projection's transaction holds and then
    wants 455 too: the server ends the COPY, whose chunk is compared.

    The session whose deadlock_timeout ends first after the cycle closes is the one ended. The
    COPY waits first: its timeout (5 s for the target's sessions) must outlast the moment the
    projection starts waiting, and the projection's (60 s) must not end first."""
    source, target, config = _tables(new_db, state_db, tmp_path)
    asked = _copied(monkeypatch)
    with psycopg.connect(target, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '5s'").format(
            sql.Identifier(admin.info.dbname)))

    def wants_455_too(projection: psycopg.Connection[Any]) -> None:
        projection.execute("SET deadlock_timeout = '60s'")
        projection.execute("INSERT INTO public.copy VALUES (455, 9, 'shipped', 2)")
        projection.commit()

    summary = _backfill_meeting(target, config, (460, 9, "shipped", 1), wants_455_too)

    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert [c for c, went_in in asked if went_in] == FRESH_CHUNKS[1:]
    assert not_fresh.reasons == ["DeadlockDetected"]
    actions = {r[0]: r[1] for r in _repairs(state_db, summary.backfill_id, range(401, 501))}
    assert actions == {k: "skipped" if k in (455, 460) else "insert" for k in range(401, 501)}
    assert [r for r in target_rows(target) if r[0] in (455, 460)] == [
        (455, 9, "shipped", 2.0), (460, 9, "shipped", 1.0)]
    assert [r for r in target_rows(target) if r[0] not in (8, 455, 460)] == [
        r for r in source_rows(source) if r[0] not in (8, 455, 460)]
    _one_row_per_key(state_db)


def test_text_keys_copied_name_the_keys_their_differences_name(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Composite keys with text needing escapes: the repairs rows' keys, written from the
    source's JSON text, equal the keys the diff stored, so lineage finds them."""
    source, target = new_db(), new_db()
    regions = ["eu", 'q"t', "b\\s", "t\tb", "n\nl", "é"]
    make_sales(source, target, regions, 20)
    config = write_sales_config(tmp_path, state_db, source, target)
    run = diff(config, "sales")
    assert run.missing == len(regions) * 20
    summary = start_backfill(config, "sales", BackfillOptions(
        scope=BackfillScope.RUN, run_id=run.run_id, chunk_size=30))
    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert summary.rows_repaired == len(regions) * 20
    with psycopg.connect(state_db) as conn:
        joined = conn.execute(
            "SELECT count(*) FROM trueup.repairs r JOIN trueup.differences d "
            "ON d.run_id = r.run_id AND d.key::text = r.key WHERE r.action = 'insert'").fetchone()
    assert joined == (len(regions) * 20,)
    assert diff(config, "sales").missing == 0


@pytest.mark.parametrize(("change", "as_is"), [
    (None, True),
    ("ALTER TABLE public.copy ALTER total TYPE numeric(14, 2)", False),
    ("ALTER TABLE public.copy ALTER order_version TYPE integer", False),
    ("ALTER TABLE public.copy ENABLE ROW LEVEL SECURITY", False),
    ("CREATE RULE also AS ON INSERT TO public.copy DO ALSO NOTIFY copied", False),
    ("ALTER TABLE public.copy ALTER state TYPE varchar(20)", False),
    ("ALTER TABLE public.copy DROP CONSTRAINT copy_pkey; "
     "CREATE INDEX ON public.copy (order_id)", False),
    ("ALTER TABLE public.copy DROP CONSTRAINT copy_pkey; "
     "CREATE UNIQUE INDEX ON public.copy (order_id) WHERE order_id > 0", False),
    ("ALTER TABLE public.copy DROP CONSTRAINT copy_pkey; ALTER TABLE public.copy "
     "ADD UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED", False),
    ("ALTER TABLE public.copy DROP CONSTRAINT copy_pkey; "
     "CREATE UNIQUE INDEX ON public.copy (order_id) INCLUDE (state)", True),
    ("ALTER TABLE public.copy ALTER order_id ADD GENERATED ALWAYS AS IDENTITY", False),
    ("ALTER TABLE public.copy ALTER order_id ADD GENERATED BY DEFAULT AS IDENTITY", True),
    ("ALTER TABLE public.copy RENAME TO copy_rows; CREATE TABLE public.copy ("
     "order_id bigint, order_version bigint, state text, total numeric(12,2), "
     "PRIMARY KEY (order_id)) PARTITION BY RANGE (order_id); CREATE TABLE public.copy_all "
     "PARTITION OF public.copy FOR VALUES FROM (MINVALUE) TO (MAXVALUE)", True),
    ("ALTER TABLE public.copy RENAME TO copy_rows; "
     "CREATE VIEW public.copy AS SELECT * FROM public.copy_rows", False),
], ids=["same-types", "another-modifier", "another-type", "row-level-security", "a-rule",
        "varchar-for-text", "no-unique-index", "a-partial-unique-index", "a-deferred-unique-key",
        "a-unique-index-with-included-columns", "identity-always", "identity-by-default",
        "partitioned", "a-view"])
def test_only_a_table_of_the_source_s_own_types_takes_source_rows_by_copy(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        change: str | None, as_is: bool) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 10, same_types=True)
    if change:
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(change)
    config = write_config(tmp_path, state_db, source, target)
    with connect(state_db, what="state", autocommit=True) as state:
        writer = UpsertWriter(config, "orders", config.reconciliations["orders"], state,
                              with_orphans=True)
        try:
            assert writer.copies_as_is is as_is
        finally:
            writer.close()
