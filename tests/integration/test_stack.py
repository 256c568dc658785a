"""scripts/stack: a fresh second stack, an idempotent `up`, Kafka and RabbitMQ round trips.

The round-trip tests use the main stack (``scripts/stack up``, run by ``make test``). The
isolated-stack test starts and stops a whole stack of its own on other ports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.conftest import pid_alive

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack"

# Every port below 32768: Linux hands out 32768-60999 as the local ports of outgoing
# connections, and a listener there can find its port taken by one. Below 20000 too, where
# tests/conftest.unused_port never looks (a test in the other xdist worker may take those).
TEST_PORTS = {
    "TRUEUP_PG_PORT": "15432",
    "TRUEUP_RABBITMQ_PORT": "15772",
    "TRUEUP_RABBITMQ_DIST_PORT": "16772",
    "TRUEUP_KAFKA_PORT": "19092",
    "TRUEUP_KAFKA_CONTROLLER_PORT": "19093",
}
# Not 15672: its distribution port (+20000) would fall into 35672-35682, rabbitmqctl's own range.
TEST_NODE = "trueup-test@localhost"


def _run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _pid(path: Path) -> int:
    return int(path.read_text().splitlines()[0].strip())


def _pids(stack_dir: Path) -> dict[str, int]:
    return {
        "postgres": _pid(stack_dir / "postgres" / "data" / "postmaster.pid"),
        "rabbitmq": _pid(stack_dir / "rabbitmq" / "rabbitmq.pid"),
        "kafka": _pid(stack_dir / "kafka" / "kafka.pid"),
    }


@pytest.fixture
def isolated_stack_env() -> Iterator[tuple[dict[str, str], Path]]:
    """Environment for a second stack in a fresh folder; the folder is removed afterwards."""
    # PostgreSQL runs as the postgres user, which must be able to reach the folder: pytest's
    # tmp_path lives under a 0700 directory, so make a world-searchable one instead.
    stack_dir = Path(tempfile.mkdtemp(prefix="trueup-stack-test-", dir="/tmp"))
    stack_dir.chmod(0o755)
    env = dict(os.environ)
    env.update(TEST_PORTS)
    env["TRUEUP_STACK_DIR"] = str(stack_dir)
    env["TRUEUP_RABBITMQ_NODE"] = TEST_NODE
    try:
        yield env, stack_dir
    finally:
        shutil.rmtree(stack_dir, ignore_errors=True)


@pytest.mark.stack
@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.rabbitmq
def test_isolated_stack_starts_from_nothing_and_up_is_idempotent(
    isolated_stack_env: tuple[dict[str, str], Path],
) -> None:
    env, stack_dir = isolated_stack_env
    pids: dict[str, int] = {}
    try:
        started = time.monotonic()
        first = _run(env, "up")
        elapsed = time.monotonic() - started
        assert first.returncode == 0, f"up failed:\n{first.stdout}\n{first.stderr}"
        assert "postgresql://postgres@127.0.0.1:15432/postgres" in first.stdout
        assert "amqp://guest:guest@127.0.0.1:15772/%2F" in first.stdout
        assert "127.0.0.1:19092" in first.stdout
        assert "already running" not in first.stdout
        print(f"isolated stack up from nothing in {elapsed:.1f}s")

        pids = _pids(stack_dir)
        assert all(pid_alive(pid) for pid in pids.values()), pids

        # The services answer on the test ports, not the main stack's.
        with psycopg.connect("postgresql://postgres@127.0.0.1:15432/postgres") as conn:
            assert conn.execute("select current_setting('port')").fetchone() == ("15432",)
        metadata = AdminClient({"bootstrap.servers": "127.0.0.1:19092"}).list_topics(timeout=10)
        assert {b.port for b in metadata.brokers.values()} == {19092}
        connection = pika.BlockingConnection(
            pika.URLParameters("amqp://guest:guest@127.0.0.1:15772/%2F")
        )
        connection.close()

        second = _run(env, "up")
        assert second.returncode == 0, f"second up failed:\n{second.stdout}\n{second.stderr}"
        for service in ("postgres", "rabbitmq", "kafka"):
            assert re.search(
                rf"^{service}: already running \(pid {pids[service]}\b", second.stdout, re.M
            ), second.stdout
        assert _pids(stack_dir) == pids

        status = _run(env, "status", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" up ") == 3, status.stdout
    finally:
        down = _run(env, "down")
    assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in pids.values()), pids
    status = _run(env, "status", timeout=60)
    assert status.returncode == 1, status.stdout
    assert status.stdout.count(" down ") == 3, status.stdout


@pytest.mark.kafka
def test_kafka_produce_consume_round_trip(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic = unique("trueup-stack-test")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)]
    ).values():
        future.result(timeout=30)
    try:
        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "acks": "all", "enable.idempotence": True}
        )
        reports: list[tuple[KafkaError | None, int | None]] = []
        key, value = b"key-1", f"hello {uuid.uuid4()}".encode()
        producer.produce(
            topic,
            key=key,
            value=value,
            on_delivery=lambda err, msg: reports.append((err, msg.offset())),
        )
        assert producer.flush(30) == 0, "message still queued after 30 s"
        assert reports == [(None, 0)], reports

        consumer = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": unique("trueup-stack-test-group"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            received = None
            deadline = time.monotonic() + 60
            while received is None and time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                received = msg
            assert received is not None, "nothing consumed within 60 s"
            assert (received.key(), received.value(), received.offset()) == (key, value, 0)
            consumer.commit(message=received, asynchronous=False)
        finally:
            consumer.close()
    finally:
        for future in admin.delete_topics([topic]).values():
            future.result(timeout=30)


@pytest.mark.rabbitmq
def test_rabbitmq_publish_with_confirm_and_consume(
    amqp_url: str, unique: Callable[[str], str]
) -> None:
    queue = unique("trueup.stack-test")
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue, durable=True)
        try:
            body = f"hello {uuid.uuid4()}".encode()
            # With confirms on, basic_publish raises on a nack, or (mandatory) when unroutable.
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )
            method, _properties, received = channel.basic_get(queue=queue, auto_ack=False)
            assert method is not None, "queue is empty after a confirmed publish"
            assert received == body
            channel.basic_ack(method.delivery_tag)
            assert channel.queue_declare(queue=queue, passive=True).method.message_count == 0
        finally:
            channel.queue_delete(queue=queue)
    finally:
        connection.close()
