"""Worker runtimes against the real brokers: retries at the configured delays, dead letters with
complete headers, no blocked partition."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from confluent_kafka import Consumer, ConsumerGroupState, Message, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from tests.integration.test_workers_support import (
    EARLY_TOLERANCE,
    LATE_TOLERANCE,
    POLICY,
    FlakyHandler,
    Queues,
    Topics,
    body_ids,
    join_and_leave,
    kafka_remaining,
    kafka_worker,
    produce_json,
    produce_with_raw_header_name,
    rabbit_worker,
    read_topic,
    running,
    wait_until,
)
from trueup import headers, metrics, tracing
from trueup.brokers import kafka, rabbitmq
from trueup.errors import ConnectionFailed
from trueup.health import HEALTH
from trueup.log import configure as configure_logs
from trueup.retry import RetryPolicy
from trueup.workers import kafka as kafka_workers
from trueup.workers.runtime import Delivery


def _check_retry_timing(handler: FlakyHandler, item: str, failures: int) -> None:
    times = [t for t, _ in handler.attempts[item]]
    assert [a for _, a in handler.attempts[item]] == list(range(1, failures + 2))
    for n in range(1, failures + 1):
        gap = times[n] - times[n - 1]
        expected = POLICY.nominal_delay(n)
        assert expected - EARLY_TOLERANCE <= gap <= expected + LATE_TOLERANCE, (
            f"retry {n} of {item} ran {gap:.3f}s after the previous attempt, "
            f"expected {expected:.3f}s")


# ---------------------------------------------------------------------------------------------
# Kafka


@pytest.mark.kafka
def test_kafka_handler_failing_twice_has_its_effect_once_after_retries_at_the_delays(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    topic = unique("orders")
    handler = FlakyHandler({"1": 2})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}, {"id": 2}])
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the flaky message's effect")
        time.sleep(0.5)  # room for a wrong second effect
    assert handler.effects.count("1") == 1 and handler.effects.count("2") == 1
    # The failing message did not block its partition: 2 was done before 1's first retry.
    assert handler.effects.index("2") < handler.effects.index("1")
    _check_retry_timing(handler, "1", failures=2)
    assert read_topic(kafka_bootstrap, f"{topic}.dlq") == []


@pytest.mark.kafka
def test_kafka_poison_messages_end_in_the_dlq_with_complete_headers(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    topic = unique("orders")
    group_handler = FlakyHandler({"1": 99}, permanent={"2"})
    worker = kafka_worker(kafka_bootstrap, topic, group_handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}, {"id": 2}, {"id": 3}])
    with running(worker.run):
        wait_until(lambda: len(read_topic(kafka_bootstrap, f"{topic}.dlq")) == 2,
                   "two dead letters")
    letters = {body_ids([m])[0]: m for m in read_topic(kafka_bootstrap, f"{topic}.dlq")}
    assert group_handler.effects == ["3"]
    assert len(group_handler.attempts["1"]) == POLICY.max_attempts
    assert len(group_handler.attempts["2"]) == 1  # permanent: no retries

    exhausted = headers.from_kafka(letters["1"].headers())
    permanent = headers.from_kafka(letters["2"].headers())
    for text, attempts, error in ((exhausted, "4", "ConnectionError"),
                                  (permanent, "1", "trueup.retry.PermanentError")):
        assert text[headers.ORIGIN] == topic
        assert text[headers.ORIGIN_PARTITION] == "0"
        assert text[headers.ORIGIN_OFFSET] in {"0", "1"}
        assert int(text[headers.ORIGIN_TIMESTAMP]) > 1_700_000_000_000
        assert text[headers.GROUP] == worker.group
        assert text[headers.ATTEMPTS] == attempts
        assert text[headers.ERROR_CLASS] == error
        assert text[headers.ERROR_MESSAGE]
        assert text[headers.MESSAGE_ID] == f"{topic}:0:{text[headers.ORIGIN_OFFSET]}"
        first = headers.parse_time(text[headers.FIRST_FAILURE])
        last = headers.parse_time(text[headers.LAST_FAILURE])
        assert first is not None and last is not None and first <= last
        assert headers.NOT_BEFORE not in text
    assert letters["1"].key() == b"1"


@pytest.mark.kafka
def test_kafka_worker_handles_each_message_of_a_quiet_topic_as_it_arrives(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # consume() waits out its timeout for a full batch: a message alone on a quiet topic waited
    # up to the poll timeout (made long here, so that such a wait cannot go unseen).
    poll_seconds = 5.0
    monkeypatch.setattr(kafka_workers, "POLL_SECONDS", poll_seconds)
    topic = unique("quiet")
    handler = FlakyHandler({})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test")
    producer.list_topics(timeout=10)  # connected, so its first message is not held back
    deliveries = kafka.Deliveries()

    def send(n: int) -> None:
        kafka.produce(producer, deliveries, topic, value=json.dumps({"id": n}).encode())
        kafka.confirm(producer, deliveries, what="test")

    with running(worker.run):
        send(0)
        wait_until(lambda: handler.effects == ["0"], "the first message (the group joined)")
        started = time.monotonic()
        for n in range(1, 6):
            send(n)
            wait_until(lambda n=n: len(handler.effects) == n + 1, f"message {n}")
        seconds = time.monotonic() - started
    assert handler.effects == [str(n) for n in range(6)]
    assert seconds < 5 * poll_seconds / 2, f"5 messages one by one took {seconds:.1f}s"


@pytest.mark.kafka
def test_kafka_groups_on_one_topic_each_handle_only_their_own_retries(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """Every group reading a topic shares its retry topics: group B must not handle (again,
    as a retry) what only group A failed."""
    topic = unique("shared")
    failing, fine = FlakyHandler({"1": 1}), FlakyHandler({})
    a = kafka_worker(kafka_bootstrap, topic, failing, unique, topics)
    b = kafka_worker(kafka_bootstrap, topic, fine, unique, topics)
    assert a.retry_topics == b.retry_topics and a.group != b.group
    produce_json(kafka_bootstrap, topic, [{"id": 1}, {"id": 2}])
    with running(a.run), running(b.run):
        wait_until(lambda: "1" in failing.effects and len(fine.effects) == 2, "both groups")
        time.sleep(POLICY.nominal_delay(1) + 1)  # room for B to take A's retry
    assert [a for _, a in failing.attempts["1"]] == [1, 2]
    assert {item: [a for _, a in attempts] for item, attempts in fine.attempts.items()} == {
        "1": [1], "2": [1]}
    assert read_topic(kafka_bootstrap, f"{topic}.dlq") == []


@pytest.mark.kafka
def test_kafka_slow_handlers_never_keep_the_worker_from_polling_past_its_interval(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """Eight messages of 2 s each, fetched in one batch, with a poll interval of 12 s: the
    worker polls again after half of it, handing the rest back, and handles each once.

    Handled in one go, the batch (16 s) would outlast the interval by 4 s; handed back after
    half of it, the worker polls every ~6 s, 6 s within the interval (a loaded machine)."""
    topic = unique("slow")
    seen: list[str] = []

    def slow(delivery: Delivery) -> None:
        assert delivery.body is not None
        seen.append(str(json.loads(delivery.body)["id"]))
        time.sleep(2)

    # librdkafka wants session.timeout.ms <= max.poll.interval.ms.
    worker = kafka_worker(kafka_bootstrap, topic, slow, unique, topics, consumer_overrides={
        "session.timeout.ms": 10000, "max.poll.interval.ms": 12000})
    produce_json(kafka_bootstrap, topic, [{"id": n} for n in range(8)])
    with running(worker.run):
        wait_until(lambda: len(seen) >= 8, "eight messages", seconds=60)
        wait_until(lambda: not kafka_remaining(kafka_bootstrap, topic, worker.group),
                   "every offset committed")
    assert seen == [str(n) for n in range(8)]


@pytest.mark.kafka
def test_kafka_handler_slower_than_the_poll_interval_costs_a_rejoin_not_the_worker(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """The consumer leaves the group while one handler outlasts max.poll.interval.ms; the
    worker goes on (joining again), and every message is handled and committed."""
    topic = unique("slower")
    seen: list[str] = []

    def slower(delivery: Delivery) -> None:
        assert delivery.body is not None
        item = str(json.loads(delivery.body)["id"])
        if item == "0" and item not in seen:
            time.sleep(8)
        seen.append(item)

    worker = kafka_worker(kafka_bootstrap, topic, slower, unique, topics, consumer_overrides={
        "session.timeout.ms": 6000, "max.poll.interval.ms": 6000})
    produce_json(kafka_bootstrap, topic, [{"id": n} for n in range(3)])
    with running(worker.run):
        wait_until(lambda: {"0", "1", "2"} <= set(seen), "three messages", seconds=60)
        wait_until(lambda: not kafka_remaining(kafka_bootstrap, topic, worker.group),
                   "every offset committed", seconds=60)
    assert seen[0] == "0"  # then again, with 1 and 2, or not: at least once


@pytest.mark.kafka
def test_kafka_worker_reads_a_negative_attempt_count_and_an_unreadable_due_time_as_none(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    # Attempt 0 made the policy raise, and int("soon") failed: the worker crashed on them.
    topic = unique("orders")
    handler = FlakyHandler({"1": 99, "2": 1})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}], extra_headers={headers.ATTEMPTS: "-1"})
    produce_json(kafka_bootstrap, worker.retry_topic(1), [{"id": 2}],
                 extra_headers={headers.ATTEMPTS: "-1", headers.NOT_BEFORE: "soon"})
    with running(worker.run):
        wait_until(lambda: "2" in handler.effects, "the retried message's effect")
        wait_until(lambda: read_topic(kafka_bootstrap, worker.dead_letter_topic) != [],
                   "the dead letter")
    assert [a for _, a in handler.attempts["2"]] == [1, 2]
    assert [a for _, a in handler.attempts["1"]] == list(range(1, POLICY.max_attempts + 1))
    dead = read_topic(kafka_bootstrap, worker.dead_letter_topic)
    assert body_ids(dead) == ["1"]
    assert headers.from_kafka(dead[0].headers())[headers.ATTEMPTS] == str(POLICY.max_attempts)


@pytest.mark.kafka
def test_kafka_retry_due_far_off_is_handled_within_the_policy_s_longest_delay(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """Each pause was capped at the longest delay, but the retry was fetched again after it
    and paused again: a retry due in a day (a worker's clock ahead, a hand-made header) held
    its partition, and every retry behind it, for a day."""
    policy = RetryPolicy(max_attempts=3, initial_seconds=1, max_seconds=1, jitter=0)
    topic = unique("orders")
    handler = FlakyHandler({})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics, policy=policy)
    in_a_day = str(int((time.time() + 86_400) * 1000))
    produce_json(kafka_bootstrap, worker.retry_topic(1), [{"id": 1}],
                 extra_headers={headers.ATTEMPTS: "1", headers.NOT_BEFORE: in_a_day})
    produce_json(kafka_bootstrap, worker.retry_topic(1), [{"id": 2}],
                 extra_headers={headers.ATTEMPTS: "1",
                                headers.NOT_BEFORE: str(int(time.time() * 1000))})
    with running(worker.run):
        wait_until(lambda: handler.effects == ["1", "2"], "both retries handled in order")
    assert [a for _, a in handler.attempts["1"]] == [2]


@pytest.mark.kafka
def test_kafka_retry_paused_when_the_group_rebalances_still_runs_when_due(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    # librdkafka keeps an application's pause on a partition through unassign and reassign: a
    # retry partition paused (not due yet) when the group rebalanced stayed paused for good.
    # The rebalance must be over before the retry is due (checked below), else the test proves
    # nothing: it takes 1-1.5 s, the delay leaves room for a loaded machine.
    delay = 15.0
    policy = RetryPolicy(max_attempts=2, initial_seconds=delay, max_seconds=delay, jitter=0)
    topic = unique("orders")
    handler = FlakyHandler({"1": 1})
    # Quick heartbeats: the worker hears of each rebalance well before the retry is due.
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics, policy=policy,
                          consumer_overrides={"heartbeat.interval.ms": 500})
    produce_json(kafka_bootstrap, topic, [{"id": 1}])
    with running(worker.run):
        wait_until(lambda: (worker.retry_topic(1), 0) in worker._paused,
                   "the retry partition paused until the retry is due")
        failed_at = handler.attempts["1"][0][0]
        rebalanced_at = join_and_leave(kafka_bootstrap, worker.group,
                                       [topic, *worker.retry_topics])
        assert rebalanced_at < failed_at + delay, (
            f"the group rebalanced {rebalanced_at - failed_at:.1f}s after the failure, after "
            f"the retry was due: the test proves nothing, make its delay longer")
        wait_until(lambda: "1" in handler.effects, "the retry's effect")
    assert handler.effects == ["1"]
    assert [a for _, a in handler.attempts["1"]] == [1, 2]
    waited = handler.attempts["1"][1][0] - failed_at
    assert delay - EARLY_TOLERANCE <= waited <= delay + 10, (
        f"the retry ran {waited:.1f}s after the failure, expected {delay:.0f}s")


@pytest.mark.kafka
def test_kafka_retry_and_dead_letter_copies_keep_binary_and_repeated_headers_as_they_were(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    topic = unique("orders")
    handler = FlakyHandler({"1": 99})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    own = [("schema-id", b"\x00\x00\x00\x01\xff"), ("tag", b"red"), ("tag", b"blue"),
           ("empty", None)]
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.publish(producer, topic, value=json.dumps({"id": 1}).encode(), key="1",
                  headers=own, what="test")
    with running(worker.run):
        wait_until(lambda: read_topic(kafka_bootstrap, worker.dead_letter_topic) != [],
                   "the dead letter")
    retried = read_topic(kafka_bootstrap, worker.retry_topic(1))
    dead = read_topic(kafka_bootstrap, worker.dead_letter_topic)
    for copy, where in ((retried[0], "retry"), (dead[0], "dead letter")):
        carried = [(k, v) for k, v in copy.headers()
                   if not k.startswith(headers.PREFIX) and k not in tracing.TRACE_HEADERS]
        assert carried == own, f"the {where} copy changed the message's own headers"
    assert headers.from_kafka(dead[0].headers())[headers.ATTEMPTS] == str(POLICY.max_attempts)


class _PollThen:
    """A consumer whose poll() calls ``then()`` before it returns a message."""

    def __init__(self, consumer: Consumer, then: Callable[[], None]) -> None:
        self.consumer, self.then = consumer, then

    def poll(self, timeout: float) -> Message | None:
        message = self.consumer.poll(timeout)
        if message is not None and message.error() is None:
            self.then()
        return message

    def consume(self, *args: Any) -> list[Message]:
        return self.consumer.consume(*args)


class _RebalancedMidBatch(kafka_workers.KafkaWorker):
    """A worker that holds its first message between poll() and consume() until the group is
    rebalancing: consume() then runs the revoke of that message's partition."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.holding = threading.Event()
        self.revoked_mid_batch = False

    def _next_messages(self, consumer: Consumer) -> list[Message]:
        if self.holding.is_set():
            return super()._next_messages(consumer)
        held = _PollThen(consumer, self._until_rebalancing)
        batch = super()._next_messages(held)  # type: ignore[arg-type]
        if batch:
            first = batch[0]
            self.revoked_mid_batch = (first.topic(), first.partition()) not in self._assigned
        return batch

    def _until_rebalancing(self) -> None:
        self.holding.set()
        admin = kafka.connect_admin(self.properties, what="test")
        deadline = time.monotonic() + 60
        while admin.describe_consumer_groups([self.group])[self.group].result().state is not (
                ConsumerGroupState.PREPARING_REBALANCING):
            assert time.monotonic() < deadline, "the group did not start rebalancing"
            time.sleep(0.1)
        # The worker hears of it at its next heartbeat (every 0.2 s) and queues the revoke for
        # consume(). Nothing shows when it has: the revoke, librdkafka's statistics and logs all
        # wait for this very thread's next consume(), and the group stays PREPARING_REBALANCE
        # until the worker rejoins, after that consume(). So give it fifty heartbeats (a loaded
        # machine); should it still miss them, revoked_mid_batch fails the test, never passes it.
        time.sleep(10)


@pytest.mark.kafka
def test_kafka_rebalance_between_poll_and_consume_skips_the_revoked_message(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    # The handler ran on a message of a partition revoked meanwhile, then store_offsets()
    # raised for that partition and the worker exited.
    topic = unique("orders")
    handler = FlakyHandler({})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics,
                          kind=_RebalancedMidBatch,
                          consumer_overrides={"heartbeat.interval.ms": 200})
    assert isinstance(worker, _RebalancedMidBatch)
    produce_json(kafka_bootstrap, topic, [{"id": 1}])
    offsets = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": worker.group,
                        "enable.auto.commit": False})
    try:
        with running(worker.run):
            wait_until(worker.holding.is_set, "the first message polled")
            join_and_leave(kafka_bootstrap, worker.group, [topic, *worker.retry_topics])
            # Committed only once the message was settled on a partition the worker owned.
            wait_until(lambda: kafka.committed_offsets(offsets, topic, 1, what="test")[0] == 1,
                       "the message's offset committed")
    finally:
        offsets.close()
    assert worker.revoked_mid_batch, "the rebalance did not land between poll and consume"
    assert handler.effects == ["1"], "the message was handled on a revoked partition"


