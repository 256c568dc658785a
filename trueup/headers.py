"""trueup's message headers: attempts, origin and error of a message, the same on both brokers.

The workers write them when a message is retried or dead-lettered; the replayer reads them to
find where a dead letter came from and how often it failed. RabbitMQ 3.13+ ignores an
``x-death`` header set by a client, so the attempt count lives in a header of our own.

Values are text on the wire (UTF-8 bytes in Kafka, strings in AMQP tables), times are ISO 8601
in UTC with milliseconds.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

PREFIX = "trueup-"
MESSAGE_ID = "trueup-message-id"
ATTEMPTS = "trueup-attempts"              # failed handler attempts over the message's life
NOT_BEFORE = "trueup-not-before"          # epoch milliseconds: a retry is not due before
ORIGIN = "trueup-origin"                  # the topic or queue the message was consumed from
ORIGIN_PARTITION = "trueup-origin-partition"
ORIGIN_OFFSET = "trueup-origin-offset"
ORIGIN_TIMESTAMP = "trueup-origin-timestamp"  # epoch milliseconds of the original message
GROUP = "trueup-group"                    # consumer group (Kafka) or consumer name (RabbitMQ)
ERROR_CLASS = "trueup-error-class"
ERROR_MESSAGE = "trueup-error-message"
FIRST_FAILURE = "trueup-first-failure"
LAST_FAILURE = "trueup-last-failure"
REPLAY_ID = "trueup-replay-id"            # the replay that last moved this message

ERROR_MESSAGE_MAX_CHARS = 1000
#: The most attempts a header is believed to count: a larger one (or a negative one) was not
#: written by trueup, and must neither overflow an ``integer`` column nor crash a worker.
MAX_ATTEMPTS = 1_000_000

# The headers a :class:`Failure` reads and writes; any other ``trueup-`` header (a retry's
# NOT_BEFORE) is dropped from a dead letter's replayed copy.
FAILURE_HEADERS = frozenset({
    MESSAGE_ID, ATTEMPTS, ORIGIN, ORIGIN_PARTITION, ORIGIN_OFFSET, ORIGIN_TIMESTAMP, GROUP,
    ERROR_CLASS, ERROR_MESSAGE, FIRST_FAILURE, LAST_FAILURE, REPLAY_ID})


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=1024)  # a replay reads each letter's failure time twice
def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def integer(text: str | None) -> int | None:
    """A header's whole number, None when absent or not a number."""
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)  # read for every dead letter; a queue holds few counts
def attempt_count(text: str | None) -> int:
    """A header's attempt count: 0 when absent or not a number, within ``0..MAX_ATTEMPTS``."""
    return clamp_attempts(integer(text) or 0)


def clamp_attempts(count: int) -> int:
    return min(max(0, count), MAX_ATTEMPTS)


@dataclass(frozen=True, kw_only=True)
class Failure:
    """What trueup knows about a message's failures, as carried in its headers."""

    message_id: str | None = None
    attempts: int = 0
    origin: str | None = None
    origin_partition: int | None = None
    origin_offset: int | None = None
    origin_timestamp_ms: int | None = None
    group: str | None = None
    error_class: str | None = None
    error_message: str | None = None
    first_failure: dt.datetime | None = None
    last_failure: dt.datetime | None = None
    replay_id: int | None = None

    @classmethod
    def read(cls, headers: Mapping[str, str]) -> Failure:
        """The failure record of a message's (text) headers; missing fields stay empty."""
        return cls(
            message_id=headers.get(MESSAGE_ID) or None,
            attempts=attempt_count(headers.get(ATTEMPTS)),
            origin=headers.get(ORIGIN) or None,
            origin_partition=integer(headers.get(ORIGIN_PARTITION)),
            origin_offset=integer(headers.get(ORIGIN_OFFSET)),
            origin_timestamp_ms=integer(headers.get(ORIGIN_TIMESTAMP)),
            group=headers.get(GROUP) or None,
            error_class=headers.get(ERROR_CLASS) or None,
            error_message=headers.get(ERROR_MESSAGE) or None,
            first_failure=parse_time(headers.get(FIRST_FAILURE)),
            last_failure=parse_time(headers.get(LAST_FAILURE)),
            replay_id=integer(headers.get(REPLAY_ID)),
        )

    def failed(self, error: BaseException, *, attempt: int, at: dt.datetime) -> Failure:
        """This record after attempt ``attempt`` failed with ``error`` at ``at``."""
        return replace(self, attempts=attempt, error_class=error_class(error),
                       error_message=error_message(error),
                       first_failure=self.first_failure or at, last_failure=at)

    def write(self) -> dict[str, str]:
        """The headers of this record (only the fields that are set)."""
        values: dict[str, Any] = {
            MESSAGE_ID: self.message_id, ATTEMPTS: self.attempts, ORIGIN: self.origin,
            ORIGIN_PARTITION: self.origin_partition, ORIGIN_OFFSET: self.origin_offset,
            ORIGIN_TIMESTAMP: self.origin_timestamp_ms, GROUP: self.group,
            ERROR_CLASS: self.error_class, ERROR_MESSAGE: self.error_message,
            FIRST_FAILURE: format_time(self.first_failure) if self.first_failure else None,
            LAST_FAILURE: format_time(self.last_failure) if self.last_failure else None,
            REPLAY_ID: self.replay_id,
        }
        return {k: str(v) for k, v in values.items() if v is not None}


def error_class(error: BaseException) -> str:
    """``module.Class`` of an error, short for builtins (``ValueError``)."""
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")


def error_message(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # a handler's exception whose __str__ fails: its class still tells
        text = ""
    return (" ".join(text.split()) or type(error).__name__)[:ERROR_MESSAGE_MAX_CHARS]


# ---------------------------------------------------------------------------------------------
# Kafka headers are a list of (name, bytes) pairs; trueup works on a name -> text mapping.


def _pairs(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None
           ) -> Iterable[tuple[str, Any]]:
    """Kafka headers as ``(name, value)`` pairs, whatever shape they came in."""
    # A list (what confluent-kafka gives) is checked first: a Mapping check costs an ABC lookup.
    if isinstance(headers, list):
        return headers
    return headers.items() if isinstance(headers, Mapping) else headers or ()


def from_kafka(headers: Iterable[tuple[str, str | bytes | None]] | Mapping[
        str, str | bytes | None] | None) -> dict[str, str]:
    """Kafka headers as text (the last value of a repeated name wins; undecodable bytes are
    replaced, never fatal)."""
    # One comprehension: this runs for every letter a replay reads.
    return {name: value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""
            for name, value in _pairs(headers)}


def to_kafka(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode("utf-8")) for name, value in headers.items()]


def kafka_copy(raw: Iterable[tuple[str, Any]] | Mapping[str, Any] | None,
               changes: Mapping[str, str], *,
               keep: Container[str] = frozenset()) -> list[tuple[str, Any]]:
    """The headers of a copy of a Kafka message: the message's own (``raw``) as they are,
    byte for byte, repeats and empty values included (a schema id is binary), except
    trueup's: those in ``changes`` take its value, the others are dropped unless in ``keep``."""
    prefix = PREFIX
    # Tests ordered for the common case (a dead letter's headers are mostly trueup's own).
    kept = [(k, v) for k, v in _pairs(raw)
            if (k not in changes and k in keep) or not k.startswith(prefix)]
    for k, v in changes.items():
        kept.append((k, v.encode()))
    return kept
