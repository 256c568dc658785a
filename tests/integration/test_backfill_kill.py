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

from tests.conftest import REPO
from tests.integration.test_backfill_support import (
    drift,
    make_tables,
    source_rows,
    target_rows,
    write_config,
)
from trueup.backfill import BackfillOptions, WorkerOptions, resume_backfill, start_backfill
from trueup.backfill.planner import plan
from trueup.backfill.upsert import UpsertWriter
from trueup.diff import diff
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

LEASE = 1.5  # seconds: a killed worker's chunk is taken over this fast


def _cli(config_path: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TRUEUP_BACKFILL_LEASE_SECONDS": str(LEASE)}
    return subprocess.Popen([sys.executable, "-m", "trueup.cli", "--config", config_path,
                             "backfill", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _chunks(state: str) -> list[tuple[int, str, int, str | None]]:
    with psycopg.connect(state) as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            "SELECT chunk, status, attempts, lease_owner FROM trueup.chunks ORDER BY chunk")]


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
    test_backfill_copy's crash test), and so are the chunks the resume does."""
    source, target = new_db(), new_db()
    make_tables(source, target, 2000, same_types=fresh)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("TRUNCATE public.copy" if fresh else
                     "DELETE FROM public.copy WHERE order_id % 2 = 0")
    config = write_config(tmp_path, state_db, source, target)
    worker = _cli(config.path, "orders", "--all", "--chunk-size", "100", "--rate", "400")
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the worker never got going"
        assert worker.poll() is None, worker.communicate()
        chunks = _chunks(state_db)
        done = [c for c in chunks if c[1] == "done"]
        if len(done) >= 3 and any(c[1] == "running" for c in chunks):
            break
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = [c for c in _chunks(state_db) if c[1] == "running"]
    assert len(killed) == 1, _chunks(state_db)

    copied = _count_copies(monkeypatch)
    summary = resume_backfill(config, 1, WorkerOptions(lease_seconds=LEASE))

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
    then they are compared)."""
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
            scope=BackfillScope.ALL, chunk_size=10 if fresh else 100, rate=1500, workers=2),
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
    # (about 45 of the 100 chunks up to key 1000, from run to run: the rest met live writes)
    assert bool(copied) is fresh, copied


def test_ctrl_c_ends_a_backfill_at_once_and_resume_finishes_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 1000)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET state = 'old'")
    config = write_config(tmp_path, state_db, source, target)
    # 100 rows a second: the whole backfill would take 10 s, so a test process starved of CPU
    # for seconds (it was once, on a busy machine: the backfill ended before the signal)
    # still interrupts it.
    worker = _cli(config.path, "orders", "--all", "--chunk-size", "100", "--rate", "100")
    deadline = time.monotonic() + 60
    while not any(c[1] == "done" for c in _chunks(state_db)):
        assert time.monotonic() < deadline and worker.poll() is None, "no chunk got done"
        time.sleep(0.05)
    interrupted = time.monotonic()
    worker.send_signal(signal.SIGINT)
    worker.communicate(timeout=60)
    assert worker.returncode == 130
    assert time.monotonic() - interrupted < 3, "the workers went on after Ctrl-C"
    assert any(c[1] != "done" for c in _chunks(state_db))
    summary = resume_backfill(config, 1, WorkerOptions(lease_seconds=LEASE))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert target_rows(target) == source_rows(source)


def test_a_backfill_rides_out_its_state_connections_being_dropped(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A state database restart or failover ended every worker (exit 2, "resume with
    --resume") and left the backfill running, which also pauses auto-repair: now each worker
    reconnects with backoff and the backfill finishes."""
    source, target = new_db(), new_db()
    make_tables(source, target, 600)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET state = 'old'")
    config = write_config(tmp_path, state_db, source, target)
    result: list[Any] = []
    backfill = threading.Thread(target=lambda: result.append(start_backfill(
        config, "orders", BackfillOptions(scope=BackfillScope.ALL, chunk_size=100, rate=300),
        WorkerOptions(workers=2, lease_seconds=LEASE))))
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
