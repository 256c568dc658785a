"""Workers and the replayer outlive a restart of RabbitMQ and of Kafka, and lose nothing.

The shared stack must never be restarted (other tests use it), so this module starts a private
stack of its own (``scripts/stack up`` on other ports, in a folder under /tmp), restarts one
broker of it at a time mid-stream, and stops it at the end. Every handled message leaves an
effect row in the private Postgres, counted by message id: each id must be there, and an id
handled twice only if it was in flight when its broker went down (at least once).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from confluent_kafka import TopicPartition

from tests.conftest import pid_alive
from tests.integration.test_workers_support import POLICY, running, wait_until
from trueup import headers, metrics
from trueup.brokers import kafka, rabbitmq
from trueup.config import parse_config
from trueup.letterboxes.kafka import KafkaLetterbox
from trueup.replay import ReplayOptions, ReplaySummary, replay
from trueup.state import migrate
from trueup.workers import kafka as kafka_workers
from trueup.workers.kafka import KafkaWorker
from trueup.workers.rabbitmq import RabbitWorker
from trueup.workers.runtime import Delivery

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack"
# Every port below 32768: Linux hands out 32768-60999 as the local ports of outgoing
# connections, and a listener there can find its port taken by one (a CI run lost Kafka's
# 39092 that way).
# Below 20000 too, where tests/conftest.unused_port never looks: a test file running in the
# other xdist worker may take any port it hands out.
PORTS = {"TRUEUP_PG_PORT": 16432, "TRUEUP_RABBITMQ_PORT": 6672,
         "TRUEUP_RABBITMQ_DIST_PORT": 16672, "TRUEUP_KAFKA_PORT": 17092,
         "TRUEUP_KAFKA_CONTROLLER_PORT": 17093}
NODE = "restart@localhost"
STACK_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 60
WAIT_SECONDS = 90.0
BEFORE, AFTER = 150, 50          # messages published before and after the restart
HELD_FROM = 60                   # handlers of later messages wait for the broker to stop
HANDLER_SECONDS = 0.05           # a handler's work: the stream outlasts a broker's stop
LETTERS = 300                    # dead letters per replay
REPLAY_RATE = 60.0               # letters/s: the replay lasts ~5 s, the restart falls inside


@dataclass(frozen=True, kw_only=True)
class PrivateStack:
    env: dict[str, str]
    folder: Path
    pg: str
    amqp: str
    bootstrap: str

    def up(self) -> None:
        done = subprocess.run([str(STACK), "up"], env=self.env, capture_output=True, text=True,
                              timeout=STACK_TIMEOUT_SECONDS, check=False)
        assert done.returncode == 0, f"scripts/stack up failed:\n{done.stdout}\n{done.stderr}"

    def down(self) -> None:
        subprocess.run([str(STACK), "down"], env=self.env, capture_output=True, text=True,
                       timeout=STACK_TIMEOUT_SECONDS, check=False)

    def _stop(self, pid_file: Path) -> None:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)  # both brokers shut down in order on SIGTERM
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while pid_alive(pid):
            assert time.monotonic() < deadline, f"pid {pid} ({pid_file}) did not stop"
            time.sleep(0.1)

    def stop_kafka(self) -> None:
        self._stop(self.folder / "kafka" / "kafka.pid")

    def stop_rabbitmq(self) -> None:
        self._stop(self.folder / "rabbitmq" / "rabbitmq.pid")

    def restart_kafka(self) -> None:
        self.stop_kafka()
        self.up()

    def restart_rabbitmq(self) -> None:
        self.stop_rabbitmq()
        self.up()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def stack() -> Iterator[PrivateStack]:
    busy = [p for p in PORTS.values() if not _port_free(p)]
    assert not busy, f"ports {busy} are in use; the private stack needs {sorted(PORTS.values())}"
    # Postgres runs as the postgres user, which must reach the folder (mkdtemp makes it 0700).
    folder = Path(tempfile.mkdtemp(prefix="trueup-restart-", dir="/tmp"))
    folder.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUEUP_")}
    env.update({k: str(v) for k, v in PORTS.items()})
    env.update({"TRUEUP_STACK_DIR": str(folder), "TRUEUP_RABBITMQ_NODE": NODE})
    made = PrivateStack(
        env=env, folder=folder, pg=f"postgresql://postgres@127.0.0.1:{PORTS['TRUEUP_PG_PORT']}",
        amqp=f"amqp://guest:guest@127.0.0.1:{PORTS['TRUEUP_RABBITMQ_PORT']}/%2F",
        bootstrap=f"127.0.0.1:{PORTS['TRUEUP_KAFKA_PORT']}")
    try:
        made.up()
        yield made
    finally:
        made.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def state(stack: PrivateStack) -> str:
    """trueup's state database, which also holds the handlers' ``effects`` table."""
    with psycopg.connect(f"{stack.pg}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE restart_state")
    dsn = f"{stack.pg}/restart_state"
    with psycopg.connect(dsn) as conn:
        migrate(conn)
        conn.execute("CREATE TABLE effects (source text NOT NULL, message_id text NOT NULL, "
                     "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    return dsn


class Effects:
    """A handler that records its effect in Postgres (failing once for some ids, holding the
    ``held`` ones until :meth:`release`), and the counts a test checks."""

    def __init__(self, dsn: str, source: str, fail_once: set[str],
                 held: Collection[str] = ()) -> None:
        self.dsn = dsn
        self.source = source
        self.fail_once = fail_once
        self.held = set(held)
        self.released = threading.Event()
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        assert delivery.body is not None
        message_id = json.loads(delivery.body)["id"]
        if message_id in self.fail_once and delivery.attempt == 1:
            raise ConnectionError(f"billing unavailable for {message_id}")
        if message_id in self.held:
            self.released.wait(WAIT_SECONDS)
        time.sleep(HANDLER_SECONDS)
        with self.lock:
            self.conn.execute("INSERT INTO effects (source, message_id) VALUES (%s, %s)",
                              (self.source, message_id))

    def counts(self) -> dict[str, int]:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT message_id, count(*) FROM effects WHERE source = %s "
                                "GROUP BY message_id", (self.source,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.conn.close()


def _check(effects: Effects, expected: set[str], in_flight: int) -> None:
    counts = effects.counts()
    missing = expected - counts.keys()
    assert not missing, f"{len(missing)} messages never handled, e.g. {sorted(missing)[:5]}"
    assert counts.keys() == expected, f"unexpected ids {sorted(counts.keys() - expected)[:5]}"
    twice = {k: n for k, n in counts.items() if n > 1}
    assert len(twice) <= in_flight, (
        f"{len(twice)} messages handled more than once; at most {in_flight} can be in flight "
        f"at a restart: {sorted(twice)[:10]}")


def _body(message_id: str) -> bytes:
    return json.dumps({"id": message_id}).encode()


# ---------------------------------------------------------------------------------------------
# Workers


def _rabbit_publish(url: str, queue: str, ids: list[str],
                    table: Callable[[str], dict[str, Any]] | None = None) -> None:
    connection = rabbitmq.connect(url, what="test")
    try:
        channel = rabbitmq.confirmed_channel(connection)
        for message_id in ids:
            rabbitmq.publish(channel, exchange="", routing_key=queue, body=_body(message_id),
                             properties=pika.BasicProperties(
                                 message_id=message_id, delivery_mode=2,
                                 headers=table(message_id) if table else None), what="test")
    finally:
        rabbitmq.close_quietly(connection)


def test_rabbitmq_worker_reconnects_after_a_broker_restart_and_loses_no_message(
        stack: PrivateStack, state: str) -> None:
    queue = f"payments_{uuid.uuid4().hex[:8]}"
    ids = [f"r{n}" for n in range(BEFORE + AFTER)]
    # the stream waits from HELD_FROM on until the broker is down: however long the broker
    # takes to stop, the restart falls inside the stream
    effects = Effects(state, queue, fail_once={"r3", "r120", f"r{BEFORE + 7}"},
                      held=ids[HELD_FROM:BEFORE])
    worker = RabbitWorker(url=stack.amqp, queue=queue, handler=effects, policy=POLICY,
                          dead_letter_queue=f"{queue}.dlq")
    connection = rabbitmq.connect(stack.amqp, what="test")
    worker.declare(connection)
    connection.close()
    _rabbit_publish(stack.amqp, queue, ids[:BEFORE])
    try:
        with running(worker.run):
            wait_until(lambda: len(effects.counts()) >= 30, "the first effects")
            # Counted while RabbitMQ is down, the held messages then let go: up() waits for
            # it and probes it for seconds, time enough for a worker to handle them all.
            stack.stop_rabbitmq()
            handled_while_down = len(effects.counts())
            effects.release()
            stack.up()
            print(f"{handled_while_down} of {BEFORE} messages handled when RabbitMQ stopped")
            assert handled_while_down < BEFORE, "the restart came after the stream ended"
            _rabbit_publish(stack.amqp, queue, ids[BEFORE:])
            wait_until(lambda: len(effects.counts()) == len(ids),
                       "every message handled after the restart", WAIT_SECONDS)
        connection = rabbitmq.connect(stack.amqp, what="test")
        dead = rabbitmq.queue_depth(connection, f"{queue}.dlq")
        connection.close()
        assert dead == 0, f"{dead} messages dead-lettered; none should be"
        # Unacked at the restart: the prefetch window (and the message in the handler).
        _check(effects, set(ids), in_flight=worker.prefetch + 1)
    finally:
        effects.close()


def test_kafka_worker_reconnects_after_a_broker_restart_and_loses_no_message(
        stack: PrivateStack, state: str) -> None:
    topic = f"orders_{uuid.uuid4().hex[:8]}"
    ids = [f"k{n}" for n in range(BEFORE + AFTER)]
    # the stream waits from HELD_FROM on until the broker is down: however long the broker
    # takes to stop, the restart falls inside the stream
    effects = Effects(state, topic, fail_once={"k3", "k120", f"k{BEFORE + 7}"},
                      held=ids[HELD_FROM:BEFORE])
    worker = KafkaWorker(properties={"bootstrap.servers": stack.bootstrap}, topic=topic,
                         group=f"group_{topic}", handler=effects, policy=POLICY,
                         dead_letter_topic=f"{topic}.dlq")
    worker.ensure_topics(partitions=1)
    producer = kafka.create_producer({"bootstrap.servers": stack.bootstrap}, what="test")

    def produce(chunk: list[str]) -> None:
        deliveries = kafka.Deliveries()
        for message_id in chunk:
            kafka.produce(producer, deliveries, topic, value=_body(message_id), key=message_id)
        kafka.confirm(producer, deliveries, what="test")

    produce(ids[:BEFORE])
    try:
        with running(worker.run):
            wait_until(lambda: len(effects.counts()) >= 30, "the first effects", WAIT_SECONDS)
            # Counted while Kafka is down: up() waits for it and probes it for seconds, time
            # enough for the reconnected worker to handle the rest of the stream.
            stack.stop_kafka()
            handled_while_down = len(effects.counts())
            effects.release()
            stack.up()
            print(f"{handled_while_down} of {BEFORE} messages handled when Kafka stopped")
            assert handled_while_down < BEFORE, "the restart came after the stream ended"
            produce(ids[BEFORE:])
            wait_until(lambda: len(effects.counts()) == len(ids),
                       "every message handled after the restart", WAIT_SECONDS)
        # Handled but not yet committed at the restart: one auto-commit interval of work (and
        # the batch in hand).
        per_interval = int(1 / HANDLER_SECONDS) + 100
        _check(effects, set(ids), in_flight=per_interval)
        consumer = kafka.create_consumer({"bootstrap.servers": stack.bootstrap},
                                         group="test-reader", what="test")
        low, high = kafka.end_offsets(consumer, f"{topic}.dlq", 1, what="test")[0]
        consumer.close()
        assert high - low == 0, f"{high - low} messages dead-lettered; none should be"
    finally:
        effects.close()


class FailingWhileKafkaIsDown:
    """A handler whose first call fails once the test has stopped Kafka (:attr:`down`): its
    retry copy is produced with no broker to confirm it."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = threading.Event()
        self.handled = threading.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.calls += 1
        if self.calls == 1:
            self.down.wait(WAIT_SECONDS)
            raise ConnectionError("billing unavailable")
        self.handled.set()


