"""A Kafka dead-letter topic as a letterbox.

"Not yet replayed" means past the offsets committed by consumer group ``trueup-replay-<name>``,
or past the positions kept in ``trueup.replay_positions`` (whichever is further): a group that
never has members loses its offsets when it has had no commit for ``offsets.retention.minutes``
(7 days by default), and the state keeps them. Reading never joins that group: partitions
are ``assign()``-ed from there, with auto commit off, so inspecting and dry runs commit
nothing. A replay commits a partition's
offset only up to its first letter kept in place (filtered out by ``--where``), and only after
Kafka confirmed the copies (``acks=all``, idempotent producer). Letters past a kept one are
re-read by the next replay and recognised as replayed by their id in ``trueup.replay_events``.
A letter no replay can move as the config stands (attempts used up without ``parking``,
nowhere to go) is copied to its partition's tail first, confirmed, and committed past, as
RabbitMQ's kept letters go to the queue's tail: it does not hold the depth up for good.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from typing import Any

import psycopg
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from trueup import headers, tracing
from trueup.brokers import kafka
from trueup.db import first_line
from trueup.errors import ConnectionFailed, NotFound, TrueupError
from trueup.letterboxes import LettersRefused, Received, Settle
from trueup.letters import UNKNOWN_ERROR, DeadLetter, Destination, epoch_time
from trueup.log import get_logger
from trueup.state import open_state

log = get_logger(__name__)

POLL_SECONDS = 1.0
STALL_SECONDS = 300.0  # no message at all for this long while some are due: give up


def replay_group(name: str) -> str:
    return f"trueup-replay-{name}"


def letter_of(message: Message, raw: Any = None) -> DeadLetter:
    """A dead letter of a Kafka message (``raw``: its headers, when already read), with or
    without trueup's headers."""
    text = headers.from_kafka(kafka.message_headers(message) if raw is None else raw)
    get = text.get
    key = message.key()
    failed_at = headers.parse_time(get(headers.LAST_FAILURE))
    if failed_at is None:
        stamp_type, stamp_ms = message.timestamp()
        if stamp_type != TIMESTAMP_NOT_AVAILABLE:
            # Milliseconds, unless the producer set another unit: a time past the year 5138
            # is read once more as milliseconds, and one still out of range is none.
            failed_at = epoch_time(stamp_ms / 1000)
    # Only the fields a replay decides on are read here; the full record is parsed on demand.
    return DeadLetter(
        message_id=get(headers.MESSAGE_ID) or (f"{message.topic()}:{message.partition()}:"
                                               f"{message.offset()}"),
        key=key.decode("utf-8", "replace") if key is not None else None,
        origin=get(headers.ORIGIN) or None,
        error_class=get(headers.ERROR_CLASS) or UNKNOWN_ERROR,
        attempts=headers.attempt_count(get(headers.ATTEMPTS)), failed_at=failed_at,
        generation=headers.integer(get(headers.REPLAY_ID)) or 0, headers=text)


def copy_headers(raw: list[tuple[str, Any]], letter: DeadLetter, *,
                 replay_id: int | None) -> list[tuple[str, Any]]:
    """The headers of a replayed copy (``replay_id`` None: a copy kept in the DLQ): the
    letter's own, with trueup's brought up to date."""
    return headers.kafka_copy(raw, letter.copy_changes(replay_id=replay_id),
                              keep=headers.FAILURE_HEADERS)


