"""Kafka through confluent-kafka: connect, publish with confirm, consume, error translation."""

from __future__ import annotations

import logging
import operator
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from functools import partial
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

# exported by confluent_kafka.admin, which the type stubs do not say
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from trueup.errors import ConnectionFailed, TrueupError
from trueup.log import get_logger

log = get_logger(__name__)

METADATA_TIMEOUT_SECONDS = 10.0


class KafkaFailed(TrueupError):
    """A Kafka operation failed after the connection was made."""


class KafkaUnconfirmed(KafkaFailed):
    """Messages neither confirmed nor refused for good: not confirmed in time, or failed for
    want of brokers (timed out, transport, retriable errors). Sending them again may succeed
    once the brokers are back."""


class KafkaRefused(KafkaFailed):
    """A message was refused outright, by the client or a broker (too large, say): sending it
    again as it is cannot succeed. ``tags``: those :func:`produce` was given for the refused
    messages, when :func:`confirm` tells."""

    def __init__(self, message: str, tags: list[Any] | None = None) -> None:
        super().__init__(message)
        self.tags = tags or []


#: Delivery reports of messages the brokers' absence or trouble left undelivered: sent again
#: once the brokers are back, they may go through. (A delivery report's error never says
#: retriable(): confluent-kafka builds it from the code alone.) _FATAL: the idempotent
#: producer must be made again. A topic gone (UNKNOWN_TOPIC_OR_PART) is no such error.
BROKERS_AWAY_CODES = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN, KafkaError._FATAL, KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.KAFKA_STORAGE_ERROR})
#: Errors that refuse a message itself, not the way to the broker.
REFUSED_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                           KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG_SIZE})
#: Room a copy of a message needs beyond the message for the headers trueup adds.
COPY_HEADROOM_BYTES = 64 * 1024
#: librdkafka's default ``message.max.bytes``, the largest message a producer sends, and the
#: most it can be set to.
CLIENT_MESSAGE_MAX_BYTES = 1_000_000
CLIENT_MESSAGE_MAX_BYTES_LIMIT = 1_000_000_000
#: The most a topic's ``max.message.bytes`` can be (a 32-bit int).
TOPIC_MESSAGE_MAX_BYTES_LIMIT = 2**31 - 1


def copy_room(largest: int) -> int:
    """What a topic takes that takes copies of messages as large as ``largest`` (another
    topic's ``max.message.bytes``), trueup's headers added."""
    return min(TOPIC_MESSAGE_MAX_BYTES_LIMIT, largest + COPY_HEADROOM_BYTES)


def copy_producer_limit(properties: Mapping[str, Any], largest: int | None) -> int:
    """The ``message.max.bytes`` of a producer of copies of messages as large as ``largest``
    (None: unknown): what the properties ask, or more when those copies need it, within what
    librdkafka takes."""
    asked = int(properties.get("message.max.bytes") or CLIENT_MESSAGE_MAX_BYTES)
    if largest is None:
        return asked
    return max(asked, min(CLIENT_MESSAGE_MAX_BYTES_LIMIT, copy_room(largest)))


#: ``message.headers()`` called through the C API, which checks that a call returning a result
#: raised nothing: CPython 3.11 runs a hot ``message.headers()`` call site through a
#: specialized instruction that does not, so headers that failed to read came back as a list
#: with the error left pending, to surface anywhere later (and a NULL name in the list).
_HEADERS = operator.methodcaller("headers")
#: The partitions whose unreadable headers were warned about (once each).
_UNREADABLE_HEADERS_SEEN: set[tuple[str | None, int | None]] = set()


def message_headers(message: Message) -> list[tuple[str, Any]]:
    """A message's headers as confluent-kafka reads them; none when it cannot: one header
    name that is not UTF-8 fails reading them all (a SystemError from a UnicodeDecodeError),
    and confluent-kafka could not produce such a name again anyway. Logged as a warning."""
    try:
        found = _HEADERS(message)
    except (SystemError, UnicodeDecodeError) as exc:
        where = (message.topic(), message.partition())
        # a warning once per partition (a producer writing such names writes them all)
        warn = log.warning if where not in _UNREADABLE_HEADERS_SEEN else log.debug
        if len(_UNREADABLE_HEADERS_SEEN) < 10_000:
            _UNREADABLE_HEADERS_SEEN.add(where)
        warn("kafka.headers_unreadable", topic=where[0], partition=where[1],
             offset=message.offset(), error=str(exc.__cause__ or exc))
        # The message keeps the list it failed to fill, a name left NULL in it, and would
        # give it without an error when asked again: reading that name crashes the
        # interpreter. Replaced, it is just no headers.
        message.set_headers([])
        return []
    return list(found.items()) if isinstance(found, dict) else found or []


