"""One trace follows a message through its whole life: produced, consumed and failed, retried,
dead-lettered, replayed and consumed again, on Kafka and on RabbitMQ (in-memory exporter)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import progress_events
from tests.integration.test_workers_support import (
    BACKOFF,
    POLICY,
    Queues,
    Topics,
    cli,
    kafka_worker,
    produce_json,
    rabbit_worker,
    read_topic,
    running,
    wait_until,
    write_config,
)
from trueup import tracing
from trueup.retry import PermanentError
from trueup.workers.runtime import Delivery


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory)
    yield memory
    tracing.shutdown()



class FailTwiceThenFixed:
    """Attempt 1 fails for a while (retried), attempt 2 for good (dead-lettered); after the
    fix every delivery succeeds. Records the trace id each attempt ran in."""

    def __init__(self) -> None:
        self.fixed = False
        self.seen: list[tuple[int, str | None]] = []  # (attempt, trace id)
        self.done = False

    def __call__(self, delivery: Delivery) -> None:
        self.seen.append((delivery.attempt, tracing.current_trace_id()))
        if self.fixed:
            self.done = True
            return
        if delivery.attempt == 1:
            raise ConnectionError("billing unavailable")
        raise PermanentError("order has no customer")


def _trace_of(exporter: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    trace_id = root.context.trace_id
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def _check_the_path(exporter: InMemorySpanExporter, handler: FailTwiceThenFixed,
                    destinations: dict[str, str]) -> None:
    """The spans of the one trace, linked child to parent in the order the message went:
    publish -> handle (retry) -> worker.retry -> handle (dead letter) -> worker.dead_letter
    -> replay.publish -> handle (ok)."""
    roots = [s for s in exporter.get_finished_spans() if s.name == "order.publish"]
    assert len(roots) == 1, f"expected one producer span, got {[s.name for s in roots]}"
    root = roots[0]
    spans = _trace_of(exporter, root)
    by_id = {s.context.span_id: s for s in spans}
    handles = sorted((s for s in spans if s.name == "worker.handle"),
                     key=lambda s: s.start_time or 0)
    names = sorted(s.name for s in spans)
    assert names == sorted(["order.publish", "worker.handle", "worker.retry", "worker.handle",
                            "worker.dead_letter", "replay.publish", "worker.handle"]), (
        f"expected the whole path in one trace, got {names}")
    trace_hex = format(root.context.trace_id, "032x")
    assert handler.seen == [(1, trace_hex), (2, trace_hex), (3, trace_hex)], (
        f"every attempt should run in the producer's trace {trace_hex}: {handler.seen}")

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, f"{span.name} has no parent"
        assert span.parent.span_id in by_id, f"{span.name}'s parent is not in the trace"
        return by_id[span.parent.span_id]

    first, second, third = handles
    retry = next(s for s in spans if s.name == "worker.retry")
    dead = next(s for s in spans if s.name == "worker.dead_letter")
    replayed = next(s for s in spans if s.name == "replay.publish")
    assert root.parent is None
    assert parent(first) is root
    assert parent(retry) is first and retry.kind is SpanKind.PRODUCER
    assert parent(second) is retry
    assert parent(dead) is second and dead.kind is SpanKind.PRODUCER
    assert parent(replayed) is dead and replayed.kind is SpanKind.PRODUCER
    assert parent(third) is replayed
    assert [(s.attributes or {}).get("outcome") for s in handles] == [
        "retry", "dead_letter", "ack"]
    assert [(s.attributes or {}).get("attempt") for s in handles] == [1, 2, 3]
    assert first.status.status_code is StatusCode.ERROR
    assert third.status.status_code is not StatusCode.ERROR
    assert (retry.attributes or {}).get("destination") == destinations["retry"]
    assert (dead.attributes or {}).get("destination") == destinations["dead_letter"]
    assert all(s.kind is SpanKind.CONSUMER for s in handles)


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_one_trace_follows_a_message_through_retry_dead_letter_and_replay(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    topic = unique("orders")
    handler = FailTwiceThenFixed()
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"orders_dlq": {
                              "connection": "bus", "topic": worker.dead_letter_topic,
                              "max_attempts": POLICY.max_attempts, "backoff": BACKOFF}})
    with tracing.span("order.publish", kind=SpanKind.PRODUCER):
        produce_json(kafka_bootstrap, topic, [{"id": 1}], extra_headers=tracing.inject({}))
    with running(worker.run):
        wait_until(lambda: len(read_topic(kafka_bootstrap, worker.dead_letter_topic)) == 1,
                   "the dead letter")
        handler.fixed = True
        status, _, err = cli(config, "replay", "orders_dlq", "--json")
        assert status == 0, err
        wait_until(lambda: handler.done, "the replayed message's effect")
    last = (progress_events(err) or [{}])[-1]
    assert (last.get("phase"), last.get("done"), last.get("total")) == ("letters", 1, 1), (
        f"expected a progress log event from the replay, got {err!r}")
    _check_the_path(exporter, handler, {"retry": f"{topic}.retry.1",
                                        "dead_letter": worker.dead_letter_topic})


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_one_trace_follows_a_message_through_retry_dead_letter_and_replay(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    queue = unique("payments")
    handler = FailTwiceThenFixed()
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"payments_dlq": {
                              "connection": "amqp", "queue": worker.dead_letter_queue,
                              "max_attempts": POLICY.max_attempts, "backoff": BACKOFF}})
    with tracing.span("order.publish", kind=SpanKind.PRODUCER):
        queues.publish(queue, json.dumps({"id": 1}).encode(), message_id="m1",
                       headers_=tracing.inject({}))
    with running(worker.run):
        wait_until(lambda: queues.depth(worker.dead_letter_queue) == 1, "the dead letter")
        handler.fixed = True
        status, _, err = cli(config, "replay", "payments_dlq", "--json")
        assert status == 0, err
        wait_until(lambda: handler.done, "the replayed message's effect")
    _check_the_path(exporter, handler, {"retry": f"{queue}.retry.1",
                                        "dead_letter": worker.dead_letter_queue})
