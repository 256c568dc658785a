"""Crash safety and concurrency of backfills: kill -9 mid-chunk, several worker processes on
one backfill, and live source writes while a backfill runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import REPO, blocked_signals
from tests.integration.test_backfill_support import (
    drift,
    make_tables,
    source_rows,
    target_rows,
    write_config,
)
from trueup.backfill import (
    LEASE_ENV,
    BackfillOptions,
    WorkerOptions,
    resume_backfill,
    start_backfill,
)
from trueup.backfill.planner import plan
from trueup.backfill.upsert import UpsertWriter
from trueup.diff import diff
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

#: Seconds: the lease of a worker this file kills, interrupts or cuts off from the state
#: database, so that its chunk is taken over soon; long enough that a stall of a loaded
#: machine (a second or two) does not lose it (lost after 2/3 of it without a renewal, see
#: trueup.backfill.chunks.Heartbeat). Every other worker, and every resume, takes the
#: default lease (30 s): no stall of a test's worker abandons a chunk or lets another worker
#: take it over, which would claim it twice.
SHORT_LEASE = 5.0


def _cli(config_path: str, *args: str, lease: float | None = None) -> subprocess.Popen[bytes]:
    """``trueup backfill ARGS`` in a process of its own, its chunks leased for ``lease``
    seconds (None: the default lease)."""
    env = {k: v for k, v in os.environ.items() if k != LEASE_ENV}
    if lease is not None:
        env[LEASE_ENV] = str(lease)
    return subprocess.Popen([sys.executable, "-m", "trueup.cli", "--config", config_path,
                             "backfill", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _chunks(state: str) -> list[tuple[int, str, int, str | None]]:
    with psycopg.connect(state) as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            "SELECT chunk, status, attempts, lease_owner FROM trueup.chunks ORDER BY chunk")]


def _quiet(state: str, timeout: float = 0.5) -> bool:
    """Whether every other session on the state database is idle (or waits on a lock) within
    ``timeout`` seconds: once its worker process is stopped, whatever that process had sent
    (a chunk's completion committing, the next claim) has then taken effect."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(state, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state = 'active' "
                "AND wait_event_type IS DISTINCT FROM 'Lock'").fetchone()
            if row is not None and row[0] == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _count_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The chunks that went in by COPY."""
    copied: list[int] = []
    copy_fresh = UpsertWriter._copy_fresh

    def counted(self: UpsertWriter, chunk: Any, *args: Any) -> Any:
        result = copy_fresh(self, chunk, *args)
        if result is not None:
            copied.append(chunk.chunk)
        return result

    monkeypatch.setattr(UpsertWriter, "_copy_fresh", counted)
    return copied


def _one_row_per_key(state: str) -> int:
    with psycopg.connect(state) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT key) FROM trueup.repairs").fetchone()
    assert row is not None and row[0] == row[1], f"expected one repairs row per key, got {row}"
    return int(row[0])


@pytest.mark.parametrize("fresh", [False, True], ids=["compared", "copied"])
def test_kill_9_mid_chunk_then_resume_completes_with_one_repairs_row_per_key(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, fresh: bool) -> None:
    """``copied``: the target is empty and of the source's types, so every chunk goes in by
    COPY (see trueup.backfill.upsert._copy_fresh): the killed chunk is one of them (killed
    mostly while paced, before its read; a kill after its repairs rows committed is
    test_backfill_copy's crash test), and so are the chunks the resume does.

    Between a chunk's completion and the next claim the worker holds no chunk, so it is
    stopped (SIGSTOP) before the kill, and killed only when it then holds exactly one; else it
    goes on (SIGCONT) and is caught later. Only the killed worker has a short lease: the
    resume takes the default one, so no stall of it can claim a chunk a second time."""
    source, target = new_db(), new_db()
    make_tables(source, target, 2000, same_types=fresh)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("TRUNCATE public.copy" if fresh else
                     "DELETE FROM public.copy WHERE order_id % 2 = 0")
    config = write_config(tmp_path, state_db, source, target)
    worker = _cli(config.path, "orders", "--all", "--chunk-size", "100", "--rate", "400",
                  lease=SHORT_LEASE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the worker never got going"
            assert worker.poll() is None, worker.communicate()
            chunks = _chunks(state_db)
            done = [c for c in chunks if c[1] == "done"]
            if len(done) >= 3 and any(c[1] == "running" for c in chunks):
                worker.send_signal(signal.SIGSTOP)
                if (_quiet(state_db)
                        and sum(c[1] == "running" for c in _chunks(state_db)) == 1):
                    break
                worker.send_signal(signal.SIGCONT)
                time.sleep(0.2)  # lets it renew its lease before it is stopped again
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:  # the test failed: no stopped worker left behind
            worker.kill()
            worker.wait()
    killed = [c for c in _chunks(state_db) if c[1] == "running"]
    assert len(killed) == 1, _chunks(state_db)

    copied = _count_copies(monkeypatch)
    summary = resume_backfill(config, 1, WorkerOptions())

    assert summary.status is BackfillStatus.SUCCEEDED
    assert bool(copied) is fresh, copied
    after = _chunks(state_db)
    assert all(c[1] == "done" for c in after)
    assert after[killed[0][0]][2] == 2, "the killed chunk was claimed again once"
    assert all(c[2] == 1 for c in after if c[0] != killed[0][0]), "done chunks never redone"
    repaired = 2000 if fresh else 1000
    assert _one_row_per_key(state_db) == repaired == summary.rows_repaired
    assert target_rows(target) == source_rows(source)


def test_several_worker_processes_share_one_backfill_and_never_hold_a_chunk_together(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """No worker is killed, so each takes the default lease: a chunk claimed twice can only
    be two processes holding it together, never a stall that let its lease run out."""
    source, target = new_db(), new_db()
    make_tables(source, target, 3000)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET state = 'old' WHERE order_id % 3 = 0")
    config = write_config(tmp_path, state_db, source, target)
    with open_state(state_db) as state:
        state.autocommit = True
        backfill_id = plan(config, "orders", BackfillOptions(
            scope=BackfillScope.ALL, chunk_size=50, rate=600), state)
    workers = [_cli(config.path, "--resume", str(backfill_id), "--workers", "2")
               for _ in range(3)]
    for w in workers:
        _out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err.decode()
    chunks = _chunks(state_db)
    assert len(chunks) == 60 and all(c[1] == "done" for c in chunks)
    assert all(c[2] == 1 for c in chunks), "a chunk was claimed twice"
    pids = {c[3].split(":")[1] for c in chunks if c[3]}
    assert len(pids) >= 2, f"expected several processes to share the work, got {pids}"
    assert _one_row_per_key(state_db) == 1000
    assert target_rows(target) == source_rows(source)


@pytest.mark.parametrize("fresh", [False, True], ids=["compared", "copied"])
def test_live_source_writes_during_a_backfill_are_never_lost_or_overwritten(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, fresh: bool) -> None:
    """``copied``: the target lacks every key up to 1000 and has the source's types, so
    chunks there go in by COPY unless a live write reached their range first (or meanwhile:
    then they are compared).

    The backfill is paced at 500 rows a second (about 4 s): long enough for the live writer,
    slowed by a loaded machine, to write well over 100 keys while it runs."""
    source, target = new_db(), new_db()
    make_tables(source, target, 2000, same_types=fresh)
    made = drift(target)
    copied = _count_copies(monkeypatch)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id <= 1000" if fresh else
                     "DELETE FROM public.copy WHERE order_id % 4 = 0")
        # a target row never goes back in version: the backfill must not even try
        conn.execute("""
            CREATE FUNCTION no_regress() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.order_version < OLD.order_version THEN
                RAISE EXCEPTION 'version of % went back', OLD.order_id;
              END IF;
              RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER no_regress BEFORE UPDATE ON public.copy "
                     "FOR EACH ROW EXECUTE FUNCTION no_regress()")
    config = write_config(tmp_path, state_db, source, target)
    stop = threading.Event()
    written: list[int] = []

    def live_writes() -> None:
        # the normal pipeline: a source write, then its consumer's versioned write
        rng = random.Random(7)
        with psycopg.connect(source, autocommit=True) as src, \
                psycopg.connect(target, autocommit=True) as tgt:
            while not stop.is_set():
                key = rng.randint(1, 2000)
                if key in made["ahead"]:
                    continue  # its target row is newer than the source on purpose
                row = src.execute("UPDATE public.orders SET version = version + 1, "
                                  "status = 'live', amount = amount + 1 WHERE id = %s "
                                  "RETURNING id, version, status, amount", (key,)).fetchone()
                assert row is not None
                tgt.execute("INSERT INTO public.copy VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (order_id) DO UPDATE SET order_version = "
                            "excluded.order_version, state = excluded.state, "
                            "total = excluded.total "
                            "WHERE copy.order_version < excluded.order_version", row)
                written.append(key)
                time.sleep(0.002)

    writer = threading.Thread(target=live_writes)
    writer.start()
    try:
        summary = start_backfill(config, "orders", BackfillOptions(
            scope=BackfillScope.ALL, chunk_size=10 if fresh else 100, rate=500, workers=2),
            WorkerOptions(workers=2))
    finally:
        stop.set()
        writer.join()
    assert summary.status is BackfillStatus.SUCCEEDED, summary.error
    assert len(set(written)) > 100, "the live writer barely ran"
    after = diff(config, "orders")
    # only the row that was ahead of the source (and was never touched by the live writer)
    # may still differ; everything written live is in the target at its newest version
    assert (after.missing, after.orphan, after.stale, after.mismatch) == (0, 0, 0, 0), after
    src = {r[0]: r for r in source_rows(source)}
    tgt = {r[0]: r for r in target_rows(target)}
    for key in set(written):
        assert tgt[key] == src[key], f"live write to {key} lost: {tgt[key]} vs {src[key]}"
    # (some 25 of the 100 chunks up to key 1000, from run to run: the rest met live writes)
    assert bool(copied) is fresh, copied


