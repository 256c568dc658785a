"""The Kafka mirror: a topic's latest message per key, kept in a table of trueup's state.

A reconciliation whose target is a topic first brings its mirror up to date: it reads every
partition from the offsets stored in ``trueup.mirror_offsets`` up to the high watermarks seen
when the run started, and merges each batch (latest message per key wins, a tombstone deletes
its key) in the same transaction that advances the offsets: exactly once into the mirror, and
the next run reads only new messages. Messages that are not JSON objects or lack a key field are
kept in ``trueup_mirror_unreadable.<name>`` until a later message of the same Kafka key
supersedes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)
from psycopg import sql

from trueup import threads
from trueup.brokers.kafka import (
    CLIENT_DEFAULTS,
    connect_admin,
    read_to_ends,
    translate,
)
from trueup.brokers.kafka import topic_id as kafka_topic_id
from trueup.collection import batch_loop
from trueup.config import Config, ReconciliationConfig
from trueup.errors import TrueupError
from trueup.fingerprint import ColumnType, storage_type
from trueup.log import get_logger
from trueup.runs import Difference
from trueup.sides import Side, mirror_side
from trueup.staging import Merger, RawMessage, store_offsets
from trueup.statuses import DifferenceClass

log = get_logger(__name__)

BATCH_MESSAGES = 20_000
#: consume() waits this long for a full batch; short, so a small tail is not a 1 s wait.
POLL_SECONDS = 0.05
WATERMARK_TIMEOUT_SECONDS = 10.0
#: Give up when the broker delivers nothing for this long although messages remain.
STALL_SECONDS = 60.0
SCHEMA = "trueup_mirror"
UNREADABLE_SCHEMA = "trueup_mirror_unreadable"
#: What named a mirror's table of unreadable messages in trueup_mirror before migration 0006.
_OLD_SUFFIX = "__unreadable"

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
        # A schema of its own: in trueup_mirror, "<name>__unreadable" was cut to 63 characters
        # (a 63-character name's was its mirror) and could be another reconciliation's mirror.
        return sql.Identifier(UNREADABLE_SCHEMA, self.name)

    @property
    def old_unreadable_table(self) -> sql.Composable:
        """Where the unreadable messages were kept before migration 0006."""
        return sql.Identifier(SCHEMA, f"{self.name}{_OLD_SUFFIX}")

    def stored_columns(self, *, not_null_keys: bool) -> sql.Composable:
        """Column definitions of the key columns, then the version's (if any), comma-ended
        when there is a version; shared by the mirror table and the stage table."""
        null = sql.SQL(" NOT NULL") if not_null_keys else sql.SQL("")
        keys = sql.SQL(", ").join(
            sql.SQL("{} {}{}").format(sql.Identifier(c), storage_type(t), null)
            for c, t in zip(self.key_columns, self.key_types, strict=True))
        if self.version_type is None:
            return keys
        return sql.SQL("{}, version {}").format(keys, storage_type(self.version_type))

    @property
    def signature(self) -> str:
        """Changes whenever stored fingerprints would mean something else, or the mirror
        table's columns (named as the source's key columns) would be others: then rebuild.
        The last part is the renderings' version: v4 rendered reals with all their digits, so
        only a mirror with a real among its types moved to it. A rebuild loses the keys whose
        messages a topic's retention removed meanwhile (see docs/operations.md, Upgrading)."""
        types = [*self.key_types, *self.column_types,
                 *([self.version_type] if self.version_type else [])]
        renderings = "v4" if any(t.name == "float4" for t in types) else "v3"
        parts = [self.topic, self.key_fields, self.key_columns, [t.name for t in self.key_types],
                 self.version_field, self.version_type.name if self.version_type else None,
                 self.column_fields, [t.name for t in self.column_types], renderings]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def shape_of(name: str, rec: ReconciliationConfig, source: Side) -> MirrorShape:
    """The mirror of topic reconciliation ``name``: its messages' fields read as ``source``
    (read as its own types) reads its columns."""
    assert rec.target.topic is not None
    return MirrorShape(
        name=name, topic=rec.target.topic, key_fields=list(rec.target.key),
        key_columns=list(rec.source.key), key_types=source.key_types,
        version_field=rec.target.version,
        version_type=source.version_type if rec.target.version else None,
        column_fields=[rec.target.columns[c] for c in rec.source.columns],
        column_types=list(source.column_types),
    )


