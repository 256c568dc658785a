"""How far the consumer that writes a target table has read its topic.

A projection table written by a Kafka consumer group is behind its source by the messages the
group has not consumed yet. Their differences are not drift but work in flight, and a run
calls them ``in_flight`` (see docs/diff.md): every source row updated after the first message
the group has not consumed was written, less ``grace`` for the time from an update to its
message. The group's committed offsets say what it has consumed; the first message past them,
in each partition that has one, says when.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from trueup.brokers.kafka import (
    KafkaFailed,
    committed_offsets,
    create_consumer,
    end_offsets,
    metadata,
    translate,
)
from trueup.config import Config, ConsumerConfig
from trueup.log import get_logger

log = get_logger(__name__)

#: How long reading the first unconsumed message of a partition may wait for it.
STALL_SECONDS = 30.0


@dataclass(frozen=True)
class Lag:
    """What a group has not consumed of its topic when a run starts."""

    offsets: int                     # past its committed ones, all partitions (with markers)
    oldest: dt.datetime | None       # the time of the first message of them (None: no lag)


def consumer_lag(config: Config, consumer: ConsumerConfig, *, what: str) -> Lag:
    """The lag of ``consumer``'s group on its topic, as of now.

    A group that has committed no offset at all is refused: a misspelt group would otherwise
    put everything since the topic's first message in flight, and hide every difference. A
    partition without an offset while others have one (a quiet partition of a group reading
    from the latest) tells nothing and is left out, with a warning."""
    properties = config.connections[consumer.connection].kafka
    assert properties is not None
    servers = str(properties.get("bootstrap.servers", ""))
    reader = create_consumer(properties, group=consumer.group, what=what,
                             **{"enable.partition.eof": True})
    try:
        with closing(reader):  # close() commits nothing: auto commit is off, nothing is stored
            topic = metadata(reader).topics.get(consumer.topic)
            if topic is None or topic.error is not None:
                raise KafkaFailed(f"{what}: topic {consumer.topic!r} does not exist")
            partitions = len(topic.partitions)
            marks = end_offsets(reader, consumer.topic, partitions, what=what)
            committed = committed_offsets(reader, consumer.topic, partitions, what=what)
            held = {p for p, (low, high) in marks.items() if high > low}
            if held and all(committed[p] is None for p in marks):
                raise KafkaFailed(
                    f"{what}: group {consumer.group!r} has committed no offset on topic "
                    f"{consumer.topic!r}, so what it has read cannot be told (is it the group "
                    f"that writes the table?)")
            silent = sorted(p for p in held if committed[p] is None)
            if silent:
                log.warning("lag.uncommitted", topic=consumer.topic, group=consumer.group,
                            partitions=silent)
            unread = {}
            for partition, (low, high) in marks.items():
                offset = committed[partition]
                # what the group reads next, if retention has not removed it meanwhile
                start = high if offset is None else max(offset, low)
                if start < high:
                    unread[partition] = (start, high)
            return Lag(offsets=sum(high - start for start, high in unread.values()),
                       oldest=_first_times(reader, consumer.topic, unread, what))
    except KafkaException as exc:
        raise translate(exc, what, servers=servers) from exc


def _first_times(reader: Consumer, topic: str, unread: Mapping[int, tuple[int, int]],
                 what: str) -> dt.datetime | None:
    """The earliest time of the first message in each partition's ``unread`` range. Only that
    message is read: a partition pauses at it, or at its end when the range holds none (a
    transaction's marker, messages compacted away)."""
    firsts: dict[int, dt.datetime | None] = {}
    ended: set[int] = set()
    reader.assign([TopicPartition(topic, p, start) for p, (start, _) in unread.items()])
    last_news = time.monotonic()
    try:
        while len(firsts) + len(ended) < len(unread):
            news = False
            for message in reader.consume(len(unread), 0.5):
                partition = int(message.partition() or 0)
                if partition in firsts or partition in ended:
                    continue
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                if error is not None:
                    ended.add(partition)
                else:
                    firsts[partition] = _time_of(message)
                reader.pause([TopicPartition(topic, partition)])
                news = True
            if news:
                last_news = time.monotonic()
            elif time.monotonic() - last_news > STALL_SECONDS:
                raise KafkaFailed(f"{what}: no message for {STALL_SECONDS:.0f} s reading the "
                                  f"first unconsumed message of topic {topic}")
    finally:
        reader.unassign()
    untimed = sorted(p for p, t in firsts.items() if t is None)
    if untimed:
        log.warning("lag.untimed", topic=topic, partitions=untimed)
    times = [t for t in firsts.values() if t is not None]
    return min(times) if times else None


def _time_of(message: Message) -> dt.datetime | None:
    """A message's time, None when it has none (or one no date holds)."""
    kind, millis = message.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE:
        return None
    try:
        return dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None
