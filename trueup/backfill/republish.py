"""The ``republish`` repair of a Kafka target topic.

Each chunk reads the *current* source rows and produces them as the contract's messages: the
key value as text (a JSON array for a composite key), a JSON object value holding the target's
key, version and column fields (built by Postgres, so numbers stay exact), and a tombstone for
an orphan. The producer is idempotent with ``acks=all``; the chunk completes (and its repairs
rows commit) only after every delivery report succeeded.

The "before" of a key comes from the topic's mirror (``trueup_mirror.<name>``, kept by
``trueup diff``) when there is one: then only keys whose mirror row differs are produced, a key
whose mirror version is newer than the source is skipped, and mirror keys the source lacks
(asked again at that moment) get tombstones. Without a mirror every source row is produced.
"""

from __future__ import annotations

import json
import operator
import queue
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing
from decimal import Decimal
from enum import Enum
from functools import partial
from itertools import islice
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from trueup import threads
from trueup.backfill import chunks
from trueup.backfill.keyspace import KeySpace, json_text, repairs_text, scope_condition
from trueup.backfill.model import (
    Backfill,
    ChunkContext,
    ChunkResult,
    RepairRow,
    record_rows,
    source_side,
)
from trueup.brokers.kafka import (
    Deliveries,
    confirm,
    connect_admin,
    create_producer,
    produce_all,
    topic_partitions,
)
from trueup.config import Config, ReconciliationConfig
from trueup.db import connect
from trueup.errors import NotFound
from trueup.fingerprint import INTEGER_TYPES, Kind, loads
from trueup.log import get_logger
from trueup.mirror import SCHEMA
from trueup.sides import day_filter, version_order
from trueup.staging import MAX_NAME_BYTES
from trueup.statuses import BackfillScope, KeyOrder, RepairAction

log = get_logger(__name__)


#: A mirror row of a chunk: version, fingerprint, key as JSON, message key.
_MirrorRow = tuple[Any, int, str, str]


class _KeyForm(Enum):
    """How _source_rows gives a row's key, and _classify completes it. Keys of integers: jsonb's
    text is their text in trueup.repairs (and a composite key's message key), and a single
    one's message key is its own text: ``[`` + that + ``]`` is its jsonb text, for less work on
    the source server than rendering both (0.7 us a row). Other keys come as jsonb's text
    (their repairs text but for numbers' trailing zeros), a single one with its message key as
    Postgres writes the value; a composite one's message key is jsonb's text."""

    INTEGER = "one integer column: the message key only"
    INTEGERS = "several integer columns: jsonb's text only"
    OTHER = "jsonb's text, and a single column's message key"


#: Source rows a chunk hands on at once: their repairs rows are recorded while the next batch
#: is read and produced. The first is smaller, so producing starts sooner: a chunk waited
#: 4.8 ms for its first 2,000 rows, now 1.3 ms for 250.
READ_BATCH = 2_000
FIRST_BATCH = 250
#: Rows per result the source streams (libpq's chunked mode needs libpq 17, which the
#: psycopg[binary] wheel bundles; an older one gets one row per result, slower but right).
STREAM_ROWS = 250 if psycopg.capabilities.has_stream_chunked() else 1
#: How long a chunk left mid-read waits for the source to take its cancel request.
CANCEL_TIMEOUT_SECONDS = 5.0
#: Rounds of catching up with the source (see RepublishWriter._catch_up) before a chunk
#: completes with keys still changing under it.
CATCH_UP_ROUNDS = 5