def _log_lines(err: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` in captured stderr."""
    found = []
    for line in err.splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict) and document.get("event") == event:
            found.append(document)
    return found


@pytest.mark.kafka
def test_kafka_worker_failed_lines_say_the_topic_partition_and_offset_of_the_message(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        capsys: pytest.CaptureFixture[str]) -> None:
    """worker.failed carried the source and message id only: which partition and offset
    (of the work topic, then of a retry topic) failed could not be told from the log."""
    configure_logs(as_json=True)
    topic = unique("orders")
    topics.create(topic)
    handler = FlakyHandler({"2": 1})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}, {"id": 2}])
    with running(worker.run):
        wait_until(lambda: "2" in handler.effects, "the retried message's effect")
    failed = _log_lines(capsys.readouterr().err, "worker.failed")
    assert [(f["topic"], f["partition"], f["offset"], f["action"]) for f in failed] == [
        (topic, 0, 1, "retry")], failed


@pytest.mark.rabbitmq
def test_rabbitmq_worker_failed_lines_say_the_queue_and_delivery_tag_of_the_message(
        amqp_url: str, unique: Callable[[str], str], queues: Queues,
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logs(as_json=True)
    queue = unique("payments")
    handler = FlakyHandler({}, permanent={"2"})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    for n in (1, 2):
        queues.publish(queue, json.dumps({"id": n}).encode(), message_id=f"m{n}")
    with running(worker.run):
        wait_until(lambda: queues.depth(worker.dead_letter_queue) == 1, "the dead letter")
    failed = _log_lines(capsys.readouterr().err, "worker.failed")
    assert [(f["queue"], f["delivery_tag"], f["message_id"], f["action"]) for f in failed] == [
        (queue, 2, "m2", "dead_letter")], failed


# ---------------------------------------------------------------------------------------------
# RabbitMQ


@pytest.mark.rabbitmq
def test_rabbitmq_handler_failing_twice_has_its_effect_once_after_retries_at_the_delays(
        amqp_url: str, unique: Callable[[str], str], queues: Queues) -> None:
    queue = unique("payments")
    handler = FlakyHandler({"1": 2})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1")
    queues.publish(queue, json.dumps({"id": 2}).encode(), message_id="m2")
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the flaky message's effect")
        time.sleep(0.5)
    assert handler.effects.count("1") == 1 and handler.effects.count("2") == 1
    assert handler.effects.index("2") < handler.effects.index("1")
    _check_retry_timing(handler, "1", failures=2)
    assert queues.depth(worker.dead_letter_queue) == 0
    assert queues.depth(queue) == 0


@pytest.mark.rabbitmq
def test_rabbitmq_poison_messages_end_in_the_dlq_with_complete_headers(
        amqp_url: str, unique: Callable[[str], str], queues: Queues) -> None:
    queue = unique("payments")
    handler = FlakyHandler({"1": 99}, permanent={"2"})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    for n in (1, 2, 3):
        queues.publish(queue, json.dumps({"id": n}).encode(), message_id=f"m{n}",
                       headers_={"tenant": "acme"})
    with running(worker.run):
        wait_until(lambda: queues.depth(worker.dead_letter_queue) == 2, "two dead letters")
    letters = {json.loads(body)["id"]: props for props, body in
               queues.drain(worker.dead_letter_queue)}
    assert handler.effects == ["3"]
    assert len(handler.attempts["1"]) == POLICY.max_attempts
    assert len(handler.attempts["2"]) == 1
    for item, attempts, error in ((1, "4", "ConnectionError"),
                                  (2, "1", "trueup.retry.PermanentError")):
        props = letters[item]
        table = props.headers
        assert props.message_id == f"m{item}"
        assert props.delivery_mode == 2 and props.expiration is None
        assert table["tenant"] == "acme"
        assert table[headers.ORIGIN] == queue
        assert table[headers.ATTEMPTS] == attempts
        assert table[headers.ERROR_CLASS] == error
        assert table[headers.MESSAGE_ID] == f"m{item}"
        assert table[headers.GROUP] == worker.name
        assert headers.parse_time(table[headers.FIRST_FAILURE]) is not None
        assert headers.parse_time(table[headers.LAST_FAILURE]) is not None
        assert "x-death" not in table


@pytest.mark.rabbitmq
def test_rabbitmq_handler_slower_than_the_heartbeat_is_handled_once_and_acked(
        amqp_url: str, unique: Callable[[str], str], queues: Queues) -> None:
    # The handler ran on pika's connection thread: no heartbeats while it ran, so RabbitMQ
    # dropped the connection, the ack failed and the message came again, endlessly.
    heartbeat = 2
    queue = unique("payments")
    handled: list[int] = []

    def slow(delivery: Delivery) -> None:
        time.sleep(3.5 * heartbeat)
        handled.append(delivery.attempt)

    worker = rabbit_worker(amqp_url, queue, slow, queues, heartbeat_seconds=heartbeat)
    queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1")
    with running(worker.run):
        wait_until(lambda: handled != [], "the slow handler's end")
    # Stopped after the handler returned: the ack went out before the worker stopped.
    assert queues.depth(queue) == 0, "the message was not acked: it is back in the queue"
    assert handled == [1]


@pytest.mark.rabbitmq
def test_rabbitmq_refusing_the_login_or_the_vhost_says_so(amqp_url: str) -> None:
    """A wrong password read 'cannot reach RabbitMQ at ...', sending people to look for a
    network problem while the broker answered; a worker logs it on every reconnect."""
    url = urlsplit(amqp_url)
    wrong_password = url._replace(netloc=f"guest:wrong@{url.hostname}:{url.port}").geturl()
    no_vhost = url._replace(path="/trueup-no-such-vhost").geturl()
    where = f"RabbitMQ at {url.hostname}:{url.port}"
    for bad, expected in [
            (wrong_password, f"connections.amqp: {where} refused the login (check the user and "
                             f"password of the URL): ConnectionClosedByBroker: (403) "
                             f"'ACCESS_REFUSED"),
            (no_vhost, f"connections.amqp: {where} refused the virtual host (check the URL's "
                       f"path and the user's permissions): ConnectionClosedByBroker: (530) "
                       f"'NOT_ALLOWED - vhost trueup-no-such-vhost not found'")]:
        with pytest.raises(ConnectionFailed) as caught:
            rabbitmq.connect(bad, what="connections.amqp")
        assert str(caught.value).startswith(expected), caught.value


class _CancelledOnce(FlakyHandler):
    """Raises asyncio.CancelledError (a BaseException, as a handler's own event loop may) the
    first time it sees a message."""

    def __call__(self, delivery: Delivery) -> None:
        assert delivery.body is not None
        if delivery.attempt == 1:
            with self.lock:
                self.attempts.setdefault(str(json.loads(delivery.body)["id"]), []).append(
                    (time.monotonic(), delivery.attempt))
            raise asyncio.CancelledError("the handler's own loop was cancelled")
        super().__call__(delivery)


@pytest.mark.kafka
def test_kafka_handler_raising_a_base_exception_has_its_message_retried_not_the_worker_killed(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """Only Exception was a handler failure: a CancelledError stopped the worker on every
    delivery of the message, and its partition with it."""
    topic = unique("orders")
    handler = _CancelledOnce({})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}])
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the retried message's effect")
    assert [a for _, a in handler.attempts["1"]] == [1, 2]


@pytest.mark.kafka
def test_kafka_retry_due_past_what_a_float_holds_is_far_off_not_a_crash(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """A hand-made due time of 400 digits failed the division into seconds (OverflowError)
    and stopped the worker; it is as far off as any, and handled within the longest delay."""
    policy = RetryPolicy(max_attempts=3, initial_seconds=1, max_seconds=1, jitter=0)
    topic = unique("orders")
    handler = FlakyHandler({})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics, policy=policy)
    produce_json(kafka_bootstrap, worker.retry_topic(1), [{"id": 1}],
                 extra_headers={headers.ATTEMPTS: "1", headers.NOT_BEFORE: "9" * 400})
    with running(worker.run):
        wait_until(lambda: handler.effects == ["1"], "the retry handled")


@pytest.mark.rabbitmq
def test_rabbitmq_header_named_in_bytes_that_are_not_utf8_is_kept_on_the_retry_copy(
        amqp_url: str, unique: Callable[[str], str], queues: Queues) -> None:
    """pika gives such a name as bytes: the copy's header filter called str.startswith on it
    (TypeError) and stopped the worker on every delivery of the message."""
    queue = unique("payments")
    handler = FlakyHandler({"1": 1})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1",
                   headers_={b"bad\xffname": "v", "tenant": "acme"})
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the retried message's effect")
    assert [a for _, a in handler.attempts["1"]] == [1, 2]
    assert queues.depth(worker.dead_letter_queue) == 0


@pytest.mark.kafka
def test_kafka_header_named_in_bytes_that_are_not_utf8_is_handled_not_a_crash(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """confluent-kafka fails reading such a message's headers (a SystemError): the worker
    stopped on every delivery of the message, before its handler ran. Its headers are read as
    none (confluent-kafka could not write that name on the retry copy anyway)."""
    topic = unique("orders")
    handler = FlakyHandler({"1": 1})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_with_raw_header_name(kafka_bootstrap, topic, b"bad\xffname", key=b"1",
                                 value=json.dumps({"id": 1}).encode(), more={"tenant": "acme"})
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the retried message's effect")
    assert [a for _, a in handler.attempts["1"]] == [1, 2]
    (retried,) = read_topic(kafka_bootstrap, worker.retry_topic(1))
    assert {name for name, _ in retried.headers()} >= {headers.ATTEMPTS, headers.ORIGIN}


def _big(bootstrap: str, topic: str, item: int, size: int) -> None:
    """Produce message ``item`` of about ``size`` bytes (a client that sends that much)."""
    producer = kafka.create_producer({"bootstrap.servers": bootstrap}, what="test",
                                     **{"message.max.bytes": 2 * size})
    deliveries = kafka.Deliveries()
    kafka.produce(producer, deliveries, topic, key=str(item),
                  value=json.dumps({"id": item, "pad": "x" * size}).encode())
    kafka.confirm(producer, deliveries, what="test")


@pytest.mark.kafka
def test_kafka_message_as_large_as_its_topic_takes_is_retried_and_dead_lettered(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """The retry and dead-letter topics took the broker's default largest message, and the
    worker's producer librdkafka's (1,000,000 bytes): a larger message of a topic that takes
    it stopped the worker at its first failure, on every delivery (nothing was lost)."""
    topic = unique("orders")
    topics.create(topic)
    _let_take(kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test"),
              [topic], 3_000_000)
    handler = FlakyHandler({"1": 1}, permanent={"2"})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    _big(kafka_bootstrap, topic, 1, 1_500_000)
    _big(kafka_bootstrap, topic, 2, 1_500_000)
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects and "2" in handler.attempts,
                   "the large message retried and the other dead-lettered")
        wait_until(lambda: len(read_topic(kafka_bootstrap, worker.dead_letter_topic)) == 1,
                   "the dead letter")
    assert [a for _, a in handler.attempts["1"]] == [1, 2]


def _let_take(admin: Any, topics: list[str], size: int) -> None:
    """Set ``max.message.bytes`` of ``topics``, as an operator would."""
    for future in admin.incremental_alter_configs([ConfigResource(
            ConfigResource.Type.TOPIC, topic, incremental_configs=[ConfigEntry(
                "max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET)])
            for topic in topics]).values():
        future.result()


@pytest.mark.kafka
def test_kafka_worker_sends_copies_as_large_as_its_topic_takes_since_it_started(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """The producer of copies was sized to the work topic once, at start: a worker started
    while Kafka could not be asked, or before its topic took larger messages, refused a copy
    of each larger message itself, and stopped at the first one the policy gave up on."""
    topic = unique("orders")
    handler = FlakyHandler({"1": 1}, permanent={"2"})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    with running(worker.run):
        produce_json(kafka_bootstrap, topic, [{"id": 0}])
        wait_until(lambda: "0" in handler.effects, "the worker at work")
        _let_take(admin, [topic, *worker.retry_topics, worker.dead_letter_topic], 3_000_000)
        _big(kafka_bootstrap, topic, 1, 1_500_000)
        _big(kafka_bootstrap, topic, 2, 1_500_000)
        wait_until(lambda: "1" in handler.effects, "the large message retried")
        wait_until(lambda: len(read_topic(kafka_bootstrap, worker.dead_letter_topic)) == 1,
                   "the other dead-lettered")
    assert [a for _, a in handler.attempts["1"]] == [1, 2]
    (dead,) = read_topic(kafka_bootstrap, worker.dead_letter_topic)
    assert len(dead.value() or b"") > 1_500_000


@pytest.mark.kafka
def test_kafka_retry_copy_its_topic_refuses_is_dead_lettered_and_the_worker_goes_on(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """A retry topic made before (smaller than its work topic takes): the broker refuses the
    copy outright, which stopped the worker on every delivery of the message."""
    topic = unique("orders")
    retry_1 = f"{topic}.retry.1"
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.create_topics(admin, [retry_1], what="test", config={"max.message.bytes": "100000"})
    topics.track(retry_1)
    handler = FlakyHandler({"1": 1, "2": 1})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    _big(kafka_bootstrap, topic, 1, 200_000)
    produce_json(kafka_bootstrap, topic, [{"id": 2}])
    with running(worker.run):
        wait_until(lambda: "2" in handler.effects, "the small message retried")
        wait_until(lambda: len(read_topic(kafka_bootstrap, worker.dead_letter_topic)) == 1,
                   "the large message dead-lettered")
    assert [a for _, a in handler.attempts["1"]] == [1]
    (dead,) = read_topic(kafka_bootstrap, worker.dead_letter_topic)
    found = headers.from_kafka(dead.headers())
    assert (found[headers.ATTEMPTS], found[headers.ORIGIN]) == ("1", topic)
    assert headers.NOT_BEFORE not in found


@pytest.mark.kafka
def test_kafka_dead_letter_copy_its_topic_refuses_stops_the_worker_saying_why(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    topic = unique("orders")
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.create_topics(admin, [f"{topic}.dlq"], what="test",
                        config={"max.message.bytes": "100000"})
    topics.track(f"{topic}.dlq")
    handler = FlakyHandler({}, permanent={"1"})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    _big(kafka_bootstrap, topic, 1, 200_000)
    refused = pytest.raises(kafka.KafkaRefused, match=r"the dead-letter topic .* refused "
                            r"message .*:0:0 .* the worker stops rather than lose it")
    with refused, running(worker.run):
        wait_until(lambda: "1" in handler.attempts, "the message handled")
        time.sleep(2)


@pytest.mark.kafka
def test_kafka_worker_whose_copies_are_never_confirmed_stops_making_progress_until_one_is(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Brokers that answer but never confirm a copy in time end session after session; each
    new session's polls counted as progress, so /readyz stayed ready while the message waited
    for good. (A confirm timeout too short for any round trip stands in for such brokers.)"""
    monkeypatch.setattr(kafka_workers, "COPY_CONFIRM_SECONDS", 1e-6)
    topic = unique("orders")
    handler = FlakyHandler({}, permanent={"1"})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    restarts = metrics.WORKER_RECONNECTS.labels(worker.group, "CopyUnconfirmed")
    before = restarts._value.get()
    produce_json(kafka_bootstrap, topic, [{"id": 1}])
    with running(worker.run):
        wait_until(lambda: restarts._value.get() >= before + 1, "the first session ended")
        first = time.monotonic()
        wait_until(lambda: restarts._value.get() >= before + 3, "two more sessions ended")
        # no progress since the first session ended (its polls before the message were)
        assert HEALTH.seconds_since_progress() >= time.monotonic() - first
        monkeypatch.setattr(kafka_workers, "COPY_CONFIRM_SECONDS", 30.0)
        confirmable = time.monotonic()
        wait_until(lambda: HEALTH.seconds_since_progress() < time.monotonic() - confirmable,
                   "progress once a copy is confirmed")
    assert len(handler.attempts["1"]) >= 4  # handled again by each session


@pytest.mark.rabbitmq
def test_rabbitmq_copy_the_broker_refuses_keeps_the_message_and_the_worker_backs_off(
        amqp_url: str, unique: Callable[[str], str], queues: Queues) -> None:
    """A dead-letter queue that rejects publishes (full, `x-overflow: reject-publish`) nacked
    the copy, and the worker stopped on every delivery of the message. It backs off and tries
    again, the message unacked; once the queue takes it (here: deleted, so the reconnect
    declares it again) the message is dead-lettered."""
    queue = unique("payments")
    queues.declare(f"{queue}.dlq", arguments={"x-max-length": 0,
                                              "x-overflow": "reject-publish"})
    handler = FlakyHandler({}, permanent={"1"})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1")
    with running(worker.run):
        wait_until(lambda: len(handler.attempts.get("1", [])) >= 4, "the message tried again")
        times = [at for at, _ in handler.attempts["1"]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[2] > gaps[0] + 0.3, gaps  # the pauses grow: 0.2, 0.4, 0.8 s...
        channel = queues.connection.channel()
        channel.queue_delete(f"{queue}.dlq")
        channel.close()
        wait_until(lambda: queues.depth(f"{queue}.dlq") == 1, "the message dead-lettered")
    assert queues.depth(queue) == 0


@pytest.mark.kafka
def test_kafka_headers_that_fail_to_read_are_none_however_hot_the_call(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """Once a ``message.headers()`` call site is hot, CPython 3.11 runs it through an
    instruction that does not check the call: the failed read came back as a list holding a
    NULL name, its error left pending to surface anywhere later, and the worker crashed the
    interpreter reading it (a segmentation fault, only in a long enough run)."""
    topic = unique("orders")
    topics.create(topic)
    produce_json(kafka_bootstrap, topic, [{"id": n} for n in range(40)],
                 extra_headers={"tenant": "acme"})
    produce_with_raw_header_name(kafka_bootstrap, topic, b"bad\xffname", key=b"40",
                                 value=json.dumps({"id": 40}).encode())
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": unique("reader"),
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        read = []
        deadline = time.monotonic() + 30
        while len(read) < 41 and time.monotonic() < deadline:
            message = consumer.poll(1)
            if message is not None and message.error() is None:
                read.append((message, kafka.message_headers(message)))
        assert [h for _, h in read[:40]] == [[("tenant", b"acme")]] * 40
        last, found = read[40]
        assert found == [] and kafka.message_headers(last) == [] and last.headers() == []
    finally:
        consumer.close()


@pytest.mark.kafka
def test_kafka_work_topic_taking_the_most_a_topic_can_still_gets_its_worker(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics) -> None:
    """max.message.bytes at an int's largest: the retry topics were asked for more than an
    int, the producer for more than librdkafka takes; neither the topics nor the worker came
    up."""
    topic = unique("orders")
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.create_topics(admin, [topic], what="test",
                        config={"max.message.bytes": str(2**31 - 1)})
    topics.track(topic)
    handler = FlakyHandler({"1": 1})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    produce_json(kafka_bootstrap, topic, [{"id": 1}])
    with running(worker.run):
        wait_until(lambda: "1" in handler.effects, "the retried message's effect")
    assert kafka.topic_max_message_bytes(admin, worker.retry_topic(1)) == 2**31 - 1
