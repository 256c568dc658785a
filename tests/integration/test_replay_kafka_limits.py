"""Kafka dead letters at the edges of what confluent-kafka reads and sends: header names that
are not UTF-8, letters larger than librdkafka's default largest message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_workers_support import (
    Topics,
    body_ids,
    cli,
    cli_json,
    kafka_remaining,
    produce_json,
    produce_with_raw_header_name,
    read_topic,
    write_config,
)
from trueup import headers
from trueup.brokers import kafka
from trueup.letterboxes.kafka import replay_group

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def test_kafka_letter_with_a_header_name_that_is_not_utf8_is_counted_and_replayed(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """confluent-kafka fails reading such a letter's headers (a SystemError): `trueup dlq` and
    `trueup replay` ended in "unexpected error" at it, for every letter of the queue. It is a
    letter without headers: counted, and replayed without them."""
    dlq, target = unique("legacy.dlq"), unique("orders")
    topics.create(dlq, target)
    produce_json(kafka_bootstrap, dlq, [{"id": 1}],
                 extra_headers={headers.ERROR_CLASS: "ValueError", headers.ORIGIN: target})
    produce_with_raw_header_name(kafka_bootstrap, dlq, b"bad\xffname", key=b"2",
                                 value=json.dumps({"id": 2}).encode(),
                                 more={headers.ERROR_CLASS: "ValueError"})
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"legacy": {"connection": "bus", "topic": dlq,
                                                   "replay_to": target}})
    assert cli_json(config, "dlq", "legacy")["by_error"] == {"ValueError": 1, "unknown": 1}
    dry = cli_json(config, "replay", "legacy", "--dry-run")
    assert (dry["moved"], dry["skipped"]) == (2, 0)
    done = cli_json(config, "replay", "legacy")
    assert (done["moved"], done["skipped"]) == (2, 0)
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["1", "2"]
    assert kafka_remaining(kafka_bootstrap, dlq, replay_group("legacy")) == []


def test_kafka_letter_larger_than_librdkafka_s_default_is_replayed_where_topics_take_it(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """The replay's producer refused a letter past 1,000,000 bytes before it left, though its
    dead-letter topic held it and its destination takes it: every replay stopped at it."""
    dlq, target = unique("big.dlq"), unique("orders")
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.create_topics(admin, [dlq, target], what="test",
                        config={"max.message.bytes": "3000000"})
    topics.track(dlq, target)
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test",
                                     **{"message.max.bytes": 3_000_000})
    deliveries = kafka.Deliveries()
    kafka.produce(producer, deliveries, dlq, key="1",
                  value=json.dumps({"id": 1, "pad": "x" * 1_500_000}).encode(),
                  headers=headers.to_kafka({headers.ERROR_CLASS: "ValueError"}))
    kafka.confirm(producer, deliveries, what="test")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"big": {"connection": "bus", "topic": dlq,
                                                "replay_to": target}})
    done = cli_json(config, "replay", "big")
    assert (done["moved"], done["skipped"]) == (1, 0)
    assert body_ids(read_topic(kafka_bootstrap, target)) == ["1"]


def test_kafka_letter_its_destination_refuses_stops_the_replay_and_the_others_move_once(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """A copy the destination refuses is reported when its batch is confirmed: nothing of
    the batch was recorded or removed, so every replay sent the batch's other letters again
    and stopped at the same batch. They are recorded and removed; the refused letter stays,
    and the replay's line names it."""
    dlq, target = unique("big.dlq"), unique("orders")
    admin = kafka.connect_admin({"bootstrap.servers": kafka_bootstrap}, what="test")
    kafka.create_topics(admin, [dlq], what="test", config={"max.message.bytes": "3000000"})
    kafka.create_topics(admin, [target], what="test")  # the broker's default: 1,048,588
    topics.track(dlq, target)
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test",
                                     **{"message.max.bytes": 3_000_000})
    deliveries = kafka.Deliveries()
    for n, pad in ((1, 10), (2, 1_500_000), (3, 10)):
        kafka.produce(producer, deliveries, dlq, key=str(n),
                      value=json.dumps({"id": n, "pad": "x" * pad}).encode(),
                      headers=headers.to_kafka({headers.ERROR_CLASS: "ValueError",
                                                headers.MESSAGE_ID: f"m{n}"}))
    kafka.confirm(producer, deliveries, what="test")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"big": {"connection": "bus", "topic": dlq,
                                                "replay_to": target}})
    for _ in range(2):
        status, _, err = cli(config, "replay", "big")
        assert status == 2
        assert "letter m2" in err.strip().splitlines()[-1]
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["1", "3"]
    # m2 stays in its place; m3, behind it, is read again and known as moved
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("big"))) == 2
    with psycopg.connect(state_db) as conn:
        rows = conn.execute("SELECT moved, skipped FROM trueup.replays ORDER BY replay_id")
        assert [tuple(r) for r in rows] == [(2, 0), (0, 1)]
