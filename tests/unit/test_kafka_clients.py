"""The properties trueup's Kafka clients start from, and which of them a user may change."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError

from tests.conftest import unused_port
from trueup import mirror
from trueup.brokers import kafka


class _Recorded:
    """Stands in for a librdkafka client class: keeps the properties it was given."""

    def __init__(self) -> None:
        self.given: list[dict[str, Any]] = []

    def __call__(self, settings: dict[str, Any]) -> object:
        self.given.append(dict(settings))
        return object()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> _Recorded:
    made = _Recorded()
    for module, name in ((kafka, "Producer"), (kafka, "Consumer"), (mirror, "Consumer")):
        monkeypatch.setattr(module, name, made)
    return made


def _clients(properties: dict[str, Any]) -> None:
    kafka.create_producer(properties, what="t")
    kafka.create_consumer(properties, group="g", what="t")
    mirror.MirrorReader(shape=SimpleNamespace(name="r"),  # type: ignore[arg-type]
                        properties=properties, conn=None,  # type: ignore[arg-type]
                        progress=lambda *a: None)


def test_clients_reconnect_after_10_ms_unless_told_otherwise(recorded: _Recorded) -> None:
    _clients({"bootstrap.servers": "127.0.0.1:9092"})
    assert [s["reconnect.backoff.ms"] for s in recorded.given] == [10, 10, 10]
    recorded.given.clear()
    _clients({"bootstrap.servers": "127.0.0.1:9092", "reconnect.backoff.ms": 250})
    assert [s["reconnect.backoff.ms"] for s in recorded.given] == [250, 250, 250]


def test_a_producer_keeps_its_guarantees_whatever_the_user_sets(recorded: _Recorded) -> None:
    kafka.create_producer({"bootstrap.servers": "x", "acks": "1",
                           "enable.idempotence": False}, what="t")
    (settings,) = recorded.given
    assert (settings["acks"], settings["enable.idempotence"]) == ("all", True)


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_librdkafka_s_own_lines_are_trueup_events_once_each_not_raw_text(
        capfd: pytest.CaptureFixture[str]) -> None:
    """librdkafka wrote '%3|...|FAIL|...' to stderr itself, about twenty a second while a
    broker was away: plain text among the JSON lines (197 lines for one failed diff)."""
    kept = _Kept()
    kafka.CLIENT_LOGGER.addHandler(kept)
    servers = f"127.0.0.1:{unused_port()}"
    consumer = kafka.create_consumer({"bootstrap.servers": servers}, group="nobody", what="t")
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            consumer.consume(1, 0.1)  # serves the client's log lines, as every reader does
    finally:
        consumer.close()
        kafka.CLIENT_LOGGER.removeHandler(kept)
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("%")]
    failures = [r for r in kept.records if vars(r)["fields"]["facility"] == "FAIL"]
    assert len(failures) == 1, [vars(r)["fields"] for r in kept.records]
    event, fields = failures[0], vars(failures[0])["fields"]
    assert (vars(event)["event"], event.levelname) == ("kafka.client", "WARNING")
    # logging trueup did not set up shows the whole line
    assert event.getMessage() == f"kafka.client FAIL [{fields['client']}]: {fields['message']}"
    assert fields["client"].startswith("rdkafka#consumer")
    assert fields["message"].startswith(f"{servers}/bootstrap: Connect to ")
    assert "Connection refused" in fields["message"]


def test_copies_of_the_largest_messages_fit_what_topics_and_librdkafka_take() -> None:
    """A work topic taking 2,000,000,000 bytes made the copies' producer ask librdkafka for
    more than it takes (1,000,000,000) and the retry topics for more than an int: the worker,
    a replay and ensure_topics failed before any message."""
    assert kafka.copy_room(1_048_588) == 1_048_588 + kafka.COPY_HEADROOM_BYTES
    assert kafka.copy_room(2**31 - 1) == 2**31 - 1
    assert kafka.copy_producer_limit({}, None) == 1_000_000
    assert kafka.copy_producer_limit({"message.max.bytes": 5_000_000}, None) == 5_000_000
    assert kafka.copy_producer_limit({}, 3_000_000) == 3_000_000 + kafka.COPY_HEADROOM_BYTES
    assert kafka.copy_producer_limit({}, 2_000_000_000) == 1_000_000_000
    assert kafka.copy_producer_limit({"message.max.bytes": 9_000_000}, 500_000) == 9_000_000


class _Flushed:
    """A producer with nothing left to send (what flush() says once each report is in)."""

    def flush(self, timeout: float) -> int:
        return 0


# Built from the code alone, as confluent-kafka builds a delivery report's error (whose
# retriable() is then always False).
@pytest.mark.parametrize(("errors", "raised"), [
    ([KafkaError(KafkaError._MSG_TIMED_OUT)], kafka.KafkaUnconfirmed),
    ([KafkaError(KafkaError._TRANSPORT), KafkaError(KafkaError.NOT_ENOUGH_REPLICAS),
      KafkaError(KafkaError.REQUEST_TIMED_OUT), KafkaError(KafkaError._FATAL)],
     kafka.KafkaUnconfirmed),
    ([KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)], kafka.KafkaFailed),
    ([KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)], kafka.KafkaFailed),
    ([KafkaError(KafkaError._MSG_TIMED_OUT),
      KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)], kafka.KafkaFailed),
    ([KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)], kafka.KafkaRefused),
], ids=["timed-out", "brokers-in-trouble", "unauthorized", "topic-gone",
        "timed-out-and-unauthorized", "too-large"])
def test_failed_deliveries_tell_brokers_away_from_failures_for_good(
        errors: list[KafkaError], raised: type[kafka.KafkaFailed]) -> None:
    """A Kafka worker starts its session again for copies the brokers' absence left
    unconfirmed (KafkaUnconfirmed), and stops for those that fail for good: it started its
    session again for any, an authorization error included, looping forever."""
    deliveries = kafka.Deliveries()
    for error in errors:
        deliveries.report("tag", error, SimpleNamespace(topic=lambda: "orders.dlq"))
    with pytest.raises(kafka.KafkaFailed) as caught:
        kafka.confirm(cast(Any, _Flushed()), deliveries, what="test")
    assert type(caught.value) is raised
    assert deliveries.transient and not deliveries.errors  # the next confirm starts afresh
