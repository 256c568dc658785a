"""A RabbitMQ worker with per-attempt delay queues and a dead-letter queue.

The worker consumes ``queue`` with a prefetch window and acks a message only after its handler
succeeded, or after its retry or dead-letter copy was confirmed by the broker (publisher
confirms). A retry waits in ``<queue>.retry.<n>`` (``n`` = failed attempts so far): a queue
without consumers whose messages expire after the policy's delay (per-message ``expiration``)
and are dead-lettered by RabbitMQ back to ``queue``. The attempt count travels in trueup's own
header: RabbitMQ 4 ignores an ``x-death`` set by a client.

The handler runs on a thread of its own while the worker keeps the connection serviced
(heartbeats): a handler slower than the heartbeat timeout must not get the connection dropped,
its ack refused and its message delivered again. Acks stay on the connection's thread.

When the connection drops (broker restart, network) the worker reconnects with growing pauses;
unacked messages are delivered again, so a handler may see a message twice (at least once).
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from trueup import headers, threads, tracing
from trueup.brokers import rabbitmq
from trueup.errors import ConnectionFailed
from trueup.health import HEALTH
from trueup.log import bound, get_logger
from trueup.retry import RetryPolicy
from trueup.workers.runtime import (
    SERVICE_SECONDS,
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

PREFETCH = 20
IDLE_SECONDS = 0.25
HEARTBEAT_SECONDS = 10  # a dead broker is noticed within two of them


class CopyRefused(rabbitmq.RabbitFailed):
    """The broker did not take a retry or dead-letter copy (a nack: a full queue that
    rejects publishes; unroutable: its queue deleted meanwhile). The message stays unacked and
    comes again after a reconnect, which declares the worker's queues again."""


RECONNECT_ERRORS: tuple[type[BaseException], ...] = (ConnectionFailed, CopyRefused,
                                                     *rabbitmq.CONNECTION_ERRORS)
#: What ``trueup_worker_reconnects_total{reason}`` names a reconnect by: the first of these
#: classes the error is an instance of (most specific first), else ``other``. A fixed set keeps
#: the label's values few whatever pika raises.
RECONNECT_REASONS: tuple[type[BaseException], ...] = (
    CopyRefused, ConnectionFailed,
    pika.exceptions.StreamLostError, pika.exceptions.AMQPHeartbeatTimeout,
    pika.exceptions.ConnectionClosedByBroker, pika.exceptions.ConnectionClosed,
    pika.exceptions.ConnectionWrongStateError, pika.exceptions.AMQPConnectionError,
    pika.exceptions.ChannelClosedByBroker, pika.exceptions.ChannelWrongStateError,
    ConnectionError, OSError)


def reconnect_reason(error: BaseException) -> str:
    """The ``reason`` label of a reconnect after ``error``: a class name of
    :data:`RECONNECT_REASONS`, or ``other``."""
    return next((kind.__name__ for kind in RECONNECT_REASONS if isinstance(error, kind)),
                "other")


