"""Serving a backfill: worker threads claim chunks until none is open, then finish it.

Any number of processes, on any number of machines sharing the state database, may serve one
backfill at once (``trueup backfill --resume ID`` joins a running one): chunk claims and leases
in Postgres are the only coordination. A failing chunk is retried with exponential backoff and
jitter; when its attempts are exhausted the backfill ends ``failed`` with that chunk's error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg

from trueup import metrics, threads, tracing
from trueup.backfill import chunks
from trueup.backfill.model import (
    Backfill,
    BackfillSummary,
    ChunkContext,
    ChunkResult,
    WorkerOptions,
)
from trueup.backfill.planner import require_repairable
from trueup.config import Config
from trueup.db import connect, first_line
from trueup.errors import ConnectionFailed, NotFound, StateError, TrueupError
from trueup.health import HEALTH
from trueup.log import get_logger
from trueup.pacing import Pacer
from trueup.queries import query
from trueup.retry import RetryPolicy
from trueup.statuses import BackfillScope, BackfillStatus, KeyOrder

log = get_logger(__name__)

#: How often an idle worker looks again for a chunk that became due (seconds).
POLL_SECONDS = 0.2

#: How a worker rides out its state database going away (a dropped connection, a restart, a
#: failover): it reconnects after about 1, 2, 4, 8, 16 and 30 s, then gives up (the backfill
#: resumes with ``--resume``). A worker that served a minute since its last trouble starts over.
STATE_RETRY = RetryPolicy(max_attempts=7, initial_seconds=1.0, multiplier=2.0, max_seconds=30.0)

#: (chunks_done, chunks, rows_repaired, rows_per_second)
Progress = Callable[[int, int, int, float], None]


class Writer(Protocol):
    def repair(self, chunk: chunks.Chunk, ctx: ChunkContext) -> ChunkResult: ...

    def close(self) -> None: ...


def load(conn: psycopg.Connection[Any], backfill_id: int) -> dict[str, Any]:
    row = conn.execute(query("get_backfill"), {"backfill_id": backfill_id}).fetchone()
    if row is None:
        raise NotFound(f"backfill: no backfill {backfill_id}")
    return dict(row)


def summary_of(row: dict[str, Any], seconds: float) -> BackfillSummary:
    return BackfillSummary(
        backfill_id=row["backfill_id"], reconciliation=row["reconciliation"],
        status=BackfillStatus(row["status"]), chunks=int(row["chunks"]),
        chunks_done=int(row["chunks_done"]), rows_planned=int(row["rows_planned"]),
        rows_repaired=int(row["rows_repaired"]), rows_skipped=int(row["rows_skipped"]),
        seconds=round(seconds, 3), dry_run=bool(row["dry_run"]), error=row["error"])


def backfill_of(row: dict[str, Any]) -> Backfill:
    return Backfill(backfill_id=row["backfill_id"], reconciliation=row["reconciliation"],
                    scope=BackfillScope(row["scope"]), run_id=row["run_id"],
                    partition=row["partition"], dry_run=row["dry_run"], rate=row["rate"],
                    key_order=KeyOrder(row["key_order"]))


def make_writer(config: Config, backfill: Backfill, state: psycopg.Connection[Any]) -> Writer:
    rec = config.reconciliations[backfill.reconciliation]
    if rec.target.topic is not None:
        from trueup.backfill.republish import RepublishWriter

        return RepublishWriter(config, backfill.reconciliation, rec, state,
                               order=backfill.key_order)
    from trueup.backfill.upsert import UpsertWriter

    return UpsertWriter(config, backfill.reconciliation, rec, state, with_orphans=True,
                        order=backfill.key_order)


def require_reconciliation(config: Config, backfill_id: int, name: str) -> None:
    """Refuse to work on a backfill whose reconciliation ``config`` does not have."""
    if name not in config.reconciliations:
        raise NotFound(f"backfill {backfill_id}: reconciliation {name!r} is not in "
                       f"{config.path}")


def require_servable(config: Config, row: dict[str, Any]) -> None:
    """Refuse to work on a backfill that ``config`` no longer lets repair: its reconciliation
    gone, or ``repair: none`` (set since planning, to stop repairs in an incident, say), before
    a resume or a joining worker writes anything."""
    name = row["reconciliation"]
    require_reconciliation(config, row["backfill_id"], name)
    require_repairable(config, name)


def serve(config: Config, backfill_id: int, options: WorkerOptions,
          progress: Progress | None = None) -> BackfillSummary:
    """Work on backfill ``backfill_id`` with ``options.workers`` threads until nothing is open."""
    started = time.monotonic()
    with connect(config.state, what="state", autocommit=True) as state:
        row = load(state, backfill_id)
    backfill = backfill_of(row)
    require_servable(config, row)
    # no more threads than chunks left to claim (one at least, to end the backfill)
    count = max(1, min(options.workers, int(row["chunks"]) - int(row["chunks_done"])))
    pacer = Pacer(backfill.rate)
    errors: list[BaseException] = []
    rows_done = [0]
    lock = threading.Lock()

    def report(result: ChunkResult) -> None:
        if progress is None:
            return
        with lock:
            rows_done[0] += result.rows_read
            elapsed = max(time.monotonic() - started, 1e-6)
        try:
            with connect(config.state, what="state", autocommit=True) as conn:
                row = load(conn, backfill_id)
        except (TrueupError, psycopg.Error) as exc:  # progress only: the work goes on
            log.warning("backfill.progress_unavailable", backfill_id=backfill_id,
                        error=first_line(exc))
            return
        progress(int(row["chunks_done"]), int(row["chunks"]), int(row["rows_repaired"]),
                 rows_done[0] / elapsed)

    def work(index: int) -> None:
        try:
            _Worker(config, backfill, options, index, pacer, report).run()
        except BaseException as exc:
            errors.append(exc)

    # Daemons, which leave Ctrl-C to this thread (trueup.threads): it ends the process at once,
    # whatever a worker is doing (its chunk's lease runs out, and a --resume claims it again);
    # the process does not wait for the backfill.
    workers = [threads.thread(work, args=(i,), name=f"trueup-backfill-{i}")
               for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    try:
        with connect(config.state, what="state", autocommit=True) as state:
            row = load(state, backfill_id)
    except (ConnectionFailed, psycopg.OperationalError):
        if errors:  # the workers gave up on the state database, which is still away
            raise _translated(errors[0]) from None
        raise
    if errors:
        if BackfillStatus(row["status"]).active:
            raise _translated(errors[0])
        # The other workers finished the backfill: a worker's trouble is no longer its fate.
        for error in errors:
            log.warning("backfill.worker_failed", backfill_id=backfill_id,
                        error=first_line(error))
    return summary_of(row, time.monotonic() - started)


def _translated(error: BaseException) -> BaseException:
    """A state database error as one line for the user; the backfill resumes from it."""
    if isinstance(error, psycopg.Error | ConnectionFailed):
        return StateError(f"backfill: state database: {first_line(error)} (resume with "
                          f"--resume once it is back)")
    return error


class _Worker:
    def __init__(self, config: Config, backfill: Backfill, options: WorkerOptions, index: int,
                 pacer: Pacer, report: Callable[[ChunkResult], None]) -> None:
        self.config = config
        self.backfill = backfill
        self.options = options
        self.owner = chunks.new_owner(index)
        self.pacer = pacer
        self.report = report
        self._lease_conn: psycopg.Connection[Any] | None = None  # the heartbeats', kept
        self._writer: Writer | None = None  # made by the first chunk, again after a failure

    def _lease_connection(self) -> psycopg.Connection[Any]:
        if self._lease_conn is None or self._lease_conn.broken or self._lease_conn.closed:
            if self._lease_conn is not None:
                self._lease_conn.close()
            self._lease_conn = chunks.lease_connection(self.config.state,
                                                       self.options.lease_seconds)
        return self._lease_conn

    def run(self) -> None:
        """Serve chunks until none is open; reconnect when the state database goes away."""
        failures = 0
        while True:
            began = time.monotonic()
            try:
                self._serve()
                return
            except (psycopg.OperationalError, ConnectionFailed) as exc:
                if time.monotonic() - began > 2 * STATE_RETRY.max_seconds:
                    failures = 0
                failures += 1
                if STATE_RETRY.exhausted(failures):
                    raise
                delay = STATE_RETRY.delay(failures)
                log.warning("backfill.state_unavailable", backfill_id=self.backfill.backfill_id,
                            worker=self.owner, attempt=failures,
                            delay_seconds=round(delay, 1), error=first_line(exc))
                time.sleep(delay)

    def _serve(self) -> None:
        bid = self.backfill.backfill_id
        with connect(self.config.state, what="state", autocommit=True,
                     application_name="trueup backfill") as state:
            try:
                while load(state, bid)["status"] == BackfillStatus.RUNNING:
                    chunk = chunks.claim(state, bid, self.owner, self.options.lease_seconds)
                    if chunk is None:
                        if self._finish_if_done(state):
                            return
                        time.sleep(POLL_SECONDS)
                        continue
                    if not self._run_chunk(state, chunk) and self._writer is not None:
                        self._writer.close()
                        self._writer = None  # its connections may be broken: open new ones
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if self._lease_conn is not None:
                    self._lease_conn.close()

    def _run_chunk(self, state: psycopg.Connection[Any], chunk: chunks.Chunk) -> bool:
        bid = self.backfill.backfill_id
        log.info("backfill.chunk_started", reconciliation=self.backfill.reconciliation,
                 backfill_id=bid, chunk=chunk.chunk, attempt=chunk.attempts)
        began = time.monotonic()
        HEALTH.progressed()
        with tracing.span("backfill.chunk", reconciliation=self.backfill.reconciliation,
                          backfill_id=bid, chunk=chunk.chunk, attempt=chunk.attempts,
                          rows_planned=chunk.rows_planned) as span:
            try:
                with chunks.Heartbeat(self.config.state, chunk, self.owner,
                                      self.options.lease_seconds,
                                      conn=self._lease_connection()) as heartbeat:
                    # Paced before the source is read, never between reading and writing: rows
                    # read before a wait could be written after the source changed them.
                    self.pacer(chunk.rows_planned)
                    heartbeat.check()  # taken over meanwhile: give it up before any work
                    ctx = ChunkContext(backfill=self.backfill, owner=self.owner,
                                       heartbeat=heartbeat)
                    if self._writer is None:  # first, or after a failed chunk: connect again
                        self._writer = make_writer(self.config, self.backfill, state)
                    result = self._writer.repair(chunk, ctx)
            except chunks.LeaseLost as exc:
                log.warning("backfill.lease_lost", backfill_id=bid, chunk=chunk.chunk,
                            error=str(exc))
                metrics.record_chunk("lease_lost", time.monotonic() - began)
                span.set_attribute("outcome", "lease_lost")
                return False
            except Exception as exc:
                span.record_exception(exc)
                outcome = self._failed(state, chunk, exc)
                span.set_attribute("outcome", outcome)
                metrics.record_chunk(outcome, time.monotonic() - began)
                return False
            span.set_attributes({"outcome": "done", "repaired": result.repaired,
                                 "skipped": result.skipped})
        # a dry run repairs nothing: its counts are in its summary, not among the rows repaired
        metrics.record_chunk("done", time.monotonic() - began,
                             repaired=0 if self.backfill.dry_run else result.repaired,
                             skipped=0 if self.backfill.dry_run else result.skipped)
        HEALTH.progressed()
        log.info("backfill.chunk_done", reconciliation=self.backfill.reconciliation,
                 backfill_id=bid, chunk=chunk.chunk, rows=result.rows_read,
                 repaired=result.repaired, skipped=result.skipped)
        self.report(result)
        return True

    def _failed(self, state: psycopg.Connection[Any], chunk: chunks.Chunk,
                exc: Exception) -> str:
        """Retry the chunk later or fail the backfill; returns the outcome for metrics."""
        bid = self.backfill.backfill_id
        error = str(exc) if isinstance(exc, TrueupError) else first_line(exc)
        decision = self.options.retry.decide(chunk.attempts, exc)
        try:
            if decision.retry:
                log.warning("backfill.chunk_retry", backfill_id=bid, chunk=chunk.chunk,
                            attempt=chunk.attempts, delay_seconds=decision.delay_seconds,
                            error=error)
                chunks.retry_later(state, chunk, self.owner,
                                   delay_seconds=decision.delay_seconds, error=error)
                return "retry"
            log.error("backfill.chunk_failed", backfill_id=bid, chunk=chunk.chunk,
                      attempt=chunk.attempts, error=error)
            # One transaction: a process killed in between must not leave a failed chunk
            # under a running backfill (its chunk stays leased instead, and is claimed again).
            with state.transaction():
                chunks.fail(state, chunk, self.owner, error=error)
                state.execute(query("finish_backfill"), {
                    "backfill_id": bid, "status": BackfillStatus.FAILED.value,
                    "error": f"chunk {chunk.chunk}: {error}"})
        except chunks.LeaseLost:
            return "lease_lost"
        return "failed"

    def _finish_if_done(self, state: psycopg.Connection[Any]) -> bool:
        bid = self.backfill.backfill_id
        row = state.execute(query("chunk_progress"), {"backfill_id": bid}).fetchone()
        assert row is not None
        if row["open"]:
            return False
        failed = row["failure"]
        status = BackfillStatus.FAILED if failed else BackfillStatus.SUCCEEDED
        finished = state.execute(query("finish_backfill_done"), {
            "backfill_id": bid, "status": status.value,
            "error": f"chunk {failed}" if failed else None}).fetchone()
        if finished is None:  # ended meanwhile, or reopened by a resume: the loop asks again
            return False
        log.info("backfill.finished", reconciliation=self.backfill.reconciliation,
                 backfill_id=bid, status=status.value)
        return True
