"""A Kafka consumer-group worker with retry topics and a dead-letter topic.

A failed message is copied to ``<topic>.retry.<n>`` (``n`` = its failed attempts so far, capped
at the number of retry topics) with a ``trueup-not-before`` header, and its offset is committed:
the work partition moves on and a failing message never blocks it. The worker also consumes the
retry topics; a retry that is not due yet pauses its partition (and seeks back) until it is.
Once the policy gives up, the message goes to the dead-letter topic with headers naming the
original topic, partition, offset and timestamp, the group, the attempts, the error and the
first and last failure times.

Offsets are committed only for messages whose handler succeeded or whose retry/dead-letter copy
Kafka has confirmed (``acks=all``, idempotent producer): at least once, never lost.

Every ``lag_interval_seconds`` the worker sets ``trueup_consumer_lag{group,topic,partition}``
for the partitions it owns (work and retry topics) from librdkafka's statistics: the
partition's high watermark minus the group's committed offset, with no request of its own to
the brokers.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from trueup import headers, metrics, tracing
from trueup.brokers import kafka
from trueup.errors import ConnectionFailed, TrueupError
from trueup.health import HEALTH
from trueup.log import bound, get_logger
from trueup.retry import RetryPolicy
from trueup.workers.runtime import (
    Action,
    DatabaseGate,
    Delivery,
    Handler,
    Reconnect,
    Settlement,
    forwarding,
    record_settlement,
    serving,
    settle,
)

log = get_logger(__name__)

POLL_SECONDS = 0.2
BATCH_MESSAGES = 100
AUTO_COMMIT_INTERVAL_MS = 1000
#: librdkafka's default max.poll.interval.ms: a batch is handled within half of it.
MAX_POLL_INTERVAL_MS = 300_000
#: How often the consumer lag gauge is refreshed (seconds): librdkafka's statistics interval.
LAG_INTERVAL_SECONDS = 5.0
#: How long a retry or dead-letter copy may take to be confirmed before the session starts
#: again (see KafkaWorker.run).
COPY_CONFIRM_SECONDS = kafka.CONFIRM_TIMEOUT_SECONDS
#: How long a stopping worker waits for copies a failure left unconfirmed (sent again anyway).
CLOSE_FLUSH_SECONDS = 5.0


class KafkaWorker:
    """Consume ``topic`` as ``group``, run ``handler``, retry and dead-letter per ``policy``.

    ``metrics_port``: serve ``/metrics``, ``/healthz`` and ``/readyz`` on that port of
    127.0.0.1 while :meth:`run` runs (0: any free port); readiness checks Kafka and, when
    ``database`` (a Postgres DSN the handler depends on) is given, the database too.
    A message whose handler failed while that database does not answer waits for it (see
    :class:`~trueup.workers.runtime.DatabaseGate`): not retried, not dead-lettered.
    """

    def __init__(self, *, properties: Mapping[str, Any], topic: str, group: str,
                 handler: Handler, policy: RetryPolicy, dead_letter_topic: str,
                 retry_topics: int | None = None, consumer_overrides: Mapping[str, Any] | None
                 = None, metrics_port: int | None = None, database: str | None = None,
                 lag_interval_seconds: float = LAG_INTERVAL_SECONDS) -> None:
        self.properties = dict(properties)
        self.topic = topic
        self.group = group
        self.handler = handler
        self.policy = policy
        self.dead_letter_topic = dead_letter_topic
        self.tiers = max(1, policy.retries if retry_topics is None else retry_topics)
        self.consumer_overrides = dict(consumer_overrides or {})
        self.metrics_port = metrics_port
        self.database = database
        self.gate = DatabaseGate(group, database)
        self._holding = False  # a failed message waits for the database, every partition paused
        #: partitions revoked or lost while a message of the batch waited for the database
        self._taken: set[tuple[str, int]] = set()
        self.lag_interval_seconds = lag_interval_seconds
        self.what = f"worker {group} on {topic}"
        self._paused: dict[tuple[str, int], float] = {}  # (topic, partition) -> monotonic due
        #: retry partition -> (offset held, monotonic time it is handled at the latest)
        self._held: dict[tuple[str, int], tuple[int, float]] = {}
        # What the rebalance callbacks assigned: whose messages are handled, whose lag reported.
        self._assigned: set[tuple[str, int]] = set()
        #: The partition of a message whose copy Kafka did not confirm, while no message has
        #: settled since and the partition is still this worker's: the loop's turns are then
        #: not progress (brokers that answer but never confirm a copy would otherwise keep the
        #: worker ready while its message waits for good).
        self._stuck: tuple[str, int] | None = None
        self._closing = False  # the session's consumer is closing (revoking all it holds)

    def retry_topic(self, failed_attempts: int) -> str:
        return f"{self.topic}.retry.{min(max(1, failed_attempts), self.tiers)}"

    @property
    def retry_topics(self) -> list[str]:
        return [f"{self.topic}.retry.{n}" for n in range(1, self.tiers + 1)]

    def ensure_topics(self, partitions: int | None = None) -> None:
        """Create the retry and dead-letter topics (as many partitions as the work topic),
        taking what it takes: its largest message with trueup's headers added."""
        admin = kafka.connect_admin(self.properties, what=self.what)
        count = partitions or kafka.topic_partitions(admin, self.topic, what=self.what) or 1
        kafka.create_topics(admin, [self.topic], partitions=count, what=self.what)
        largest = kafka.topic_max_message_bytes(admin, self.topic)
        kafka.create_topics(admin, [*self.retry_topics, self.dead_letter_topic],
                            partitions=count, what=self.what, config={} if largest is None else {
                                "max.message.bytes": str(kafka.copy_room(largest))})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then commit what is done and leave the group.

        A retry or dead-letter copy Kafka does not confirm (the brokers away for longer than
        the confirm timeout, a delivery failing for want of in-sync replicas) ends the session
        with the message's offset not stored: after a pause (0.2 s doubling to 5 s) a new one
        joins the group again and handles the message again."""
        with serving(self.metrics_port, database=self.database, kafka=self.properties):
            reconnect = Reconnect(self.group)
            while not stop.is_set():
                try:
                    self._consume(stop, reconnect)
                except CopyUnconfirmed as exc:
                    reconnect.after("CopyUnconfirmed", exc, stop, broker="kafka",
                                    topic=self.topic, group=self.group)

    def _consume(self, stop: threading.Event, reconnect: Reconnect) -> None:
        consumer = kafka.create_consumer(
            self.properties, group=self.group, what=self.what,
            **{"enable.auto.commit": True, "enable.auto.offset.store": False,
               "auto.commit.interval.ms": AUTO_COMMIT_INTERVAL_MS,
               "topic.metadata.refresh.interval.ms": 5000,
               "statistics.interval.ms": max(100, int(self.lag_interval_seconds * 1000)),
               "stats_cb": self._on_stats, **self.consumer_overrides})
        try:
            copies = _Copies(self.properties, self.topic, what=self.what)
            try:
                consumer.subscribe([self.topic, *self.retry_topics], on_assign=self._on_assign,
                                   on_revoke=self._on_revoke, on_lost=self._on_lost)
                log.info("worker.started", broker="kafka", topic=self.topic, group=self.group)
                while not stop.is_set():
                    # The loop turns: not stuck, even when idle or with retry partitions
                    # paused. Unlike RabbitMQ, no message can hold a turning loop back: a
                    # failing one moves to a retry topic, a refused dead-letter copy stops the
                    # worker, and a broker away fails the kafka check; but a copy left
                    # unconfirmed holds its message until one settles (see _stuck).
                    if self._stuck is None:
                        HEALTH.progressed()
                    self._resume_due(consumer)
                    batch = self._next_messages(consumer)
                    self._batch(consumer, copies, batch, stop)
                    if self._stuck is None:  # a message settled: the pauses start again
                        reconnect.reset()
            finally:
                copies.close()
        finally:
            self._closing = True
            try:
                consumer.close()  # commits the stored offsets (auto commit), leaves the group
            finally:
                self._closing = False
            self._forget_lag(list(self._assigned))
            log.info("worker.stopped", broker="kafka", topic=self.topic, group=self.group)

    # -----------------------------------------------------------------------------------------

    def _batch(self, consumer: Consumer, copies: _Copies, batch: list[Message],
               stop: threading.Event) -> None:
        """Handle a batch, within half the group's poll interval: past it, the messages not yet
        handled are handed back (their partitions seeked back to them) for the next poll, so
        that slow handlers never keep the worker from polling long enough to leave the group
        with a batch in hand."""
        started = time.monotonic()
        # Partitions whose messages in hand are no longer handled: past a message left
        # unsettled, or taken by a rebalance while a message waited for the database (given
        # back or not, they are read again from the committed offset). None of their offsets
        # may be stored, nor sought to: that would pass over the message left.
        left: set[tuple[str | None, int | None]] = set()
        self._taken.clear()
        for i, message in enumerate(batch):
            if stop.is_set():
                return
            if i and time.monotonic() - started > self._batch_seconds:
                self._hand_back(consumer, [m for m in batch[i:]
                                           if (m.topic(), m.partition()) not in left])
                return
            where = (message.topic(), message.partition())
            if where not in left and not self._one(consumer, copies, message, stop):
                left.add(where)
            left.update(self._taken)

    @property
    def _batch_seconds(self) -> float:
        interval_ms = (self.consumer_overrides.get("max.poll.interval.ms")
                       or self.properties.get("max.poll.interval.ms") or MAX_POLL_INTERVAL_MS)
        return int(interval_ms) / 1000 / 2

    def _hand_back(self, consumer: Consumer, messages: list[Message]) -> None:
        """Seek each partition back to its first message of ``messages``: the next poll
        fetches them again. A paused partition was seeked back to its retry already."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if message.error() is None and topic is not None and partition is not None \
                    and offset is not None:
                first.setdefault((topic, partition), offset)
        for (topic, partition), offset in first.items():
            if (topic, partition) in self._paused or (topic, partition) not in self._assigned:
                continue
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                if not self._revoked(consumer, exc, topic, partition, offset):
                    raise
        log.info("worker.batch_handed_back", group=self.group, messages=len(messages),
                 seconds=round(self._batch_seconds, 1))

    def _one(self, consumer: Consumer, copies: _Copies, message: Message,
             stop: threading.Event) -> bool:
        """Handle one message of a batch; False when it was left unsettled (see _hold)."""
        error = message.error()
        if error is not None:
            if kafka.is_transient(error):
                log.debug("worker.kafka_error", error=error.str())
                return True
            if error.code() == KafkaError._MAX_POLL_EXCEEDED:
                # One handler outlasted max.poll.interval.ms: the consumer left the group and
                # joins again on the next poll. Whatever it had not committed, the partitions'
                # owners handle again (at least once).
                log.warning("worker.left_group", group=self.group, error=error.str())
                return True
            raise kafka.translate(KafkaException(error), self.what)
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        if (topic, partition) not in self._assigned:
            # Polled just before consume() ran a rebalance that revoked its partition: its
            # owner now reads it again from the committed offset.
            log.debug("worker.skipped_revoked", group=self.group, topic=topic,
                      partition=partition, offset=offset)
            return True
        if (topic, partition) in self._paused:
            return True  # fetched before the pause; the seek brings it back when due
        raw = kafka.message_headers(message)
        text = headers.from_kafka(raw)
        if topic != self.topic and (text.get(headers.GROUP) or self.group) != self.group:
            # Every group consuming a topic shares its retry topics: another group's retry is
            # that group's to handle.
            self._done(consumer, topic, partition, offset, message)
            return True
        if topic != self.topic:
            wait = self._wait(topic, partition, offset, text)
            if wait > 0:
                self._pause(consumer, topic, partition, offset, wait)
                return True
        # where the message is, on every line about it (its failure, a refused retry copy)
        with bound(topic=topic, partition=partition, offset=offset), \
                tracing.message_span("worker.handle", text, topic=topic, partition=partition,
                                     offset=offset, group=self.group):
            try:
                if not self._settle(consumer, copies, message, raw, text, stop):
                    return False
            except CopyUnconfirmed:
                self._stuck = (topic, partition)
                raise
        self._stuck = None
        HEALTH.progressed()
        return True

    def _settle(self, consumer: Consumer, copies: _Copies, message: Message,
                raw: list[tuple[str, Any]], text: dict[str, str], stop: threading.Event) -> bool:
        """Handle the message and settle it (store its offset once done); False when it was
        left unsettled, its offset not stored: the worker stopped, or its partition was
        taken, while it waited for the database."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        failure = headers.Failure.read(text)
        if topic == self.topic:
            failure = replace(failure, origin=topic, origin_partition=partition,
                              origin_offset=offset, origin_timestamp_ms=message.timestamp()[1],
                              group=self.group)
        delivery = Delivery(body=message.value(), key=message.key(), headers=text,
                            source=self.topic, attempt=failure.attempts + 1,
                            message_id=failure.message_id or f"{topic}:{partition}:{offset}")
        settlement = settle(self.handler, delivery, self.policy, failure, gate=self.gate)
        while settlement.action is Action.HOLD:
            # the database is away: the message waits, its offset not stored, and is handled
            # again (its attempt not counted) once it answers; a stopping worker, or one whose
            # partition was taken meanwhile, leaves it to be handled again
            if not self._hold(consumer, topic, partition, stop):
                return False
            settlement = settle(self.handler, delivery, self.policy, failure, gate=self.gate)
        if settlement.action is not Action.ACK:
            changes = settlement.failure.write()
            if settlement.action is Action.RETRY:
                target = self.retry_topic(settlement.failure.attempts)
                due = time.time() + settlement.delay_seconds
                changes[headers.NOT_BEFORE] = str(int(due * 1000))
            else:
                target = self.dead_letter_topic
            settlement = self._forward(copies, message, raw, settlement, target, changes)
        # Committed by the next auto commit, or on revoke/close: only now is the message done.
        self._done(consumer, topic, partition, offset, message)
        record_settlement(self.group, settlement)
        return True

    def _hold(self, consumer: Consumer, topic: str, partition: int,
              stop: threading.Event) -> bool:
        """Wait for the database with every partition paused, polling meanwhile so that the
        consumer stays in its group (``max.poll.interval.ms``) and rebalances run: True once
        it answers and ``topic:partition`` stayed this worker's all along (taken and given
        back, it is read again from the committed offset)."""
        consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
        self._holding = True

        def service(seconds: float) -> bool:
            message = consumer.poll(seconds)
            if message is not None and message.error() is None:
                self._hand_back(consumer, [message])  # fetched before its partition paused
            return (topic, partition) in self._assigned and (topic, partition) not in self._taken

        try:
            return self.gate.wait(stop, service)
        finally:
            self._holding = False
            consumer.resume([TopicPartition(t, p) for t, p in self._assigned
                             if (t, p) not in self._paused])

    def _forward(self, copies: _Copies, message: Message, raw: list[tuple[str, Any]],
                 settlement: Settlement, target: str, changes: dict[str, str]) -> Settlement:
        """Copy ``message`` to its retry topic or the dead-letter topic (``target``) and wait
        for the confirm; the settlement it was sent by. A retry copy refused outright (too
        large for the retry topic) is dead-lettered instead; a dead-letter copy refused so
        stops the worker, which cannot go past the message without losing it."""
        # From the raw headers, not ``text``: the message's own travel on byte for byte.
        copied = headers.kafka_copy(raw, changes)
        try:
            with forwarding(settlement, target):
                copies.publish(target, value=message.value(), key=message.key(),
                               headers=tracing.inject(copied))
            return settlement
        except kafka.KafkaRefused as exc:
            where = f"{message.topic()}:{message.partition()}:{message.offset()}"
            if target == self.dead_letter_topic:
                raise kafka.KafkaRefused(
                    f"{self.what}: the dead-letter topic {target} refused message {where} "
                    f"({exc}); the worker stops rather than lose it: let the topic take it "
                    f"(max.message.bytes) and start the worker again") from exc
            log.warning("worker.retry_refused", group=self.group, target=target,
                        message=where, error=str(exc))
        changes.pop(headers.NOT_BEFORE, None)
        dead = replace(settlement, action=Action.DEAD_LETTER)
        return self._forward(copies, message, raw, dead, self.dead_letter_topic, changes)

    def _done(self, consumer: Consumer, topic: str, partition: int, offset: int,
              message: Message) -> None:
        """Store the message's offset for the next commit."""
        try:
            consumer.store_offsets(message=message)
        except KafkaException as exc:
            if not self._revoked(consumer, exc, topic, partition, offset):
                raise

    def _wait(self, topic: str, partition: int, offset: int, text: dict[str, str]) -> float:
        """Seconds until the retry at ``offset`` is due: the time in its header (not a number:
        due now), but never later than the policy's longest delay, which bounds every retry a
        worker writes, after this worker first held it. A far-off time (a wrong clock, a
        hand-made header) must not hold up the partition for good: each pause is fetched
        again, so the bound counts from the first."""
        # past the year 285,000 a time is as far off as any: a float cannot divide more
        due_ms = min(headers.integer(text.get(headers.NOT_BEFORE)) or 0, 2 ** 53)
        wait = due_ms / 1000 - time.time()
        if wait <= 0:
            return 0.0
        now = time.monotonic()
        held = self._held.get((topic, partition))
        if held is None or held[0] != offset:
            held = (offset, now + self.policy.max_seconds)
            self._held[(topic, partition)] = held
            if wait > self.policy.max_seconds:
                log.warning("worker.retry_due_far_off", group=self.group, topic=topic,
                            partition=partition, offset=offset, due_in_seconds=round(wait),
                            handled_in_seconds=self.policy.max_seconds)
        return min(wait, held[1] - now)

    def _pause(self, consumer: Consumer, topic: str, partition: int, offset: int,
               wait: float) -> None:
        tp = TopicPartition(topic, partition, offset)
        consumer.pause([tp])
        try:
            consumer.seek(tp)
        except KafkaException as exc:
            if not self._revoked(consumer, exc, topic, partition, offset):
                raise
            return  # the pause is undone when the partition is assigned again
        self._paused[(topic, partition)] = time.monotonic() + wait

    def _revoked(self, consumer: Consumer, exc: KafkaException, topic: str, partition: int,
                 offset: int) -> bool:
        """True (and logged) when ``exc`` says the partition of a message is no longer this
        consumer's: a rebalance took it while the message was in hand. Its new owner reads the
        message again from the committed offset (at least once)."""
        error = kafka.error_of(exc)
        if error is None or error.code() not in (KafkaError._STATE,
                                                 KafkaError._UNKNOWN_PARTITION):
            return False
        if any(tp.topic == topic and tp.partition == partition
               for tp in consumer.assignment()):
            return False  # still ours: a real failure, never to be passed over
        log.warning("worker.partition_revoked", group=self.group, topic=topic,
                    partition=partition, offset=offset, error=error.str())
        return True

    def _resume_due(self, consumer: Consumer) -> None:
        now = time.monotonic()
        due = [key for key, at in self._paused.items() if at <= now]
        if due:
            consumer.resume([TopicPartition(t, p) for t, p in due])
            for key in due:
                del self._paused[key]

    def _next_messages(self, consumer: Consumer) -> list[Message]:
        """What has arrived, up to a batch. Only the first message is waited for (until the
        poll timeout): consume() would wait out its timeout for a full batch, delaying every
        message of a quiet topic by up to the timeout."""
        first = consumer.poll(self._poll_timeout())
        if first is None:
            return []
        return [first, *consumer.consume(BATCH_MESSAGES - 1, 0)]

    def _poll_timeout(self) -> float:
        if not self._paused:
            return POLL_SECONDS
        return max(0.0, min(POLL_SECONDS, min(self._paused.values()) - time.monotonic()))

    def _on_stats(self, document: str) -> None:
        """librdkafka's statistics (every ``lag_interval_seconds``, from ``consume``): the lag
        of each owned partition. Committed lag when the group committed an offset there, else
        the lag behind the offsets stored for the next commit; unknown (not set) before
        either."""
        try:
            stats = json.loads(document)
            for topic, about in (stats.get("topics") or {}).items():
                for number, partition in (about.get("partitions") or {}).items():
                    key = (topic, int(number))
                    if key not in self._assigned:
                        continue  # the -1 "unassigned" entry, or another member's
                    lag = int(partition.get("consumer_lag", -1))
                    if lag < 0:
                        lag = int(partition.get("consumer_lag_stored", -1))
                    if lag >= 0:
                        metrics.CONSUMER_LAG.labels(self.group, topic, str(key[1])).set(lag)
        except (ValueError, TypeError, AttributeError) as exc:  # never fail the poll loop
            log.debug("worker.stats_unreadable", group=self.group, error=str(exc))

    def _forget_lag(self, partitions: list[tuple[str, int]]) -> None:
        """Stop reporting partitions this worker no longer owns: their new owner reports."""
        for topic, partition in partitions:
            self._assigned.discard((topic, partition))
            with contextlib.suppress(KeyError):  # never reported (lag not known yet)
                metrics.CONSUMER_LAG.remove(self.group, topic, str(partition))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps an application's pause on a partition through unassign and reassign:
        # a retry partition paused when the group rebalanced would never be fetched again.
        # Its retry, fetched anew, pauses it again until due.
        consumer.resume(partitions)
        if self._holding:  # not fetched while a message waits for the database (see _hold)
            consumer.pause(partitions)
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)
            self._assigned.add((tp.topic, tp.partition))
        if self._stuck is not None and self._stuck not in self._assigned:
            # a new session not given the stuck message's partition: another member has it
            self._stuck = None
        log.info("worker.assigned", group=self.group,
                 partitions=[f"{tp.topic}:{tp.partition}" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what is done before another member takes the partitions over.
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("worker.commit_failed", group=self.group, error=str(exc))
        self._forget_partitions(partitions)

    def _forget_partitions(self, partitions: list[TopicPartition]) -> None:
        """What this worker kept of partitions no longer its own: pauses, holds, lag, and the
        stuck message's (another member handles it now), but when the session itself ends."""
        if not self._closing and self._stuck in {(tp.topic, tp.partition) for tp in partitions}:
            self._stuck = None
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)
            self._held.pop((tp.topic, tp.partition), None)
            if self._holding:
                self._taken.add((tp.topic, tp.partition))
        self._forget_lag([(tp.topic, tp.partition) for tp in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already, so nothing is committed.
        self._forget_partitions(partitions)
        log.warning("worker.partitions_lost", group=self.group, count=len(partitions))


class CopyUnconfirmed(kafka.KafkaFailed):
    """A retry or dead-letter copy that Kafka did not confirm for want of brokers (see
    :class:`kafka.KafkaUnconfirmed`): the worker starts its session again (see
    :meth:`KafkaWorker.run`). A copy failing for good (an authorization error, say) stops the
    worker, as one refused outright does."""


class _Copies:
    """The worker's producer of retry and dead-letter copies, sending messages as large as the
    work topic takes (librdkafka refuses a larger one before it leaves, at 1,000,000 bytes by
    default), or what the properties say when that is more.

    The work topic's size is asked at start and again when a copy is refused: a worker started
    while Kafka could not be asked (or before its topic existed), or whose topic was let take
    larger messages since, gets a producer sized to the topic then, which sends the copy again.
    """

    def __init__(self, properties: Mapping[str, Any], topic: str, *, what: str) -> None:
        self.properties, self.topic, self.what = properties, topic, what
        self.limit = self._limit()
        self.producer = self._producer()

    def _limit(self) -> int:
        try:
            admin = kafka.connect_admin(self.properties, what=self.what)
        except TrueupError:  # the consumer says what is wrong with the connection
            return kafka.copy_producer_limit(self.properties, None)
        return kafka.copy_producer_limit(self.properties,
                                         kafka.topic_max_message_bytes(admin, self.topic))

    def publish(self, target: str, *, value: bytes | None, key: bytes | None,
                headers: list[tuple[str, Any]]) -> None:
        """Send a copy and wait for its confirmation; :class:`kafka.KafkaRefused` when refused
        by a producer as large as the work topic takes, or by ``target``."""
        def send() -> None:
            kafka.publish(self.producer, target, value=value, key=key, headers=headers,
                          what=f"{self.what}: {target}", timeout=COPY_CONFIRM_SECONDS)

        try:
            try:
                send()
            except kafka.KafkaRefused:
                limit = self._limit()
                if limit <= self.limit:
                    raise
                log.info("worker.copy_limit_raised", topic=self.topic, before=self.limit,
                         after=limit)
                self.producer.flush(CLOSE_FLUSH_SECONDS)  # nothing waits: each is confirmed
                self.limit = limit
                self.producer = self._producer()
                send()
        except (kafka.KafkaUnconfirmed, ConnectionFailed) as exc:  # the brokers away
            raise CopyUnconfirmed(str(exc)) from exc

    def _producer(self) -> Any:
        return kafka.create_producer(self.properties, what=self.what,
                                     **{"message.max.bytes": self.limit})

    def close(self) -> None:
        # Every copy was confirmed (or timed out) before its offset was stored: this only
        # waits for one a failure left behind, which is sent again anyway.
        self.producer.flush(CLOSE_FLUSH_SECONDS)