def error_of(exc: KafkaException) -> KafkaError | None:
    """The librdkafka error a confluent-kafka exception carries, if any."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


def translate(exc: KafkaException, what: str, *,
              servers: str | None = None) -> TrueupError:
    """A trueup error for a confluent-kafka exception; ``what`` names the config path,
    ``servers`` the bootstrap servers a connection failure names when given."""
    error = error_of(exc)
    reason = error.str() if error is not None else str(exc)
    if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                              KafkaError._TIMED_OUT):
        return unreachable(what, servers, reason)
    return KafkaFailed(f"{what}: {reason}")


def unreachable(what: str, servers: str | None, reason: str) -> ConnectionFailed:
    """The error of a Kafka that does not answer (a refused connection, a timeout)."""
    at = f" at {servers}" if servers else ""
    return ConnectionFailed(f"{what}: cannot reach Kafka{at}: {reason}")


def connect_admin(properties: Mapping[str, Any], *, what: str) -> AdminClient:
    """An AdminClient that has answered a metadata request (so the cluster is reachable)."""
    settings: dict[str, Any] = {"logger": CLIENT_LOGGER, **properties,
                                "socket.connection.setup.timeout.ms": 5000}
    try:  # the constructor already refuses a property librdkafka does not know
        admin = AdminClient(settings)
    except KafkaException as exc:
        raise translate(exc, what, servers=properties.get("bootstrap.servers")) from exc
    try:
        metadata(admin)
    except KafkaException as exc:
        admin.poll(0)  # its log lines so far, which say why (once each)
        raise translate(exc, what, servers=properties.get("bootstrap.servers")) from exc
    return admin


#: How long the first metadata request waits in librdkafka: the thread waits in C, where
#: Python runs no signal handler, so Ctrl-C or SIGTERM took effect only when the wait ended.
#: Each request unanswered is sent again with twice the wait (a big cluster's answer may take
#: longer than the first slice) until the timeout.
METADATA_SLICE_SECONDS = 0.5
#: What a metadata request that gets no answer fails with (tried again until the timeout).
_NO_ANSWER = (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)


def metadata(client: AdminClient | Consumer, timeout: float | None = None) -> Any:
    """The cluster's metadata (every topic's), asked for in growing slices (0.5 s, 1 s, 2 s,
    ...) until ``timeout`` (:data:`METADATA_TIMEOUT_SECONDS`) passes without an answer, so a
    signal is handled within a slice."""
    deadline = time.monotonic() + (METADATA_TIMEOUT_SECONDS if timeout is None else timeout)
    wait = METADATA_SLICE_SECONDS
    while True:
        left = deadline - time.monotonic()
        try:
            return client.list_topics(timeout=max(min(wait, left), 0.01))
        except KafkaException as exc:
            error = error_of(exc)
            if left <= wait or error is None or error.code() not in _NO_ANSWER:
                raise
        wait *= 2


def topic_id(admin: AdminClient, topic: str, *, what: str,
             servers: str | None = None) -> str:
    """The topic's id: a topic deleted and created again under its old name gets a new one.
    A broker that does not answer is :class:`~trueup.errors.ConnectionFailed` naming
    ``servers``."""
    try:
        description = admin.describe_topics(TopicCollection([topic]))[topic].result(
            timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise translate(exc, what, servers=servers) from exc
    except TimeoutError as exc:  # the future's own timeout: the broker went quiet
        raise unreachable(what, servers, f"no answer within {METADATA_TIMEOUT_SECONDS:.0f}s "
                                         f"describing the topic") from exc
    return str(description.topic_id)


def topic_max_message_bytes(admin: AdminClient, topic: str) -> int | None:
    """The largest message ``topic`` takes (its ``max.message.bytes``); None when it cannot
    be told (no such topic, no right to describe it)."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        described = admin.describe_configs([resource], request_timeout=METADATA_TIMEOUT_SECONDS)
        entry = described[resource].result().get("max.message.bytes")
    except KafkaException:
        return None
    return int(entry.value) if entry is not None and entry.value else None


