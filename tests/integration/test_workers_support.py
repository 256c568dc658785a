"""Helpers shared by the worker, dead-letter and replay tests (this module holds no tests).

Topics and queues made here are deleted by the fixtures that made them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pika
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from trueup import headers
from trueup.brokers import kafka, rabbitmq
from trueup.retry import PermanentError, RetryPolicy
from trueup.workers.kafka import KafkaWorker
from trueup.workers.rabbitmq import RabbitWorker
from trueup.workers.runtime import Delivery

WAIT_SECONDS = 60.0

# Short delays keep the tests fast; no jitter so the delays can be checked.
POLICY = RetryPolicy(max_attempts=4, initial_seconds=0.2, multiplier=2, max_seconds=2,
                     jitter=0)
EARLY_TOLERANCE = 0.05   # a retry never runs before its delay (clock granularity aside)
# ... and not much later (consumer poll, fetch, broker expiry). Kafka alone adds up to ~0.5 s: a
# resumed retry partition is fetched only once the outstanding fetch returns (fetch.wait.max.ms),
# and a loaded 2-core CI machine adds seconds more. The early bound is what proves the backoff
# grows; this one only proves a retry is not held up far past its delay.
LATE_TOLERANCE = 2.5
#: POLICY as the config file writes it (dead_letters.*.backoff).
BACKOFF = {"initial": "200ms", "multiplier": 2, "max": "2s"}


class Topics:
    """Creates Kafka topics for one test and deletes them afterwards."""

    def __init__(self, bootstrap: str) -> None:
        self.properties = {"bootstrap.servers": bootstrap}
        self.admin: AdminClient = kafka.connect_admin(self.properties, what="test")
        self.made: list[str] = []

    def create(self, *names: str, partitions: int = 1) -> None:
        kafka.create_topics(self.admin, list(names), partitions=partitions, what="test")
        self.made.extend(names)

    def track(self, *names: str) -> None:
        self.made.extend(names)

    def delete(self) -> None:
        kafka.delete_topics(self.admin, sorted(set(self.made)), what="test")


class Queues:
    """Declares RabbitMQ queues for one test and deletes them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = rabbitmq.connect(url, what="test")
        self.made: list[str] = []

    def declare(self, *names: str, arguments: dict[str, Any] | None = None) -> None:
        channel = self.connection.channel()
        for name in names:
            channel.queue_declare(queue=name, durable=True, arguments=arguments)
            self.made.append(name)
        channel.close()

    def track(self, *names: str) -> None:
        self.made.extend(names)

    def depth(self, name: str) -> int:
        return rabbitmq.queue_depth(self.connection, name) or 0

    def publish(self, queue: str, body: bytes, *, message_id: str | None = None,
                headers_: dict[str, Any] | None = None, exchange: str = "") -> None:
        channel = rabbitmq.confirmed_channel(self.connection)
        rabbitmq.publish(channel, exchange=exchange, routing_key=queue, body=body,
                         properties=pika.BasicProperties(message_id=message_id,
                                                         headers=headers_, delivery_mode=2),
                         what="test")
        channel.close()

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every message off ``queue`` (acked)."""
        channel = self.connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found.append((properties, body))
        channel.close()
        return found

    def delete(self) -> None:
        if not self.connection.is_open:
            self.connection = rabbitmq.connect(self.url, what="test")
        channel = self.connection.channel()
        for name in sorted(set(self.made)):
            channel.queue_delete(queue=name)
        channel.close()
        self.connection.close()


def produce_json(bootstrap: str, topic: str, items: list[dict[str, Any]], *,
                 key_field: str = "id",
                 extra_headers: dict[str, str] | None = None) -> None:
    producer = kafka.create_producer({"bootstrap.servers": bootstrap}, what="test")
    deliveries = kafka.Deliveries()
    for item in items:
        kafka.produce(producer, deliveries, topic, value=json.dumps(item).encode(),
                      key=str(item[key_field]),
                      headers=headers.to_kafka(extra_headers) if extra_headers else None)
    kafka.confirm(producer, deliveries, what="test")


def produce_with_raw_header_name(bootstrap: str, topic: str, name: bytes, *, key: bytes,
                                 value: bytes, more: dict[str, str] | None = None) -> None:
    """Produce one message with a header named ``name`` exactly (confluent-kafka cannot: it
    names a header by a str), and the headers ``more``, through librdkafka itself."""
    path = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    lib = ctypes.CDLL(str(next(path.glob("librdkafka*.so*"))))
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_headers_new.restype = ctypes.c_void_p
    lib.rd_kafka_headers_new.argtypes = [ctypes.c_size_t]
    lib.rd_kafka_header_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ssize_t,
                                        ctypes.c_char_p, ctypes.c_ssize_t]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    error = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    assert lib.rd_kafka_conf_set(conf, b"bootstrap.servers", bootstrap.encode(), error, 512) == 0
    producer = lib.rd_kafka_new(0, conf, error, 512)  # 0: RD_KAFKA_PRODUCER
    assert producer, error.value
    try:
        found = lib.rd_kafka_headers_new(1 + len(more or {}))
        lib.rd_kafka_header_add(found, name, len(name), b"v", 1)
        for other, text in (more or {}).items():
            lib.rd_kafka_header_add(found, other.encode(), -1, text.encode(), -1)
        # rd_kafka_producev's varargs: (type, value...) pairs ended by 0 (RD_KAFKA_VTYPE_END)
        topic_, value_, key_, flags, headers_ = 1, 4, 5, 7, 10
        assert lib.rd_kafka_producev(
            ctypes.c_void_p(producer), ctypes.c_int(topic_), ctypes.c_char_p(topic.encode()),
            ctypes.c_int(flags), ctypes.c_int(2),  # RD_KAFKA_MSG_F_COPY
            ctypes.c_int(value_), ctypes.c_char_p(value), ctypes.c_size_t(len(value)),
            ctypes.c_int(key_), ctypes.c_char_p(key), ctypes.c_size_t(len(key)),
            ctypes.c_int(headers_), ctypes.c_void_p(found), ctypes.c_int(0)) == 0
        lib.rd_kafka_flush(ctypes.c_void_p(producer), 10_000)
        assert lib.rd_kafka_outq_len(ctypes.c_void_p(producer)) == 0
    finally:
        lib.rd_kafka_destroy(ctypes.c_void_p(producer))


def read_topic(bootstrap: str, topic: str, partitions: int = 1) -> list[Any]:
    """Every message of ``topic`` from the beginning to its end now (no group, no commits)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                         "enable.auto.commit": False})
    try:
        ends = kafka.end_offsets(consumer, topic, partitions, what="test")
        wanted = {p: high for p, (low, high) in ends.items() if high > low}
        consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in wanted])
        found: list[Any] = []
        deadline = time.monotonic() + WAIT_SECONDS
        done: set[int] = set()
        while len(done) < len(wanted) and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                assert partition is not None and offset is not None
                found.append(message)
                if offset + 1 >= wanted[partition]:
                    done.add(partition)
        return found
    finally:
        consumer.close()


