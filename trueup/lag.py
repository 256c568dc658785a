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
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException

from trueup.brokers.kafka import (
    KafkaFailed,
    committed_offsets,
    create_consumer,
    end_offsets,
    metadata,
    read_to_ends,
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

    messages: int                    # past its committed offsets, all partitions
    oldest: dt.datetime | None       # the time of the first of them (None: no lag)


def consumer_lag(config: Config, consumer: ConsumerConfig, *, what: str) -> Lag:
    """The lag of ``consumer``'s group on its topic, as of now. A partition the group has
    never committed an offset for is unconsumed from its first message."""
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
            unread = {}
            for partition, (low, high) in marks.items():
                # what the group reads next, if retention has not removed it meanwhile
                offset = committed[partition]
                start = low if offset is None else max(offset, low)
                if start < high:
                    unread[partition] = (start, high)
            return Lag(messages=sum(high - start for start, high in unread.values()),
                       oldest=_first_times(reader, consumer.topic, unread, what))
    except KafkaException as exc:
        raise translate(exc, what, servers=servers) from exc


def _first_times(reader: Any, topic: str, unread: Mapping[int, tuple[int, int]],
                 what: str) -> dt.datetime | None:
    """The earliest time of the first message in each partition's ``unread`` range (its first
    offset may hold none: a transaction marker, a message compacted away)."""
    firsts: dict[int, dt.datetime | None] = {}

    def stalled() -> Exception:
        return KafkaFailed(f"{what}: no message for {STALL_SECONDS:.0f} s reading the first "
                           f"unconsumed message of topic {topic}")

    with closing(read_to_ends(reader, topic, unread, batch_size=len(unread), poll_seconds=0.5,
                              stall_seconds=STALL_SECONDS, stalled=stalled)) as batches:
        for batch in batches:
            for message in batch:
                kind, millis = message.timestamp()
                firsts.setdefault(int(message.partition() or 0), None
                                  if kind == TIMESTAMP_NOT_AVAILABLE else
                                  dt.datetime.fromtimestamp(millis / 1000, dt.UTC))
            if len(firsts) == len(unread):
                break
    untimed = sorted(p for p, t in firsts.items() if t is None)
    if untimed:
        log.warning("lag.untimed", topic=topic, partitions=untimed)
    times = [t for t in firsts.values() if t is not None]
    return min(times) if times else None
