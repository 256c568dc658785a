"""Worker runtimes against the real brokers: retries at the configured delays, dead letters with
complete headers, no blocked partition."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.integration.test_workers_support import (
    EARLY_TOLERANCE,
    LATE_TOLERANCE,
    POLICY,
    FlakyHandler,
    Queues,
    Topics,
    body_ids,
    kafka_worker,
    produce_json,
    rabbit_worker,
    read_topic,
    running,
    wait_until,
)
from trueup import headers
from trueup.brokers import kafka
from trueup.workers import kafka as kafka_workers


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
    poll_seconds = 3.0
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
