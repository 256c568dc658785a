"""Letterboxes: a dead-letter topic or queue, read and emptied the same way on either broker.

The replayer (:mod:`trueup.replay`) and the inspector (:mod:`trueup.dlq`) only talk to the
:class:`Letterbox` protocol. Its contract: :meth:`~Letterbox.letters` yields batches of what is
in the box; :meth:`~Letterbox.publish` sends a copy somewhere, :meth:`~Letterbox.confirm` returns
once every copy sent so far is confirmed by the broker, and only then does
:meth:`~Letterbox.settle` remove letters from the box (Kafka: commit, RabbitMQ: ack).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from trueup.brokers.kafka import KafkaRefused
from trueup.config import Config
from trueup.letters import DeadLetter, Destination


class Settle(StrEnum):
    DONE = "done"            # copied and confirmed (or a duplicate): remove it from the box
    KEEP = "keep"            # looked at and not moved (filtered out): keep it
    #: Looked at and kept for good: no replay moves it as the config stands (attempts used up
    #: without a parking lot, nowhere to go). Kept at the box's tail (copied there, confirmed,
    #: then removed from its place), so the letters behind it can be removed and the depth
    #: drops (Kafka; RabbitMQ moves every kept letter to its tail).
    TAIL = "tail"
    UNTOUCHED = "untouched"  # not looked at (--max reached): as if never read


class LettersRefused(KafkaRefused):
    """Copies the destination refused outright, told by :meth:`Letterbox.confirm`: every
    other copy sent since the last confirm is confirmed; ``items`` are the letters of those
    refused, which stay in the box."""

    def __init__(self, message: str, items: list[Received]) -> None:
        super().__init__(message)
        self.items = items


@dataclass(kw_only=True, slots=True)  # one per letter read: not frozen, see DeadLetter
class Received:
    """A letter and the broker's handle on it (a Kafka message, a RabbitMQ delivery)."""

    letter: DeadLetter
    handle: Any


class Letterbox(Protocol):
    name: str
    where: str     # the topic or queue, for messages
    confirms_each_publish: bool  # publish() returns confirmed (RabbitMQ) or confirm() waits

    def depth(self) -> int:
        """Dead letters not yet replayed (without taking any)."""
        ...

    def heads(self) -> list[DeadLetter]:
        """The first letter of each part of the box read in order of failure (a Kafka
        partition), without taking any; none when :meth:`letters` reads the oldest first
        anyway (a queue)."""
        ...

    def letters(self, *, batch_size: int, take: bool) -> Generator[list[Received], None, None]:
        """Batches of the letters in the box now. ``take=False`` reads without removing
        anything, even through :meth:`settle` (inspection and dry runs)."""
        ...

    def prepare(self, destination: Destination) -> None:
        """Make sure a destination trueup owns (the parking lot) exists."""
        ...

    def require(self, destination: Destination) -> None:
        """Refuse a destination trueup does not own (``replay_to``) that does not exist,
        before any letter is sent (:class:`~trueup.errors.NotFound`)."""
        ...

    def publish(self, item: Received, destination: Destination, *, replay_id: int) -> None:
        ...

    def confirm(self) -> None:
        """Return once every copy sent so far is confirmed; :class:`LettersRefused` when
        some were refused outright and all the others confirmed."""
        ...

    def wait(self, seconds: float) -> None:
        """Pause (``--rate``) while keeping the broker connection alive (heartbeats)."""
        ...

    def settle(self, items: list[Received], states: list[Settle]) -> None:
        ...

    def close(self) -> None:
        ...


def open_letterbox(config: Config, name: str) -> Letterbox:
    """The letterbox of dead-letter queue ``name`` of the config."""
    dlq = config.dead_letter(name)
    connection = config.connection(dlq.connection)
    what = f"dead_letters.{name}"
    if dlq.topic is not None:
        from trueup.letterboxes.kafka import KafkaLetterbox

        assert connection.kafka is not None
        return KafkaLetterbox(properties=connection.kafka, topic=dlq.topic, name=name,
                              what=what, state=config.state)
    from trueup.letterboxes.rabbitmq import RabbitLetterbox

    assert connection.rabbitmq is not None and dlq.queue is not None
    return RabbitLetterbox(url=connection.rabbitmq, queue=dlq.queue, name=name, what=what)
