"""A RabbitMQ dead-letter queue as a letterbox.

Depth comes from a passive declare, which touches no message. Reading without taking (inspection,
dry runs) uses ``basic_get`` without ack and then closes the channel: RabbitMQ puts every message
back at its place, marked ``redelivered`` (the only trace; nothing consumes a dead-letter queue
but the replayer, which ignores the flag). Do not give a dead-letter queue an
``x-delivery-limit``: a requeue counts as a delivery there.

A replay consumes with a prefetch window and handles exactly as many messages as the queue held
when it started. A copy is published with a publisher confirm before the letter is acked. A
letter that stays (filtered out, no destination) is moved to the tail of the queue (published,
confirmed, then acked), so later letters can be reached; letters not looked at are requeued in
place.

Letters RabbitMQ dead-lettered by itself (rejected, expired, delivery limit) carry only
``x-death``: their origin is the queue they died in, their error ``rabbitmq.<reason>``, their
attempts the sum of the death counts (added to trueup's count when both exist).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Generator
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from trueup import headers, tracing
from trueup.brokers import rabbitmq
from trueup.errors import NotFound
from trueup.letterboxes import Received, Settle
from trueup.letters import UNKNOWN_ERROR, DeadLetter, Destination, epoch_time
from trueup.log import get_logger

log = get_logger(__name__)

IDLE_SECONDS = 1.0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def letter_of(properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    """A dead letter of an AMQP message, from trueup's headers and RabbitMQ's ``x-death``."""
    table = properties.headers or {}
    text = rabbitmq.text_headers(properties)
    failure = headers.Failure.read(text)
    origin, error, failed_at, attempts = (failure.origin, failure.error_class,
                                          failure.last_failure, failure.attempts)
    # RabbitMQ keeps the most recent death first; a wait in a worker's delay queue is none
    deaths = [d for d in table.get("x-death") or []
              if isinstance(d, dict) and not _waited(d, origin)]
    if deaths:
        latest = deaths[0]
        when, recorded = _utc(latest.get("time")), _utc(failed_at)
        if recorded is None or (when is not None and when > recorded):
            # the broker's death is the letter's latest failure: it says where and why
            origin = _text(latest.get("queue")) or origin
            error = f"rabbitmq.{_text(latest.get('reason')) or 'dead_lettered'}"
            failed_at = when or failed_at
        attempts = headers.clamp_attempts(attempts + sum(
            int(d.get("count") or 1) for d in deaths))
    message_id = properties.message_id or failure.message_id
    if not message_id:
        # No id anywhere: the content and its death make one (identical twins share it).
        digest = hashlib.sha256(body)
        digest.update(f"|{origin}|{failed_at}|{error}".encode())
        message_id = f"sha256:{digest.hexdigest()[:32]}"
    return DeadLetter(message_id=message_id, key=properties.message_id, origin=origin,
                      error_class=error or UNKNOWN_ERROR, attempts=attempts,
                      failed_at=failed_at or _stamp(properties),
                      generation=failure.replay_id or 0, headers=text, record=failure)


def _utc(value: Any) -> dt.datetime | None:
    """A time as an aware UTC datetime (pika reads AMQP timestamps as naive UTC)."""
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _waited(death: dict[str, Any], origin: str | None) -> bool:
    """A death that was no failure: the message waited out a retry delay in its worker's
    delay queue (``<origin>.retry.<n>``), which expires it back to the work queue."""
    queue = _text(death.get("queue")) or ""
    return (_text(death.get("reason")) == "expired" and origin is not None
            and queue.startswith(f"{origin}.retry.") and queue.rpartition(".")[2].isdigit())


def _stamp(properties: pika.BasicProperties) -> dt.datetime | None:
    """The AMQP ``timestamp`` (seconds; many producers write milliseconds), None when absent or
    no time at all."""
    stamp = properties.timestamp
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        return epoch_time(stamp)
    return None


class RabbitLetterbox:
    def __init__(self, *, url: str, queue: str, name: str, what: str) -> None:
        self.url = url
        self.confirms_each_publish = True
        self.where = queue
        self.name = name
        self.what = what
        self.connection = rabbitmq.connect_retrying(url, what=what)
        if rabbitmq.queue_depth(self.connection, queue) is None:
            self.connection.close()
            raise NotFound(f"{what}: RabbitMQ queue {queue!r} does not exist")
        self.channel: BlockingChannel | None = None

    def depth(self) -> int:
        return rabbitmq.queue_depth(self.connection, self.where) or 0

    def heads(self) -> list[DeadLetter]:
        return []  # one queue, read from its head: the oldest letters come first

    def letters(self, *, batch_size: int, take: bool) -> Generator[list[Received], None, None]:
        budget = self.depth()
        if budget == 0:
            return
        if not take:
            yield from self._peek(budget, batch_size)
            return
        channel = rabbitmq.confirmed_channel(self.connection, prefetch=batch_size)
        self.channel = channel
        try:
            deliveries = channel.consume(self.where, inactivity_timeout=IDLE_SECONDS)
            seen = 0
            while seen < budget:
                batch: list[Received] = []
                for method, properties, body in deliveries:
                    if method is None:
                        break  # idle: hand over what there is
                    batch.append(Received(letter=letter_of(properties, body),
                                          handle=(method.delivery_tag, properties, body)))
                    seen += 1
                    if len(batch) >= batch_size or seen >= budget:
                        break
                if batch:
                    yield batch
                elif self.depth() == 0:
                    break  # someone else emptied the queue meanwhile
        finally:
            self.channel = None
            if channel.is_open:
                # Anything delivered and not settled goes back to its place.
                channel.close()

    def _peek(self, budget: int, batch_size: int) -> Generator[list[Received], None, None]:
        channel = self.connection.channel()
        try:
            seen = 0
            while seen < budget:
                batch: list[Received] = []
                while seen < budget and len(batch) < batch_size:
                    method, properties, body = channel.basic_get(self.where, auto_ack=False)
                    if method is None:
                        budget = seen
                        break
                    seen += 1
                    batch.append(Received(letter=letter_of(properties, body), handle=None))
                if batch:
                    yield batch
        finally:
            if channel.is_open:
                channel.close()  # every message read goes back, in order

    def prepare(self, destination: Destination) -> None:
        if destination.name is not None and destination.exchange is None:
            rabbitmq.ensure_queue(self.connection, destination.name)

    def require(self, destination: Destination) -> None:
        if destination.exchange is not None:
            if not rabbitmq.exchange_exists(self.connection, destination.exchange):
                raise NotFound(f"{self.what}: the letters' destination, exchange "
                               f"{destination.exchange!r}, does not exist")
        elif destination.name is not None and \
                rabbitmq.queue_depth(self.connection, destination.name) is None:
            raise NotFound(f"{self.what}: the letters' destination, RabbitMQ queue "
                           f"{destination.name!r}, does not exist")  # as _copy() says it

    def _copy(self, item: Received, *, exchange: str, routing_key: str,
              replay_id: int | None) -> None:
        assert self.channel is not None
        _, properties, body = item.handle
        kept = {k: v for k, v in rabbitmq.without_broker_deaths(properties.headers).items()
                if not k.startswith(headers.PREFIX)}
        table = tracing.inject({**kept, **item.letter.failure(replay_id=replay_id).write()})
        target = (f"exchange {exchange!r} with routing key {routing_key!r}" if exchange
                  else f"queue {routing_key!r}")
        what = f"{self.what}: a copy to {target}"
        try:
            rabbitmq.publish(self.channel, exchange=exchange, routing_key=routing_key,
                             body=body, what=what, properties=rabbitmq.republished_properties(
                                 properties, headers=table))
        except rabbitmq.Unroutable as exc:
            if exchange:
                raise
            # the default exchange routes to every queue by its name: this one is gone
            raise NotFound(f"{self.what}: the letters' destination, RabbitMQ queue "
                           f"{routing_key!r}, does not exist") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code not in rabbitmq.REFUSAL_CODES:
                raise  # an outage of the channel: the replay reconnects
            # The broker's answer (no such exchange, access refused), the same on every try:
            # no outage to reconnect through. The channel's unacked letters are back in place.
            raise rabbitmq.refused(exc, what) from exc

    def publish(self, item: Received, destination: Destination, *, replay_id: int) -> None:
        if destination.exchange is not None:
            self._copy(item, exchange=destination.exchange,
                       routing_key=destination.routing_key, replay_id=replay_id)
        else:
            assert destination.name is not None
            self._copy(item, exchange="", routing_key=destination.name, replay_id=replay_id)

    def confirm(self) -> None:
        """Nothing to wait for: each publish returned after its confirm."""

    def wait(self, seconds: float) -> None:
        # Through the connection: a plain sleep leaves heartbeats unanswered, and a pause
        # longer than the heartbeat timeout gets the connection dropped by the broker.
        self.connection.sleep(seconds)

    def settle(self, items: list[Received], states: list[Settle]) -> None:
        if self.channel is None:
            return  # read without taking
        # A run of DONE letters is acked at once (multiple=True up to its last tag): every
        # delivery of this channel before the run is settled already, those after it have
        # higher tags. One frame a batch instead of one a letter.
        done_up_to: int | None = None
        for item, state in zip(items, states, strict=True):
            tag = item.handle[0]
            if state is Settle.DONE:
                done_up_to = tag
                continue
            if done_up_to is not None:
                self.channel.basic_ack(done_up_to, multiple=True)
                done_up_to = None
            if state is Settle.KEEP or state is Settle.TAIL:
                # To the tail, so the letters behind it can be reached; then off the head.
                self._copy(item, exchange="", routing_key=self.where, replay_id=None)
                self.channel.basic_ack(tag)
            else:
                self.channel.basic_nack(tag, requeue=True)
        if done_up_to is not None:
            self.channel.basic_ack(done_up_to, multiple=True)

    def close(self) -> None:
        rabbitmq.close_quietly(self.connection)
