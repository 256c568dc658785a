"""The example shop's outbox relay against a Postgres and a Kafka that fail under it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest

from examples.shop import relay
from examples.shop.settings import Shop
from tests.conftest import create_database, drop_database
from tests.integration.test_workers_support import Topics, read_topic, running, wait_until
from trueup.brokers import kafka
from trueup.workers import runtime

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

SHOP_SQL = Path(__file__).resolve().parents[2] / "examples" / "shop" / "shop.sql"
WAIT_SECONDS = 20.0


@pytest.fixture
def shop_db(unique: Callable[[str], str]) -> Iterator[str]:
    """A scratch shop database (orders and outbox), dropped afterwards."""
    name = unique("fix2_shop")
    dsn = create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SHOP_SQL.read_bytes())
        yield dsn
    finally:
        drop_database(name)


def _shop(dsn: str, bootstrap: str) -> Shop:
    return cast(Shop, SimpleNamespace(shop_dsn=dsn, kafka={"bootstrap.servers": bootstrap}))


def _relay(dsn: str, bootstrap: str) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        relay.run(_shop(dsn, bootstrap), stop)
    return run


def _outbox(dsn: str, topic: str, order_id: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO public.outbox (topic, key, payload) VALUES (%s, %s, %s) RETURNING id",
            (topic, str(order_id), json.dumps({"id": order_id, "version": 1}))).fetchone()
    assert row is not None
    return int(str(row[0]))


def _published(dsn: str, outbox_id: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT published_at IS NOT NULL FROM public.outbox WHERE id = %s",
                           (outbox_id,)).fetchone()
    return bool(row and row[0])


def _keys(bootstrap: str, topic: str) -> set[str]:
    return {m.key().decode() for m in read_topic(bootstrap, topic)}


def test_relay_publishes_again_after_its_database_connection_was_terminated(
        shop_db: str, kafka_bootstrap: str, unique: Callable[[str], str],
        topics: Topics) -> None:
    """The relay kept the one connection it opened: a terminated backend (a restart, a
    failover) ended its thread with AdminShutdown, and every later outbox row stayed
    unpublished."""
    topic = unique("fix2_orders")
    topics.create(topic)
    with running(_relay(shop_db, kafka_bootstrap)):
        first = _outbox(shop_db, topic, 1)
        wait_until(lambda: _published(shop_db, first), "the first row published", WAIT_SECONDS)
        with psycopg.connect(shop_db, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()) t").fetchone()
        assert killed is not None and killed[0] >= 1  # the relay's backend
        second = _outbox(shop_db, topic, 2)
        wait_until(lambda: _published(shop_db, second), "the row after the terminated backend "
                   "published", WAIT_SECONDS)
    assert _keys(kafka_bootstrap, topic) == {"1", "2"}


def test_relay_keeps_rows_kafka_did_not_confirm_and_sends_them_once_it_does(
        shop_db: str, kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch Kafka did not confirm in time raised KafkaUnconfirmed out of relay_batch and
    ended the relay: the rows stayed unpublished for good. Now they stay unpublished only
    until Kafka confirms them, with each failure logged once and a growing pause between."""
    topic = unique("fix2_orders")
    topics.create(topic)
    outage = 3  # batches Kafka does not confirm in time (brokers away longer than the wait)
    failures: list[BaseException] = []
    confirm = kafka.confirm

    def flaky_confirm(producer: Any, deliveries: kafka.Deliveries, **kwargs: Any) -> None:
        if len(failures) < outage:
            assert not _published(shop_db, outbox_id)  # never marked without a confirmation
            failures.append(kafka.KafkaUnconfirmed(
                "outbox relay: 1 messages not confirmed within 120s"))
            raise failures[-1]
        confirm(producer, deliveries, **kwargs)

    monkeypatch.setattr(kafka, "confirm", flaky_confirm)
    warnings: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Recorder:
        def warning(self, event: str, **fields: Any) -> None:
            with lock:
                warnings.append({"event": event, **fields})

    monkeypatch.setattr(runtime, "log", Recorder())
    outbox_id = _outbox(shop_db, topic, 7)
    with running(_relay(shop_db, kafka_bootstrap)):
        wait_until(lambda: _published(shop_db, outbox_id), "the row published once Kafka "
                   "confirms it", WAIT_SECONDS)
    assert len(failures) == outage
    with lock:
        assert [w["reason"] for w in warnings] == ["KafkaUnconfirmed"] * len(failures)
        pauses = [w["pause_seconds"] for w in warnings]
    assert pauses == [min(runtime.Reconnect.MAX_SECONDS, runtime.Reconnect.FIRST_SECONDS * 2**n)
                      for n in range(outage)]  # growing, bounded
    assert _keys(kafka_bootstrap, topic) == {"7"}


def test_relay_stops_at_a_row_kafka_refuses_for_good_saying_why(
        shop_db: str, kafka_bootstrap: str, unique: Callable[[str], str],
        topics: Topics) -> None:
    """A message too large for the topic was retried every 5 s for ever, every row after it
    waiting behind it: the relay stops instead, the row unpublished, the refusal its error."""
    topic = unique("fix2_orders")
    topics.create(topic)
    with psycopg.connect(shop_db, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO public.outbox (topic, key, payload) VALUES (%s, '8', %s) RETURNING id",
            (topic, json.dumps({"id": 8, "note": "x" * 2_000_000}))).fetchone()
    assert row is not None
    later = _outbox(shop_db, topic, 9)
    stop = threading.Event()
    timer = threading.Timer(WAIT_SECONDS, stop.set)  # a relay that keeps trying returns
    timer.start()
    try:
        with pytest.raises(kafka.KafkaRefused, match="Message size too large"):
            relay.run(_shop(shop_db, kafka_bootstrap), stop)
    finally:
        timer.cancel()
    assert not _published(shop_db, int(str(row[0]))) and not _published(shop_db, later)
