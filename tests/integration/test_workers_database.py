"""A worker whose handler depends on a database (``database=DSN``) holds a failed message while
that database does not answer: no retry or dead-letter copy, no attempt used up, the message
handled once the database is back. Against real brokers and a real Postgres database closed to
new connections (``ALLOW_CONNECTIONS false``), as a maintenance window or a failover closes it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from confluent_kafka import Consumer
from psycopg import sql

from tests.conftest import PG_ADMIN_DSN
from tests.integration.test_workers_support import (
    POLICY,
    Queues,
    Topics,
    join_and_leave,
    kafka_worker,
    produce_json,
    rabbit_worker,
    read_topic,
    running,
    wait_until,
)
from trueup import metrics
from trueup.retry import PermanentError
from trueup.workers.kafka import KafkaWorker
from trueup.workers.runtime import Delivery

#: How long the database stays closed once a message waits for it: longer than every retry of
#: POLICY together (0.2 + 0.4 + 0.8 s), so a worker that did not hold would dead-letter.
CLOSED_SECONDS = 3.0


class Recorder:
    """Writes each message's id into the database's ``effects`` table; records the attempt
    each delivery said it was. A message with id ``poison`` fails for good."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.attempts: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE effects (id text NOT NULL)")

    def __call__(self, delivery: Delivery) -> None:
        assert delivery.body is not None
        item = str(json.loads(delivery.body)["id"])
        with self.lock:
            self.attempts.append((item, delivery.attempt))
        if item == "poison":
            raise PermanentError("no such customer")
        with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("INSERT INTO effects VALUES (%s)", (item,))

    def effects(self) -> list[str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return sorted(r[0] for r in conn.execute("SELECT id FROM effects").fetchall())


@contextlib.contextmanager
def closed(dsn: str) -> Iterator[None]:
    """The database refusing new connections (and its sessions ended) until the block ends."""
    name = urlsplit(dsn).path.lstrip("/")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(name)))
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            yield
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                sql.Identifier(name)))


def _waits(worker: str) -> float:
    return metrics.WORKER_DATABASE_WAITS.labels(worker)._value.get()


def _while_closed(handler: Recorder, send: Callable[[], None]) -> None:
    """Close the database, send three messages, keep it closed for CLOSED_SECONDS once the
    handler failed on the first, then open it."""
    with closed(handler.dsn):
        send()
        wait_until(lambda: bool(handler.attempts), "the handler failing")
        threading.Event().wait(CLOSED_SECONDS)


def _kafka(bootstrap: str, unique: Callable[[str], str], topics: Topics,
           dsn: str) -> tuple[str, Recorder, KafkaWorker]:
    """A work topic, a handler recording into ``dsn``, and a worker depending on ``dsn``."""
    topic = unique("orders")
    handler = Recorder(dsn)
    return topic, handler, kafka_worker(bootstrap, topic, handler, unique, topics, database=dsn)


@pytest.mark.kafka
def test_kafka_worker_holds_messages_while_its_database_is_away_then_handles_them(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        empty_db: str) -> None:
    topic, handler, worker = _kafka(kafka_bootstrap, unique, topics, empty_db)
    waits = _waits(worker.group)
    with running(worker.run):
        _while_closed(handler, lambda: produce_json(
            kafka_bootstrap, topic, [{"id": n} for n in (1, 2, 3)]))
        wait_until(lambda: handler.effects() == ["1", "2", "3"], "every message's effect")
        # the database answering, a message failing for good is still dead-lettered
        produce_json(kafka_bootstrap, topic, [{"id": "poison"}])
        wait_until(lambda: len(read_topic(kafka_bootstrap, f"{topic}.dlq")) == 1,
                   "the poison message dead-lettered")
    assert [json.loads(m.value())["id"] for m in read_topic(kafka_bootstrap,
                                                            f"{topic}.dlq")] == ["poison"]
    assert all(read_topic(kafka_bootstrap, t) == [] for t in worker.retry_topics)
    assert {attempt for _, attempt in handler.attempts} == {1}  # the outage used none up
    assert handler.effects() == ["1", "2", "3"]
    assert _waits(worker.group) > waits


@pytest.mark.rabbitmq
def test_rabbitmq_worker_holds_messages_while_its_database_is_away_then_handles_them(
        amqp_url: str, unique: Callable[[str], str], queues: Queues, empty_db: str) -> None:
    queue = unique("payments")
    handler = Recorder(empty_db)
    worker = rabbit_worker(amqp_url, queue, handler, queues, database=empty_db)

    def send(*items: object) -> None:
        for n in items:
            queues.publish(queue, json.dumps({"id": n}).encode(), message_id=f"m{n}")

    waits = _waits(worker.name)
    with running(worker.run):
        _while_closed(handler, lambda: send(1, 2, 3))
        wait_until(lambda: handler.effects() == ["1", "2", "3"], "every message's effect")
        send("poison")
        wait_until(lambda: queues.depth(f"{queue}.dlq") == 1, "the poison message dead-lettered")
    assert all(queues.depth(worker.delay_queue(n)) == 0 for n in range(1, worker.tiers + 1))
    assert queues.depth(queue) == 0
    assert {attempt for _, attempt in handler.attempts} == {1}
    assert handler.effects() == ["1", "2", "3"]
    assert _waits(worker.name) > waits