class KafkaLetterbox:
    def __init__(self, *, properties: Mapping[str, Any], topic: str, name: str,
                 what: str, state: str | None = None) -> None:
        self.properties = dict(properties)
        self.confirms_each_publish = False
        self.where = topic
        self.name = name
        self.what = what
        self.state = state  # the state database's DSN, where positions are kept (None: not)
        self.admin = kafka.connect_admin(self.properties, what=what)
        partitions = kafka.topic_partitions(self.admin, topic, what=what)
        if partitions is None:
            raise NotFound(f"{what}: Kafka topic {topic!r} does not exist")
        self.partitions = partitions
        # the topic's incarnation, which kept positions must belong to (see _kept_positions)
        self._topic_id = kafka.topic_id(self.admin, topic, what=what,
                                        servers=self.properties.get("bootstrap.servers")) \
            if state is not None else None
        self.consumer = kafka.create_consumer(self.properties, group=replay_group(name),
                                              what=what, **{"enable.auto.offset.store": False,
                                                            "enable.partition.eof": True})
        self._producer: Producer | None = None
        self._deliveries = kafka.Deliveries()
        self._blocked: set[int] = set()
        self._committed: dict[int, int] = {}  # partition -> next offset committed (async)
        self._destinations: set[str] = set()  # topics known to exist

    def _bounds(self) -> dict[int, tuple[int, int]]:
        """``partition -> (first offset not yet replayed, end offset now)``."""
        ends = kafka.end_offsets(self.consumer, self.where, self.partitions, what=self.what)
        committed = kafka.committed_offsets(self.consumer, self.where, self.partitions,
                                            what=self.what)
        kept = self._kept_positions()
        bounds = {}
        for partition, (low, high) in ends.items():
            position = kept.get(partition)
            if position is not None and position > high:
                position = None  # the topic was deleted and created again since
            start = max(low, committed.get(partition) or low, position or low)
            bounds[partition] = (start, max(start, high))
        return bounds

    def _kept_positions(self) -> dict[int, int]:
        """``partition -> next offset`` kept in the state by the last replay."""
        if self.state is None:
            return {}
        with open_state(self.state) as conn:
            rows = conn.execute(
                "SELECT partition, next_offset, topic_id FROM trueup.replay_positions "
                "WHERE name = %s AND topic = %s", (self.name, self.where)).fetchall()
        # a position in another incarnation of the topic (deleted and created again since)
        # says nothing of this one's offsets, which started over
        return {r["partition"]: r["next_offset"] for r in rows
                if r["topic_id"] in (None, self._topic_id)}

    def _keep_positions(self, positions: Mapping[int, int]) -> None:
        """Keep ``positions`` in the state beside the group's offsets. Not kept (the state
        unreachable), the group's offsets still say where the replay got to."""
        if self.state is None or not positions:
            return
        try:
            with open_state(self.state, migrate_schema=False) as conn, conn.transaction():
                conn.cursor().executemany(
                    "INSERT INTO trueup.replay_positions "
                    "(name, topic, partition, next_offset, topic_id) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (name, topic, partition) DO UPDATE "
                    "SET next_offset = excluded.next_offset, topic_id = excluded.topic_id, "
                    "updated_at = now()",
                    [(self.name, self.where, p, o, self._topic_id)
                     for p, o in positions.items()])
        except (psycopg.Error, TrueupError) as exc:
            log.warning("replay.positions_not_kept", dead_letters=self.name,
                        topic=self.where, error=first_line(exc))

    def depth(self) -> int:
        return sum(end - start for start, end in self._bounds().values())

    def _stalled(self) -> Exception:
        return ConnectionFailed(f"{self.what}: no message from Kafka topic {self.where!r} "
                                f"for {STALL_SECONDS:.0f}s")

    def heads(self) -> list[DeadLetter]:
        """The first letter not yet replayed of each partition, the oldest of it: a partition
        holds its letters in the order they failed, and a reading of the first letters of the
        topic may see one partition's only."""
        bounds = {p: (start, start + 1) for p, (start, end) in self._bounds().items()
                  if end > start}
        heads: dict[int, DeadLetter] = {}
        batches = kafka.read_to_ends(
            self.consumer, self.where, bounds, batch_size=max(1, len(bounds)),
            poll_seconds=POLL_SECONDS, stall_seconds=STALL_SECONDS, outlive_transient=True,
            stalled=self._stalled)
        try:
            for messages in batches:
                for message in messages:
                    partition = message.partition()
                    assert partition is not None
                    heads.setdefault(partition, letter_of(message))
        except KafkaException as exc:
            raise kafka.translate(exc, self.what) from exc
        finally:
            batches.close()
        return list(heads.values())

    def letters(self, *, batch_size: int, take: bool) -> Generator[list[Received], None, None]:
        bounds = self._bounds()
        self._blocked = set()
        if take and any(end > start for start, end in bounds.values()):
            # An idempotent producer holds the first messages produced before it has its
            # producer id until a timer fires, about half a second (librdkafka PR 5032): made
            # now, it gets the id while the first letters are fetched.
            self._producer_()

        # Letters that arrive during the replay wait for the next one.
        batches = kafka.read_to_ends(self.consumer, self.where, bounds, batch_size=batch_size,
                                     poll_seconds=POLL_SECONDS, stall_seconds=STALL_SECONDS,
                                     stalled=self._stalled, outlive_transient=True)
        try:
            for messages in batches:
                batch = []
                for message in messages:
                    raw = kafka.message_headers(message)
                    batch.append(Received(letter=letter_of(message, raw), handle=(message, raw)))
                yield batch
        except KafkaException as exc:
            raise kafka.translate(exc, self.what) from exc
        finally:
            batches.close()

    def prepare(self, destination: Destination) -> None:
        if destination.name is not None:
            kafka.create_topics(self.admin, [destination.name], partitions=self.partitions,
                                what=self.what)
            self._destinations.add(destination.name)

    def require(self, destination: Destination) -> None:
        """Refuse to send to a topic that does not exist: a broker that creates topics on use
        would make one of a misspelt ``replay_to`` (or a deleted origin), and the letters
        would leave their queue for a topic nobody reads. The parking lot is made on purpose
        (:meth:`prepare`). Also asked before each letter's first copy to a topic (an origin
        is known only then)."""
        topic = destination.name
        if topic is None or topic in self._destinations:
            return
        if kafka.topic_partitions(self.admin, topic, what=self.what) is None:
            raise NotFound(f"{self.what}: the letters' destination, Kafka topic {topic!r}, "
                           f"does not exist")
        self._destinations.add(topic)

    def _producer_(self) -> Producer:
        if self._producer is None:
            # a letter as large as its topic takes, with the headers a replay adds, goes out
            # (librdkafka refuses a message past 1,000,000 bytes before it leaves by default)
            limit = kafka.copy_producer_limit(
                self.properties, kafka.topic_max_message_bytes(self.admin, self.where))
            self._producer = kafka.create_producer(self.properties, what=self.what,
                                                   **{"message.max.bytes": limit})
        return self._producer

    def publish(self, item: Received, destination: Destination, *, replay_id: int) -> None:
        assert destination.name is not None
        self.require(destination)
        message: Message
        message, raw = item.handle
        # The key is kept, so a replayed letter lands in its key's partition, in key order.
        kafka.produce(self._producer_(), self._deliveries, destination.name,
                      value=message.value(), key=message.key(),
                      headers=tracing.inject(copy_headers(raw, item.letter,
                                                          replay_id=replay_id)),
                      tag=item)

    def confirm(self) -> None:
        if self._producer is None:
            return
        try:
            kafka.confirm(self._producer, self._deliveries, what=self.what)
        except kafka.KafkaRefused as exc:  # only refusals: every other copy is confirmed
            refused: list[Received] = exc.tags  # publish() tags each copy with its letter
            raise LettersRefused(f"{exc}; letter {refused[0].letter.message_id} stays in the "
                                 f"dead letters, and every replay stops at it: let the "
                                 f"destination take it (max.message.bytes), or leave it out "
                                 f"with --where", refused) from exc

    def wait(self, seconds: float) -> None:
        # The consumer is assign()-ed (no group to heartbeat to) and librdkafka's threads keep
        # the connections: a plain sleep is enough.
        time.sleep(seconds)

    def settle(self, items: list[Received], states: list[Settle]) -> None:
        """Commit, per partition, up to the first letter that stays in its place; a letter kept
        for good (``TAIL``) is copied to its partition's tail first (confirmed), so the
        partition is committed past it and the depth drops."""
        commits: dict[int, int] = {}
        tail: list[Received] = []
        for item, state in zip(items, states, strict=True):
            message: Message = item.handle[0]
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            if partition in self._blocked:
                # Read again by the next replay anyway: a copy at the tail would be a duplicate.
                continue
            if state is Settle.DONE:
                commits[partition] = offset + 1
            elif state is Settle.TAIL:
                tail.append(item)
                commits[partition] = offset + 1
            else:
                self._blocked.add(partition)
        if not commits:
            return
        if tail:
            self._to_tail(tail)  # confirmed before the commit past them: a crash between the
            # two leaves the letter twice (the next replay keeps both), never lost
        self._committed.update(commits)
        # Asynchronous: a commit lost to a crash only makes the next replay re-read letters it
        # then recognises as replayed (recorded before this call). close() commits for sure.
        # Not past letters copied to the tail: read again (after a reconnect, say), each would
        # be copied once more, and both copies kept for good.
        offsets = [TopicPartition(self.where, p, o) for p, o in commits.items()]
        if tail:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self._keep_positions(self._committed)
        else:
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def _to_tail(self, items: list[Received]) -> None:
        """Copy letters kept for good to the end of their partition and wait for the broker's
        confirm. A copy keeps the letter's id, failure record, trace and the replay that made
        the letter, if any (it was moved within its box, not replayed by this one). The copies
        are past the end offsets this replay reads to: it never meets them again."""
        producer, deliveries = self._producer_(), kafka.Deliveries()
        for item in items:
            message: Message
            message, raw = item.handle
            kafka.produce(producer, deliveries, self.where, value=message.value(),
                          key=message.key(), partition=message.partition(),
                          headers=copy_headers(raw, item.letter, replay_id=None))
        # Its own deliveries: failures of the next batch's copies (produced meanwhile) are
        # that batch's to report, from confirm().
        kafka.confirm(producer, deliveries, what=f"{self.what}: kept letters to the tail")
        log.info("replay.kept_to_tail", dead_letters=self.name, topic=self.where,
                 letters=len(items))

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(kafka.CONFIRM_TIMEOUT_SECONDS)
        try:
            if self._committed:
                self.consumer.commit(offsets=[TopicPartition(self.where, p, o)
                                              for p, o in self._committed.items()],
                                     asynchronous=False)
                self._keep_positions(self._committed)
        except KafkaException as exc:
            raise kafka.translate(exc, f"{self.what}: commit") from exc
        finally:
            self.consumer.close()
