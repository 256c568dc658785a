"""The ``upsert`` repair of a Postgres target table.

A chunk whose scope the target holds no row of (a new projection, a lost range) is repaired
by one ``COPY`` of the current source rows from the source server into the target table, as a
plain copy would, while their repairs rows stream into the state database (see
``_copy_fresh``). For every other chunk the current source rows are copied straight from the
source server into a temporary stage on the target server (``COPY ... TO STDOUT`` piped into
``COPY ... FROM STDIN``, no parsing in Python), compared there with the target rows, and
written with ``INSERT ... ON CONFLICT DO UPDATE ... WHERE target.version <=
excluded.version``: a target row that is newer than the source is never overwritten (it is
recorded as ``skipped``). A chunk whose every write is an insert tries a plain ``INSERT``
first (see ``_insert_new``). An orphan is deleted only after the source is asked again, at
that moment, whether it still lacks the key.

When trueup's state lives in the target database, the target writes, the repairs rows and the
chunk's completion commit in one transaction. Otherwise the repairs are recorded as intent
(on a thread of their own while the target writes) and committed before the target commits,
then the chunk completes with the actual outcome;
a crash between these steps leaves the chunk to be claimed again, and the retry finds the rows
already repaired (no candidates) or repairs them again under the same repairs rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from contextlib import ExitStack
from typing import Any

import psycopg
from psycopg import sql

from trueup import threads
from trueup.backfill import chunks
from trueup.backfill.keyspace import KeySpace, json_text, repairs_text, scope_condition
from trueup.backfill.model import (
    Backfill,
    ChunkContext,
    ChunkResult,
    Repair,
    chunk_has_repairs,
    new_repairs,
    pipe,
    record_repairs,
    record_staged,
    record_text,
    source_side,
    staging,
)
from trueup.config import Config, ReconciliationConfig
from trueup.db import connect, same_server
from trueup.errors import TrueupError
from trueup.fingerprint import ColumnType, Kind, loads, storage_type
from trueup.log import get_logger
from trueup.queries import query
from trueup.sides import (
    SharedTypes,
    Side,
    day_filter,
    exact_numeric,
    reconciled_types,
    table_side,
)
from trueup.statuses import BackfillScope, KeyOrder, RepairAction

log = get_logger(__name__)

#: Candidates of a chunk whose repairs rows (about 100 bytes each) are held in memory, to be
#: recorded in the state database while the target writes; more are piped first, then written.
INTENT_IN_MEMORY_ROWS = 50_000
#: The same bound in bytes, for a chunk that goes in by COPY with its state in the target
#: database (its repairs rows wait in memory for the COPY to end).
INTENT_IN_MEMORY_BYTES = INTENT_IN_MEMORY_ROWS * 100

#: Source COPY data handed on at once to the target and the state by a fresh chunk's COPY:
#: small enough that the three servers work at once, large enough to cost Python little.
SPLIT_BYTES = 1 << 16
#: The first object id a database gives objects created in it: the built-in types trueup
#: compares have fixed ids below it, the same in every database of a server version.
FIRST_NORMAL_OID = 16384

#: Number types a bool is written into as 1 or 0.
_NUMBER_TYPES = ("int2", "int4", "int8", "numeric", "float4", "float8")

_STAGE = sql.Identifier("trueup_stage")
_CAND = sql.Identifier("trueup_cand")
#: A candidate as a repairs row: key, action, fingerprint before and after.
_REPAIR_COLUMNS = sql.SQL(
    "trueup_key, trueup_action, trueup_before, "
    "CASE WHEN trueup_action = 'skipped' THEN trueup_before ELSE trueup_fp END")


#: The candidates as repairs rows, by COPY.
CANDIDATES_OUT = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(_REPAIR_COLUMNS, _CAND)


def candidate_rows(target: psycopg.Connection[Any]) -> bytes:
    """What :data:`CANDIDATES_OUT` writes, rendered by the target as one value: reading a COPY
    takes Python a call per row (about 1 us). jsonb's text never holds a tab, newline or
    carriage return (it escapes them), so a backslash is all that COPY needs escaped; the
    other columns are words and numbers."""
    row = target.execute(sql.SQL(
        "SELECT string_agg(concat_ws(E'\\t', replace(trueup_key::text, '\\', '\\\\'), "
        "trueup_action, coalesce(trueup_before::text, '\\N'), "
        "coalesce(CASE WHEN trueup_action = 'skipped' THEN trueup_before ELSE trueup_fp END"
        "::text, '\\N')), E'\\n') AS copied FROM {}").format(_CAND)).fetchone()
    copied = row["copied"] if row else None
    return f"{copied}\n".encode() if copied else b""


#: Between the key and the fingerprint of a fresh chunk's repairs row: inserted, nothing before.
_INSERTED = b"\tinsert\t\\N\t"


def split_fresh(data: bytes, end: bytes) -> tuple[bytes, bytes, int]:
    """Whole lines of a fresh chunk's source COPY (the key as JSON, the fingerprint, then the
    target's row) as the target rows, the repairs rows in their staged form (each ended by
    ``end``), and how many. COPY text escapes tabs and newlines inside fields, so each field
    passes on as it is, escapes and all."""
    rows: list[bytes] = []
    repairs: list[bytes] = []
    for line in data.split(b"\n")[:-1]:
        key, fp, row = line.split(b"\t", 2)
        rows.append(row)
        repairs.append(key + _INSERTED + fp)
    if not rows:
        return b"", b"", 0
    return b"\n".join(rows) + b"\n", end.join(repairs) + end, len(rows)


class _DryRun(Exception):
    """Raised inside the chunk's transaction to roll back a dry run."""