def topic_partitions(admin: AdminClient, topic: str, *, what: str) -> int | None:
    """The number of partitions of ``topic``, or None when it does not exist.

    Asks for the metadata of every topic: a request naming one topic makes a broker with
    ``auto.create.topics.enable`` create it, and inspecting must never create anything.
    """
    try:
        found = metadata(admin).topics.get(topic)
    except KafkaException as exc:
        raise translate(exc, what) from exc
    if found is None or found.error is not None:
        return None
    return len(found.partitions)


# ---------------------------------------------------------------------------------------------
# Publish with confirm, consume, topics (used by the workers and the replayer)

class _ClientLog(logging.Filter):
    """librdkafka's own log lines as trueup events (``kafka.client``, with ``facility``,
    ``client`` and ``message``), each distinct message at most once per ``REPEAT_SECONDS``.
    Printed by librdkafka itself they were plain text among the JSON lines, twenty a second
    while a broker was away (one per reconnect)."""

    REPEAT_SECONDS = 30.0
    MAX_MESSAGES = 1000  # distinct messages remembered (offsets and ids vary without end)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (last shown, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs ("%s [%s] %s", facility, client name, "[thrd:...]: message")
        args = record.args
        facility, client, text = ((str(args[0]), str(args[1]), str(args[2]))
                                  if isinstance(args, tuple) and len(args) == 3
                                  else ("", "", record.getMessage()))
        message = _THREAD_PREFIX.sub("", text)
        # one client's "after 0ms" and "after 1ms" are one message; each client says it once
        alike = f"{client} {_NUMBERS.sub('#', message)}"
        now = time.monotonic()
        with self._lock:
            shown, held = self._seen.get(alike, (-self.REPEAT_SECONDS, 0))
            if now - shown < self.REPEAT_SECONDS:
                self._seen[alike] = (shown, held + 1)
                return False
            if len(self._seen) >= self.MAX_MESSAGES:
                self._seen.clear()
            self._seen[alike] = (now, 0)
        # trueup's formatter shows the event and its fields; any other handler (logging not
        # set up by trueup.log) the whole line
        record.msg, record.args = "kafka.client %s [%s]: %s", (facility, client, message)
        record.event = "kafka.client"
        # the client's errors are mostly what it retries by itself: trueup reports what fails
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.fields = {"facility": facility, "client": client, "message": message,
                         **({"repeated": held} if held else {})}
        return True


_THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: ")
_NUMBERS = re.compile(r"\d+")

#: Where every trueup client's librdkafka log lines go (served when the client is polled).
CLIENT_LOGGER = logging.getLogger("trueup.kafka.client")
CLIENT_LOGGER.addFilter(_ClientLog())

#: Properties every trueup client starts from (the user's win). librdkafka drops its bootstrap
#: connection once it has learned the brokers, failing a request sent on it, which then waits
#: for a connection to a learned broker: one the default reconnect backoff (100 ms, with
#: jitter) holds back. That cost each short-lived client about 50 ms on its first request.
#: Its log lines go to :data:`CLIENT_LOGGER`.
CLIENT_DEFAULTS: dict[str, Any] = {"reconnect.backoff.ms": 10, "logger": CLIENT_LOGGER}

PRODUCER_DEFAULTS: dict[str, Any] = {
    # Nothing is acknowledged before the write it depends on is confirmed: every replica must
    # have the message, and a retried send never duplicates it.
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 5,
    # Success needs no report: flush() returning 0 says every message was acknowledged, and a
    # failure still gets its report. One Python call per message saved.
    "delivery.report.only.error": True,
}
CONFIRM_TIMEOUT_SECONDS = 120.0


