"""Values that travel through a backfill, and the repairs rows every writer records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from trueup.backfill.chunks import LEASE_SECONDS, Chunk, Heartbeat
from trueup.backfill.keyspace import repairs_text
from trueup.config import ReconciliationConfig
from trueup.errors import UsageError
from trueup.fingerprint import ColumnType
from trueup.pacing import valid_rate
from trueup.queries import query
from trueup.retry import RetryPolicy
from trueup.sides import Side, table_side
from trueup.statuses import BackfillScope, BackfillStatus, KeyOrder, RepairAction

#: Rows per chunk unless ``--chunk-size`` says otherwise.
DEFAULT_CHUNK_ROWS = 10_000
#: The largest chunk size the state holds (an ``integer`` column).
MAX_CHUNK_ROWS = 2**31 - 1
#: Worker threads one process may run (each holds a connection to the state, the source and
#: the target): more machines or processes serve a backfill beyond that.
MAX_WORKERS = 32
#: A failing chunk is tried this often, backing off 1 s, 2 s, 4 s ... (capped at 60 s).
CHUNK_RETRY = RetryPolicy(max_attempts=5, initial_seconds=1.0, multiplier=2.0, max_seconds=60.0)


@dataclass(frozen=True, kw_only=True)
class BackfillOptions:
    """What ``trueup backfill NAME ...`` asks for."""

    scope: BackfillScope
    run_id: int | None = None
    partition: str | None = None
    dry_run: bool = False
    chunk_size: int = DEFAULT_CHUNK_ROWS
    rate: float | None = None          # rows per second per process, None: as fast as it goes
    workers: int = 1
    launched_by: str | None = None     # the root id of the Dagster run that plans it
    alongside: bool = False            # run while another backfill of it is active

    def __post_init__(self) -> None:
        """Refuse what no backfill can run, before anything is planned."""
        if self.chunk_size <= 0:
            raise UsageError(f"chunk_size: expected a positive integer (got {self.chunk_size})")
        if self.chunk_size > MAX_CHUNK_ROWS:
            raise UsageError(f"chunk_size: expected at most {MAX_CHUNK_ROWS} "
                             f"(got {self.chunk_size})")
        require_workers(self.workers)
        if not valid_rate(self.rate):
            raise UsageError(f"rate: expected a positive number of rows per second "
                             f"(got {self.rate})")
        if self.scope is BackfillScope.RUN and self.run_id is None:
            raise UsageError("scope run needs run_id")
        if self.scope is not BackfillScope.RUN and self.run_id is not None:
            raise UsageError(f"run_id: only scope run repairs one run's differences (scope is "
                             f"{self.scope.value}; set scope run, or leave run_id empty)")
        if self.scope is BackfillScope.PARTITION and not self.partition:
            raise UsageError("scope partition needs a partition (or a partitioned run)")


def require_workers(workers: int) -> None:
    """Refuse a worker count no process should run (0 would leave a running backfill no
    thread works on, blocking every later one; thousands would exhaust the servers'
    connections)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers: expected 1 to {MAX_WORKERS} (got {workers}); more "
                         f"processes serve one backfill together beyond that")


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How one process serves a backfill."""

    workers: int = 1
    lease_seconds: float = LEASE_SECONDS
    retry: RetryPolicy = CHUNK_RETRY

    def __post_init__(self) -> None:
        require_workers(self.workers)


@dataclass(frozen=True, kw_only=True)
class BackfillSummary:
    """What ``trueup backfill --json`` prints (plus a few fields for status and Dagster)."""

    backfill_id: int
    reconciliation: str
    status: BackfillStatus
    chunks: int
    rows_planned: int
    rows_repaired: int
    rows_skipped: int
    seconds: float
    chunks_done: int = 0
    dry_run: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        return out


@dataclass(frozen=True, kw_only=True)
class Backfill:
    """A backfill as stored: what each chunk of it needs to know."""

    backfill_id: int
    reconciliation: str
    scope: BackfillScope
    run_id: int | None
    partition: str | None
    dry_run: bool
    rate: float | None
    key_order: KeyOrder = KeyOrder.C  # how its key ranges compare text keys


@dataclass(frozen=True, kw_only=True)
class Repair:
    """One repaired (or deliberately skipped) key: a row of trueup.repairs."""

    key: list[Any]
    action: RepairAction
    fingerprint_before: int | None
    fingerprint_after: int | None
    #: the key as trueup.repairs holds it, rendered by Postgres (exact, where ``key`` holds
    #: floats read back from jsonb); None: rendered from ``key`` (repairs_text)
    text: str | None = None


@dataclass(frozen=True, kw_only=True)
class ChunkResult:
    rows_read: int
    repaired: int
    skipped: int


@dataclass(kw_only=True)
class ChunkContext:
    """What a writer gets with a chunk: who holds it, and the lease."""

    backfill: Backfill
    owner: str
    heartbeat: Heartbeat


#: A repairs row as staged: the key as trueup.repairs holds it (see
#: trueup.backfill.keyspace.repairs_text), the action, the fingerprints before and after.
RepairRow = tuple[str, str, int | None, int | None]


def record_repairs(conn: psycopg.Connection[Any], backfill: Backfill, chunk: Chunk,
                   repairs: Sequence[Repair], *, again: bool = False) -> None:
    """Write repairs rows inside the caller's transaction (one per backfill and key; see
    :func:`record_staged` for ``again``)."""
    if not repairs:
        return
    record_rows(conn, backfill, chunk, [
        (r.text or repairs_text(r.key), r.action.value, r.fingerprint_before, r.fingerprint_after)
        for r in repairs], again=again)


def record_rows(conn: psycopg.Connection[Any], backfill: Backfill, chunk: Chunk,
                rows: Iterable[RepairRow], *, again: bool = False) -> bool:
    """:func:`record_repairs` for rows already in their staged form (``rows`` may be a
    stream: it is read once). Return whether every row was new to the chunk (none met a row
    it held already).

    Rows new to the chunk are COPYed straight into trueup.repairs (1.9 us per row on the
    server against 2.7 staged and inserted) when their run is known: the backfill's, or none
    at all (no run of the reconciliation has differences). Otherwise each row is given the
    last run that found its key by :func:`record_staged`, as are rows the chunk may hold
    already (``again``, or a COPY that meets one), which it corrects.
    """
    params = _record_params(backfill, chunk)
    rows = iter(rows)
    seen: list[RepairRow] = []
    known = _run_known(conn, backfill, params)
    if not again and known:
        # COPY text made here: 0.18 us a row, against 0.42 through write_row
        null = "\\N"
        try:
            with conn.transaction(), _into_repairs(conn, backfill, chunk) as (  # a savepoint
                    copy, end):
                lines: list[str] = []
                for row in rows:
                    seen.append(row)
                    key, action, before, after = row
                    if "\\" in key:  # JSON text holds no tab, newline or carriage return
                        key = key.replace("\\", "\\\\")
                    lines.append(f"{key}\t{action}\t{null if before is None else before}\t"
                                 f"{null if after is None else after}{end}")
                    if len(lines) == COPY_LINES:
                        copy.write("".join(lines))
                        lines.clear()
                copy.write("".join(lines))
            return True
        except psycopg.errors.UniqueViolation:
            again = True
    seen.extend(rows)  # all of them, or those the COPY did not reach
    if not seen:
        return not again
    with staging(conn) as copy:
        for row in seen:
            copy.write_row(row)
    return record_staged(conn, backfill, chunk, again=again, run_known=known)


def record_text(conn: psycopg.Connection[Any], backfill: Backfill, chunk: Chunk,
                data: bytes) -> bool:
    """:func:`record_rows` for rows given as ``COPY`` text, a line each of key, action and the
    fingerprints before and after (as :data:`trueup.backfill.upsert.CANDIDATES_OUT` writes
    them). When their run is known, each line gets the columns the chunk gives them all and
    goes straight into trueup.repairs (1.9 us per row, against 2.7 staged and inserted);
    otherwise, or when one meets a row the chunk holds already, they are staged."""
    if not data:
        return True
    params = _record_params(backfill, chunk)
    known = _run_known(conn, backfill, params)
    if known:
        try:
            with conn.transaction(), _into_repairs(conn, backfill, chunk) as (  # a savepoint
                    copy, end):
                # no field holds a newline (jsonb escapes them): one ends each line
                copy.write(data.replace(b"\n", end.encode()))
            return True
        except psycopg.errors.UniqueViolation:
            pass
    with staging(conn) as copy:
        copy.write(data)
    return record_staged(conn, backfill, chunk, again=known, run_known=known)


def chunk_has_repairs(conn: psycopg.Connection[Any], chunk: Chunk) -> bool:
    """Whether the chunk holds repairs rows already (an unfinished attempt's intent)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("chunk_has_repairs"), {
            "backfill_id": chunk.backfill_id, "chunk": chunk.chunk}).fetchone()
    return bool(row and row[0])


