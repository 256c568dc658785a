"""Chunks: a worker stops when it cannot renew its lease, what it commits under
:meth:`Heartbeat.hold` is fenced against a takeover, and a plan reads one snapshot."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import PG_ADMIN_DSN
from tests.integration.test_backfill_support import make_tables, write_config
from trueup.backfill import BackfillOptions, WorkerOptions, runner, start_backfill
from trueup.backfill import chunks as chunk_leases
from trueup.backfill.model import ChunkContext, ChunkResult
from trueup.backfill.planner import plan
from trueup.backfill.runner import _Worker, backfill_of, load
from trueup.config import Config
from trueup.db import connect
from trueup.errors import StateError
from trueup.pacing import Pacer
from trueup.retry import RetryPolicy
from trueup.state import open_state
from trueup.statuses import BackfillScope

pytestmark = pytest.mark.postgres

LEASE = 1.5  # seconds


@pytest.fixture
def planned(new_db: Callable[[], str], state_db: str, tmp_path: Path) -> tuple[Config, int]:
    """The config of 100 rows to repair, and a backfill of them planned in chunks of 50."""
    source, target = new_db(), new_db()
    make_tables(source, target, 100)
    config = write_config(tmp_path, state_db, source, target)
    with open_state(state_db) as state:
        state.autocommit = True
        return config, plan(config, "orders", BackfillOptions(scope=BackfillScope.ALL,
                                                              chunk_size=50), state)


@pytest.fixture
def claimed(state_db: str, planned: tuple[Config, int]
            ) -> Iterator[tuple[psycopg.Connection[dict[str, object]], chunk_leases.Chunk]]:
    """A planned backfill's first chunk, claimed by worker ``a`` on a state connection."""
    _, backfill_id = planned
    with connect(state_db, what="state", autocommit=True) as conn:
        chunk = chunk_leases.claim(conn, backfill_id, "a", LEASE)
        assert chunk is not None
        yield conn, chunk


def test_a_lease_whose_renewals_stall_counts_as_lost_before_it_can_expire(
        state_db: str, claimed: tuple[psycopg.Connection[dict[str, object]],
                                      chunk_leases.Chunk]) -> None:
    _, chunk = claimed
    lease = 2 * LEASE  # a third of it covers opening the heartbeat's connection, however slow
    with psycopg.connect(state_db) as blocker:
        # Every renewal waits behind this lock (a state database that does not answer).
        blocker.execute("SELECT 1 FROM trueup.chunks WHERE backfill_id = %s AND chunk = %s "
                        "FOR UPDATE", (chunk.backfill_id, chunk.chunk))
        # claimed now: the time this test took to get here is not the worker's start-up
        just_claimed = replace(chunk, claimed_at=time.monotonic())
        with chunk_leases.Heartbeat(state_db, just_claimed, "a", lease) as heartbeat:
            heartbeat.check()
            deadline = time.monotonic() + 3 * lease
            with pytest.raises(chunk_leases.LeaseLost, match="not renewed"):
                while time.monotonic() < deadline:
                    heartbeat.check()
                    time.sleep(0.05)
            blocker.rollback()


def _expire(conn: psycopg.Connection[dict[str, object]], chunk: chunk_leases.Chunk) -> None:
    conn.execute("UPDATE trueup.chunks SET lease_expires_at = now() - interval '1 hour' "
                 "WHERE backfill_id = %s AND chunk = %s", (chunk.backfill_id, chunk.chunk))


def test_a_held_lease_keeps_other_workers_off_until_commit_and_a_lost_one_cannot_be_held(
        state_db: str, claimed: tuple[psycopg.Connection[dict[str, object]],
                                      chunk_leases.Chunk]) -> None:
    conn, chunk = claimed
    with chunk_leases.Heartbeat(state_db, chunk, "a", LEASE) as heartbeat, \
            connect(state_db, what="state", autocommit=True) as other, conn.transaction():
        heartbeat.hold(conn)
        _expire(conn, chunk)  # as if the lease ran out while this transaction commits
        taken = chunk_leases.claim(other, chunk.backfill_id, "b", LEASE)
        assert taken is None or taken.chunk != chunk.chunk
    _expire(conn, chunk)  # the heartbeat has stopped: now the lease does run out
    with connect(state_db, what="state", autocommit=True) as other:
        while (taken := chunk_leases.claim(other, chunk.backfill_id, "b", LEASE)) is not None \
                and taken.chunk != chunk.chunk:
            pass
        assert taken is not None, "the expired chunk was not taken over"
    with conn.transaction(), pytest.raises(chunk_leases.LeaseLost):
        heartbeat.hold(conn)