@pytest.mark.kafka
def test_kafka_worker_stopped_while_a_message_waits_for_its_database_leaves_it_uncommitted(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        empty_db: str) -> None:
    topic, handler, worker = _kafka(kafka_bootstrap, unique, topics, empty_db)
    with closed(empty_db), running(worker.run):
        produce_json(kafka_bootstrap, topic, [{"id": 1}])
        wait_until(lambda: bool(handler.attempts), "the handler failing")
        # stopped within the wait (running() joins the worker)
    again = KafkaWorker(properties={"bootstrap.servers": kafka_bootstrap}, topic=topic,
                        group=worker.group, handler=handler, policy=POLICY,
                        dead_letter_topic=f"{topic}.dlq", database=empty_db)
    with running(again.run):
        wait_until(lambda: handler.effects() == ["1"], "the message handled by the next run")
    assert read_topic(kafka_bootstrap, f"{topic}.dlq") == []
    assert {attempt for _, attempt in handler.attempts} == {1}


@pytest.mark.rabbitmq
def test_rabbitmq_worker_stopped_while_a_message_waits_for_its_database_leaves_it_queued(
        amqp_url: str, unique: Callable[[str], str], queues: Queues, empty_db: str) -> None:
    queue = unique("payments")
    handler = Recorder(empty_db)
    worker = rabbit_worker(amqp_url, queue, handler, queues, database=empty_db)
    with closed(empty_db), running(worker.run):
        queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1")
        wait_until(lambda: bool(handler.attempts), "the handler failing")
    assert queues.depth(queue) == 1  # not acked, back in its queue
    with running(worker.run):
        wait_until(lambda: handler.effects() == ["1"], "the message handled by the next run")
    assert queues.depth(f"{queue}.dlq") == 0
    assert {attempt for _, attempt in handler.attempts} == {1}


@pytest.mark.kafka
def test_kafka_group_rebalancing_while_a_message_waits_for_its_database_loses_nothing(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        empty_db: str) -> None:
    """A member joining and leaving takes the partition of the waiting message away and back:
    the message is read again from the committed offset, and handled once the database is
    back, once, neither retried nor dead-lettered."""
    topic, handler, worker = _kafka(kafka_bootstrap, unique, topics, empty_db)
    with running(worker.run):
        with closed(empty_db):
            produce_json(kafka_bootstrap, topic, [{"id": n} for n in (1, 2)])
            wait_until(lambda: bool(handler.attempts), "the handler failing")
            join_and_leave(kafka_bootstrap, worker.group, [topic, *worker.retry_topics])
        wait_until(lambda: handler.effects() == ["1", "2"], "every message's effect")
        time.sleep(1.0)  # room for a wrong second effect
    assert handler.effects() == ["1", "2"]
    assert read_topic(kafka_bootstrap, f"{topic}.dlq") == []
    assert all(read_topic(kafka_bootstrap, t) == [] for t in worker.retry_topics)
    assert {attempt for _, attempt in handler.attempts} == {1}


@pytest.mark.kafka
def test_kafka_hold_outlasting_the_batch_then_a_rebalance_giving_the_partition_back_loses_nothing(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        empty_db: str) -> None:
    """A message held past half the poll interval, its partition taken and given back by a
    rebalance meanwhile: the batch's hand-back sought the partition past the held message (to
    the next one in hand), and the message was never handled."""
    topic, other = unique("orders"), unique("other")
    topics.create(other)
    handler = Recorder(empty_db)
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics, database=empty_db,
                          consumer_overrides={"max.poll.interval.ms": 8000,
                                              "session.timeout.ms": 6000,
                                              "heartbeat.interval.ms": 500})
    with running(worker.run):
        with closed(empty_db):
            produce_json(kafka_bootstrap, topic, [{"id": n} for n in (0, 1, 2)])
            wait_until(lambda: bool(handler.attempts), "the handler failing")
            time.sleep(worker._batch_seconds + 1)
            # a member of the group reading another topic: an eager rebalance takes every
            # partition and gives them back
            joiner = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": worker.group,
                               "enable.auto.commit": False, "session.timeout.ms": 6000,
                               "heartbeat.interval.ms": 500})
            assigned: list[bool] = []
            joiner.subscribe([other], on_assign=lambda c, ps: assigned.append(True))
            wait_until(lambda: joiner.poll(0.1) is None and bool(assigned), "the joiner in")
        try:
            wait_until(lambda: joiner.poll(0.1) is None and handler.effects() == ["0", "1", "2"],
                       "every message's effect")
        finally:
            joiner.close()
    assert read_topic(kafka_bootstrap, f"{topic}.dlq") == []