@contextmanager
def new_repairs(conn: psycopg.Connection[Any], backfill: Backfill,
                chunk: Chunk) -> Iterator[tuple[psycopg.Copy, bytes]]:
    """A ``COPY`` taking the repairs rows of a chunk that holds none yet as COPY text in their
    staged form (key, action, fingerprints before and after), and the bytes that must end each
    line. The rows go straight into trueup.repairs when their run is known; otherwise through
    the stage, where each gets the last run that found its key (see :func:`record_text`)."""
    params = _record_params(backfill, chunk)
    if _run_known(conn, backfill, params):
        with _into_repairs(conn, backfill, chunk) as (copy, end):
            yield copy, end.encode()
    else:
        with staging(conn) as copy:
            yield copy, b"\n"
        record_staged(conn, backfill, chunk, run_known=False)


@contextmanager
def staging(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Copy]:
    """A ``COPY`` of repairs rows in their staged form (key, action, fingerprints before and
    after) into the stage that :func:`record_staged` moves into trueup.repairs."""
    conn.execute(query("stage_repairs"))
    with conn.cursor() as cur, cur.copy(
            "COPY trueup_repairs_stage (key, action, fingerprint_before, fingerprint_after) "
            "FROM STDIN") as copy:
        yield copy


#: Lines of COPY text handed on at once.
COPY_LINES = 1_000


