"""RabbitMQ through pika: connections, queue and exchange inspection, error translation."""

from __future__ import annotations

import pika
import pika.exceptions

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