def test_a_lease_held_late_in_a_long_transaction_runs_from_the_hold(
        state_db: str, claimed: tuple[psycopg.Connection[dict[str, object]],
                                      chunk_leases.Chunk]) -> None:
    """The renewal read now(), the transaction's start: held after a target write longer than
    the lease, it set an expiry already past, and once committed another worker could take the
    chunk over while this one still finished it."""
    conn, chunk = claimed
    with chunk_leases.Heartbeat(state_db, chunk, "a", LEASE) as heartbeat, conn.transaction():
        conn.execute("SELECT pg_sleep(%s)", (LEASE + 0.5,))  # the long write
        heartbeat.hold(conn)
        row = conn.execute(
            "SELECT lease_expires_at > clock_timestamp() AS ahead FROM trueup.chunks "
            "WHERE backfill_id = %s AND chunk = %s", (chunk.backfill_id, chunk.chunk)).fetchone()
        assert row is not None and row["ahead"], "the lease held was already over"


def test_planned_rows_come_from_one_snapshot_of_the_source(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds and the count were read in two snapshots: rows deleted in between made the
    last chunk's planned rows (the count less the other chunks') negative."""
    source, target = new_db(), new_db()
    make_tables(source, target, 100)
    config = write_config(tmp_path, state_db, source, target)
    execute = psycopg.Connection.execute

    def deleting_after_the_bounds(self: psycopg.Connection[Any], query: Any,
                                  *args: Any, **kwargs: Any) -> Any:
        cursor = execute(self, query, *args, **kwargs)
        if "trueup_n" in (query if isinstance(query, str) else query.as_string(self)):
            with psycopg.connect(source, autocommit=True) as other:
                execute(other, "DELETE FROM public.orders WHERE id > 20")
        return cursor

    monkeypatch.setattr(psycopg.Connection, "execute", deleting_after_the_bounds)
    with open_state(state_db) as state:
        state.autocommit = True
        backfill_id = plan(config, "orders", BackfillOptions(scope=BackfillScope.ALL,
                                                             chunk_size=50), state)
    monkeypatch.undo()
    with psycopg.connect(state_db) as conn:
        planned = [r[0] for r in conn.execute(
            "SELECT rows_planned FROM trueup.chunks WHERE backfill_id = %s ORDER BY chunk",
            (backfill_id,))]
    assert planned == [50, 50], planned


def test_a_chunk_taken_over_while_its_worker_was_still_starting_is_lost_at_once(
        state_db: str, claimed: tuple[psycopg.Connection[dict[str, object]],
                                      chunk_leases.Chunk]) -> None:
    """The heartbeat counted the lease from its own start, after the worker had opened its
    writer's connections: a lease that ran out meanwhile went unnoticed until the first
    renewal, a third of a lease into the chunk's work."""
    conn, chunk = claimed
    started_late = replace(chunk, claimed_at=time.monotonic() - LEASE)
    _expire(conn, chunk)
    with connect(state_db, what="state", autocommit=True) as other:
        while (taken := chunk_leases.claim(other, chunk.backfill_id, "b", LEASE)) is not None \
                and taken.chunk != chunk.chunk:
            pass
    with chunk_leases.Heartbeat(state_db, started_late, "a", LEASE) as heartbeat, \
            pytest.raises(chunk_leases.LeaseLost, match="lease lost"):
        heartbeat.check()