def join_and_leave(bootstrap: str, group: str, topics: list[str]) -> float:
    """Make ``group`` rebalance twice: a plain member joins (subscribed to ``topics``), waits
    for its assignment, and leaves without committing. Returns when it got its assignment
    (monotonic seconds): every older member was revoked before then."""
    assigned: list[float] = []
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "heartbeat.interval.ms": 500})
    try:
        consumer.subscribe(topics, on_assign=lambda c, ps: assigned.append(time.monotonic()))
        deadline = time.monotonic() + WAIT_SECONDS
        while not assigned and time.monotonic() < deadline:
            consumer.poll(0.1)
        assert assigned, f"no assignment in group {group} within {WAIT_SECONDS:.0f}s"
    finally:
        consumer.close()
    return assigned[0]


def body_ids(messages: list[Any]) -> list[str]:
    return [str(json.loads(m.value())["id"]) for m in messages]


@contextlib.contextmanager
def running(target: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    """Run a worker's ``run(stop)`` in a thread; stop it and re-raise its error at the end."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            target(stop)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the worker did not stop within 60 s"
    if errors:
        raise errors[0]


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.05)


def write_config(path: Any, *, state: str, bootstrap: str, amqp: str,
                 dead_letters: dict[str, dict[str, Any]]) -> str:
    """A trueup.yaml with connections ``bus`` (Kafka) and ``amqp`` (RabbitMQ); its path."""
    document = {"state": state,
                "connections": {"bus": {"kafka": {"bootstrap.servers": bootstrap}},
                                "amqp": {"rabbitmq": amqp}},
                "dead_letters": dead_letters}
    file = path / "trueup.yaml"
    file.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return str(file)


def cli(config: str, *args: str) -> tuple[int, str, str]:
    """Run ``trueup --config CONFIG ARGS`` in this process; (status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from trueup.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(["--config", config, *args])
    return status, out.getvalue(), err.getvalue()


def cli_json(config: str, *args: str) -> Any:
    status, out, err = cli(config, *args, "--json")
    assert status == 0, f"trueup {' '.join(args)} exited {status}: {err}"
    return json.loads(out)


def kafka_remaining(bootstrap: str, topic: str, group: str) -> list[Any]:
    """Messages of ``topic`` past the offsets ``group`` committed (read without committing)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        committed = kafka.committed_offsets(consumer, topic, 1, what="test")
        low, high = kafka.end_offsets(consumer, topic, 1, what="test")[0]
    finally:
        consumer.close()
    start = max(low, committed.get(0) or low)
    return [m for m in read_topic(bootstrap, topic) if (m.offset() or 0) >= start][: high - start]


class FlakyHandler:
    """Fails ``failures[id]`` times for a message id, then succeeds; records every attempt."""

    def __init__(self, failures: dict[str, int], permanent: set[str] | None = None) -> None:
        self.failures = failures
        self.permanent = permanent or set()
        self.attempts: dict[str, list[tuple[float, int]]] = {}
        self.effects: list[str] = []
        self.lock = threading.Lock()
        self.fixed = False  # after "the fix", every message succeeds

    def __call__(self, delivery: Delivery) -> None:
        assert delivery.body is not None
        item = str(json.loads(delivery.body)["id"])
        with self.lock:
            self.attempts.setdefault(item, []).append((time.monotonic(), delivery.attempt))
            if self.fixed:
                self.effects.append(item)
                return
            if item in self.permanent:
                raise PermanentError(f"order {item} has no customer")
            if len(self.attempts[item]) <= self.failures.get(item, 0):
                raise ConnectionError(f"billing unavailable for {item}")
            self.effects.append(item)


def kafka_worker(bootstrap: str, topic: str, handler: Callable[[Delivery], None],
                  unique: Callable[[str], str], topics: Topics, *,
                  policy: RetryPolicy = POLICY, kind: type[KafkaWorker] = KafkaWorker,
                  consumer_overrides: dict[str, Any] | None = None,
                  database: str | None = None) -> KafkaWorker:
    worker = kind(properties={"bootstrap.servers": bootstrap}, topic=topic,
                  group=unique("group"), handler=handler, policy=policy,
                  dead_letter_topic=f"{topic}.dlq", consumer_overrides=consumer_overrides,
                  database=database)
    topics.track(topic, *worker.retry_topics, worker.dead_letter_topic)
    worker.ensure_topics(partitions=1)
    return worker


def rabbit_worker(url: str, queue: str, handler: Callable[[Delivery], None],
                   queues: Queues, **options: Any) -> RabbitWorker:
    worker = RabbitWorker(url=url, queue=queue, handler=handler, policy=POLICY,
                          dead_letter_queue=f"{queue}.dlq", **options)
    queues.track(queue, worker.dead_letter_queue,
                 *(worker.delay_queue(n) for n in range(1, worker.tiers + 1)))
    connection = rabbitmq.connect(url, what="test")
    worker.declare(connection)
    connection.close()
    return worker