def mirror_of(config: Config, shape: MirrorShape) -> Side:
    """The mirror of ``shape`` as a side to compare (it may not exist until the first sync)."""
    return mirror_side(dsn=config.state, relation=shape.table, key=shape.key_columns,
                       key_types=shape.key_types, version_type=shape.version_type)


def sync_mirror(config: Config, shape: MirrorShape, connection: str,
                conn: psycopg.Connection[Any], progress: Progress) -> None:
    """Bring the mirror of ``shape`` up to date from Kafka ``connection`` (a config name)."""
    properties = config.connections[connection].kafka
    assert properties is not None
    lock = int.from_bytes(hashlib.sha256(f"trueup-mirror:{shape.name}".encode()).digest()[:8],
                          "big", signed=True)
    conn.commit()  # each batch commits with its offsets: no transaction of the caller's around
    # One mirror sync at a time per reconciliation; a second run waits, then reads less.
    conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
    unlock = partial(conn.execute, "SELECT pg_advisory_unlock(%s)", (lock,))
    try:
        _ensure_tables(conn, shape, topic_id(dict(properties), shape.topic))
        with batch_loop():
            consumed = MirrorReader(shape, dict(properties), conn, progress).run()
        log.info("mirror.synced", reconciliation=shape.name, topic=shape.topic,
                 messages=consumed)
    except BaseException:
        # The lock is the session's: released on a transaction of its own, after the failed
        # one (an unlock there failed too, and its error took the place of the real one). A
        # connection that broke releases it by closing.
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
            unlock()
            conn.commit()
        raise
    unlock()
    conn.commit()


def topic_id(properties: dict[str, Any], topic: str) -> str:
    """The topic's id: a topic deleted and created again under its old name gets a new one.

    A Kafka that does not answer is :class:`~trueup.errors.ConnectionFailed` naming its
    bootstrap servers, a property librdkafka does not know a trueup error too: one line.
    """
    what = f"topic {topic}"
    return kafka_topic_id(connect_admin(properties, what=what), topic, what=what,
                          servers=properties.get("bootstrap.servers"))


def _ensure_tables(conn: psycopg.Connection[Any], shape: MirrorShape,
                   topic: str = "") -> None:
    """Create the mirror tables, or start them over when they describe something else: other
    config (the shape's signature) or another incarnation of the topic (its id)."""
    identity = f"{shape.signature} {topic}".strip()
    with conn.transaction():
        found = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class') AS sig, "
            "to_regclass(%s) IS NOT NULL AS unreadable_exists",
            (shape.table.as_string(conn), shape.unreadable_table.as_string(conn))).fetchone()
        assert found is not None
        if found["sig"] == identity and found["unreadable_exists"]:
            return  # every run but the first: one catalog lookup
        old = _old_unreadable(conn, shape)
        if found["sig"] == identity and old:
            # kept as before migration 0006: moved, not read again from Kafka
            _move_old_unreadable(conn, shape.old_unreadable_table, shape.name)
            return
        if found["sig"]:
            log.warning("mirror.rebuilt", reconciliation=shape.name, topic=shape.topic,
                        was=found["sig"], now=identity)
        owner = shape.name.removesuffix(_OLD_SUFFIX)
        if owner != shape.name and not found["sig"] and _exists(conn, shape.table):
            # Where this mirror goes, reconciliation `owner` kept its unreadable messages
            # before migration 0006: they move to their place first.
            if _exists(conn, sql.Identifier(UNREADABLE_SCHEMA, owner)):
                conn.execute(sql.SQL("DROP TABLE {}").format(shape.table))
            else:
                _move_old_unreadable(conn, shape.table, owner)
        # New, configured differently, or the topic was recreated: start it over.
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(shape.table,
                                                                   shape.unreadable_table))
        if old:
            conn.execute(sql.SQL("DROP TABLE {}").format(shape.old_unreadable_table))
        conn.execute("DELETE FROM trueup.mirror_offsets WHERE reconciliation = %s",
                     (shape.name,))
        conn.execute(sql.SQL(
            "CREATE TABLE {table} ({stored}, fingerprint bigint NOT NULL, "
            "row_hash bigint NOT NULL, native_hash bigint, kafka_partition integer NOT NULL, "
            "kafka_offset bigint NOT NULL, PRIMARY KEY ({pk}))"
        ).format(table=shape.table, stored=shape.stored_columns(not_null_keys=True),
                 pk=sql.SQL(", ").join(sql.Identifier(c) for c in shape.key_columns)))
        conn.execute(sql.SQL(
            "CREATE TABLE {} (kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL, "
            "message_key text, reason text NOT NULL, PRIMARY KEY (kafka_partition, kafka_offset))"
        ).format(shape.unreadable_table))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            shape.table, sql.Literal(identity)))