def test_ctrl_c_ends_a_backfill_at_once_and_resume_finishes_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The interrupted process leaves its chunk leased: a short lease, so the resume (on the
    default lease) takes it over soon."""
    source, target = new_db(), new_db()
    make_tables(source, target, 1000)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET state = 'old'")
    config = write_config(tmp_path, state_db, source, target)
    # 100 rows a second: the whole backfill would take 10 s, so a test process starved of CPU
    # for seconds (it was once, on a busy machine: the backfill ended before the signal)
    # still interrupts it.
    worker = _cli(config.path, "orders", "--all", "--chunk-size", "100", "--rate", "100",
                  lease=SHORT_LEASE)
    deadline = time.monotonic() + 60
    while not any(c[1] == "done" for c in _chunks(state_db)):
        assert time.monotonic() < deadline and worker.poll() is None, "no chunk got done"
        time.sleep(0.05)
    # Linux gives a process's signal to any thread not blocking it: one that went to a worker
    # thread left the main thread waiting for the whole backfill (a CI run: 9 s)
    blocked = blocked_signals(worker.pid)
    assert len(blocked) > 1 and not {signal.SIGINT, signal.SIGTERM} & blocked[worker.pid], blocked
    assert all({signal.SIGINT, signal.SIGTERM} <= signals for tid, signals in blocked.items()
               if tid != worker.pid), f"a thread takes Ctrl-C from the main thread: {blocked}"
    interrupted = time.monotonic()
    worker.send_signal(signal.SIGINT)
    worker.communicate(timeout=60)
    assert worker.returncode == 130
    # 6 s leaves a loaded machine room to start and end the interpreter, yet the rest of the
    # backfill takes about 9 s: a worker that went on after Ctrl-C still fails this.
    assert time.monotonic() - interrupted < 6, "the workers went on after Ctrl-C"
    assert any(c[1] != "done" for c in _chunks(state_db))
    summary = resume_backfill(config, 1, WorkerOptions())
    assert summary.status is BackfillStatus.SUCCEEDED
    assert target_rows(target) == source_rows(source)


def test_a_backfill_rides_out_its_state_connections_being_dropped(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A state database restart or failover ended every worker (exit 2, "resume with
    --resume") and left the backfill running, which also pauses auto-repair: now each worker
    reconnects with backoff and the backfill finishes.

    100 rows a second: the 6 chunks take about 6 s, so the backfill is still running (its
    workers hold state sessions) when the test, maybe starved of CPU for a while, drops them.
    A chunk whose session was dropped stays leased: a short lease, so it is taken over
    soon."""
    source, target = new_db(), new_db()
    make_tables(source, target, 600)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET state = 'old'")
    config = write_config(tmp_path, state_db, source, target)
    result: list[Any] = []
    backfill = threading.Thread(target=lambda: result.append(start_backfill(
        config, "orders", BackfillOptions(scope=BackfillScope.ALL, chunk_size=100, rate=100),
        WorkerOptions(workers=2, lease_seconds=SHORT_LEASE))))
    backfill.start()
    deadline = time.monotonic() + 60
    while not any(c[1] == "done" for c in _chunks(state_db)):
        assert time.monotonic() < deadline and backfill.is_alive(), "no chunk got done"
        time.sleep(0.05)
    with psycopg.connect(state_db, autocommit=True) as conn:
        dropped = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE 'trueup backfill%%'").fetchone()
    assert dropped is not None and dropped[0] >= 2, dropped
    backfill.join(timeout=120)
    assert result, "the backfill did not finish"
    assert result[0].status is BackfillStatus.SUCCEEDED, result[0].error
    assert target_rows(target) == source_rows(source)
    assert _one_row_per_key(state_db) == 600
