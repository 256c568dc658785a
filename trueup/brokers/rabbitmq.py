"""RabbitMQ through pika: connect, publish with confirm, consume, error translation."""

from __future__ import annotations

import contextlib
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from trueup.db import first_line
from trueup.errors import ConnectionFailed, TrueupError

CONNECT_TIMEOUT_SECONDS = 10


class RabbitFailed(TrueupError):
    """A RabbitMQ operation failed after the connection was made."""


def translate(exc: Exception, what: str) -> TrueupError:
    """A trueup error for a pika exception; ``what`` names the config path."""
    if isinstance(exc, pika.exceptions.AMQPConnectionError | ConnectionError | OSError):
        return ConnectionFailed(f"{what}: cannot reach RabbitMQ: {first_line(exc) or 'refused'}")
    return RabbitFailed(f"{what}: {first_line(exc)}")


def connect(url: str, *, what: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = CONNECT_TIMEOUT_SECONDS
    params.blocked_connection_timeout = CONNECT_TIMEOUT_SECONDS
    params.connection_attempts = 1
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise translate(exc, what) from exc


def queue_depth(connection: pika.BlockingConnection, queue: str) -> int | None:
    """Messages ready in ``queue`` (passive declare), or None when it does not exist.

    A passive declare of a missing queue closes the channel, so each check uses its own.
    """
    channel = connection.channel()
    try:
        result = channel.queue_declare(queue=queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    channel.close()
    return int(result.method.message_count)


def exchange_exists(connection: pika.BlockingConnection, exchange: str) -> bool:
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange=exchange, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    channel.close()
    return True


# ---------------------------------------------------------------------------------------------
# Publish with confirm, consume, declare (used by the workers and the replayer)

PERSISTENT = 2  # delivery_mode of a message that survives a broker restart

#: Errors after which a connection is gone and a new one is needed (broker restart, network).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ChannelClosedByBroker,
    pika.exceptions.ConnectionWrongStateError,
    ConnectionError,
    OSError,
)

#: Reply codes of a channel the broker closed in answer to what was asked, the same on every
#: try: no such exchange or queue (404), access refused (403). Other closes (406 when a
#: delivery stayed unacknowledged past the broker's consumer_timeout, say) are outages: a new
#: connection and another try get past them.
REFUSAL_CODES = frozenset({403, 404})


def refused(exc: pika.exceptions.ChannelClosedByBroker, what: str) -> RabbitFailed:
    """The error for a channel the broker closed in answer to a request (``what``)."""
    return RabbitFailed(f"{what}: RabbitMQ refused it and closed the channel "
                        f"({exc.reply_code} {exc.reply_text})")


def connect_retrying(url: str, *, what: str, heartbeat: int = 10) -> pika.BlockingConnection:
    """A connection with a short heartbeat, so a dead broker is noticed within seconds."""
    params = pika.URLParameters(url)
    params.socket_timeout = CONNECT_TIMEOUT_SECONDS
    params.blocked_connection_timeout = CONNECT_TIMEOUT_SECONDS
    params.connection_attempts = 1
    params.heartbeat = heartbeat
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise translate(exc, what) from exc


def confirmed_channel(connection: pika.BlockingConnection,
                      prefetch: int | None = None) -> BlockingChannel:
    """A channel in publisher-confirm mode: :func:`publish` returns once the broker has the
    message (persisted, for a durable queue and a persistent message)."""
    channel = connection.channel()
    channel.confirm_delivery()
    if prefetch is not None:
        channel.basic_qos(prefetch_count=prefetch)
    return channel


def publish(channel: BlockingChannel, *, exchange: str, routing_key: str, body: bytes,
            properties: pika.BasicProperties, what: str) -> None:
    """Publish one message and wait for the broker's confirm.

    ``mandatory``: a message no queue takes is returned and reported, never silently dropped.
    """
    try:
        channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                              properties=properties, mandatory=True)
    except pika.exceptions.UnroutableError as exc:
        target = f"exchange {exchange!r}" if exchange else "the default exchange"
        raise RabbitFailed(f"{what}: no queue bound to {target} with routing key "
                           f"{routing_key!r}") from exc
    except pika.exceptions.NackError as exc:
        raise RabbitFailed(f"{what}: the broker refused the message (nack)") from exc


def declare_queue(channel: BlockingChannel, queue: str,
                  arguments: dict[str, Any] | None = None) -> None:
    """Declare a durable queue (no-op when it exists with the same arguments)."""
    try:
        channel.queue_declare(queue=queue, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise RabbitFailed(f"queue {queue!r} exists with other arguments: "
                               f"{exc.reply_text}") from exc
        raise


def text_headers(properties: pika.BasicProperties) -> dict[str, str]:
    """A message's headers as text (AMQP tables may hold numbers, bytes, lists: those that are
    not plain values are left out; ``x-death`` is read separately)."""
    found: dict[str, str] = {}
    for name, value in (properties.headers or {}).items():
        if isinstance(value, bytes):
            found[name] = value.decode("utf-8", "replace")
        elif isinstance(value, str | int | float | bool):
            found[name] = str(value)
    return found


#: Headers RabbitMQ writes when it dead-letters a message; a client that republishes drops them
#: (RabbitMQ 3.13+ would ignore them anyway) and records what they said in trueup's headers.
BROKER_DEATH_HEADERS = ("x-death", "x-first-death-queue", "x-first-death-reason",
                        "x-first-death-exchange", "x-last-death-queue", "x-last-death-reason",
                        "x-last-death-exchange")


def republished_properties(properties: pika.BasicProperties, *, headers: dict[str, Any],
                           expiration: str | None = None) -> pika.BasicProperties:
    """The properties of a copy of a message: same ids and content type, persistent, with
    ``headers``; never the original's expiration (a dead letter must not expire) nor its
    ``user_id`` (the broker refuses one that is not the publishing user)."""
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        headers=headers, delivery_mode=PERSISTENT, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to,
        expiration=expiration, message_id=properties.message_id,
        timestamp=properties.timestamp, type=properties.type, app_id=properties.app_id)


def without_broker_deaths(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in BROKER_DEATH_HEADERS}


def ensure_queue(connection: pika.BlockingConnection, queue: str,
                 arguments: dict[str, Any] | None = None) -> None:
    """Declare ``queue`` unless it exists (with whatever arguments its owner gave it)."""
    if queue_depth(connection, queue) is not None:
        return
    channel = connection.channel()
    declare_queue(channel, queue, arguments)
    channel.close()


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close a connection that may already be dead (after a broker restart, say)."""
    if connection is None or not connection.is_open:
        return
    with contextlib.suppress(*CONNECTION_ERRORS):  # gone either way
        connection.close()