def _move_old_unreadable(conn: psycopg.Connection[Any], table: sql.Composable,
                         name: str) -> None:
    """Move a table of unreadable messages kept as before migration 0006 to its place."""
    # by a name no reconciliation can have (a dash), so nothing is in the way
    moving = "trueup-moving"
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table, sql.Identifier(moving)))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
        sql.Identifier(SCHEMA, moving), sql.Identifier(UNREADABLE_SCHEMA)))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
        sql.Identifier(UNREADABLE_SCHEMA, moving), sql.Identifier(name)))


def _exists(conn: psycopg.Connection[Any], table: sql.Composable) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS found",
                       (table.as_string(conn),)).fetchone()
    return bool(row and row["found"])


def _old_unreadable(conn: psycopg.Connection[Any], shape: MirrorShape) -> bool:
    """Whether the table of unreadable messages is there as kept before migration 0006. A
    mirror table is never taken for one: the name, cut to 63 characters, may be a mirror's (its
    own or another reconciliation's), and mirrors carry a comment."""
    row = conn.execute(
        "SELECT obj_description(to_regclass(%s), 'pg_class') IS NULL "
        "AND to_regclass(%s) IS NOT NULL AS found",
        (shape.old_unreadable_table.as_string(conn),) * 2).fetchone()
    return bool(row and row["found"])


