"""The properties trueup's Kafka clients start from, and which of them a user may change."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

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
