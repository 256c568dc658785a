"""A table target written by a Kafka consumer: what its group has not consumed yet is in flight."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg.rows import dict_row

from tests.conftest import unused_port
from trueup import lag
from trueup.brokers.kafka import create_consumer
from trueup.config import Config, ConsumerConfig, load_config
from trueup.diff import diff
from trueup.errors import TrueupError
from trueup.runs import differences_of

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

#: Order i was last updated at BASE + i minutes; its message was written a second later.
BASE = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)
ORDERS = range(1, 9)
GRACE_SECONDS = 5


def _updated(i: int) -> dt.datetime:
    return BASE + dt.timedelta(minutes=i)


@pytest.fixture
def shop(new_db: Callable[[], str], topics: Any, unique: Callable[[str], str],
         kafka_bootstrap: str) -> dict[str, str]:
    """Orders 1-8 in the source; their events in a topic of two partitions (odd ids in 0,
    even in 1, offsets 0-3 in id order); the copy holds orders 1 and 2 only."""
    source, target, topic = new_db(), new_db(), unique("orders")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        for i in ORDERS:
            conn.execute("INSERT INTO public.orders VALUES (%s, 1, 'new', %s)", (i, _updated(i)))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy VALUES (1, 1, 'new'), (2, 1, 'new')")
    topics.create(topic, partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for i in ORDERS:
        producer.produce(topic, key=str(i), partition=(i + 1) % 2,
                         value=json.dumps({"id": i, "version": 1, "status": "new"}),
                         timestamp=int((_updated(i) + dt.timedelta(seconds=1)).timestamp() * 1000))
    assert producer.flush(30) == 0
    return {"source": source, "target": target, "topic": topic}


def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """The group has consumed each partition up to (not including) its offset."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                        asynchronous=False)
    finally:
        consumer.close()


def _config(tmp_path: Path, state: str, shop: dict[str, str], bootstrap: str,
            consumer: dict[str, str] | None) -> Config:
    """Reconciliation ``invoices``: the orders into the copy, ``consumer`` its writer;
    connection ``bus`` is Kafka at ``bootstrap``."""
    ends = {"key": ["id"], "version": "version", "columns": ["status"]}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"shop": {"postgres": shop["source"]},
                        "billing": {"postgres": shop["target"]},
                        "bus": {"kafka": {"bootstrap.servers": bootstrap}}},
        "reconciliations": {"invoices": {
            "source": {"connection": "shop", "table": "orders", "updated_at": "updated_at",
                       **ends},
            "target": {"connection": "billing", "table": "copy", **ends,
                       **({"consumer": consumer} if consumer else {})},
            "grace": f"{GRACE_SECONDS}s"}}}))
    return load_config(path)


def _classes(config: Config, state: str) -> dict[int, str]:
    summary = diff(config, "invoices")
    with psycopg.connect(state, row_factory=dict_row) as conn:
        return {d.key[0]: d.cls.value for d in differences_of(conn, summary.run_id)}