class _Recording:
    """A chunk's repairs rows, recorded on the recorder's thread as batches are added, in
    the caller's transaction on ``conn`` (which is the recorder's until the end of the
    ``with``: :meth:`finish`, or leaving it on an error, waits for the recorder)."""

    def __init__(self, recorder: ThreadPoolExecutor, conn: psycopg.Connection[Any],
                 backfill: Backfill, chunk: chunks.Chunk) -> None:
        self._recorder = recorder
        self._record = partial(record_rows, conn, backfill, chunk)
        self._batches: queue.SimpleQueue[list[RepairRow] | None] = queue.SimpleQueue()
        self._done: Future[bool] | None = None

    def add(self, rows: list[RepairRow]) -> None:
        if not rows:
            return
        if self._done is None:  # started by the first rows: a chunk with none records none
            self._done = self._recorder.submit(self._record, self._rows())
        elif self._done.done():
            self._done.result()  # the recorder failed: raise its error now
        self._batches.put(rows)

    def _rows(self) -> Iterator[RepairRow]:
        while (batch := self._batches.get()) is not None:
            yield from batch

    def finish(self) -> bool:
        """Wait until every row added is recorded; raise the recorder's error if it failed.
        Return whether every row was new to the chunk (see record_rows)."""
        if self._done is None:
            return True
        self._batches.put(None)
        done, self._done = self._done, None
        wait([done])
        return done.result()

    def __enter__(self) -> _Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._done is not None:  # an error: stop the recorder before the rollback
            self._batches.put(None)
            wait([self._done])


