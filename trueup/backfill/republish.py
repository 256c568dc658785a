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
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from trueup.backfill import chunks
from trueup.backfill.keyspace import KeySpace, scope_condition
from trueup.backfill.model import (
    ChunkContext,
    ChunkResult,
    RepairRow,
    day_filter,
    key_text,
    record_rows,
    source_side,
)
from trueup.brokers.kafka import Deliveries, confirm, create_producer, produce
from trueup.config import Config, ReconciliationConfig
from trueup.db import connect
from trueup.mirror import SCHEMA
from trueup.statuses import BackfillScope, KeyOrder, RepairAction


def message_key(key: Sequence[Any]) -> str:
    """The Kafka key of a key (values as read back from jsonb)."""
    if len(key) == 1:
        value = key[0]
        return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(list(key), ensure_ascii=False)


#: A key of integers as jsonb renders it, which is also its canonical text (key_text).
_INTEGERS = re.compile(r"\[-?\d+(?:, -?\d+)*\]")


def keys_of(key_json: str) -> tuple[str, str]:
    """``(key_text, message_key)`` of a key given as jsonb's text: what parsing it and calling
    both would give, without parsing the common key of integers."""
    if _INTEGERS.fullmatch(key_json):
        return key_json, key_json if ", " in key_json else key_json[1:-1]
    key = json.loads(key_json)
    return key_text(key), message_key(key)


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
        self.side, _ = source_side(self.source, rec, dsn)
        self.order = order  # how the backfill's key ranges compare text keys
        self.space = KeySpace(exprs=self.side.key, types=self.side.key_types, order=order)
        self.producer = create_producer(dict(properties),
                                        what=f"reconciliations.{name}.target")
        self.what = f"topic {self.topic}"
        # records a chunk's repairs rows in the state database while this thread produces
        self.recorder = self.stack.enter_context(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="trueup-repairs"))

    def close(self) -> None:
        self.producer.flush(10)
        self.stack.close()

    def _value(self) -> sql.Composable:
        rec, side = self.rec, self.side
        pairs: list[sql.Composable] = []
        for field, expr in zip(rec.target.key, side.key, strict=True):
            pairs += [sql.Literal(field), expr]
        if rec.target.version is not None and side.version is not None:
            pairs += [sql.Literal(rec.target.version), side.version]
        for column in rec.source.columns:
            pairs += [sql.Literal(rec.target.columns[column]), sql.Identifier(column)]
        return sql.SQL("json_build_object({})::text").format(sql.SQL(", ").join(pairs))

    def _mirror(self, chunk: chunks.Chunk) -> dict[str, tuple[Any, int, str]] | None:
        """The mirror's rows of ``chunk``: key_text -> (version, fingerprint, key as JSON)."""
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
                "SELECT ({key})::text, {version}, fingerprint FROM {table} WHERE {scope}"
            ).format(key=space.as_json, version=version, table=table,
                     scope=scope_condition(space, chunk.key_from, chunk.key_to, chunk.keys)))
            return {keys_of(key)[0]: (version, fingerprint, key)
                    for key, version, fingerprint in cur}

    def repair(self, chunk: chunks.Chunk, ctx: ChunkContext) -> ChunkResult:
        backfill = ctx.backfill
        where = sql.SQL("({}) AND ({})").format(
            scope_condition(self.space, chunk.key_from, chunk.key_to, chunk.keys),
            day_filter(self.side, backfill.partition))
        # Keys as jsonb's text: a key of integers is used as it comes (keys_of), and the
        # repairs rows take that text whatever the key.
        with self.source.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(sql.SQL(
                "SELECT ({key})::text, {value}, {version}, {fp} "
                "FROM {rel} WHERE {where} ORDER BY {order}"
            ).format(key=self.space.as_json, value=self._value(),
                     version=self.side.version or sql.NULL, fp=self.side.fingerprint,
                     rel=self.side.relation, where=where, order=self.space.ordered)).fetchall()
        mirror = self._mirror(chunk)
        versioned = self.rec.target.version is not None and self.side.version is not None
        messages: list[tuple[str, str | None]] = []
        repairs: list[RepairRow] = []
        found: set[str] = set()
        skipped = 0
        for key, value, version, fingerprint in rows:
            text, kafka_key = keys_of(key)
            found.add(text)
            known = mirror.pop(text, None) if mirror is not None else None
            before = None
            if known is not None:
                known_version, before, _ = known
                if versioned and known_version is not None and version is not None \
                        and known_version > version:
                    repairs.append((key, RepairAction.SKIPPED.value, before, before))
                    skipped += 1
                    continue
                if before == fingerprint and (not versioned or known_version == version):
                    continue  # the topic already holds this row
            messages.append((kafka_key, value))
            repairs.append((key, RepairAction.PUBLISH.value, before, fingerprint))
        for key, before in self._orphans(chunk, backfill.scope, found, mirror):
            messages.append((message_key(key), None))
            repairs.append((json.dumps(key), RepairAction.TOMBSTONE.value, before, None))
        ctx.heartbeat.check()
        repaired = len(repairs) - skipped
        if backfill.dry_run:
            with self.state.transaction():
                repaired, skipped = chunks.complete(self.state, chunk, ctx.owner, dry_run=True,
                                                    repaired=repaired, skipped=skipped)
            return ChunkResult(rows_read=len(rows), repaired=repaired, skipped=skipped)
        deliveries = Deliveries()
        with self.state.transaction():
            # The repairs rows are written while the messages are produced, and committed only
            # once every message is acknowledged by all in-sync replicas.
            recorded = self.recorder.submit(record_rows, self.state, backfill, chunk, repairs)
            try:
                for kafka_key, value in messages:
                    produce(self.producer, deliveries, self.topic, key=kafka_key, value=value)
            finally:
                wait([recorded])  # the connection is the recorder's until then
            recorded.result()
            confirm(self.producer, deliveries, what=self.what)
            ctx.heartbeat.check()
            repaired, skipped = chunks.complete(self.state, chunk, ctx.owner, dry_run=False)
        return ChunkResult(rows_read=len(rows), repaired=repaired, skipped=skipped)

    def _orphans(self, chunk: chunks.Chunk, scope: BackfillScope, found: set[str],
                 mirror: dict[str, tuple[Any, int, str]] | None
                 ) -> list[tuple[list[Any], int | None]]:
        """Keys of the chunk the topic may hold but the source lacks, confirmed with it now.
        ``found``: the key_text of every source row read; ``mirror``: the mirror's rows the
        source rows did not claim."""
        if scope is BackfillScope.PARTITION:
            return []
        candidates: dict[str, tuple[list[Any], int | None]] = {}
        if mirror:
            candidates = {text: (json.loads(key), fingerprint)
                          for text, (_, fingerprint, key) in mirror.items()}
        if chunk.keys is not None and mirror is None:
            for key in chunk.keys:
                text = key_text(key)
                if text not in found:
                    candidates[text] = (key, None)
        if not candidates:
            return []
        present = {key_text(r["key"]) for r in self.source.execute(sql.SQL(
            "SELECT {} AS key FROM {} WHERE {}").format(
                self.space.as_json, self.side.relation,
                self.space.in_list([k for k, _ in candidates.values()])))}
        return [v for k, v in candidates.items() if k not in present]
