"""Connecting to RabbitMQ: what a user reads when it cannot be reached (sockets on 127.0.0.1,
no broker needed)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import unused_port
from trueup.brokers import rabbitmq
from trueup.errors import ConnectionFailed


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (not RabbitMQ's)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            return  # closed

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
    server.close()
    for conn in accepted:
        conn.close()
    thread.join(5)


def test_a_refused_connection_names_the_broker_and_the_reason() -> None:
    """It said only 'cannot reach RabbitMQ: AMQPConnectionError'."""
    port = unused_port()
    with pytest.raises(ConnectionFailed) as caught:
        rabbitmq.connect(f"amqp://guest:guest@127.0.0.1:{port}/%2F", what="connections.amqp")
    assert str(caught.value) == (f"connections.amqp: cannot reach RabbitMQ at 127.0.0.1:{port}: "
                                 f"Connection refused")


def test_a_port_that_never_answers_the_handshake_is_one_line_not_a_traceback(
        silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """pika raised its connector's own AMQPConnectorStackTimeout, no AMQPError: dlq, replay
    and validate ended in a traceback, validate without its other findings."""
    monkeypatch.setattr(rabbitmq, "CONNECT_TIMEOUT_SECONDS", 1)
    for connect in (rabbitmq.connect, rabbitmq.connect_retrying):
        with pytest.raises(ConnectionFailed) as caught:
            connect(f"amqp://guest:guest@127.0.0.1:{silent_port}/%2F", what="connections.amqp")
        assert str(caught.value) == (f"connections.amqp: cannot reach RabbitMQ at "
                                     f"127.0.0.1:{silent_port}: no AMQP handshake within 1 s "
                                     f"(is it RabbitMQ's port?)")