class RepublishWriter:
    """Produces chunks of one reconciliation to its topic (one per worker)."""

    def __init__(self, config: Config, name: str, rec: ReconciliationConfig,
                 state: psycopg.Connection[Any], *, order: KeyOrder = KeyOrder.C) -> None:
        assert rec.target.topic is not None
        self.name = name
        self.rec = rec
        self.topic = rec.target.topic
        self.state = state
        self.stack = ExitStack()
        dsn = config.connections[rec.source.connection].postgres
        properties = config.connections[rec.target.connection].kafka
        assert dsn is not None and properties is not None
        self.source = self.stack.enter_context(connect(
            dsn, what="source", autocommit=True, application_name=f"trueup backfill {name}"))
        self.side = source_side(self.source, rec, dsn)
        self.order = order  # how the backfill's key ranges compare text keys
        self.space = KeySpace(exprs=self.side.key, types=self.side.key_types, order=order)
        integers = all(t.name in INTEGER_TYPES for t in self.side.key_types)
        # a key with a numeric or JSON part: its repairs row's text trims the numbers (see
        # _classify)
        self.plain_numbers = any(t.name == "numeric" or t.kind is Kind.JSON
                                 for t in self.side.key_types)
        # How a source row's key comes out of _source_rows (see there)
        self.key_form = (_KeyForm.OTHER if not integers else
                         _KeyForm.INTEGER if len(self.side.key_types) == 1 else
                         _KeyForm.INTEGERS)
        what = f"reconciliations.{name}.target"
        # A broker that creates topics on use would make a deleted topic again, with its own
        # partition count: the keys would land in other partitions than their history.
        if topic_partitions(connect_admin(dict(properties), what=what), self.topic,
                            what=what) is None:
            raise NotFound(f"{what}: topic {self.topic!r} does not exist (a backfill "
                           f"republishes into it and creates no topic)")
        self.producer = create_producer(dict(properties), what=what)
        self.what = f"topic {self.topic}"
        # whether the source's rows tell by their xmin that they changed (see _unchanged): a
        # table's, a partitioned table's and a materialized view's do; a view has no xmin,
        # and a foreign table's rows have none of their own (postgres_fdw gives each 0,
        # which age() takes for infinitely old)
        kind = self.source.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass",
                                   (self.side.relation.as_string(self.source),)).fetchone()
        self._by_xmin = kind is not None and kind["relkind"] in ("r", "p", "m")
        # records a chunk's repairs rows in the state database while this thread produces
        self.recorder = self.stack.enter_context(
            threads.executor(1, "trueup-repairs"))
        # reads the next batch of source rows while this thread produces the last one's
        self.reader = self.stack.enter_context(
            threads.executor(1, "trueup-source"))

    def close(self) -> None:
        self.producer.flush(10)
        self.stack.close()

    def _fields(self) -> list[tuple[str, sql.Composable]]:
        """The message value's fields: (the target's field name, the source expression)."""
        rec, side = self.rec, self.side
        fields: list[tuple[str, sql.Composable]] = list(zip(rec.target.key, side.key,
                                                            strict=True))
        if rec.target.version is not None and side.version is not None:
            fields.append((rec.target.version, side.version))
        fields += [(rec.target.columns[c], sql.Identifier(c)) for c in rec.source.columns]
        return fields

    def _rows_query(self, where: sql.Composable, key: sql.Composable,
                    kafka_key: sql.Composable) -> sql.Composed:
        """The source rows of ``where`` as _source_rows gives them. The inner query reads the
        table under its own column names; the outer one names each field's value as the target
        does and renders it with ``row_to_json``: a third cheaper than ``json_build_object``,
        which looks up each argument's type on every row, and 0.4 us a row cheaper than a
        scalar subquery per row.
        The outer query names only trueup's own columns, so no field name can clash with a
        source column. Names too long for a column take ``json_build_object``."""
        fields = self._fields()
        inner = [sql.SQL("{} AS {}").format(expr, sql.Identifier(f"trueup_f{n}"))
                 for n, (_, expr) in enumerate(fields)]
        values = [(name, sql.SQL("trueup_row.{}").format(sql.Identifier(f"trueup_f{n}")))
                  for n, (name, _) in enumerate(fields)]
        value: sql.Composable
        lateral: sql.Composable
        if all(len(name.encode()) <= MAX_NAME_BYTES for name, _ in values):
            value = sql.SQL("row_to_json(trueup_fields.*)::text")
            lateral = sql.SQL(" CROSS JOIN LATERAL (SELECT {}) AS trueup_fields").format(
                sql.SQL(", ").join(sql.SQL("{} AS {}").format(ref, sql.Identifier(name))
                                   for name, ref in values))
        else:
            value = sql.SQL("json_build_object({})::text").format(sql.SQL(", ").join(
                sql.SQL("{}, {}").format(sql.Literal(name), ref) for name, ref in values))
            lateral = sql.SQL("")
        # in key order, named by the outer query: inside, a bare name would be matched to the
        # inner query's output names first (the key fields come first)
        order = KeySpace(exprs=[ref for _, ref in values[:len(self.side.key)]],
                         types=self.side.key_types, order=self.order).ordered
        return sql.SQL(
            "SELECT trueup_row.trueup_key, trueup_row.trueup_kafka_key, {value}, "
            "trueup_row.trueup_version, trueup_row.trueup_fp "
            "FROM (SELECT {key} AS trueup_key, {kafka_key} AS trueup_kafka_key, "
            "{version} AS trueup_version, {fp} AS trueup_fp, {inner} "
            "FROM {rel} WHERE {where}) AS trueup_row{lateral} ORDER BY {order}"
        ).format(value=value, key=key, kafka_key=kafka_key,
                 version=self.side.version or sql.NULL, fp=self.side.fingerprint,
                 inner=sql.SQL(", ").join(inner), rel=self.side.relation, where=where,
                 lateral=lateral, order=order)

    def _chunk_rows(self, chunk: chunks.Chunk, backfill: Backfill) -> sql.Composable:
        """The chunk's source rows (of the backfill's day, if any). Keys with a NULL part are
        not repaired (as by upsert): no message key to give them."""
        return sql.SQL("({}) AND ({}) AND {}").format(
            scope_condition(self.space, chunk.key_from, chunk.key_to, chunk.keys),
            day_filter(self.side, backfill.partition), self.space.complete)

    def _day_keys(self, chunk: chunks.Chunk, backfill: Backfill) -> list[list[Any]]:
        """The keys of the chunk's source rows of its backfill's day, read exactly (a float
        would ask the mirror for 0.3 for 0.30000000000000001, and miss its version)."""
        with self.source.cursor(row_factory=tuple_row) as cur:
            return [loads(row[0]) for row in cur.execute(sql.SQL(
                "SELECT ({})::text FROM {} WHERE {}").format(
                    self.space.as_json, self.side.relation, self._chunk_rows(chunk, backfill)))]

    def _mirror(self, chunk: chunks.Chunk, keys: list[list[Any]] | None = None
                ) -> dict[str, _MirrorRow] | None:
        """The mirror's rows of ``chunk`` (of its ``keys`` only, when given): key as
        trueup.repairs holds it -> (version, fingerprint, key as JSON, message key); None
        without a mirror."""
        table = sql.Identifier(SCHEMA, self.name)
        exists = self.state.execute("SELECT to_regclass(%s) IS NOT NULL AS ok",
                                    (table.as_string(self.state),)).fetchone()
        if not exists or not exists["ok"]:
            return None
        space = KeySpace(exprs=[sql.Identifier(k) for k in self.rec.source.key],
                         types=self.side.key_types, order=self.order)
        version = sql.SQL("version") if self.side.version_type is not None and \
            self.rec.target.version else sql.NULL
        with self.state.cursor(row_factory=tuple_row) as cur:
            cur.execute(sql.SQL(
                "SELECT ({key})::text, {version}, fingerprint, {message_key}, ({repairs})::text "
                "FROM {table} WHERE {scope}"
            ).format(key=space.as_json, version=version, table=table,
                     repairs=space.repairs_key,
                     message_key=space.message_key,
                     scope=scope_condition(space, chunk.key_from, chunk.key_to,
                                           keys if keys is not None else chunk.keys)))
            return {repairs: (version, fingerprint, key, message_key)
                    for key, version, fingerprint, message_key, repairs in cur}

    def repair(self, chunk: chunks.Chunk, ctx: ChunkContext) -> ChunkResult:
        """Produce the chunk's rows a batch at a time; the repairs rows of each batch are
        recorded (on the recorder's thread) while the next one is read and produced, and
        committed with the chunk only once every message is acknowledged by all replicas."""
        backfill = ctx.backfill
        # A day's chunk spans every day's keys in its range: it reads the mirror's rows of the
        # day's keys only, at most a chunk's worth, not the range's.
        mirror = self._mirror(chunk, self._day_keys(chunk, backfill)
                              if backfill.scope is BackfillScope.PARTITION else None)
        deliveries = Deliveries()
        found: set[str] = set()
        sent: dict[str, tuple[Any, str]] = {}
        rows_read = repaired = skipped = 0
        # taken before the chunk's read: what changes after it, _catch_up finds
        horizon = None if backfill.dry_run else self._horizon()
        with ExitStack() as stack:
            recording: _Recording | None = None
            if not backfill.dry_run:
                stack.enter_context(self.state.transaction())
                recording = stack.enter_context(
                    _Recording(self.recorder, self.state, backfill, chunk))
            batches = stack.enter_context(closing(
                self._prefetched(self._source_rows(chunk, backfill))))
            for batch in batches:
                rows_read += len(batch)
                messages, repairs, batch_skipped = self._classify(batch, mirror, found, sent)
                repaired += len(repairs) - batch_skipped
                skipped += batch_skipped
                if recording is not None:
                    recording.add(repairs)
                    produce_all(self.producer, deliveries, self.topic, messages)
                ctx.heartbeat.check()
            batches.close()  # the source connection is this thread's again
            ctx.heartbeat.check()
            orphans = self._orphans(chunk, backfill.scope, found, mirror)
            repaired += len(orphans)
            if recording is None:
                with self.state.transaction():
                    repaired, skipped = chunks.complete(self.state, chunk, ctx.owner,
                                                        counts=(repaired, skipped))
                return ChunkResult(rows_read=rows_read, repaired=repaired, skipped=skipped)
            recording.add([(text, RepairAction.TOMBSTONE.value, before, None)
                           for _, before, _, text in orphans])
            produce_all(self.producer, deliveries, self.topic,
                        [(kafka_key, None) for _, _, kafka_key, _ in orphans])
            fresh = recording.finish()
            confirm(self.producer, deliveries, what=self.what)
            ctx.heartbeat.check()
            if not self._unchanged(self._chunk_rows(chunk, backfill), rows_read, horizon):
                self._catch_up(chunk, backfill, ctx, deliveries, sent, {
                    text: (key, kafka_key) for key, _, kafka_key, text in orphans})
            # A chunk's repairs rows commit only with its completion: when those recorded here
            # were all new, they are all it holds, and their counts are this chunk's.
            repaired, skipped = chunks.complete(
                self.state, chunk, ctx.owner, counts=(repaired, skipped) if fresh else None)
        return ChunkResult(rows_read=rows_read, repaired=repaired, skipped=skipped)

    def _prefetched(self, batches: Generator[list[tuple[Any, ...]], None, None]
                    ) -> Generator[list[tuple[Any, ...]], None, None]:
        """``batches``, each read on the reader's thread while the one before is used."""
        pending = self.reader.submit(next, batches, None)
        try:
            while (batch := pending.result()) is not None:
                pending = self.reader.submit(next, batches, None)
                yield batch
        finally:
            if not pending.done():  # left early (a failure, a lost lease): stop the read
                self._cancel_read()
            wait([pending])  # then the source connection is this thread's again
            batches.close()

    def _cancel_read(self) -> None:
        """Ask the source to cancel the statement the reader is streaming. When that fails (the
        server is unreachable, say), the read ends by itself, with an error or its last row."""
        try:
            self.source.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            log.warning("backfill.cancel_failed", reconciliation=self.name, error=str(exc))

    def _source_rows(self, chunk: chunks.Chunk, backfill: Backfill
                     ) -> Generator[list[tuple[Any, ...]], None, None]:
        """The chunk's current source rows, in batches of one snapshot: (key as jsonb's text,
        message key, message value, version, fingerprint), where the key's form leaves out
        what _classify derives (see _KeyForm)."""
        where = self._chunk_rows(chunk, backfill)
        key, kafka_key = self._key_columns()
        # One statement, streamed: the server goes on computing rows while they are used
        # (a named cursor's FETCH leaves it idle in between), and one snapshot holds them all.
        with self.source.cursor(row_factory=tuple_row) as cur, closing(cast(
                # a generator: closing it early cancels the rest of the query
                Generator[tuple[Any, ...], None, None],
                cur.stream(self._rows_query(where, key, kafka_key), size=STREAM_ROWS))) as rows:
            size = FIRST_BATCH
            while batch := list(islice(rows, size)):
                yield batch
                size = READ_BATCH

    def _key_columns(self) -> tuple[sql.Composable, sql.Composable]:
        """How _source_rows reads a row's key (see _KeyForm): jsonb's text, and the message
        key, each unless _key_texts derives it."""
        key = sql.NULL if self.key_form is _KeyForm.INTEGER else \
            sql.SQL("({})::text").format(self.space.as_json)
        # the message key as Postgres writes the value (a timestamp's, a numeric's scale),
        # not as JSON; a composite key's is jsonb's text, which `key` is already
        kafka_key = self.space.message_key if len(self.side.key) == 1 else sql.NULL
        return key, kafka_key

    def _key_texts(self, key: str | None, kafka_key: str | None) -> tuple[str, str]:
        """A key as _key_columns reads it: its text in trueup.repairs, exact (by it the
        mirror's rows are claimed, and orphans told from the rows read), and its message key."""
        form = self.key_form
        if form is _KeyForm.INTEGER:
            assert kafka_key is not None
            return f"[{kafka_key}]", kafka_key
        assert key is not None
        if form is _KeyForm.INTEGERS:
            return key, key
        kafka_key = kafka_key or key  # a composite key's: jsonb's text
        if self.plain_numbers:  # 9.00 is 9; jsonb's text is it for other types
            return repairs_text(json.loads(key, parse_float=Decimal)), kafka_key
        return key, kafka_key

    @property
    def _versioned(self) -> bool:
        return self.rec.target.version is not None and self.side.version is not None

    def _classify(self, batch: list[tuple[Any, ...]],
                  mirror: dict[str, _MirrorRow] | None, found: set[str],
                  sent: dict[str, tuple[Any, str]]
                  ) -> tuple[list[tuple[str, str]], list[RepairRow], int]:
        """The messages and repairs rows of a batch of source rows, and how many of those rows
        are skipped (the topic holds a newer version). ``found`` gains each row's repairs text,
        ``sent`` each produced row's (its version, or fingerprint unversioned, and its message
        key); ``mirror`` loses the rows the batch's keys claim."""
        versioned = self._versioned
        key_texts = self._key_texts
        publish, skip = RepairAction.PUBLISH.value, RepairAction.SKIPPED.value
        messages: list[tuple[str, str]] = []
        repairs: list[RepairRow] = []
        skipped = 0
        for key, kafka_key, value, version, fingerprint in batch:
            key, kafka_key = key_texts(key, kafka_key)
            found.add(key)
            known = mirror.pop(key, None) if mirror is not None else None
            before = None
            if known is not None:
                known_version, before, _, _ = known
                # as the upsert's guard: a topic's version beats a source row without one (and
                # versions order as Postgres orders them: NaN above every number)
                known_order, order = version_order(known_version), version_order(version)
                if versioned and known_order is not None and (
                        order is None or known_order > order):
                    repairs.append((key, skip, before, before))
                    skipped += 1
                    continue
                if before == fingerprint and (not versioned or known_order == order):
                    continue  # the topic already holds this row
            messages.append((kafka_key, value))
            repairs.append((key, publish, before, fingerprint))
            sent[key] = (version if versioned else fingerprint, kafka_key)
        return messages, repairs, skipped

    # -- catching up -------------------------------------------------------------------------

    def _catch_up(self, chunk: chunks.Chunk, backfill: Backfill, ctx: ChunkContext,
                  deliveries: Deliveries, sent: dict[str, tuple[Any, str]],
                  gone: dict[str, tuple[list[Any], str]]) -> None:
        """Produce again what changed in the source since the chunk read it: rows it produced
        whose version (fingerprint, unversioned) moved on or that were deleted, and keys it
        tombstoned that came back. A chunk produces a snapshot a while after reading it; a row
        the application changed meanwhile, and published itself, would otherwise end the
        key's messages with the chunk's older copy. Asked only once every copy is confirmed,
        until a round finds nothing moved: a change the source commits after that round is
        published by the application after the chunk's last copy. ``sent`` and ``gone`` are
        keyed by the repairs text, ``gone`` holding the key and its message key. The repairs
        rows of the keys produced again are corrected (their "before" stays)."""
        where = self._chunk_rows(chunk, backfill)
        for _ in range(CATCH_UP_ROUNDS):
            moved = self._moved(where, sent, gone)
            if not moved:
                return
            log.info("backfill.caught_up", reconciliation=self.name, chunk=chunk.chunk,
                     keys=len(moved))
            keys = [loads(text) for text in moved]
            where = sql.SQL("({}) AND {}").format(self.space.in_list(keys), self.space.complete)
            found: set[str] = set()
            sent = {}
            key, kafka_key = self._key_columns()
            with self.source.cursor(row_factory=tuple_row) as cur:
                rows = cur.execute(self._rows_query(where, key, kafka_key)).fetchall()
            messages, repairs, _ = self._classify(rows, None, found, sent)
            missing = [(text, key) for text, key in zip(moved, keys, strict=True)
                       if text not in found]
            held = {r["n"] for r in self.source.execute(self.space.held(
                self.side.relation, [key for _, key in missing]))} if missing else set()
            gone = {text: (key, moved[text]) for n, (text, key) in enumerate(missing, 1)
                    if n not in held}
            repairs += [(text, RepairAction.TOMBSTONE.value, None, None) for text in gone]
            produce_all(self.producer, deliveries, self.topic,
                        [*messages, *((kafka_key, None) for _, kafka_key in gone.values())])
            confirm(self.producer, deliveries, what=self.what)
            record_rows(self.state, backfill, chunk, repairs, again=True)
            ctx.heartbeat.check()
        if self._moved(where, sent, gone):
            log.warning("backfill.keys_still_changing", reconciliation=self.name,
                        chunk=chunk.chunk, rounds=CATCH_UP_ROUNDS,
                        hint="the next diff finds any key whose last message is not its row")

    def _horizon(self) -> str | None:
        """The oldest transaction still running on the source (its ``xmin``), for
        :meth:`_unchanged`; None where rows have no ``xmin`` of their own to compare (a view,
        a foreign table)."""
        if not self._by_xmin:
            return None
        row = self.source.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon").fetchone()
        assert row is not None
        return str(int(row["horizon"]) % 2**32)  # as a row's xmin is: 32 bits of it

    def _unchanged(self, where: sql.Composable, rows_read: int, horizon: str | None) -> bool:
        """Whether the rows of ``where`` are surely those a read that began after ``horizon``
        (see :meth:`_horizon`) found, ``rows_read`` of them: as many now, and none written by
        a transaction that had not ended when the read began (every such row's ``xmin``, or
        that of its subtransaction, is the horizon or later). Postgres keeps the ``xmin`` of
        unfrozen rows within 2**31 of the next one, so ``age()`` orders them (a frozen row
        past a wraparound may look newer: compared row by row, never missed). False when in
        doubt: then :meth:`_catch_up` compares row by row. A cheap question (one count over
        the chunk's rows on the source, 2 ms for 10,000) where comparing each row costs 30."""
        if horizon is None:
            return False
        row = self.source.execute(sql.SQL(
            # xmin 0: a foreign partition's row (postgres_fdw), which has none of its own
            "SELECT count(*) AS n, count(*) FILTER (WHERE xmin = '0'::xid "
            "OR age(xmin) <= age({}::xid)) AS newer FROM {} WHERE {}").format(
                sql.Literal(horizon), self.side.relation, where)).fetchone()
        assert row is not None
        return int(row["n"]) == rows_read and int(row["newer"]) == 0

    def _moved(self, where: sql.Composable, sent: dict[str, tuple[Any, str]],
               gone: dict[str, tuple[list[Any], str]]) -> dict[str, str]:
        """Of the keys produced (``sent``, rows of ``where``) and tombstoned (``gone``), those
        whose source row is not what was produced: repairs text -> message key."""
        moved: dict[str, str] = {}
        if sent:
            key, kafka_key = self._key_columns()
            mark = self.side.version if self._versioned else self.side.fingerprint
            assert mark is not None
            with self.source.cursor(row_factory=tuple_row) as cur:
                now = {self._key_texts(k, kk)[0]: m for k, kk, m in cur.execute(sql.SQL(
                    "SELECT {}, {}, {} FROM {} WHERE {}").format(
                        key, kafka_key, mark, self.side.relation, where))}
            same = (lambda a, b: version_order(a) == version_order(b)) if self._versioned \
                else operator.eq
            moved = {text: kafka_key for text, (was, kafka_key) in sent.items()
                     if text not in now or not same(now[text], was)}
        if gone:
            listed = list(gone.items())
            for row in self.source.execute(self.space.held(
                    self.side.relation, [key for _, (key, _) in listed])):
                text, (_, kafka_key) = listed[row["n"] - 1]
                moved[text] = kafka_key
        return moved

    def _orphans(self, chunk: chunks.Chunk, scope: BackfillScope, found: set[str],
                 mirror: dict[str, _MirrorRow] | None
                 ) -> list[tuple[list[Any], int | None, str, str]]:
        """Keys of the chunk the topic may hold but the source lacks, confirmed with it now,
        each with its fingerprint in the topic (if known), its message key and its text in
        trueup.repairs. ``found``: the repairs text of every source row read; ``mirror``: the
        mirror's rows the source rows did not claim. Keys are read exactly (a key a double
        cannot hold is no other key) and a difference's key as the source's type
        ("1.1000000000" is the source's 1.10); the source is asked for them by value."""
        if scope is BackfillScope.PARTITION:
            return []
        candidates: dict[str, tuple[list[Any], int | None, str]] = {}
        if mirror:
            candidates = {text: (loads(key), fingerprint, kafka_key)
                          for text, (_, fingerprint, key, kafka_key) in mirror.items()}
        if chunk.keys is not None and mirror is None:
            for key, text, kafka_key in self._rendered(chunk.keys):
                if text not in found:
                    candidates[text] = (key, None, kafka_key)
        if not candidates:
            return []
        listed = list(candidates.items())
        held = {r["n"] for r in self.source.execute(self.space.held(
            self.side.relation, [key for _, (key, _, _) in listed]))}
        return [(key, before, kafka_key, text)
                for n, (text, (key, before, kafka_key)) in enumerate(listed, 1) if n not in held]

    def _rendered(self, keys: Sequence[Sequence[Any]]) -> list[tuple[Any, str, str]]:
        """Each of ``keys`` (JSON values of a difference), its text in trueup.repairs and its
        message key, as Postgres writes the values read as the source's key types."""
        space = self.space.from_json()
        with self.source.cursor(row_factory=tuple_row) as cur:
            return [(key, text, kafka_key) for key, (text, kafka_key) in zip(keys, cur.execute(
                sql.SQL("SELECT ({})::text, {} FROM jsonb_array_elements(%s::jsonb) "
                        "WITH ORDINALITY AS e (j, n) ORDER BY n").format(
                            space.repairs_text, space.message_key), (json_text(keys),)),
                strict=True)]