class RabbitWorker:
    """Consume ``queue``, run ``handler``, retry and dead-letter per ``policy``.

    ``metrics_port``: serve ``/metrics``, ``/healthz`` and ``/readyz`` on that port of
    127.0.0.1 while :meth:`run` runs (0: any free port); readiness checks RabbitMQ and, when
    ``database`` (a Postgres DSN the handler depends on) is given, the database too.
    A message whose handler failed while that database does not answer waits for it (see
    :class:`~trueup.workers.runtime.DatabaseGate`): not retried, not dead-lettered.
    ``heartbeat_seconds``: the AMQP heartbeat timeout of the worker's connection.
    """

    def __init__(self, *, url: str, queue: str, handler: Handler, policy: RetryPolicy,
                 dead_letter_queue: str, prefetch: int = PREFETCH, name: str | None = None,
                 retry_queues: int | None = None, metrics_port: int | None = None,
                 database: str | None = None,
                 heartbeat_seconds: int = HEARTBEAT_SECONDS) -> None:
        self.url = url
        self.queue = queue
        self.handler = handler
        self.policy = policy
        self.dead_letter_queue = dead_letter_queue
        self.prefetch = prefetch
        self.name = name or f"trueup-worker-{queue}"
        self.tiers = max(1, policy.retries if retry_queues is None else retry_queues)
        self.metrics_port = metrics_port
        self.database = database
        self.gate = DatabaseGate(self.name, database)
        self.heartbeat_seconds = heartbeat_seconds
        self.what = f"worker {self.name} on {queue}"
        self._handling: ThreadPoolExecutor | None = None

    def delay_queue(self, failed_attempts: int) -> str:
        return f"{self.queue}.retry.{min(max(1, failed_attempts), self.tiers)}"

    def declare(self, connection: pika.BlockingConnection) -> None:
        """The work queue (unless it exists), the delay queues and the dead-letter queue."""
        rabbitmq.ensure_queue(connection, self.queue)
        rabbitmq.ensure_queue(connection, self.dead_letter_queue)
        for n in range(1, self.tiers + 1):
            # No x-message-ttl on the queue: the delay is each message's expiration, so a
            # changed backoff never clashes with the declared arguments.
            rabbitmq.ensure_queue(connection, self.delay_queue(n), {
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.queue})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting whenever the connection is lost."""
        reconnect = Reconnect(self.name)
        self._handling = threads.executor(1, "trueup-handler")
        try:
            with serving(self.metrics_port, database=self.database, rabbitmq=self.url):
                while not stop.is_set():
                    try:
                        self._session(stop, reconnect)
                    except RECONNECT_ERRORS as exc:
                        reconnect.after(reconnect_reason(exc), exc, stop, broker="rabbitmq",
                                        queue=self.queue)
        finally:
            # A handler still running after a lost connection finishes before run() returns.
            self._handling.shutdown(wait=True)
            self._handling = None
        log.info("worker.stopped", broker="rabbitmq", queue=self.queue)

    def _session(self, stop: threading.Event, reconnect: Reconnect) -> None:
        connection = rabbitmq.connect_retrying(self.url, what=self.what,
                                               heartbeat=self.heartbeat_seconds)
        try:
            self.declare(connection)
            channel = rabbitmq.confirmed_channel(connection, prefetch=self.prefetch)
            log.info("worker.started", broker="rabbitmq", queue=self.queue, name=self.name)
            for method, properties, body in channel.consume(self.queue,
                                                            inactivity_timeout=IDLE_SECONDS):
                if stop.is_set():
                    break
                if method is None:
                    # Nothing came within IDLE_SECONDS: an idle queue is not a stuck worker.
                    # A delivery is progress only once settled (in _one): a message whose copy
                    # the broker refuses comes first again after every reconnect, and must not
                    # keep a worker that never gets past it looking ready.
                    HEALTH.progressed()
                else:
                    self._one(channel, method, properties, body, stop)
                # The pauses start again once the session got somewhere (a message settled,
                # or none waiting), not when it starts: a message whose copy the broker
                # refuses each time must not be handled again five times a second.
                reconnect.reset()
            channel.cancel()  # unacked prefetched messages go back to the queue
        finally:
            rabbitmq.close_quietly(connection)

    def _one(self, channel: BlockingChannel, method: Any, properties: pika.BasicProperties,
             body: bytes, stop: threading.Event) -> None:
        text = rabbitmq.text_headers(properties)
        # where the message is, on every line about it (the handler thread's too: it runs in
        # a copy of this context)
        with bound(queue=self.queue, delivery_tag=method.delivery_tag), \
                tracing.message_span("worker.handle", text, queue=self.queue,
                                     delivery_tag=method.delivery_tag):
            self._settle(channel, method, properties, body, text, stop)
        HEALTH.progressed()

    def _settle(self, channel: BlockingChannel, method: Any, properties: pika.BasicProperties,
                body: bytes, text: dict[str, str], stop: threading.Event) -> None:
        failure = headers.Failure.read(text)
        message_id = properties.message_id or failure.message_id or uuid.uuid4().hex
        delivery = Delivery(body=body, key=None, headers=text, source=self.queue,
                            attempt=failure.attempts + 1, message_id=message_id)
        settlement = self._handled(channel, delivery, failure)
        while settlement.action is Action.HOLD:
            # the database is away: the message waits, unacked, and is handled again (its
            # attempt not counted) once it answers; a stopping worker leaves it to come again
            if not self.gate.wait(stop, lambda seconds: self._service(channel, seconds)):
                return
            settlement = self._handled(channel, delivery, failure)
        if settlement.action is not Action.ACK:
            record = settlement.failure
            record = replace(record, origin=self.queue, group=self.name)
            table = {**rabbitmq.without_broker_deaths(
                {k: v for k, v in (properties.headers or {}).items()
                 # pika gives a name that is not UTF-8 as bytes: not ours, kept as it came
                 if not (isinstance(k, str) and k.startswith(headers.PREFIX))}),
                **record.write()}
            if settlement.action is Action.RETRY:
                target = self.delay_queue(record.attempts)
                expiration = str(max(0, int(settlement.delay_seconds * 1000)))
            else:
                target, expiration = self.dead_letter_queue, None
            try:
                with forwarding(settlement, target):
                    rabbitmq.publish(channel, exchange="", routing_key=target, body=body,
                                     properties=rabbitmq.republished_properties(
                                         properties, headers=tracing.inject(table),
                                         expiration=expiration),
                                     what=f"{self.what}: {target}")
            except rabbitmq.RabbitFailed as exc:  # a nack, or unroutable
                raise CopyRefused(str(exc)) from exc
        # Only now, with the handler done or its copy confirmed, does the message leave.
        channel.basic_ack(method.delivery_tag)
        record_settlement(self.name, settlement)

    def _handled(self, channel: BlockingChannel, delivery: Delivery,
                 failure: headers.Failure) -> Settlement:
        """:func:`settle` on the handler thread (in this thread's trace context), servicing the
        connection until it is done. One handler at a time: a handler left running by a lost
        connection holds up the next one, never runs beside it."""
        assert self._handling is not None
        running = self._handling.submit(contextvars.copy_context().run, settle, self.handler,
                                        delivery, self.policy, failure, gate=self.gate)
        while not wait([running], timeout=SERVICE_SECONDS).done:
            channel.connection.process_data_events(time_limit=0)
        return running.result()

    @staticmethod
    def _service(channel: BlockingChannel, seconds: float) -> bool:
        """Keep the connection serviced (heartbeats) for ``seconds``."""
        channel.connection.process_data_events(time_limit=seconds)
        return True
