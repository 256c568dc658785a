"""Chunks of a backfill: claimed with ``FOR UPDATE SKIP LOCKED`` under a lease, renewed by a
heartbeat while the chunk runs, completed or retried once, each step one guarded statement.

A worker that dies (kill -9, a lost machine) stops renewing; once its lease has expired any
other worker claims the chunk again. Completion is guarded by the lease owner, so a worker that
lost its lease can never mark done a chunk someone else now holds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from trueup import metrics, threads
from trueup.db import connect, first_line
from trueup.errors import ConnectionFailed, StateError
from trueup.log import get_logger
from trueup.queries import query

log = get_logger(__name__)

#: How long a claim holds without a heartbeat (seconds); a killed worker's chunk waits this long.
LEASE_SECONDS = 30.0


class LeaseLost(StateError):
    """The chunk's lease expired and another worker may hold it; this worker must stop."""


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One claimed chunk: a key range ``[key_from, key_to)`` or an explicit list of keys."""

    backfill_id: int
    chunk: int
    key_from: list[Any] | None
    key_to: list[Any] | None
    keys: list[list[Any]] | None
    rows_planned: int
    attempts: int
    #: When this worker's claim committed (``time.monotonic``): its lease runs from about then.
    claimed_at: float = field(default_factory=time.monotonic, compare=False)


def new_owner(worker: int) -> str:
    """A lease owner name unique across machines, processes and workers."""
    return f"{socket.gethostname()}:{os.getpid()}:{worker}:{uuid.uuid4().hex[:6]}"


def claim(conn: psycopg.Connection[Any], backfill_id: int, owner: str,
          lease_seconds: float) -> Chunk | None:
    """Claim the next due chunk (or one whose lease expired); None when nothing is claimable."""
    with conn.transaction():
        row = conn.execute(query("claim_chunk"), {"backfill_id": backfill_id, "owner": owner,
                                                  "lease_seconds": lease_seconds}).fetchone()
    if row is None:
        return None
    if row["taken_over"]:
        taken_over(backfill_id, row["chunk"], row["attempts"], owner=owner)
    return Chunk(backfill_id=row["backfill_id"], chunk=row["chunk"], key_from=row["key_from"],
                 key_to=row["key_to"], keys=row["keys"], rows_planned=row["rows_planned"],
                 attempts=row["attempts"])


def taken_over(backfill_id: int, chunk: int, attempt: int, *, owner: str) -> None:
    """Count and log a chunk whose worker's lease expired, claimed now by ``owner`` (or
    reopened by a resume)."""
    metrics.LEASES_TAKEN_OVER.inc()
    log.warning("backfill.lease_taken_over", backfill_id=backfill_id, chunk=chunk, owner=owner,
                attempt=attempt)


def _guarded(conn: psycopg.Connection[Any], name: str, params: dict[str, Any],
             chunk: Chunk) -> Any:
    row = conn.execute(query(name), params).fetchone()
    if row is None:
        raise LeaseLost(f"backfill {chunk.backfill_id} chunk {chunk.chunk}: no longer held by "
                        f"this worker (lease expired or backfill cancelled)")
    return row


def complete(conn: psycopg.Connection[Any], chunk: Chunk, owner: str, *,
             counts: tuple[int, int] | None = None) -> tuple[int, int]:
    """Mark the chunk done inside the caller's transaction; return (repaired, skipped).

    ``counts``: (repaired, skipped) when the caller knows them (a dry run, or a chunk whose
    every repairs row this transaction recorded, new); None: counted from the chunk's repairs
    rows, which a retried chunk may hold from an earlier attempt."""
    repaired, skipped = counts or (0, 0)
    row = _guarded(conn, "complete_chunk", {
        "backfill_id": chunk.backfill_id, "chunk": chunk.chunk, "owner": owner,
        "count": counts is None, "repaired": repaired, "skipped": skipped}, chunk)
    return int(row["rows_repaired"]), int(row["rows_skipped"])


def retry_later(conn: psycopg.Connection[Any], chunk: Chunk, owner: str, *,
                delay_seconds: float, error: str) -> None:
    with conn.transaction():
        _guarded(conn, "retry_chunk", {"backfill_id": chunk.backfill_id, "chunk": chunk.chunk,
                                       "owner": owner, "delay_seconds": delay_seconds,
                                       "error": error}, chunk)


def fail(conn: psycopg.Connection[Any], chunk: Chunk, owner: str, *, error: str) -> None:
    with conn.transaction():
        _guarded(conn, "fail_chunk", {"backfill_id": chunk.backfill_id, "chunk": chunk.chunk,
                                      "owner": owner, "error": error}, chunk)


def lease_connection(state_dsn: str, lease_seconds: float) -> psycopg.Connection[Any]:
    """A connection to renew leases on (a worker keeps one from chunk to chunk: a connection
    per chunk costs the server a new process each time)."""
    conn = connect(state_dsn, what="state", autocommit=True,
                   application_name="trueup backfill heartbeat")
    # A renewal stuck longer than the silence a lease survives is of no use: give up, retry.
    conn.execute("SET statement_timeout = "
                 f"{int(lease_seconds * Heartbeat.SILENCE_SHARE * 1000)}")
    return conn


class Heartbeat:
    """Renews a chunk's lease every third of the lease, on a connection of its own or on
    ``conn`` (from :func:`lease_connection`, left open; replaced by one of its own if it breaks).

    :meth:`check` fails when a renewal found the chunk taken over, and also when no renewal
    succeeded for :data:`SILENCE_SHARE` of the lease (the state database unreachable, a renewal
    stuck behind a lock): the lease may have run out, so the work must stop.
    """

    #: Of the lease: how long without a successful renewal until the lease counts as lost.
    SILENCE_SHARE = 2 / 3

    def __init__(self, state_dsn: str, chunk: Chunk, owner: str, lease_seconds: float, *,
                 conn: psycopg.Connection[Any] | None = None) -> None:
        self.chunk = chunk
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._state_dsn = state_dsn
        self._renewed = chunk.claimed_at  # the lease's start
        self._lease = {"backfill_id": chunk.backfill_id, "chunk": chunk.chunk, "owner": owner,
                       "lease_seconds": lease_seconds}  # what renew_lease asks
        self._stop = threading.Event()
        self._lent = conn
        self._conn: psycopg.Connection[Any] | None = conn or self._connect()
        self._thread = threads.thread(self._run, name=f"trueup-lease-{chunk.chunk}")

    def _connect(self) -> psycopg.Connection[Any]:
        return lease_connection(self._state_dsn, self.lease_seconds)

    def __enter__(self) -> Heartbeat:
        # What ran since the claim (the writer's connections opened, tables reflected) may
        # have used up much of the lease: renew it before the work starts, or learn it is lost.
        if time.monotonic() - self._renewed > self.lease_seconds / 3 and not self._renew():
            self.lost.set()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._close()

    def _close(self) -> None:
        if self._conn is not None and self._conn is not self._lent:
            self._conn.close()
        self._conn = None

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            if not self._renew() and not self._stop.is_set():
                self.lost.set()
                return

    def _renew(self) -> bool:
        """Renew the lease once; False only when the chunk is no longer this worker's (a
        renewal the state database did not answer is logged, and the silence counts on)."""
        asked = time.monotonic()  # the server's lease runs from about now
        try:
            if self._conn is None or self._conn.broken:
                self._close()
                self._conn = self._connect()
            row = self._conn.execute(query("renew_lease"), self._lease).fetchone()
        except (psycopg.Error, ConnectionFailed) as exc:
            log.warning("backfill.heartbeat_failed", backfill_id=self.chunk.backfill_id,
                        chunk=self.chunk.chunk, error=first_line(exc))
            return True
        if row is None:
            return False
        self._renewed = asked
        return True

    def hold(self, conn: psycopg.Connection[Any]) -> None:
        """Renew the lease inside ``conn``'s current transaction, or raise :class:`LeaseLost`.

        The renewal locks the chunk's row until that transaction ends, so no other worker can
        take the chunk over before it commits: what it writes is fenced by the lease."""
        _guarded(conn, "renew_lease", self._lease, self.chunk)
        self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the chunk was taken over, or its lease may have run
        out for want of renewals."""
        if self.lost.is_set():
            raise LeaseLost(f"backfill {self.chunk.backfill_id} chunk {self.chunk.chunk}: "
                            f"lease lost")
        silent = time.monotonic() - self._renewed
        if silent > self.lease_seconds * self.SILENCE_SHARE:
            raise LeaseLost(f"backfill {self.chunk.backfill_id} chunk {self.chunk.chunk}: "
                            f"lease not renewed for {silent:.1f}s of {self.lease_seconds:.0f}s")