class MirrorReader:
    """Reads the topic from the stored offsets to the high watermarks, batch by batch."""

    def __init__(self, shape: MirrorShape, properties: dict[str, Any],
                 conn: psycopg.Connection[Any], progress: Progress, *,
                 parse_in_postgres: bool = True) -> None:
        self.shape = shape
        self.conn = conn
        self.progress = progress
        self.parse_in_postgres = parse_in_postgres
        self.consumer = Consumer({
            **CLIENT_DEFAULTS,
            **properties,
            "group.id": f"trueup-mirror-{shape.name}",  # offsets live in Postgres, not here
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # how a partition ending in a compacted gap is seen
            "fetch.max.bytes": 52_428_800,
            # the default (1000 ms) pauses fetching whenever the local queue is full: a fast
            # reader like this one then idles most of the time (4.5 s vs 0.7 s per 1M messages)
            "fetch.queue.backoff.ms": 10,
            "queued.max.messages.kbytes": 262_144,
        })

    def run(self) -> int:
        try:
            return self._run()
        except KafkaException as exc:
            raise translate(exc, f"topic {self.shape.topic}") from exc
        finally:
            self.consumer.close()

    def _plan(self) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
        """partition -> (first offset to read, high watermark) for partitions with news; and
        partition -> low watermark for partitions whose stored offset it passed (messages
        lost), to store with the run's first mirror change."""
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
        lost: dict[int, int] = {}
        for partition, (low, high) in marks.items():
            read_from = stored.get(partition, 0)  # a new (or rebuilt) mirror: the beginning
            start = max(read_from, low)
            if start > read_from:
                # Retention (or DeleteRecords) removed messages before they were read: the
                # mirror keeps what it read before them, cannot know what they said, and keys
                # only they held are gone from the topic's state as read.
                log.warning("mirror.messages_lost", reconciliation=self.shape.name,
                            topic=self.shape.topic, partition=partition, from_offset=read_from,
                            to_offset=start, messages=start - read_from)
                # stored with the run's mirror changes, so the loss is reported once (a run
                # that fails before it commits any leaves it to the next run to report)
                lost[partition] = start
            if start < high:
                plan[partition] = (start, high)
        return plan, lost

    def _store_skipped(self, offsets: dict[int, int]) -> None:
        """Store the offsets past lost messages that no merged batch stored with its rows."""
        if offsets:
            with self.conn.transaction():
                store_offsets(self.conn, self.shape, offsets)

    def _reset(self) -> None:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("TRUNCATE {}, {}").format(self.shape.table,
                                                                self.shape.unreadable_table))
            self.conn.execute("DELETE FROM trueup.mirror_offsets WHERE reconciliation = %s",
                              (self.shape.name,))

    def _run(self) -> int:
        plan, lost = self._plan()
        if not plan:  # nothing to read past the gap: the new offsets are the only change
            self._store_skipped(lost)
            return 0
        total = sum(high - start for start, high in plan.values())

        def stalled() -> Exception:
            return MirrorFailed(f"topic {self.shape.topic}: no messages for "
                                f"{STALL_SECONDS:.0f} s although the high watermark was not "
                                f"reached")

        merger = Merger(self.shape, self.conn, parse_in_postgres=self.parse_in_postgres)
        merger.offsets_skipped = lost  # stored with the first batch
        done = 0
        # The merge of one batch runs in Postgres while this thread fetches the next.
        with threads.executor(1, "trueup-mirror") as writer, \
                closing(read_to_ends(self.consumer, self.shape.topic, plan,
                                     batch_size=BATCH_MESSAGES, poll_seconds=POLL_SECONDS,
                                     stall_seconds=STALL_SECONDS, stalled=stalled)) as batches:
            pending: Future[None] | None = None
            for batch in batches:
                staged = [_raw(message) for message in batch]
                if pending is not None:
                    pending.result()  # one batch in flight at a time: offsets stay in order
                pending = writer.submit(merger.merge, staged)
                done += len(staged)
                self.progress("mirror", done, total)
            if pending is not None:
                pending.result()
        self._store_skipped(merger.offsets_skipped)  # no batch held a message (only markers)
        if merger.fallbacks:
            log.info("mirror.python_batches", reconciliation=self.shape.name,
                     batches=merger.fallbacks)
        return done


def _raw(message: Message) -> RawMessage:
    key = message.key()
    return RawMessage(int(message.partition() or 0), int(message.offset() or 0),
                      key.decode("utf-8", "replace") if key is not None else None,
                      message.value())


#: Unreadable messages read from the mirror per round trip.
UNREADABLE_BATCH = 5_000


def unreadable(conn: psycopg.Connection[Any], shape: MirrorShape) -> Iterator[Difference]:
    """The mirror's unreadable messages as differences, streamed (a topic of another format
    than JSON makes every message unreadable: millions of them)."""
    with conn.cursor(name="trueup_unreadable") as cur:
        cur.itersize = UNREADABLE_BATCH
        cur.execute(sql.SQL(
            "SELECT kafka_partition, kafka_offset, message_key, reason FROM {} "
            "ORDER BY kafka_partition, kafka_offset").format(shape.unreadable_table))
        for row in cur:
            yield Difference(key=[row["message_key"]], cls=DifferenceClass.UNREADABLE,
                             detail={"partition": row["kafka_partition"],
                                     "offset": row["kafka_offset"], "reason": row["reason"]})