class _KeptOut(Exception):
    """Raised inside a savepoint to undo a plain insert that a trigger let only partly in."""


class _TooMany(Exception):
    """Raised when a fresh chunk's repairs rows, held in memory, outgrow it (see _copy_fresh)."""


def _names(prefix: str, n: int) -> list[sql.Identifier]:
    return [sql.Identifier(f"trueup_{prefix}{i}") for i in range(n)]


def _regclass(conn: psycopg.Connection[Any], table: str) -> str:
    return sql.Identifier(*table.split(".")).as_string(conn)


def _exact_types(conn: psycopg.Connection[Any], table: str) -> dict[str, tuple[int, int, bool]]:
    """Each column of ``table``: its type's object id and modifier, and whether a ``COPY``
    writes it as an INSERT does (not generated, not an identity column ``ALWAYS``)."""
    rows = conn.execute(
        "SELECT attname AS name, atttypid::int AS type, atttypmod AS modifier, "
        "attidentity <> 'a' AND attgenerated = '' AS ordinary FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (_regclass(conn, table),)).fetchall()
    return {r["name"]: (r["type"], r["modifier"], r["ordinary"]) for r in rows}


def same_database(a: psycopg.Connection[Any], b: psycopg.Connection[Any]) -> bool:
    """True when two connections reach the same database of the same cluster."""
    probe = "SELECT current_database() AS db"
    return same_server(a, b) and a.execute(probe).fetchone() == b.execute(probe).fetchone()


#: What tells a target row (``t``) from the one its key held before.
_ROW_SEEN = sql.SQL("t.xmin::text")


class UpsertWriter:
    """Repairs chunks of one reconciliation into its target table (one per worker)."""

    def __init__(self, config: Config, name: str, rec: ReconciliationConfig,
                 state: psycopg.Connection[Any], *, with_orphans: bool,
                 order: KeyOrder = KeyOrder.C) -> None:
        self.name = name
        self.order = order  # how the backfill's key ranges compare text keys
        self.rec = rec
        self.state = state
        self.with_orphans = with_orphans
        self.stack = ExitStack()
        source_dsn = config.connections[rec.source.connection].postgres
        target_dsn = config.connections[rec.target.connection].postgres
        assert source_dsn is not None and target_dsn is not None and rec.target.table
        app = f"trueup backfill {name}"
        self.source = self.stack.enter_context(connect(source_dsn, what="source",
                                                       autocommit=True, application_name=app))
        self.target = self.stack.enter_context(connect(target_dsn, what="target",
                                                       autocommit=True, application_name=app))
        # Each column as the type both sides are read as, as a diff reads them (a ``numeric``
        # 10.5 under a ``bigint`` stays 10.5 and is repaired, where read as a bigint it would
        # be the source's 11): what a diff reports the backfill repairs.
        shared, self.column_types = reconciled_types(rec, self.source, self.target)
        # the source's fingerprints rendered as the types it shares with the target
        self.source_side = source_side(self.source, rec, source_dsn, as_types=shared.columns)
        self.target_side = self._target_as_diffed(target_dsn, shared)
        self.source.commit()
        self.target_types = self._target_types(rec.target.table)
        self.copies_as_is = self._copies_as_is()
        self.shared = same_database(self.target, state)
        self.target.commit()
        # records a chunk's intent in the state database while this thread writes the target
        self.recorder = self.stack.enter_context(
            threads.executor(1, "trueup-repairs"))
        self._create_stage()

    def close(self) -> None:
        self.stack.close()

    # -- shapes ------------------------------------------------------------------------------

    @property
    def key_types(self) -> list[ColumnType]:
        return self.source_side.key_types

    def _target_as_diffed(self, dsn: str, shared: SharedTypes) -> Side:
        """The target read as a diff reads it, its columns as the ``shared`` types. Keys are
        read as the source's (see "Known limits" in docs/backfills.md)."""
        rec = self.rec
        assert rec.target.table
        return table_side(
            label="target", dsn=dsn, table=rec.target.table, key=rec.target.key,
            version=rec.target.version, columns=[rec.target.columns[c] for c in rec.source.columns],
            as_types=shared.columns, key_as=self.source_side.key_types, version_as=shared.version,
            conn=self.target)

    def _target_types(self, table: str) -> dict[str, tuple[str, str]]:
        """Each column of the target table: its type's schema and name."""
        rows = self.target.execute(
            "SELECT a.attname AS name, n.nspname AS schema, t.typname AS type "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            (_regclass(self.target, table),)).fetchall()
        return {r["name"]: (r["schema"], r["type"]) for r in rows}

    def _target_type(self, column: str) -> sql.Identifier:
        return sql.Identifier(*self.target_types[column])

    def _copies_as_is(self) -> bool:
        """Whether source rows can go into the target by a ``COPY`` of the text the source
        writes, with the outcome an INSERT would have: the target is a plain or partitioned
        table (a COPY ignores rules and refuses row-level security and views) whose unique
        index on the key columns (valid, not deferred, not partial) makes a row that arrives
        meanwhile fail the COPY, and each written column is an ordinary one (not an identity
        column a COPY would override) of exactly its source column's built-in type, modifier
        included, so the text reads back as the same value."""
        rec = self.rec
        pairs = [*zip(rec.source.key, rec.target.key, strict=True),
                 *((c, rec.target.columns[c]) for c in rec.source.columns)]
        if self._versioned:
            assert rec.source.version is not None and rec.target.version is not None
            pairs.append((rec.source.version, rec.target.version))
        assert rec.target.table
        source = _exact_types(self.source, rec.source.table)
        target = _exact_types(self.target, rec.target.table)
        row = self.target.execute(query("copy_target"), {
            "table": _regclass(self.target, rec.target.table),
            "key": sorted(rec.target.key)}).fetchone()
        return bool(row and row["takes_copy"]) and all(
            s in source and t in target and source[s][:2] == target[t][:2] and target[t][2]
            and source[s][0] < FIRST_NORMAL_OID for s, t in pairs)

    def _create_stage(self) -> None:
        rec, st = self.rec, self.source_side
        cols: list[sql.Composable] = [
            sql.SQL("{} {}").format(n, storage_type(t))
            for n, t in zip(_names("k", len(rec.source.key)), st.key_types, strict=True)]
        if st.version is not None and st.version_type is not None:
            cols.append(sql.SQL("trueup_v {}").format(storage_type(st.version_type)))
        cols += [sql.SQL("{} {}").format(n, storage_type(t))
                 for n, t in zip(_names("c", len(rec.source.columns)), self.column_types,
                                 strict=True)]
        cols.append(sql.SQL("trueup_fp bigint"))
        self.target.execute(sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                _STAGE, sql.SQL(", ").join(cols)))
        self.target.commit()

    @property
    def _versioned(self) -> bool:
        return self.source_side.version is not None and self.rec.target.version is not None

    def _source_space(self) -> KeySpace:
        return KeySpace(exprs=self.source_side.key, types=self.key_types, order=self.order)

    def _target_space(self, alias: str | None = None) -> KeySpace:
        return KeySpace(exprs=[sql.Identifier(*([alias] if alias else []), k)
                               for k in self.rec.target.key],
                        types=self.key_types, order=self.order)

    def _target_key_json(self) -> sql.Composable:
        """A target row's key as JSON rendered as the source's (each column cast to its source
        column's type, as a diff renders it): a ``numeric(12,2)`` key 9.00 under a ``bigint``
        one is ``[9]``, which the source can be asked for."""
        return self._target_key().as_json

    def _target_key(self) -> KeySpace:
        return KeySpace(exprs=self.target_side.key, types=self.key_types)

    def _stage_space(self) -> KeySpace:
        """The stage's key, as the stage aliased ``s`` holds it."""
        return KeySpace(exprs=[sql.Identifier("s", f"trueup_k{i}")
                               for i in range(len(self.key_types))], types=self.key_types)

    # -- one chunk ---------------------------------------------------------------------------

    def repair(self, chunk: chunks.Chunk, ctx: ChunkContext) -> ChunkResult:
        try:
            return self._repair(chunk, ctx)
        except _DryRun as dry:
            return dry.args[0]  # type: ignore[no-any-return]
        except BaseException:
            for conn in (self.source, self.target, self.state):
                if not conn.closed:
                    conn.rollback()
            raise

    def _repair(self, chunk: chunks.Chunk, ctx: ChunkContext) -> ChunkResult:
        backfill = ctx.backfill
        # A key with a NULL part never meets its target row (= is never true): it would be
        # inserted again by every backfill. Such keys are not repaired.
        where = sql.SQL("({}) AND ({}) AND {}").format(
            scope_condition(self._source_space(), chunk.key_from, chunk.key_to, chunk.keys),
            day_filter(self.source_side, backfill.partition), self._source_space().complete)
        copied = self._copy_fresh(chunk, where, ctx)
        if copied is not None:
            return copied
        with self.target.transaction():
            rows = self._stage(where)
            ctx.heartbeat.check()
            candidates = self._candidates(chunk)
            orphans, seen = (self._orphans(chunk) if self._orphans_apply(backfill.scope)
                             else ([], []))
            if backfill.dry_run:
                planned = self.target.execute(sql.SQL(
                    "SELECT count(*) FILTER (WHERE trueup_action <> 'skipped') AS repaired, "
                    "count(*) FILTER (WHERE trueup_action = 'skipped') AS skipped FROM {}"
                ).format(_CAND)).fetchone()
                assert planned is not None
                repaired = int(planned["repaired"]) + len(orphans)
                skipped = int(planned["skipped"])
                with self.state.transaction():
                    chunks.complete(self.state, chunk, ctx.owner, counts=(repaired, skipped))
                raise _DryRun(ChunkResult(rows_read=rows, repaired=repaired, skipped=skipped))
            intent: Future[None] | None = None
            if not self.shared:
                # Intent first: it commits before the target does, so a crash in between still
                # leaves these rows. Recorded while the target writes, when the candidates are
                # few enough to hold in memory.
                if candidates <= INTENT_IN_MEMORY_ROWS:
                    intent = self.recorder.submit(self._record_intent, ctx, chunk, orphans,
                                                  candidate_rows(self.target))
                else:
                    self._record_intent(ctx, chunk, orphans, None)
            try:
                changed = self._write()
                deleted = self._delete(orphans, seen)
            finally:
                if intent is not None:
                    wait([intent])  # then the state connection is this thread's again
            if intent is not None:
                intent.result()  # its error, if it failed: the target rolls back
            changed += [a for a, p in zip(deleted, orphans, strict=True) if a != p]
            ctx.heartbeat.check()
            if self.shared:
                self._correct(changed)
                self.target.execute(query("stage_repairs"))
                self.target.execute(sql.SQL(
                    "INSERT INTO trueup_repairs_stage SELECT {} FROM {}").format(
                        _REPAIR_COLUMNS, _CAND))
                record_staged(self.target, backfill, chunk)
                record_repairs(self.target, backfill, chunk, deleted)
                repaired, skipped = chunks.complete(self.target, chunk, ctx.owner)
        if not self.shared:
            with self.state.transaction():
                # corrections of the intent rows written above
                record_repairs(self.state, backfill, chunk, changed, again=True)
                repaired, skipped = chunks.complete(self.state, chunk, ctx.owner)
        return ChunkResult(rows_read=rows, repaired=repaired, skipped=skipped)

    def _copy_fresh(self, chunk: chunks.Chunk, where: sql.Composable,
                    ctx: ChunkContext) -> ChunkResult | None:
        """Repair a fresh chunk (see :meth:`_fresh`) by one ``COPY`` from the source into the
        target, the repairs rows (all inserts) streaming into the state database meanwhile and
        committed before the target commits, as the intent of the compare path is; None, with
        nothing written, when the chunk is not fresh or stopped being so: a row with one of its
        keys arrived meanwhile (the COPY meets it), or a trigger kept a row out. The compare
        path then repairs it, and finds and corrects the repairs rows of any attempt that
        committed its intent but not the target. The rows go in in key order, as the compare
        path writes them; should a projection's transaction writing several keys take them in
        another order, the deadlock it meets rolls the chunk back to the compare path too."""
        backfill = ctx.backfill
        try:
            with self.target.transaction():
                if not self._fresh(chunk, backfill):
                    return None
                if self.shared:  # one connection: the repairs rows wait for the target's COPY
                    held: list[bytes] = []
                    size = 0

                    def hold(repairs: bytes) -> None:
                        nonlocal size  # a chunk may have grown since it was planned
                        held.append(repairs)
                        size += len(repairs)
                        if size > INTENT_IN_MEMORY_BYTES:
                            raise _TooMany

                    rows = self._copy_rows(where, hold, b"\n")
                    counts = (rows, 0) if record_text(
                        self.target, backfill, chunk, b"".join(held)) else None
                    done = chunks.complete(self.target, chunk, ctx.owner, counts=counts)
                else:
                    with self.state.transaction():
                        with new_repairs(self.state, backfill, chunk) as (copy, end):
                            rows = self._copy_rows(where, copy.write, end)
                        # fenced by the lease from here to the commit, not during the copy:
                        # meanwhile the heartbeat renews it (it waits for this row lock)
                        ctx.heartbeat.hold(self.state)
                ctx.heartbeat.check()
        except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected,
                _KeptOut, _TooMany) as exc:
            log.info("backfill.chunk_not_fresh", backfill_id=backfill.backfill_id,
                     chunk=chunk.chunk, reason=type(exc).__name__)
            return None
        if not self.shared:
            with self.state.transaction():
                done = chunks.complete(self.state, chunk, ctx.owner, counts=(rows, 0))
        return ChunkResult(rows_read=rows, repaired=done[0], skipped=done[1])

    def _fresh(self, chunk: chunks.Chunk, backfill: Backfill) -> bool:
        """Whether a COPY may repair the chunk: it writes (no dry run) columns the target takes
        as the source writes them (:meth:`_copies_as_is`), the target holds no row in its
        scope (asked through the key index) and it holds no repairs rows yet. Held by a shared
        database's single connection, its repairs rows must fit in memory."""
        space = self._target_space("t")
        if (backfill.dry_run or not self.copies_as_is
                or not space.indexed(ranges=chunk.keys is None)
                or (self.shared and chunk.rows_planned > INTENT_IN_MEMORY_ROWS)):
            return False
        held = self.target.execute(sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {} AS t WHERE {}) AS held").format(
                self.target_side.relation,
                scope_condition(space, chunk.key_from, chunk.key_to, chunk.keys))).fetchone()
        assert held is not None
        # repairs rows are only an earlier attempt's: a first one need not ask
        return not held["held"] and not (chunk.attempts > 1 and chunk_has_repairs(
            self.target if self.shared else self.state, chunk))

    def _copy_rows(self, where: sql.Composable, record: Callable[[bytes], object],
                   end: bytes) -> int:
        """COPY the source rows of ``where`` into the target in key order, handing their
        repairs rows (COPY text, each line ended by ``end``) to ``record`` on the way; how many
        went in."""
        st = self.source_side
        columns = [self._source_space().repairs_text, st.fingerprint, *st.key,
                   *([st.version] if self._versioned and st.version is not None else []),
                   *(sql.Identifier(c) for c in self.rec.source.columns)]
        # ORDER BY the key's positions: a bare name there is an output column's first (a key
        # column named hashtextextended would be the fingerprint's)
        out = sql.SQL("COPY (SELECT {} FROM {} WHERE {} ORDER BY {}) TO STDOUT").format(
            sql.SQL(", ").join(columns), st.relation, where,
            sql.SQL(", ").join(sql.Literal(3 + i) for i in range(len(st.key))))
        into = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self.target_side.relation, sql.SQL(", ").join(map(sql.Identifier, self._written())))
        read = 0

        def hand_on(lines: bytes) -> None:
            nonlocal read
            rows, repairs, n = split_fresh(lines, end)
            if n:
                writer.write(rows)
                record(repairs)
                read += n

        with self.source.cursor() as src, self.target.cursor() as dst:
            with src.copy(out) as reader, dst.copy(into) as writer:
                buffer = bytearray()
                for block in reader:
                    buffer += block
                    if len(buffer) >= SPLIT_BYTES:
                        whole = buffer.rfind(b"\n") + 1  # a block is a row: this is the end
                        hand_on(bytes(buffer[:whole]))
                        del buffer[:whole]
                if buffer and not buffer.endswith(b"\n"):
                    raise TrueupError("source COPY data ended inside a row")
                hand_on(bytes(buffer))
            if dst.rowcount != read:
                raise _KeptOut  # a trigger kept rows out: the compare path says which
        return read

    def _record_intent(self, ctx: ChunkContext, chunk: chunks.Chunk,
                       orphans: Sequence[Repair], candidates: bytes | None) -> None:
        """Commit the repairs rows of the candidates, with their expected actions, and of the
        orphans, fenced by the chunk's lease. ``candidates``: their COPY data, read already;
        None: piped from the target now."""
        state = self.state
        with state.transaction():
            ctx.heartbeat.hold(state)
            if candidates is not None:
                record_text(state, ctx.backfill, chunk, candidates)
            else:
                with staging(state) as writer, self.target.cursor() as src, \
                        src.copy(CANDIDATES_OUT) as reader:
                    pipe(reader, writer)
                record_staged(state, ctx.backfill, chunk)
            record_repairs(state, ctx.backfill, chunk, orphans)

    def _correct(self, changed: Sequence[Repair]) -> None:
        """Candidates whose write turned out otherwise than expected (the guard refused)."""
        for repair in changed:  # by the key's text as the target rendered it: exact
            self.target.execute(sql.SQL(
                "UPDATE {} SET trueup_action = %s WHERE trueup_key::text = %s").format(_CAND),
                (repair.action.value, repair.text or repairs_text(repair.key)))

    def _orphans_apply(self, scope: BackfillScope) -> bool:
        # A partition is a window of the source's updated_at: target rows have no such column.
        return self.with_orphans and scope is not BackfillScope.PARTITION

    def _stage(self, where: sql.Composable) -> int:
        st = self.source_side
        columns: list[sql.Composable] = [
            sql.SQL("{}::{}").format(k, storage_type(t))
            for k, t in zip(st.key, st.key_types, strict=True)]
        if st.version is not None and st.version_type is not None:
            columns.append(st.version)
        source_cols = [sql.Identifier(c) for c in self.rec.source.columns]
        columns += [sql.SQL("({})::{}").format(c, storage_type(t))
                    for c, t in zip(source_cols, self.column_types, strict=True)]
        columns.append(st.fingerprint)
        out = sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT").format(
            sql.SQL(", ").join(columns), st.relation, where)
        with self.source.cursor() as src, self.target.cursor() as dst:
            with src.copy(out) as reader, dst.copy(sql.SQL("COPY {} FROM STDIN").format(
                    _STAGE)) as writer:
                pipe(reader, writer)
            return max(dst.rowcount, 0)

    def _join(self) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("t.{} = s.{}").format(sql.Identifier(k), n)
            for k, n in zip(self.rec.target.key, _names("k", len(self.key_types)), strict=True))

    def _candidates(self, chunk: chunks.Chunk) -> int:
        """Stage rows the target lacks or holds differently, with the action expected; how many.

        The target is read within the chunk's scope when its key index serves that: a join to
        the whole table lets the planner choose a scan of it, whose cost grows with every chunk
        the backfill writes. (A target row the scope missed would only make an expected insert
        an actual update, which the write's outcome corrects.)"""
        ts = self.target_side
        # The target's rows in a subquery of their own, its columns given trueup's names: a
        # target column named like a stage column (trueup_fp, trueup_k0) stays out of reach.
        # (Its fingerprint is computed at the scan: for every row a hash join would read,
        # when the scope cannot use the index; the planner probes the index instead.)
        keys = _names("t", len(self.key_types))
        held = [sql.SQL("t.{} AS {}").format(sql.Identifier(k), n)
                for k, n in zip(self.rec.target.key, keys, strict=True)]
        held.append(sql.SQL("{} AS trueup_tfp").format(ts.fingerprint))
        first = sql.SQL("t.{}").format(keys[0])
        differs: list[sql.Composable] = [sql.SQL("{} IS NULL").format(first),
                                         sql.SQL("t.trueup_tfp IS DISTINCT FROM s.trueup_fp")]
        action: sql.Composable = sql.SQL("'update'")
        if self._versioned:
            assert ts.version is not None
            held.append(sql.SQL("{} AS trueup_tv").format(ts.version))
            differs.append(sql.SQL("t.trueup_tv IS DISTINCT FROM s.trueup_v"))
            action = sql.SQL("CASE WHEN t.trueup_tv > s.trueup_v THEN 'skipped' "
                             "ELSE 'update' END")
        made = self.target.execute(sql.SQL(
            "CREATE TEMP TABLE {cand} ON COMMIT DROP AS "
            "SELECT s.*, {key} AS trueup_key, "
            "CASE WHEN {first} IS NULL THEN NULL ELSE t.trueup_tfp END AS trueup_before, "
            "CASE WHEN {first} IS NULL THEN 'insert' ELSE {action} END AS trueup_action "
            "FROM {stage} AS s LEFT JOIN (SELECT {held} FROM {target} AS t WHERE {scope}) AS t "
            "ON {join} WHERE {differs}"
        ).format(cand=_CAND, first=first, action=action, stage=_STAGE,
                 key=self._stage_space().repairs_key,
                 held=sql.SQL(", ").join(held), target=ts.relation,
                 scope=self._indexed_scope(chunk),
                 join=sql.SQL(" AND ").join(
                     sql.SQL("t.{} = s.{}").format(t, k)
                     for t, k in zip(keys, _names("k", len(self.key_types)), strict=True)),
                 differs=sql.SQL(" OR ").join(differs)))
        return max(made.rowcount, 0)

    def _indexed_scope(self, chunk: chunks.Chunk) -> sql.Composable:
        space = self._target_space("t")
        if not space.indexed(ranges=chunk.keys is None):
            return sql.SQL("true")  # the index cannot serve it: a filter costs more than probes
        return scope_condition(space, chunk.key_from, chunk.key_to, chunk.keys)

    def _written(self) -> list[str]:
        """The target columns a repair writes: key, version (when both sides have one), the
        columns compared."""
        rec = self.rec
        return [*rec.target.key,
                *([rec.target.version] if self._versioned and rec.target.version else []),
                *(rec.target.columns[c] for c in rec.source.columns)]

    def _write(self) -> list[Repair]:
        """Upsert the candidates under the version guard; the candidates whose actual action
        differs from the expected one (a newer row arrived meanwhile)."""
        rec, ts = self.rec, self.target_side
        target_cols = self._written()
        stage_cols = [*_names("k", len(self.key_types)),
                      *([sql.Identifier("trueup_v")] if self._versioned else []),
                      *_names("c", len(rec.source.columns))]
        values = sql.SQL(", ").join(
            self._as_target(s, t, k)
            for s, t, k in zip(stage_cols, target_cols, self._written_types(), strict=True))
        updated = target_cols[len(rec.target.key):]
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in updated)
        guard: sql.Composable = sql.SQL("")
        if self._versioned:
            assert rec.target.version is not None
            guard = sql.SQL(" WHERE trueup_t.{} IS NULL OR {} <= {}").format(
                sql.Identifier(rec.target.version), self._guarded_version("trueup_t"),
                self._guarded_version("excluded"))
        conflict = (sql.SQL("DO UPDATE SET {}{}").format(updates, guard) if updated
                    else sql.SQL("DO NOTHING"))
        stage_keys = _names("k", len(self.key_types))
        cols = sql.SQL(", ").join(map(sql.Identifier, target_cols))
        order = sql.SQL(", ").join(stage_keys)
        if self._insert_new(cols, values, order):
            return []  # every write was an expected insert, and went in as one
        # Written rows come back by their key columns, matched to the candidates as written
        # (cast to the target's types): cheaper than matching keys as jsonb.
        returned = [sql.Identifier(f"trueup_r{i}") for i in range(len(stage_keys))]
        written = sql.SQL(" AND ").join(
            sql.SQL("up.{} = c.{}::{}").format(r, k, self._target_type(t))
            for r, k, t in zip(returned, stage_keys, rec.target.key, strict=True))
        rows = self.target.execute(sql.SQL(
            "WITH up AS (INSERT INTO {target} AS trueup_t ({cols}) SELECT {values} FROM {cand} "
            "WHERE trueup_action <> 'skipped' ORDER BY {order} "
            "ON CONFLICT ({keys}) {conflict} "
            "RETURNING {returning}, (xmax = 0) AS trueup_inserted), "
            "outcome AS (SELECT c.trueup_key, c.trueup_key::text AS trueup_text, "
            "c.trueup_action, c.trueup_before, c.trueup_fp, "
            "CASE WHEN up.{first} IS NULL THEN 'skipped' WHEN up.trueup_inserted THEN 'insert' "
            "ELSE 'update' END AS actual FROM {cand} AS c LEFT JOIN up ON {written}) "
            "SELECT * FROM outcome WHERE actual <> trueup_action"
        ).format(target=ts.relation, cols=cols, values=values, cand=_CAND,
                 order=order,
                 keys=sql.SQL(", ").join(map(sql.Identifier, rec.target.key)),
                 conflict=conflict, returning=sql.SQL(", ").join(
                     sql.SQL("trueup_t.{} AS {}").format(sql.Identifier(k), r)
                     for k, r in zip(rec.target.key, returned, strict=True)),
                 first=returned[0], written=written)).fetchall()
        return [Repair(key=r["trueup_key"], action=RepairAction(r["actual"]),
                       fingerprint_before=r["trueup_before"],
                       fingerprint_after=r["trueup_before"] if r["actual"] == "skipped"
                       else r["trueup_fp"], text=r["trueup_text"])
                for r in rows]

    def _guarded_version(self, alias: str) -> sql.Composable:
        """The target's version column of row ``alias`` as the version guard compares it: as
        the type a diff compares the versions as, so a text ``'9'`` is older than a source's 10
        (as text it sorts after ``'10'``) and ``'11'`` newer than 2."""
        version, compared = self.rec.target.version, self.target_side.version_type
        assert version is not None and compared is not None
        column = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(version))
        if self.target_types[version][1] == compared.name:
            return column
        return sql.SQL("({})::{}").format(column, storage_type(compared))

    def _written_types(self) -> list[ColumnType]:
        """The source type of each value a repair writes, in :meth:`_written` order."""
        st = self.source_side
        version = [st.version_type] if self._versioned and st.version_type else []
        return [*st.key_types, *version, *self.column_types]

    def _as_target(self, staged: sql.Composable, column: str,
                   source: ColumnType) -> sql.Composable:
        """A staged value of ``source``'s type as the target column takes it, so that a diff
        reads it back as the source's value: a number, bool, time or uuid into a JSON column
        as its JSON (text is taken for a document, as a cast reads it); a double or real into
        a ``numeric`` column exactly (a cast keeps 15 or 6 digits)."""
        target, name = self._target_type(column), self.target_types[column][1]
        as_json = source.kind not in (Kind.JSON, Kind.TEXT) or source.name == "uuid"
        if name in ("json", "jsonb") and as_json:
            return sql.SQL("to_jsonb({})::{}").format(staged, target)
        if name == "numeric" and source.name in ("float4", "float8"):
            return sql.SQL("{}::{}").format(exact_numeric(staged), target)
        if source.kind is Kind.BOOL and name in _NUMBER_TYPES:
            # as 1 or 0, which a diff reads back as true or false (only integer has a cast)
            return sql.SQL("({})::int4::{}").format(staged, target)
        return sql.SQL("{}::{}").format(staged, target)

    def _insert_new(self, cols: sql.Composable, values: sql.Composable,
                    order: sql.Composable) -> bool:
        """When every candidate to write is an expected insert (the target lacked its key),
        insert them by a plain INSERT: half the work of a speculative one per row (1 against
        2 us). True when all went in; else nothing did, and the guarded upsert is left to it.

        A chunk that also updates is left to the guarded upsert: one statement in key order,
        which takes its row locks in the order a projection writing several keys at once does.
        A unique violation (a row with one of the keys arrived since, or another unique value)
        or a row a trigger kept out sends them there too, which says what became of each."""
        counts = self.target.execute(sql.SQL(
            "SELECT count(*) FILTER (WHERE trueup_action = 'insert') AS inserts, "
            "count(*) FILTER (WHERE trueup_action = 'update') AS updates FROM {}").format(
                _CAND)).fetchone()
        assert counts is not None
        if counts["updates"] or not counts["inserts"]:
            return False
        try:
            with self.target.transaction():  # a savepoint
                inserted = self.target.execute(sql.SQL(
                    "INSERT INTO {target} ({cols}) SELECT {values} FROM {cand} "
                    "WHERE trueup_action = 'insert' ORDER BY {order}").format(
                        target=self.target_side.relation, cols=cols, values=values,
                        cand=_CAND, order=order)).rowcount
                if inserted != counts["inserts"]:
                    raise _KeptOut
            return True
        except (psycopg.errors.UniqueViolation, _KeptOut):
            return False

    def _orphans(self, chunk: chunks.Chunk) -> tuple[list[Repair], list[str]]:
        """Target rows of the chunk without a source row, confirmed by asking the source; and
        the version of each row seen (its ``xmin``, in the same order), which is all
        :meth:`_delete` may delete. Keys travel exactly (read with Decimal numbers): a key a
        double cannot hold (0.30000000000000001) must not be taken for another (0.3)."""
        ts = self.target_side
        space = self._target_space()
        candidates = self.target.execute(sql.SQL(
            "SELECT ({key})::text AS key, ({text})::text AS text, {fp} AS fp, {seen} AS seen "
            "FROM {target} AS t "
            "WHERE {scope} AND {complete} AND NOT EXISTS (SELECT 1 FROM {stage} AS s WHERE {join})"
        ).format(key=self._target_key_json(), text=self._target_key().repairs_key,
                 fp=ts.fingerprint, seen=_ROW_SEEN,
                 target=ts.relation,
                 complete=space.complete,
                 scope=scope_condition(space, chunk.key_from, chunk.key_to, chunk.keys),
                 stage=_STAGE, join=self._join())).fetchall()
        if not candidates:
            return [], []
        keys = [loads(r["key"]) for r in candidates]
        held = {r["n"] for r in self.source.execute(self._source_space().held(
            self.source_side.relation, keys))}
        self.source.commit()
        orphans = [(r, key) for n, (r, key) in enumerate(zip(candidates, keys, strict=True), 1)
                   if n not in held]
        return ([Repair(key=key, action=RepairAction.DELETE, fingerprint_before=r["fp"],
                        fingerprint_after=None, text=r["text"]) for r, key in orphans],
                [r["seen"] for r, _ in orphans])

    def _delete(self, orphans: Sequence[Repair], seen: Sequence[str]) -> list[Repair]:
        """Delete the orphans still as they were seen: a row written meanwhile (its key came
        back to the source, and its projection wrote it, even with the same values) is left
        alone, counted skipped. A row is the one seen while its ``xmin`` is: every write of a
        row makes a new one (a DELETE waiting for a writer checks the row the writer left)."""
        if not orphans:
            return []
        space = self._target_space()
        deleted = {r["text"] for r in self.target.execute(sql.SQL(
            "DELETE FROM {rel} AS t WHERE {keys} AND ({key}, {row}) IN ("
            "SELECT j -> 0, j ->> 1 FROM jsonb_array_elements({seen}::jsonb) "
            "AS trueup_seen (j)) "
            "RETURNING ({text})::text AS text").format(
                rel=self.target_side.relation, keys=space.in_list([o.key for o in orphans]),
                key=self._target_key_json(), row=_ROW_SEEN,
                text=self._target_key().repairs_key,
                seen=sql.Literal(json_text([[o.key, row] for o, row in zip(
                    orphans, seen, strict=True)]))))}
        return [o if o.text in deleted else
                Repair(key=o.key, action=RepairAction.SKIPPED,
                       fingerprint_before=o.fingerprint_before, fingerprint_after=None,
                       text=o.text)
                for o in orphans]
