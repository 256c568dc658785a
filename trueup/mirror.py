"""The Kafka mirror: a topic's latest message per key, kept in a table of trueup's state.

A reconciliation whose target is a topic first brings its mirror up to date: it reads every
partition from the offsets stored in ``trueup.mirror_offsets`` up to the high watermarks seen
when the run started, and merges each batch (latest message per key wins, a tombstone deletes
its key) in the same transaction that advances the offsets: exactly once into the mirror, and
the next run reads only new messages. Messages that are not JSON objects or lack a key field are
kept in ``<mirror>__unreadable`` until a later message of the same Kafka key supersedes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from psycopg import sql

from trueup.brokers.kafka import translate
from trueup.config import Config, ReconciliationConfig
from trueup.errors import TrueupError
from trueup.fingerprint import PART_SEPARATOR, ColumnType, Kind, fields_text, loads
from trueup.fingerprint import copy_text as value_text
from trueup.log import get_logger
from trueup.runs import Difference
from trueup.sides import Side, mirror_side
from trueup.statuses import DifferenceClass

log = get_logger(__name__)

BATCH_MESSAGES = 20_000
POLL_SECONDS = 1.0
WATERMARK_TIMEOUT_SECONDS = 10.0
#: Give up when the broker delivers nothing for this long although messages remain.
STALL_SECONDS = 60.0
SCHEMA = "trueup_mirror"

Progress = Callable[[str, int, int], None]


class MirrorFailed(TrueupError):
    """The topic could not be read into its mirror."""


@dataclass(frozen=True, kw_only=True)
class MirrorShape:
    """What the mirror of one reconciliation stores, derived from config and source types."""

    name: str
    topic: str
    key_fields: list[str]          # JSON fields of the key, in key order
    key_columns: list[str]         # mirror columns holding them (the source's key names)
    key_types: list[ColumnType]
    version_field: str | None
    version_type: ColumnType | None
    column_fields: list[str]       # JSON fields of the compared columns, in source order
    column_types: list[ColumnType]

    @property
    def table(self) -> sql.Composable:
        return sql.Identifier(SCHEMA, self.name)

    @property
    def unreadable_table(self) -> sql.Composable:
        return sql.Identifier(SCHEMA, f"{self.name}__unreadable")

    @property
    def signature(self) -> str:
        """Changes whenever stored fingerprints would mean something else: then rebuild."""
        parts = [self.topic, self.key_fields, [t.name for t in self.key_types],
                 self.version_field, self.version_type.name if self.version_type else None,
                 self.column_fields, [t.name for t in self.column_types], "v1"]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _storage_type(ctype: ColumnType) -> sql.Composable:
    # Built-in types only: the state database has no enums or extensions of the source's.
    if ctype.kind is Kind.TEXT and ctype.name != "uuid":
        return sql.SQL("text")
    if ctype.kind is Kind.JSON:
        return sql.SQL("jsonb")
    return sql.Identifier(ctype.name)


def shape_of(name: str, rec: ReconciliationConfig, source: Side,
             column_types: list[ColumnType]) -> MirrorShape:
    assert rec.target.topic is not None
    return MirrorShape(
        name=name, topic=rec.target.topic, key_fields=list(rec.target.key),
        key_columns=list(rec.source.key), key_types=source.key_types,
        version_field=rec.target.version,
        version_type=source.version_type if rec.target.version else None,
        column_fields=[rec.target.columns[c] for c in rec.source.columns],
        column_types=column_types,
    )


def sync_mirror(config: Config, name: str, rec: ReconciliationConfig, source: Side,
                column_types: list[ColumnType], conn: psycopg.Connection[Any],
                progress: Progress) -> tuple[Side, list[Difference]]:
    """Bring the mirror of ``name`` up to date; return it as a side, and what is unreadable."""
    shape = shape_of(name, rec, source, column_types)
    properties = config.connections[rec.target.connection].kafka
    assert properties is not None
    lock = int.from_bytes(hashlib.sha256(f"trueup-mirror:{name}".encode()).digest()[:8],
                          "big", signed=True)
    # One mirror sync at a time per reconciliation; a second run waits, then reads less.
    conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
    try:
        _ensure_tables(conn, shape)
        consumed = MirrorReader(shape, dict(properties), conn, progress).run()
        log.info("mirror.synced", reconciliation=name, topic=shape.topic, messages=consumed)
        unreadable = list(_unreadable(conn, shape))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))
        conn.commit()
    side = mirror_side(dsn=config.state, relation=shape.table, key=shape.key_columns,
                       key_types=shape.key_types, version_type=shape.version_type)
    return side, unreadable


def _ensure_tables(conn: psycopg.Connection[Any], shape: MirrorShape) -> None:
    with conn.transaction():
        found = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class') AS sig",
                             (shape.table.as_string(conn),)).fetchone()
        if found is not None and found["sig"] == shape.signature:
            return
        # New, or configured differently than when it was filled: start it over.
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(shape.table,
                                                                   shape.unreadable_table))
        conn.execute("DELETE FROM trueup.mirror_offsets WHERE reconciliation = %s",
                     (shape.name,))
        keys = [sql.SQL("{} {} NOT NULL").format(sql.Identifier(c), _storage_type(t))
                for c, t in zip(shape.key_columns, shape.key_types, strict=True)]
        version = sql.SQL("version {},").format(_storage_type(shape.version_type)) \
            if shape.version_type else sql.SQL("")
        conn.execute(sql.SQL(
            "CREATE TABLE {table} ({keys}, {version} fingerprint bigint NOT NULL, "
            "row_hash bigint NOT NULL, kafka_partition integer NOT NULL, "
            "kafka_offset bigint NOT NULL, PRIMARY KEY ({pk}))"
        ).format(table=shape.table, keys=sql.SQL(", ").join(keys), version=version,
                 pk=sql.SQL(", ").join(sql.Identifier(c) for c in shape.key_columns)))
        conn.execute(sql.SQL(
            "CREATE TABLE {} (kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL, "
            "message_key text, reason text NOT NULL, PRIMARY KEY (kafka_partition, kafka_offset))"
        ).format(shape.unreadable_table))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            shape.table, sql.Literal(shape.signature)))


class MirrorReader:
    """Reads the topic from the stored offsets to the high watermarks, batch by batch."""

    def __init__(self, shape: MirrorShape, properties: dict[str, Any],
                 conn: psycopg.Connection[Any], progress: Progress) -> None:
        self.shape = shape
        self.conn = conn
        self.progress = progress
        self.consumer = Consumer({
            **properties,
            "group.id": f"trueup-mirror-{shape.name}",  # offsets live in Postgres, not here
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # how a partition ending in a compacted gap is seen
            "fetch.max.bytes": 52_428_800,
            "queued.max.messages.kbytes": 262_144,
        })

    def run(self) -> int:
        try:
            return self._run()
        except KafkaException as exc:
            raise translate(exc, f"topic {self.shape.topic}") from exc
        finally:
            self.consumer.close()

    def _plan(self) -> dict[int, tuple[int, int]]:
        """partition -> (first offset to read, high watermark) for partitions with news."""
        metadata = self.consumer.list_topics(self.shape.topic, timeout=WATERMARK_TIMEOUT_SECONDS)
        topic = metadata.topics.get(self.shape.topic)
        if topic is None or topic.error is not None:
            raise MirrorFailed(f"topic {self.shape.topic!r} does not exist")
        stored = {r["partition"]: r["next_offset"] for r in self.conn.execute(
            "SELECT partition, next_offset FROM trueup.mirror_offsets "
            "WHERE reconciliation = %s AND topic = %s", (self.shape.name, self.shape.topic))}
        self.conn.commit()
        marks = {p: self.consumer.get_watermark_offsets(
            TopicPartition(self.shape.topic, p), timeout=WATERMARK_TIMEOUT_SECONDS)
            for p in topic.partitions}
        if any(offset > marks.get(p, (0, -1))[1] for p, offset in stored.items()):
            # Offsets we read are gone: the topic was deleted and created again. The mirror
            # describes a topic that no longer exists, so it starts over.
            log.warning("mirror.reset", reconciliation=self.shape.name, topic=self.shape.topic)
            self._reset()
            stored = {}
        plan = {}
        for partition, (low, high) in marks.items():
            start = max(stored.get(partition, low), low)
            if start < high:
                plan[partition] = (start, high)
        return plan

    def _reset(self) -> None:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("TRUNCATE {}, {}").format(self.shape.table,
                                                                self.shape.unreadable_table))
            self.conn.execute("DELETE FROM trueup.mirror_offsets WHERE reconciliation = %s",
                              (self.shape.name,))

    def _run(self) -> int:
        plan = self._plan()
        if not plan:
            return 0
        total = sum(high - start for start, high in plan.values())
        self.consumer.assign([TopicPartition(self.shape.topic, p, start if start else
                                             OFFSET_BEGINNING) for p, (start, _) in plan.items()])
        remaining = {p: high for p, (_, high) in plan.items()}
        merger = Merger(self.shape, self.conn)
        done = 0
        while remaining:
            batch = self.consumer.consume(num_messages=BATCH_MESSAGES, timeout=POLL_SECONDS)
            if not batch:
                merger.note_idle(POLL_SECONDS)
                continue
            staged = []
            for message in batch:
                error = message.error()
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    eof_high = remaining.get(partition)
                    if eof_high is not None and offset >= eof_high:
                        del remaining[partition]
                    continue
                high = remaining.get(partition)
                if high is None or offset >= high:
                    continue  # beyond this run's snapshot: the next run reads it
                staged.append(message)
                if offset + 1 >= high:
                    del remaining[partition]
            merger.merge(staged)
            done += len(staged)
            self.progress("mirror", done, total)
        return done


class Merger:
    """Stages a batch of messages with COPY and merges it into the mirror in one transaction."""

    def __init__(self, shape: MirrorShape, conn: psycopg.Connection[Any]) -> None:
        self.shape = shape
        self.conn = conn
        self.idle = 0.0
        keys = [sql.SQL("{} {}").format(sql.Identifier(c), _storage_type(t))
                for c, t in zip(shape.key_columns, shape.key_types, strict=True)]
        version = sql.SQL("version {},").format(_storage_type(shape.version_type)) \
            if shape.version_type else sql.SQL("")
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS trueup_stage (kafka_partition integer, "
            "kafka_offset bigint, message_key text, tombstone boolean, {keys}, {version} "
            "fields text, reason text) ON COMMIT DELETE ROWS"
        ).format(keys=sql.SQL(", ").join(keys), version=version))
        conn.commit()
        self.columns = ["kafka_partition", "kafka_offset", "message_key", "tombstone",
                        *shape.key_columns, *(["version"] if shape.version_type else []),
                        "fields", "reason"]
        self._merge_sql = self._build_merge()

    def note_idle(self, seconds: float) -> None:
        self.idle += seconds
        if self.idle >= STALL_SECONDS:
            raise MirrorFailed(f"topic {self.shape.topic}: no messages for {STALL_SECONDS:.0f} s "
                               f"although the high watermark was not reached")

    def merge(self, messages: list[Any]) -> None:
        self.idle = 0.0
        if not messages:
            return
        copy_sql = sql.SQL("COPY trueup_stage ({}) FROM STDIN").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns))
        with self.conn.transaction(), self.conn.cursor() as cur:
            with cur.copy(copy_sql) as copy:
                for row in self._rows(messages):
                    copy.write_row(row)
            for statement in self._merge_sql:
                cur.execute(statement)

    def _rows(self, messages: list[Any]) -> Iterator[tuple[Any, ...]]:
        shape = self.shape
        n_keys = len(shape.key_columns)
        with_version = shape.version_type is not None
        for m in messages:
            raw_key = m.key()
            message_key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
            value = m.value()
            head = (m.partition(), m.offset(), message_key)
            filler: tuple[Any, ...] = (None,) * (n_keys + with_version)
            if value is None:
                tombstone_keys = _keys_from_message_key(message_key, shape)
                if tombstone_keys is None:
                    yield (*head, True, *filler, None, "tombstone without a readable key")
                else:
                    yield (*head, True, *tombstone_keys, *((None,) if with_version else ()),
                           None, None)
                continue
            try:
                document = loads(value)
            except ValueError:
                yield (*head, False, *filler, None, "not JSON")
                continue
            if not isinstance(document, dict):
                yield (*head, False, *filler, None, "not a JSON object")
                continue
            keys = [document.get(f) for f in shape.key_fields]
            missing = [f for f, k in zip(shape.key_fields, keys, strict=True) if k is None]
            if missing:
                yield (*head, False, *filler, None, f"no key field {missing[0]!r}")
                continue
            key_texts = [value_text(k, t) for k, t in zip(keys, shape.key_types, strict=True)]
            if any(k is None for k in key_texts):
                yield (*head, False, *filler, None, "key field of the wrong type")
                continue
            version: tuple[Any, ...] = ()
            if with_version:
                assert shape.version_field is not None and shape.version_type is not None
                raw_version = document.get(shape.version_field)
                version_text = None if raw_version is None else value_text(
                    raw_version, shape.version_type)
                if raw_version is not None and version_text is None:
                    yield (*head, False, *filler, None,
                           f"version field {shape.version_field!r} of the wrong type")
                    continue
                version = (version_text,)
            fields = fields_text((document.get(f) for f in shape.column_fields),
                                 shape.column_types)
            yield (*head, False, *key_texts, *version, fields, None)

    def _build_merge(self) -> list[sql.Composed]:
        shape = self.shape
        keys = [sql.Identifier(c) for c in shape.key_columns]
        key_list = sql.SQL(", ").join(keys)
        staged = Side(label="target", dsn="", relation=sql.Identifier("trueup_stage"), key=keys,
                      key_types=shape.key_types,
                      version=sql.Identifier("version") if shape.version_type else None,
                      version_type=shape.version_type, fingerprint=sql.SQL("0"),
                      row_hash=sql.SQL("0"))
        version_col = sql.SQL("version, ") if shape.version_type else sql.SQL("")
        latest = sql.SQL(
            "SELECT DISTINCT ON ({keys}) * FROM trueup_stage WHERE reason IS NULL "
            "ORDER BY {keys}, kafka_offset DESC").format(keys=key_list)
        match = sql.SQL(" AND ").join(sql.SQL("m.{0} = l.{0}").format(k) for k in keys)
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in
            [*(["version"] if shape.version_type else []), "fingerprint", "row_hash",
             "kafka_partition", "kafka_offset"])
        row_hash = sql.SQL("hashtextextended(concat_ws({}, {}, {}, fields), 0)").format(
            sql.Literal(PART_SEPARATOR), staged.key_text, staged.version_text)
        return [
            sql.SQL("CREATE TEMP TABLE trueup_latest ON COMMIT DROP AS {}").format(latest),
            sql.SQL("DELETE FROM {mirror} AS m USING trueup_latest AS l "
                    "WHERE l.tombstone AND {match}").format(mirror=shape.table, match=match),
            sql.SQL(
                "INSERT INTO {mirror} ({keys}, {version}fingerprint, row_hash, kafka_partition, "
                "kafka_offset) SELECT {keys}, {version}hashtextextended(fields, 0), {row_hash}, "
                "kafka_partition, kafka_offset FROM trueup_latest WHERE NOT tombstone "
                "ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            ).format(mirror=shape.table, keys=key_list, version=version_col, row_hash=row_hash,
                     updates=updates),
            # a later message of the same Kafka key supersedes an unreadable one
            sql.SQL(
                "DELETE FROM {unreadable} AS u USING trueup_stage AS s "
                "WHERE u.message_key = s.message_key AND u.kafka_partition = s.kafka_partition "
                "AND u.kafka_offset < s.kafka_offset").format(unreadable=shape.unreadable_table),
            sql.SQL(
                "INSERT INTO {unreadable} (kafka_partition, kafka_offset, message_key, reason) "
                "SELECT s.kafka_partition, s.kafka_offset, s.message_key, s.reason "
                "FROM trueup_stage AS s WHERE s.reason IS NOT NULL AND NOT EXISTS ("
                "SELECT 1 FROM trueup_stage AS later WHERE later.message_key = s.message_key "
                "AND later.kafka_partition = s.kafka_partition "
                "AND later.kafka_offset > s.kafka_offset) "
                "ON CONFLICT DO NOTHING").format(unreadable=shape.unreadable_table),
            sql.SQL(
                "INSERT INTO trueup.mirror_offsets (reconciliation, topic, partition, "
                "next_offset) SELECT {name}, {topic}, kafka_partition, max(kafka_offset) + 1 "
                "FROM trueup_stage GROUP BY kafka_partition "
                "ON CONFLICT (reconciliation, topic, partition) DO UPDATE SET next_offset = "
                "GREATEST(trueup.mirror_offsets.next_offset, excluded.next_offset), "
                "updated_at = now()").format(name=sql.Literal(shape.name),
                                             topic=sql.Literal(shape.topic)),
        ]


def _keys_from_message_key(message_key: str | None, shape: MirrorShape) -> list[str] | None:
    """Key values of a tombstone, from the Kafka message key (text, or a JSON array)."""
    if message_key is None:
        return None
    if len(shape.key_fields) == 1:
        try:
            parsed = loads(message_key)
        except ValueError:
            parsed = message_key
        values = parsed if isinstance(parsed, list) and len(parsed) == 1 else [message_key]
    else:
        try:
            values = loads(message_key)
        except ValueError:
            return None
        if not isinstance(values, list) or len(values) != len(shape.key_fields):
            return None
    texts: list[str] = []
    for v, t in zip(values, shape.key_types, strict=True):
        text = value_text(v, t)
        if text is None:
            return None
        texts.append(text)
    return texts


def _unreadable(conn: psycopg.Connection[Any], shape: MirrorShape) -> Iterator[Difference]:
    rows = conn.execute(sql.SQL(
        "SELECT kafka_partition, kafka_offset, message_key, reason FROM {} "
        "ORDER BY kafka_partition, kafka_offset").format(shape.unreadable_table))
    for row in rows:
        yield Difference(key=[row["message_key"]], cls=DifferenceClass.UNREADABLE,
                         detail={"partition": row["kafka_partition"],
                                 "offset": row["kafka_offset"], "reason": row["reason"]})