@contextmanager
def _into_repairs(conn: psycopg.Connection[Any], backfill: Backfill,
                  chunk: Chunk) -> Iterator[tuple[psycopg.Copy, str]]:
    """A ``COPY`` straight into trueup.repairs of lines that hold a row's own fields as staged
    (key, action, fingerprints before and after), and the text that must end each line: the
    fields every repairs row of the chunk has, then the newline."""
    shared = "\t".join(_copy_text(v) for v in (
        backfill.reconciliation, backfill.run_id, backfill.backfill_id, chunk.chunk))
    with conn.cursor() as cur, cur.copy(
            "COPY trueup.repairs (key, action, fingerprint_before, fingerprint_after, "
            "reconciliation, run_id, backfill_id, chunk) FROM STDIN") as copy:
        yield copy, f"\t{shared}\n"


def _copy_text(value: str | int | None) -> str:
    """A value as a field of COPY's text format."""
    if value is None:
        return "\\N"
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace(
        "\n", "\\n").replace("\r", "\\r")


def _run_known(conn: psycopg.Connection[Any], backfill: Backfill,
               params: dict[str, Any]) -> bool:
    """Whether every repairs row of the backfill has one run to name: its own, or none (no run
    of the reconciliation has differences); else each row names the last run that found it."""
    return backfill.run_id is not None or not _has_differences(conn, params)


def _has_differences(conn: psycopg.Connection[Any], params: dict[str, Any]) -> bool:
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("has_differences"), params).fetchone()
    return bool(row and row[0])


def _record_params(backfill: Backfill, chunk: Chunk) -> dict[str, Any]:
    return {"reconciliation": backfill.reconciliation, "run_id": backfill.run_id,
            "backfill_id": backfill.backfill_id, "chunk": chunk.chunk}


def record_staged(conn: psycopg.Connection[Any], backfill: Backfill, chunk: Chunk, *,
                  again: bool = False, run_known: bool | None = None) -> bool:
    """Move the rows staged in ``trueup_repairs_stage`` into trueup.repairs; return whether
    they were all new to the chunk.

    A chunk's rows are usually new: they commit with its completion, so a chunk tried again
    has none yet, and a plain insert (no ``ON CONFLICT`` probe: 2.2 of 8.8 us per row) does.
    Where rows may exist (a chunk that recorded its intent before a crash, or the correction
    of that intent: ``again``) the insert updates them instead; a plain insert that finds one
    anyway rolls back to its savepoint and does that. Each row is given the last run that
    found its key only when the backfill names no run and some run found differences
    (``run_known``: that answer, when the caller has it).
    """
    params = _record_params(backfill, chunk)
    known = _run_known(conn, backfill, params) if run_known is None else run_known
    insert = query("record_repairs_of_run" if known else "record_repairs")
    if not again:
        try:
            with conn.transaction():  # a savepoint
                conn.execute(insert, params)
        except psycopg.errors.UniqueViolation:
            again = True
    if again:
        conn.execute(sql.SQL("{} {}").format(insert, query("record_repairs_again")), params)
    conn.execute("DELETE FROM trueup_repairs_stage")
    return not again


#: Bytes gathered before handing COPY data on (COPY yields one row at a time).
PIPE_BYTES = 1 << 20


def pipe(reader: Iterable[Any], writer: Any) -> None:
    """Pass COPY data from a ``COPY ... TO STDOUT`` to a ``COPY ... FROM STDIN``."""
    buffer = bytearray()
    for block in reader:
        buffer += block
        if len(buffer) >= PIPE_BYTES:
            writer.write(bytes(buffer))
            buffer.clear()
    if buffer:
        writer.write(bytes(buffer))


def source_side(conn: psycopg.Connection[Any], rec: ReconciliationConfig, dsn: str,
                as_types: Sequence[ColumnType] | None = None) -> Side:
    """The source as a diff sees it (its columns read as ``as_types``, the types they share
    with a target table's)."""
    return table_side(label="source", dsn=dsn, table=rec.source.table, key=rec.source.key,
                      version=rec.source.version, columns=rec.source.columns,
                      as_types=as_types, updated_at=rec.source.updated_at, conn=conn)
