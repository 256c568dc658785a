"""RabbitMQ through pika: connect, publish with confirm, consume, error translation."""

from __future__ import annotations

import contextlib
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from trueup.db import first_line, redact, scrubbed
from trueup.errors import ConnectionFailed, TrueupError

CONNECT_TIMEOUT_SECONDS = 10


class RabbitFailed(TrueupError):
    """A RabbitMQ operation failed after the connection was made."""


class Unroutable(RabbitFailed):
    """A published message no queue took: the broker returned it."""


#: What opening a connection raises when the broker cannot be reached or will not talk: a
#: handshake that never ends (a port that is not RabbitMQ's) comes as the connector's own
#: exception, not as an AMQPError.
CONNECT_ERRORS = (pika.exceptions.AMQPError, AMQPConnectorException, OSError)


def translate(exc: Exception, what: str, *, at: str | None = None) -> TrueupError:
    """A trueup error for a pika exception; ``what`` names the config path, ``at`` the broker's
    host and port when known."""
    where = f" at {at}" if at else ""
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return ConnectionFailed(f"{what}: RabbitMQ{where} refused the login (check the user "
                                f"and password of the URL): {_reason(exc)}")
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return ConnectionFailed(f"{what}: RabbitMQ{where} refused the virtual host (check the "
                                f"URL's path and the user's permissions): {_reason(exc)}")
    if isinstance(exc, pika.exceptions.AMQPConnectionError | AMQPConnectorException
                  | ConnectionError | OSError):
        return ConnectionFailed(f"{what}: cannot reach RabbitMQ{where}: {_reason(exc)}")
    return RabbitFailed(f"{what}: {first_line(exc)}")


def _reason(exc: BaseException) -> str:
    """Why a connection failed, from the innermost error pika wrapped (``Connection refused``,
    not ``AMQPConnectionError``)."""
    if isinstance(exc, AMQPConnectorStackTimeout):  # its text names every socket option
        return (f"no AMQP handshake within {CONNECT_TIMEOUT_SECONDS} s (is it RabbitMQ's "
                f"port?)")
    while isinstance(exc, pika.exceptions.AMQPConnectionError | AMQPConnectorException) \
            and not str(exc).strip(" ()") and exc.args:
        inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    inner = getattr(exc, "exception", None)  # a connector's socket or handshake error
    if isinstance(inner, BaseException):
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc)


def _parameters(url: str, what: str, heartbeat: int | None = None) -> pika.URLParameters:
    try:
        params = pika.URLParameters(url)
    except Exception as exc:
        # a port or query option pika cannot read: ValueError mostly, but ssl_options is
        # evaluated as a Python literal and opens the files it names (SyntaxError, OSError...)
        raise ConnectionFailed(f"{what}: cannot read the RabbitMQ URL "
                               f"{redact(url)!r}: {scrubbed(first_line(exc), url)}") from exc
    params.socket_timeout = CONNECT_TIMEOUT_SECONDS
    params.blocked_connection_timeout = CONNECT_TIMEOUT_SECONDS
    # the whole connect, handshake included: a port that accepts and never answers
    params.stack_timeout = CONNECT_TIMEOUT_SECONDS
    params.connection_attempts = 1
    if heartbeat is not None:
        params.heartbeat = heartbeat
    return params


def _open(params: pika.URLParameters, what: str) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(params)
    except CONNECT_ERRORS as exc:
        raise translate(exc, what, at=f"{params.host}:{params.port}") from exc


def connect(url: str, *, what: str) -> pika.BlockingConnection:
    return _open(_parameters(url, what), what)


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
    return _open(_parameters(url, what, heartbeat), what)


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
        raise Unroutable(f"{what}: no queue bound to {target} with routing key "
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
        if not isinstance(name, str):  # a name that is not UTF-8 (pika's bytes): not ours
            continue
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