class Deliveries:
    """Failed deliveries of the messages given to a producer since the last :func:`confirm`
    (producers of :func:`create_producer` report failures only)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        #: Of the errors, those that refused a message itself: its tag (see :func:`produce`).
        self.refused: list[Any] = []
        #: Whether every error was one the brokers' coming back may cure (BROKERS_AWAY_CODES).
        self.transient = True

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        self.report(None, error, message)

    def report(self, tag: Any, error: KafkaError | None, message: Any) -> None:
        """The delivery report of a message produced with ``tag``."""
        if error is not None:
            self.errors.append(f"{message.topic()}: {error.str()}")
            if error.code() in REFUSED_CODES:
                self.refused.append(tag)
            if not (error.code() in BROKERS_AWAY_CODES or error.retriable()):
                self.transient = False


def create_producer(properties: Mapping[str, Any], *, what: str,
                    **overrides: Any) -> Producer:
    """A producer with ``acks=all`` and idempotence (the caller may add properties)."""
    try:
        return Producer({**CLIENT_DEFAULTS, **properties, **PRODUCER_DEFAULTS, **overrides})
    except KafkaException as exc:
        raise translate(exc, what) from exc


def produce(producer: Producer, deliveries: Deliveries, topic: str, *, value: bytes | str | None,
            key: bytes | str | None = None, headers: list[tuple[str, Any]] | None = None,
            partition: int | None = None, timestamp_ms: int | None = None,
            tag: Any = None) -> None:
    """Hand one message to ``producer``; :func:`confirm` waits for its delivery report.

    No poll() per message: the producers report failures only, and confirm()'s flush serves
    those. A poll releases and retakes the GIL, a handover to any other busy thread of the
    process (a replay's recorder) every message. ``tag``: what :class:`KafkaRefused` names
    the message by when the broker refuses it (a callback of its own, made when given).
    """
    report = deliveries.on_delivery if tag is None else partial(deliveries.report, tag)
    kwargs: dict[str, Any] = {"value": value, "key": key, "headers": headers,
                              "on_delivery": report}
    if partition is not None:
        kwargs["partition"] = partition
    if timestamp_ms is not None:
        kwargs["timestamp"] = timestamp_ms
    while True:
        try:
            producer.produce(topic, **kwargs)
            break
        except BufferError:
            producer.poll(0.05)  # the local queue is full: let deliveries drain
        except KafkaException as exc:  # refused before it left: message.max.bytes, say
            error = error_of(exc)
            if error is not None and error.code() in REFUSED_CODES:
                raise KafkaRefused(f"{topic}: {error.str()}") from exc
            raise translate(exc, f"topic {topic}") from exc


def produce_all(producer: Producer, deliveries: Deliveries, topic: str,
                messages: Iterable[tuple[str | None, str | None]]) -> None:
    """:func:`produce` each ``(key, value)`` of ``messages``, in order (a backfill's many)."""
    send, report = producer.produce, deliveries.on_delivery
    for key, value in messages:
        while True:
            try:
                send(topic, value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain


def confirm(producer: Producer, deliveries: Deliveries, *, what: str,
            timeout: float = CONFIRM_TIMEOUT_SECONDS) -> None:
    """Wait until every message produced so far is acknowledged by all in-sync replicas.

    Raises :class:`KafkaFailed` when one was refused or not confirmed in ``timeout`` seconds
    (:class:`KafkaRefused` when each failed one was refused outright, :class:`KafkaUnconfirmed`
    when none was refused for good); the caller must then not commit or ack anything that
    depends on those messages.
    """
    remaining = producer.flush(timeout)
    errors, deliveries.errors = deliveries.errors, []
    refused, deliveries.refused = deliveries.refused, []
    transient, deliveries.transient = deliveries.transient, True
    if remaining:
        raise KafkaUnconfirmed(
            f"{what}: {remaining} messages not confirmed within {timeout:.0f}s")
    if errors:
        told = f"{what}: {len(errors)} messages refused, first: {errors[0]}"
        if len(refused) == len(errors):  # every other message confirmed
            raise KafkaRefused(told, refused)
        raise (KafkaUnconfirmed if transient else KafkaFailed)(told)


def publish(producer: Producer, topic: str, *, value: bytes | None, what: str,
            key: bytes | str | None = None, headers: list[tuple[str, Any]] | None = None,
            timeout: float = CONFIRM_TIMEOUT_SECONDS) -> None:
    """Produce one message and wait for its confirmation (see :func:`confirm`)."""
    deliveries = Deliveries()
    produce(producer, deliveries, topic, value=value, key=key, headers=headers)
    confirm(producer, deliveries, what=what, timeout=timeout)


def create_consumer(properties: Mapping[str, Any], *, group: str, what: str,
                    **overrides: Any) -> Consumer:
    """A consumer of ``group`` that never commits by itself unless ``overrides`` say so."""
    settings = {**CLIENT_DEFAULTS, **properties, "group.id": group,
                "enable.auto.commit": False, "auto.offset.reset": "earliest", **overrides}
    try:
        return Consumer(settings)
    except KafkaException as exc:
        raise translate(exc, what) from exc


def create_topics(admin: AdminClient, names: list[str], *, partitions: int = 1,
                  what: str, config: Mapping[str, str] | None = None) -> None:
    """Create the topics among ``names`` that do not exist yet (and wait for them)."""
    existing = admin.list_topics(timeout=METADATA_TIMEOUT_SECONDS).topics
    wanted = [NewTopic(n, num_partitions=partitions, replication_factor=-1,
                       config=dict(config or {})) for n in names if n not in existing]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise translate(exc, f"{what}: topic {name}") from exc


def delete_topics(admin: AdminClient, names: list[str], *, what: str) -> None:
    existing = admin.list_topics(timeout=METADATA_TIMEOUT_SECONDS).topics
    doomed = [n for n in names if n in existing]
    if not doomed:
        return
    for name, future in admin.delete_topics(doomed, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise translate(exc, f"{what}: topic {name}") from exc


def end_offsets(consumer: Consumer, topic: str, partitions: int, *,
                what: str) -> dict[int, tuple[int, int]]:
    """``partition -> (low, high)`` watermarks of ``topic``."""
    found = {}
    for partition in range(partitions):
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_SECONDS, cached=False)
        except KafkaException as exc:
            raise translate(exc, what) from exc
        found[partition] = (int(low), int(high))
    return found


def committed_offsets(consumer: Consumer, topic: str, partitions: int, *,
                      what: str) -> dict[int, int | None]:
    """``partition -> next offset`` committed by the consumer's group (None when none)."""
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                     timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise translate(exc, what) from exc
    for tp in offsets:
        if tp.error is not None:  # that partition's answer: no offset is not "none committed"
            raise translate(KafkaException(tp.error), f"{what}: partition {tp.partition}")
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in offsets}


def read_to_ends(consumer: Consumer, topic: str, bounds: Mapping[int, tuple[int, int]], *,
                 batch_size: int, poll_seconds: float, stall_seconds: float,
                 stalled: Callable[[], Exception],
                 outlive_transient: bool = False) -> Generator[list[Message], None, None]:
    """The messages of ``topic`` from ``start`` up to ``end`` (exclusive) of each partition in
    ``bounds`` (``partition -> (start, end)``), batch by batch as consumed.

    The ends are a snapshot: what arrives past them waits for the next reader. A partition is
    done at its message at ``end - 1``, or at its end-of-partition event past ``end`` when the
    last offsets held no message (transaction markers, compacted away): ``consumer`` needs
    ``enable.partition.eof``. Raises ``stalled()`` when no message came for ``stall_seconds``
    while some are due, and a consumer error as :class:`KafkaException` (errors librdkafka
    recovers from by itself are waited out instead with ``outlive_transient``).
    """
    active = {p: end for p, (start, end) in bounds.items() if end > start}
    if not active:
        return
    assigned = [TopicPartition(topic, p, bounds[p][0]) for p in active]
    consumer.assign(assigned)
    # A partition paused at its end by an earlier read stays paused through unassign().
    consumer.resume(assigned)
    due = {p: bounds[p][0] for p in active}  # the next offset expected per partition

    def finished(partition: int) -> None:
        del active[partition]
        consumer.pause([TopicPartition(topic, partition)])

    last_seen = time.monotonic()
    try:
        while active:
            # No more than are left: consume() waits out its timeout for a full batch.
            left = sum(end - due[p] for p, end in active.items())
            batch = []
            for message in consumer.consume(max(1, min(batch_size, left)), poll_seconds):
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if outlive_transient and is_transient(error):
                        continue
                    raise KafkaException(error)
                partition, offset = message.partition(), message.offset()
                assert partition is not None and offset is not None  # a message, or an EOF
                end = active.get(partition)
                if end is None:
                    continue  # finished: the rest waits for the next reader
                if error is not None:  # the partition's end as of now
                    if offset >= end:  # no message sat at end - 1 (markers, compacted away)
                        finished(partition)
                    continue
                if offset < end:
                    batch.append(message)
                    due[partition] = offset + 1
                if offset + 1 >= end:
                    finished(partition)
            if batch:
                last_seen = time.monotonic()
                yield batch
            elif time.monotonic() - last_seen > stall_seconds:
                raise stalled()
    finally:
        consumer.unassign()


def is_transient(error: KafkaError) -> bool:
    """Errors a consumer or producer outlives: librdkafka reconnects and retries by itself."""
    return bool(error.retriable()) or error.code() in (
        KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
        KafkaError._PARTITION_EOF, KafkaError.NOT_COORDINATOR, KafkaError._RESOLVE,
        KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