def test_a_worker_that_started_slowly_renews_its_lease_before_working(
        state_db: str, claimed: tuple[psycopg.Connection[dict[str, object]],
                                      chunk_leases.Chunk]) -> None:
    """Renewed when the heartbeat starts: the lease now ends at least the start-up's time
    later than the claim made it end (not read against the clock, which a slow query moves)."""
    conn, chunk = claimed

    def expires() -> dt.datetime:
        row = conn.execute(
            "SELECT lease_expires_at FROM trueup.chunks WHERE backfill_id = %s AND chunk = %s",
            (chunk.backfill_id, chunk.chunk)).fetchone()
        assert row is not None
        return row["lease_expires_at"]  # type: ignore[return-value]

    claimed_until = expires()
    time.sleep(LEASE / 2)  # opening the writer's connections, reflecting tables
    with chunk_leases.Heartbeat(state_db, chunk, "a", LEASE) as heartbeat:
        heartbeat.check()
        renewed_by = (expires() - claimed_until).total_seconds()
    assert renewed_by >= LEASE / 2, renewed_by


def test_a_worker_gives_up_a_chunk_taken_over_before_its_writer_starts(
        state_db: str, planned: tuple[Config, int]) -> None:
    """The worker noticed the takeover only at its writer's first check: a republish
    produced a batch, an upsert copied the chunk into the target, before giving it up."""
    config, backfill_id = planned
    with connect(state_db, what="state", autocommit=True) as conn:
        chunk = chunk_leases.claim(conn, backfill_id, "a", LEASE)
        assert chunk is not None
        _expire(conn, chunk)
        while (taken := chunk_leases.claim(conn, backfill_id, "b", LEASE)) is not None \
                and taken.chunk != chunk.chunk:
            pass
        repaired: list[int] = []

        class Writer:
            def repair(self, chunk: chunk_leases.Chunk, ctx: ChunkContext) -> ChunkResult:
                repaired.append(chunk.chunk)
                raise AssertionError("unreachable")

            def close(self) -> None:
                pass

        worker = _Worker(config, backfill_of(load(conn, backfill_id)),
                         WorkerOptions(lease_seconds=LEASE), 0, Pacer(None), lambda r: None)
        worker._writer = Writer()
        started_late = replace(chunk, claimed_at=time.monotonic() - LEASE)
        assert not worker._run_chunk(conn, started_late)
        assert repaired == [], "the writer started on a chunk another worker holds"


def test_a_backfill_reopened_after_its_chunks_were_counted_is_not_finished_over_them(
        state_db: str, planned: tuple[Config, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker counted no open chunk (a --cancel had just cancelled the pending ones),
    then a --resume reopened them before the worker finished the backfill: it was marked
    succeeded over chunks that then never ran."""
    config, backfill_id = planned
    real_query = runner.query

    def counted_before_the_resume(name: str) -> Any:
        if name == "chunk_progress":  # what the worker saw before the resume committed
            return "SELECT 0 AS chunks, 0 AS done, 0 AS open, NULL AS failure"
        return real_query(name)

    monkeypatch.setattr(runner, "query", counted_before_the_resume)
    with connect(state_db, what="state", autocommit=True) as conn:
        worker = _Worker(config, backfill_of(load(conn, backfill_id)), WorkerOptions(), 0,
                         Pacer(None), lambda r: None)
        assert not worker._finish_if_done(conn)
        assert load(conn, backfill_id)["status"] == "running"


def test_a_state_database_that_stays_away_ends_the_backfill_saying_how_to_resume(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers gave up on the state database, then the summary's own connection failed
    on it too: the error was that connection's, without the way back."""
    source, target = new_db(), new_db()
    make_tables(source, target, 100)
    config = write_config(tmp_path, state_db, source, target)
    database = psycopg.conninfo.conninfo_to_dict(state_db)["dbname"]
    monkeypatch.setattr(runner, "STATE_RETRY", RetryPolicy(max_attempts=2, initial_seconds=0.05,
                                                           max_seconds=0.1))
    claim = chunk_leases.claim

    def state_goes_away(*args: Any, **kwargs: Any) -> Any:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        return claim(*args, **kwargs)

    monkeypatch.setattr(chunk_leases, "claim", state_goes_away)
    try:
        with pytest.raises(StateError, match=r"^backfill: state database: .* \(resume with "
                                             r"--resume once it is back\)$"):
            start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.ALL))
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