def test_kafka_worker_outlives_a_copy_unconfirmed_while_kafka_is_down(
        stack: PrivateStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry copy that Kafka did not confirm within the timeout (120 s; 2 s here) stopped
    the worker for good with KafkaFailed: only a restart from outside brought it back. The
    session starts again, and handles the message again once Kafka is back."""
    monkeypatch.setattr(kafka_workers, "COPY_CONFIRM_SECONDS", 2.0)
    topic = f"orders_{uuid.uuid4().hex[:8]}"
    handler = FailingWhileKafkaIsDown()
    worker = KafkaWorker(properties={"bootstrap.servers": stack.bootstrap}, topic=topic,
                         group=f"group_{topic}", handler=handler, policy=POLICY,
                         dead_letter_topic=f"{topic}.dlq")
    worker.ensure_topics(partitions=1)
    producer = kafka.create_producer({"bootstrap.servers": stack.bootstrap}, what="test")
    kafka.publish(producer, topic, value=_body("k1"), key="k1", what="test")
    restarts = metrics.WORKER_RECONNECTS.labels(worker.group, "CopyUnconfirmed")
    before = restarts._value.get()
    with running(worker.run):
        wait_until(lambda: handler.calls == 1, "the message in its handler", WAIT_SECONDS)
        stack.stop_kafka()
        try:
            handler.down.set()
            wait_until(lambda: restarts._value.get() > before, "the session started again",
                       WAIT_SECONDS)
        finally:
            stack.up()
        assert handler.handled.wait(WAIT_SECONDS), "the message was not handled again"


# ---------------------------------------------------------------------------------------------
# Replayer


def _letter_headers(origin: str, message_id: str) -> dict[str, str]:
    return {headers.MESSAGE_ID: message_id, headers.ATTEMPTS: "1", headers.ORIGIN: origin,
            headers.ERROR_CLASS: "ConnectionError",
            headers.LAST_FAILURE: "2026-01-02T03:04:05.000Z"}


@contextlib.contextmanager
def _replaying(run: Callable[[], ReplaySummary]) -> Iterator[list[Any]]:
    """Run a replay in a thread; the list holds its summary or its error when it ended."""
    ended: list[Any] = []

    def main() -> None:
        try:
            ended.append(run())
        except BaseException as exc:  # reported by the test
            ended.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield ended
    finally:
        thread.join(WAIT_SECONDS + 60)
    assert not thread.is_alive(), "the replay did not end"


def _replayed(state: str, name: str) -> int:
    with psycopg.connect(state) as conn:
        row = conn.execute("SELECT count(DISTINCT e.message_id) FROM trueup.replay_events e "
                           "JOIN trueup.replays r USING (replay_id) WHERE r.name = %s "
                           "AND e.outcome = 'moved'", (name,)).fetchone()
    return int(row[0]) if row else 0


def _replay_through_restart(state: str, name: str, config_text: str,
                            restart: Callable[[], None]) -> list[ReplaySummary]:
    config = parse_config(config_text, "test_broker_restart", os.environ)
    options = ReplayOptions(rate=REPLAY_RATE, batch_size=25)
    with _replaying(lambda: replay(config, name, options)) as ended:
        wait_until(lambda: _replayed(state, name) >= 50 or bool(ended), "the first moves")
        assert not ended, f"the replay ended before the restart: {ended}"
        restart()
    summaries = [s for s in ended if isinstance(s, ReplaySummary)]
    errors = [e for e in ended if not isinstance(e, ReplaySummary)]
    assert not errors, f"the replay did not outlive the restart: {errors[0]!r}"
    # Whatever is left (nothing, if the replay resumed as it should) goes in a second replay.
    summaries.append(replay(config, name, ReplayOptions()))
    return summaries


def _config_text(state: str, stack: PrivateStack, dead_letters: dict[str, Any]) -> str:
    return json.dumps({"state": state,
                       "connections": {"bus": {"kafka": {"bootstrap.servers": stack.bootstrap}},
                                       "amqp": {"rabbitmq": stack.amqp}},
                       "dead_letters": dead_letters})


def test_replay_outlives_a_rabbitmq_restart_and_loses_no_letter(
        stack: PrivateStack, state: str) -> None:
    queue = f"settle_{uuid.uuid4().hex[:8]}"
    ids = [f"q{n}" for n in range(LETTERS)]
    connection = rabbitmq.connect(stack.amqp, what="test")
    rabbitmq.ensure_queue(connection, queue)
    rabbitmq.ensure_queue(connection, f"{queue}.dlq")
    connection.close()
    _rabbit_publish(stack.amqp, f"{queue}.dlq", ids, lambda i: _letter_headers(queue, i))
    name = f"dlq_{queue}"
    text = _config_text(state, stack, {name: {"connection": "amqp", "queue": f"{queue}.dlq"}})

    summaries = _replay_through_restart(state, name, text, stack.restart_rabbitmq)

    connection = rabbitmq.connect(stack.amqp, what="test")
    try:
        assert rabbitmq.queue_depth(connection, f"{queue}.dlq") == 0, "letters left behind"
        channel = connection.channel()
        found: dict[str, int] = {}
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found[properties.message_id] = found.get(properties.message_id, 0) + 1
    finally:
        rabbitmq.close_quietly(connection)
    missing = set(ids) - found.keys()
    assert not missing, f"{len(missing)} letters lost, e.g. {sorted(missing)[:5]}"
    twice = [k for k, n in found.items() if n > 1]
    # Confirmed one by one and recorded before the next: at most the letter in hand twice.
    assert len(twice) <= 1, f"letters moved twice: {twice}"
    # A letter sent again was not recorded the first time: each is counted as moved once.
    assert sum(s.moved for s in summaries) == LETTERS


def test_replay_outlives_a_kafka_restart_and_loses_no_letter(
        stack: PrivateStack, state: str) -> None:
    topic = f"orders_{uuid.uuid4().hex[:8]}"
    dlq = f"{topic}.dlq"
    ids = [f"d{n}" for n in range(LETTERS)]
    admin = kafka.connect_admin({"bootstrap.servers": stack.bootstrap}, what="test")
    kafka.create_topics(admin, [topic, dlq], partitions=1, what="test")
    producer = kafka.create_producer({"bootstrap.servers": stack.bootstrap}, what="test")
    deliveries = kafka.Deliveries()
    for message_id in ids:
        kafka.produce(producer, deliveries, dlq, value=_body(message_id), key=message_id,
                      headers=headers.to_kafka(_letter_headers(topic, message_id)))
    kafka.confirm(producer, deliveries, what="test")
    name = f"dlq_{topic}"
    text = _config_text(state, stack, {name: {"connection": "bus", "topic": dlq}})

    summaries = _replay_through_restart(state, name, text, stack.restart_kafka)

    box = KafkaLetterbox(properties={"bootstrap.servers": stack.bootstrap}, topic=dlq,
                         name=name, what="test")
    try:
        assert box.depth() == 0, f"{box.depth()} letters not committed as replayed"
    finally:
        box.close()
    consumer = kafka.create_consumer({"bootstrap.servers": stack.bootstrap},
                                     group=f"reader_{topic}", what="test")
    found: dict[str, int] = {}
    try:
        low, high = kafka.end_offsets(consumer, topic, 1, what="test")[0]
        consumer.assign([TopicPartition(topic, 0, low)])
        seen = low
        deadline = time.monotonic() + WAIT_SECONDS
        while seen < high and time.monotonic() < deadline:
            for message in consumer.consume(500, 1.0):
                if message.error() is not None:
                    continue
                message_id = headers.from_kafka(message.headers())[headers.MESSAGE_ID]
                found[message_id] = found.get(message_id, 0) + 1
                seen = (message.offset() or 0) + 1
    finally:
        consumer.close()
    missing = set(ids) - found.keys()
    assert not missing, f"{len(missing)} letters lost, e.g. {sorted(missing)[:5]}"
    twice = [k for k, n in found.items() if n > 1]
    # Sent but not yet confirmed and recorded when Kafka went down: at most two batches
    # (the one being confirmed and the one being recorded).
    assert len(twice) <= 2 * 25, f"{len(twice)} letters moved twice: {twice[:10]}"
    # A letter sent again was not recorded the first time: each is counted as moved once.
    assert sum(s.moved for s in summaries) == LETTERS