def test_differences_past_what_the_consumer_has_read_are_in_flight(
        shop: dict[str, str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        unique: Callable[[str], str]) -> None:
    """The group consumed orders 1, 3, 5 (partition 0) and 2, 4 (partition 1). Orders 3, 4
    and 5 were consumed yet are not in the copy: lost, missing. Orders 6, 7 and 8 were updated
    after the first message it has not consumed (order 6's): on their way, in flight."""
    group = unique("billing")
    _commit(kafka_bootstrap, group, shop["topic"], {0: 3, 1: 2})
    consumer = {"connection": "bus", "topic": shop["topic"], "group": group}
    lagging = _config(tmp_path, state_db, shop, kafka_bootstrap, consumer)
    assert _classes(lagging, state_db) == {3: "missing", 4: "missing", 5: "missing",
                                           6: "in_flight", 7: "in_flight", 8: "in_flight"}

    # without the consumer, the run cannot know: all six are missing
    unaware = _config(tmp_path, state_db, shop, kafka_bootstrap, None)
    assert _classes(unaware, state_db) == {i: "missing" for i in range(3, 9)}

    # a group that has consumed everything leaves nothing in flight
    _commit(kafka_bootstrap, group, shop["topic"], {0: 4, 1: 4})
    assert _classes(lagging, state_db) == {i: "missing" for i in range(3, 9)}

    # a group that never committed (a misspelt one, say) cannot tell what it read: taking
    # it for one that read nothing would put every difference in flight and hide them all
    fresh = {**consumer, "group": unique("fresh")}
    with pytest.raises(TrueupError, match=r"^diff invoices: run \d+ failed: "
                                          f"reconciliations.invoices.target.consumer: group "
                                          f"'{fresh['group']}' has committed no offset on "
                                          f"topic '{shop['topic']}'"):
        diff(_config(tmp_path, state_db, shop, kafka_bootstrap, fresh), "invoices")
    # one partition without an offset (a quiet one, read from the latest) tells nothing: the
    # other's first unconsumed message (order 6's) sets the time
    _commit(kafka_bootstrap, fresh["group"], shop["topic"], {1: 2})
    assert _classes(_config(tmp_path, state_db, shop, kafka_bootstrap, fresh),
                    state_db) == {3: "missing", 4: "missing", 5: "missing",
                                  6: "in_flight", 7: "in_flight", 8: "in_flight"}


class _Counting:
    """A consumer that counts the messages (and partition ends) it hands out."""

    def __init__(self, consumer: Any) -> None:
        self.consumer, self.handed = consumer, 0

    def consume(self, *args: Any) -> list[Any]:
        found = self.consumer.consume(*args)
        self.handed += len(found)
        return found  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


def test_the_lag_reads_one_message_a_partition_and_nothing_past_a_transaction_marker(
        topics: Any, unique: Callable[[str], str], kafka_bootstrap: str, tmp_path: Path,
        state_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition whose unread offsets held no message (the marker ending a transaction the
    group read past) never gave a first message, so the whole backlog of the others was
    read to its end."""
    topic, group = unique("ledger"), unique("ledger")
    topics.create(topic, partitions=2)
    transactional = Producer({"bootstrap.servers": kafka_bootstrap,
                              "transactional.id": unique("tx")})
    transactional.init_transactions(30)
    transactional.begin_transaction()
    transactional.produce(topic, b"{}", partition=0)  # offset 0; its commit marker is 1
    transactional.commit_transaction(30)
    first = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(1000):
        plain.produce(topic, b"{}", partition=1,
                      timestamp=int(first.timestamp() * 1000) + i)
    assert plain.flush(30) == 0
    _commit(kafka_bootstrap, group, topic, {0: 1, 1: 0})
    made: list[_Counting] = []

    def counting(*args: Any, **kwargs: Any) -> _Counting:
        made.append(_Counting(create_consumer(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(lag, "create_consumer", counting)
    config = _config(tmp_path, state_db, {"source": state_db, "target": state_db, "topic": topic},
                     kafka_bootstrap, {"connection": "bus", "topic": topic, "group": group})
    found = lag.consumer_lag(config, ConsumerConfig(connection="bus", topic=topic, group=group),
                             what="t")
    assert found == lag.Lag(offsets=1 + 1000, oldest=first)
    # partition 1's first message, and perhaps a few fetched with it; partition 0's end
    assert made[0].handed < 100, made[0].handed


def test_a_consumer_whose_kafka_cannot_be_reached_fails_the_run_naming_it(
        shop: dict[str, str], state_db: str, tmp_path: Path, kafka_bootstrap: str) -> None:
    nobody = f"127.0.0.1:{unused_port()}"
    config = _config(tmp_path, state_db, shop, nobody,
                     {"connection": "bus", "topic": shop["topic"], "group": "billing"})
    with pytest.raises(TrueupError, match=r"^diff invoices: run \d+ failed: "
                                          r"reconciliations\.invoices\.target\.consumer: "
                                          r"cannot reach Kafka at 127\.0\.0\.1:\d+"):
        diff(config, "invoices")
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT status FROM trueup.runs").fetchall() == [("failed",)]
    # and one that names a topic Kafka does not have
    config = _config(tmp_path, state_db, shop, kafka_bootstrap,
                     {"connection": "bus", "topic": shop["topic"] + "-gone", "group": "billing"})
    with pytest.raises(TrueupError, match=r"^diff invoices: run \d+ failed: "
                                          r"reconciliations\.invoices\.target\.consumer: "
                                          r"topic '.*-gone' does not exist$"):
        diff(config, "invoices")
