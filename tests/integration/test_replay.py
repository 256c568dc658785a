"""``trueup dlq`` and ``trueup replay`` against the real brokers and the state database."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition

from tests.integration.test_workers_support import (
    BACKOFF,
    POLICY,
    FlakyHandler,
    Queues,
    Topics,
    body_ids,
    cli,
    cli_json,
    kafka_remaining,
    kafka_worker,
    produce_json,
    rabbit_worker,
    read_topic,
    running,
    wait_until,
    write_config,
)
from trueup import headers
from trueup.brokers import kafka
from trueup.brokers.kafka import KafkaFailed
from trueup.config import Config, load_config
from trueup.dlq import inspect
from trueup.errors import TrueupError
from trueup.letterboxes import kafka as letterbox_kafka
from trueup.letterboxes import open_letterbox
from trueup.letterboxes.kafka import KafkaLetterbox, replay_group
from trueup.letterboxes.rabbitmq import RabbitLetterbox
from trueup.replay import ReplayOptions, replay


def _loaded(tmp_path: Path, state: str, bootstrap: str, amqp: str,
            **dead_letters: dict[str, Any]) -> Config:
    """The loaded config of the stack with these ``dead_letters``."""
    return load_config(write_config(tmp_path, state=state, bootstrap=bootstrap, amqp=amqp,
                                    dead_letters=dead_letters))


def _events(state: str) -> list[tuple[str, str]]:
    with psycopg.connect(state) as conn:
        rows = conn.execute("SELECT message_id, outcome FROM trueup.replay_events "
                            "ORDER BY replay_id, message_id").fetchall()
    return [(r[0], r[1]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Kafka


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_poison_letters_replay_after_the_fix_and_exhausted_ones_are_parked(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    topic = unique("orders")
    handler = FlakyHandler({"2": 99}, permanent={"1"})
    worker = kafka_worker(kafka_bootstrap, topic, handler, unique, topics)
    topics.track(f"{topic}.parked")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"orders_dlq": {
                              "connection": "bus", "topic": f"{topic}.dlq",
                              "max_attempts": POLICY.max_attempts, "backoff": BACKOFF,
                              "parking": f"{topic}.parked"}})
    produce_json(kafka_bootstrap, topic, [{"id": 1}, {"id": 2}, {"id": 3}])
    with running(worker.run):
        wait_until(lambda: len(read_topic(kafka_bootstrap, f"{topic}.dlq")) == 2,
                   "two dead letters")

    report = cli_json(config, "dlq", "orders_dlq")
    assert report["depth"] == 2
    assert report["by_error"] == {"trueup.retry.PermanentError": 1, "ConnectionError": 1}
    assert report["by_origin"] == {topic: 2}
    assert 0 <= report["oldest_age_seconds"] < 120
    assert cli_json(config, "dlq", "orders_dlq")["depth"] == 2, "inspecting took letters"

    dry = cli_json(config, "replay", "orders_dlq", "--dry-run")
    assert (dry["dry_run"], dry["moved"], dry["parked"], dry["skipped"]) == (True, 1, 1, 0)
    assert cli_json(config, "dlq", "orders_dlq")["depth"] == 2, "a dry run took letters"

    handler.fixed = True
    with running(worker.run):
        done = cli_json(config, "replay", "orders_dlq")
        wait_until(lambda: "1" in handler.effects, "the replayed letter's effect")
    assert (done["dry_run"], done["moved"], done["parked"], done["skipped"]) == (False, 1, 1, 0)
    assert set(done) == {"replay_id", "name", "dry_run", "moved", "parked", "skipped",
                         "seconds"}
    assert handler.effects == ["3", "1"]
    parked = read_topic(kafka_bootstrap, f"{topic}.parked")
    assert body_ids(parked) == ["2"]
    text = headers.from_kafka(parked[0].headers())
    assert text[headers.ATTEMPTS] == str(POLICY.max_attempts)
    assert text[headers.REPLAY_ID] == str(done["replay_id"])
    assert cli_json(config, "dlq", "orders_dlq")["depth"] == 0
    again = cli_json(config, "replay", "orders_dlq")
    assert (again["moved"], again["parked"]) == (0, 0)
    outcomes = sorted(o for _, o in _events(state_db))
    assert outcomes == ["moved", "parked", "would_move", "would_park"]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letters_without_trueup_headers_go_to_replay_to_and_where_filters(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    dlq, target = unique("legacy.dlq"), unique("orders")
    topics.create(dlq, target)
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(10)])           # no headers
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(10, 15)],
                 extra_headers={headers.ERROR_CLASS: "ValueError", headers.ATTEMPTS: "1",
                                headers.ORIGIN: "somewhere.else"})
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"legacy": {"connection": "bus", "topic": dlq,
                                                   "replay_to": target}})
    assert cli_json(config, "dlq", "legacy")["by_error"] == {"unknown": 10, "ValueError": 5}

    first = cli_json(config, "replay", "legacy", "--where", "error=ValueError", "--max", "3")
    assert (first["moved"], first["skipped"]) == (3, 10)
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["10", "11", "12"]
    # The unheaded letters came first and stayed: nothing could be committed past them.
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("legacy"))) == 15

    rest = cli_json(config, "replay", "legacy")
    assert (rest["moved"], rest["skipped"]) == (12, 3)   # the 3 already moved are recognised
    moved = body_ids(read_topic(kafka_bootstrap, target))
    assert sorted(moved, key=int) == [str(n) for n in range(15)], "lost or duplicated"
    assert kafka_remaining(kafka_bootstrap, dlq, replay_group("legacy")) == []


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letters_are_never_sent_to_a_topic_that_does_not_exist(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """A misspelt replay_to: the broker created the topic on first use and the letters left
    their queue for it, although validate said it did not exist."""
    dlq, nowhere = unique("typo.dlq"), unique("orders.v1.typo")
    topics.create(dlq)
    topics.track(nowhere)  # deleted afterwards, should it be made after all
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(3)])
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"typo": {"connection": "bus", "topic": dlq,
                                                 "replay_to": nowhere}})
    for dry_run in (["--dry-run"], []):  # a dry run tells it too
        status, _, err = cli(config, "replay", "typo", *dry_run)
        assert status == 2
        assert err.strip().splitlines()[-1] == (f"dead_letters.typo: the letters' destination, "
                                                f"Kafka topic {nowhere!r}, does not exist")
    assert kafka.topic_partitions(topics.admin, nowhere, what="test") is None
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("typo"))) == 3


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letterbox_has_its_producer_before_the_first_letters_and_inspecting_makes_none(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # An idempotent producer holds messages produced before it has its producer id for about
    # half a second (librdkafka PR 5032): a replay makes it before fetching, not at the first
    # publish, and inspecting or a dry run (which publish nothing) make none.
    dlq = unique("early.dlq")
    topics.create(dlq)
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(3)])
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     early={"connection": "bus", "topic": dlq})
    box = open_letterbox(config, "early")
    assert isinstance(box, KafkaLetterbox)
    try:
        looked = [item for batch in box.letters(batch_size=10, take=False) for item in batch]
        assert len(looked) == 3 and box._producer is None
        batches = box.letters(batch_size=10, take=True)
        first = next(batches)
        assert len(first) == 3 and box._producer is not None
        batches.close()
    finally:
        box.close()


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_dlq_written_in_a_transaction_is_read_to_its_end(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A transactional producer ends the log with a commit marker, an offset no consumer sees:
    # the last letter is not at the end offset - 1. Reading stalled until STALL_SECONDS.
    monkeypatch.setattr(letterbox_kafka, "STALL_SECONDS", 15.0)
    dlq, target = unique("tx.dlq"), unique("tx.orders")
    topics.create(dlq, target)
    producer = Producer({"bootstrap.servers": kafka_bootstrap,
                         "transactional.id": unique("tx")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for n in range(3):
        producer.produce(dlq, value=json.dumps({"id": n}).encode(), key=str(n))
    producer.commit_transaction(30)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     tx={"connection": "bus", "topic": dlq, "replay_to": target})

    report = inspect(config, "tx")
    assert (report.inspected, report.by_error) == (3, {"unknown": 3})
    assert replay(config, "tx").moved == 3
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["0", "1", "2"]
    assert replay(config, "tx").moved == 0


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_copies_the_destination_refuses_leave_their_letters_in_the_dlq(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # Producers ask for delivery reports of failures only: a refused copy must still fail the
    # replay before anything is committed.
    dlq, target = unique("refused.dlq"), unique("refused.orders")
    topics.create(dlq)
    kafka.create_topics(topics.admin, [target], what="test",
                        config={"max.message.bytes": "2000"})
    topics.track(target)
    produce_json(kafka_bootstrap, dlq, [{"id": 1}, {"id": 2, "note": "x" * 5000}, {"id": 3}])
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     refused={"connection": "bus", "topic": dlq, "replay_to": target})

    with pytest.raises(KafkaFailed, match=r"messages refused.*too large"):
        replay(config, "refused")
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("refused"))) == 3
    with psycopg.connect(state_db) as conn:
        status = conn.execute("SELECT status FROM trueup.replays").fetchall()
    assert status == [("failed",)]
    assert _events(state_db) == []


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_copies_sent_before_a_letter_fails_its_batch_are_not_sent_again(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """The copies queued in the producer before a letter failed the batch were delivered when
    the replay closed, but neither recorded nor committed: every new attempt sent them again
    (RabbitMQ's, confirmed one by one, were recorded)."""
    dlq, origin, gone = unique("halfway.dlq"), unique("halfway.orders"), unique("gone")
    topics.create(dlq, origin)
    for position in range(10):
        produce_json(kafka_bootstrap, dlq, [{"id": position}], extra_headers={
            headers.ORIGIN: gone if position == 5 else origin, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     halfway={"connection": "bus", "topic": dlq})
    for _ in range(2):  # the letter stays in the way until someone looks at it
        # the one line says which letter stops every replay, and how to pass it
        with pytest.raises(TrueupError, match=(
                f"Kafka topic '{gone}', does not exist: it is where letter {dlq}:0:5 came "
                f"from, and every replay stops at that letter. Create it, set replay_to, or "
                f"leave such letters out with --where 'origin!={gone}'$")):
            replay(config, "halfway", ReplayOptions(batch_size=100))
        assert body_ids(read_topic(kafka_bootstrap, origin)) == ["0", "1", "2", "3", "4"]
    assert [outcome for _, outcome in _events(state_db)] == ["moved"] * 5


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_letter_whose_origin_queue_is_gone_is_named_with_the_way_past_it(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    """The replay said only "no queue bound to the default exchange", naming no letter."""
    dlq, origin, gone = unique("halfway.dlq"), unique("halfway.orders"), unique("gone")
    queues.declare(dlq)
    queues.declare(origin)
    for position in range(10):
        queues.publish(dlq, json.dumps({"id": position}).encode(), message_id=f"h{position}",
                       headers_={headers.ORIGIN: gone if position == 5 else origin,
                                 headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     halfway={"connection": "amqp", "queue": dlq})
    for _ in range(2):  # the letter stays in the way until someone looks at it
        with pytest.raises(TrueupError, match=(
                f"RabbitMQ queue '{gone}', does not exist: it is where letter h5 came from, "
                f"and every replay stops at that letter. Create it, set replay_to, or leave "
                f"such letters out with --where 'origin!={gone}'$")):
            replay(config, "halfway", ReplayOptions(batch_size=100))
    assert [json.loads(body)["id"] for _, body in queues.drain(origin)] == [0, 1, 2, 3, 4]
    assert [outcome for _, outcome in _events(state_db)] == ["moved"] * 5

    done = replay(config, "halfway", ReplayOptions(where=f"origin!={gone}"))
    assert (done.moved, done.skipped) == (4, 1), done  # 0-4 moved and acked already, 5 left out
    assert [json.loads(body)["id"] for _, body in queues.drain(origin)] == [6, 7, 8, 9]
    assert [json.loads(body)["id"] for _, body in queues.drain(dlq)] == [5]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_copies_of_one_message_are_sent_and_recorded_once_in_any_batch(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # A worker that dead-letters a message twice leaves two copies with one id. A replay
    # records each id once (replay_events has no ON CONFLICT to fall back on): copies in the
    # same batch, in the batches just before (not yet recorded when the batch is looked up)
    # and far apart (recorded long before) must all be told apart, in a dry run too.
    dlq, target = unique("twice.dlq"), unique("orders")
    topics.create(dlq, target)
    #  batch (of 3):  0        1        2        3        4        5
    order = ["a", "a", "b",  "c", "d", "e",  "a", "f", "g",  "h", "i", "j",  "k", "b", "c",
             "l", "m", "a"]
    for position, message_id in enumerate(order):
        produce_json(kafka_bootstrap, dlq, [{"id": position}], extra_headers={
            headers.MESSAGE_ID: message_id, headers.ORIGIN: target, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     twice={"connection": "bus", "topic": dlq})
    copies = len(order) - len(set(order))

    tried = replay(config, "twice", ReplayOptions(dry_run=True, batch_size=3))
    assert (tried.moved, tried.skipped) == (len(order), 0)  # a dry run sends nothing to know by
    done = replay(config, "twice", ReplayOptions(batch_size=3))
    assert (done.moved, done.skipped) == (len(set(order)), copies)

    moved = body_ids(read_topic(kafka_bootstrap, target))
    assert sorted(map(int, moved)) == sorted(order.index(i) for i in set(order)), (
        "each id's first copy, once")
    with psycopg.connect(state_db) as conn:
        recorded = conn.execute(
            "SELECT replay_id, message_id, count(*) FROM trueup.replay_events "
            "GROUP BY replay_id, message_id").fetchall()
    assert {r[2] for r in recorded} == {1}
    assert sorted(r[1] for r in recorded if r[0] == done.replay_id) == sorted(set(order))
    assert sorted(r[1] for r in recorded if r[0] == tried.replay_id) == sorted(set(order))
    assert kafka_remaining(kafka_bootstrap, dlq, replay_group("twice")) == []


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letter_that_failed_after_its_id_was_moved_is_another_message_and_moved(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """A copy left in the DLQ after its id was moved (a stop before removing it) is dropped;
    a letter that failed after the move is another message under the same id (a topic
    created again restarts the offsets ids default to) and is moved, never dropped."""
    dlq, target = unique("reused.dlq"), unique("orders")
    topics.create(dlq, target)
    first = {headers.MESSAGE_ID: "orders:0:5", headers.ORIGIN: target, headers.ATTEMPTS: "1"}
    produce_json(kafka_bootstrap, dlq, [{"id": 1}], extra_headers=first)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     reused={"connection": "bus", "topic": dlq})
    assert replay(config, "reused", ReplayOptions()).moved == 1

    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    produce_json(kafka_bootstrap, dlq, [{"id": 2}, {"id": 3}], extra_headers={
        **first, headers.LAST_FAILURE: later.isoformat()})
    produce_json(kafka_bootstrap, dlq, [{"id": 4}], extra_headers={
        **first, headers.LAST_FAILURE: "2026-01-01T00:00:00+00:00"})  # the copy left behind
    again = replay(config, "reused", ReplayOptions())
    # 2 is moved; 3, its copy, once; 4 failed before the first move: that move was its own
    assert (again.moved, again.skipped) == (1, 2)
    assert sorted(map(int, body_ids(read_topic(kafka_bootstrap, target)))) == [1, 2]
    assert kafka_remaining(kafka_bootstrap, dlq, replay_group("reused")) == []


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_dlq_topic_created_again_has_every_new_letter_counted_and_replayed(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """A position kept for the old topic was taken as the new one's while the new one was
    shorter: its first letters were neither counted in the depth nor ever replayed."""
    dlq, target = unique("again.dlq"), unique("orders")
    topics.create(dlq, target)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     recreated={"connection": "bus", "topic": dlq})

    def letters(prefix: str, count: int) -> None:
        for n in range(count):
            produce_json(kafka_bootstrap, dlq, [{"id": f"{prefix}{n}"}], extra_headers={
                headers.ORIGIN: target, headers.ATTEMPTS: "1",
                headers.MESSAGE_ID: f"{prefix}{n}"})

    letters("old", 5)
    assert replay(config, "recreated").moved == 5
    kafka.delete_topics(topics.admin, [dlq], what="test")
    deadline = time.monotonic() + 30
    while True:  # the broker finishes deleting in the background
        try:
            kafka.create_topics(topics.admin, [dlq], what="test")
            break
        except TrueupError:
            assert time.monotonic() < deadline, f"{dlq} was not created again"
            time.sleep(0.5)
    letters("new", 8)
    assert inspect(config, "recreated").depth == 8
    assert replay(config, "recreated").moved == 8
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == sorted(
        [f"old{n}" for n in range(5)] + [f"new{n}" for n in range(8)])


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_dlq_oldest_age_counts_every_partition_s_oldest_letter(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """The oldest age came from the first letters read, often of one partition: a partition
    whose letters failed years ago went unseen, and the age check passed."""
    dlq = unique("aged.dlq")
    topics.create(dlq, partitions=2)
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test")
    deliveries = kafka.Deliveries()
    recent = dt.datetime.now(dt.UTC).isoformat()
    for partition, first_failed in ((0, recent), (1, "2020-01-01T00:00:00+00:00")):
        for n in range(3000):
            failed = first_failed if n == 0 else recent
            kafka.produce(producer, deliveries, dlq, value=b"{}", partition=partition,
                          headers=headers.to_kafka({headers.LAST_FAILURE: failed,
                                                    headers.ATTEMPTS: "1"}))
    kafka.confirm(producer, deliveries, what="test")
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     aged={"connection": "bus", "topic": dlq})
    report = inspect(config, "aged", limit=100)
    assert report.inspected == 100 and report.depth == 6000
    years = (dt.datetime.now(dt.UTC) - dt.datetime(2020, 1, 1, tzinfo=dt.UTC)).total_seconds()
    assert report.oldest_age_seconds is not None
    assert abs(report.oldest_age_seconds - years) < 600, report.oldest_age_seconds


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_id_skipped_then_sent_in_one_replay_is_known_as_replayed_by_it_afterwards(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # Replay 1 moved x and y but did not commit (offset reset below). Both came back, failed
    # again, and were dead-lettered twice more as replay 1's copies. Replay 2 skips the first
    # x and y (replay 1 moved them), sends the next ones (new failures), and must then know
    # them as its own: their events, first recorded as skipped (y's in the same batch, x's in
    # the batch before), say moved, so the last copies (three batches on, seen only through
    # the lookup) are not sent a third time.
    dlq, target = unique("again.dlq"), unique("orders")
    topics.create(dlq, target)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     again={"connection": "bus", "topic": dlq})
    letter = {headers.ORIGIN: target, headers.ATTEMPTS: "1"}
    for n, message_id in enumerate("xy"):
        produce_json(kafka_bootstrap, dlq, [{"id": n}],
                     extra_headers={**letter, headers.MESSAGE_ID: message_id})
    first = replay(config, "again")
    assert first.moved == 2
    copies = {2: "y", 4: "x", 12: "x", 13: "y"}
    # Batches of 3: [0 x, 1 y, 2 y'] [3, 4 x', 5] [6-8] [9-11] [12 x', 13 y'].
    for n in range(2, 14):
        produce_json(kafka_bootstrap, dlq, [{"id": n}], extra_headers={
            **letter, headers.MESSAGE_ID: copies.get(n, f"f{n}"),
            **({headers.REPLAY_ID: str(first.replay_id)} if n in copies else {})})
    consumer = kafka.create_consumer({"bootstrap.servers": kafka_bootstrap},
                                     group=replay_group("again"), what="test")
    consumer.commit(offsets=[TopicPartition(dlq, 0, 0)], asynchronous=False)  # not committed
    consumer.close()
    with psycopg.connect(state_db, autocommit=True) as conn:  # nor kept in the state
        conn.execute("DELETE FROM trueup.replay_positions")

    second = replay(config, "again", ReplayOptions(batch_size=3))
    assert (second.moved, second.skipped) == (10, 4)
    assert sorted(map(int, body_ids(read_topic(kafka_bootstrap, target)))) == list(range(12)), (
        "x and y sent by replay 1 (0, 1) and replay 2 (4, 2), not a third time (12, 13)")
    with psycopg.connect(state_db) as conn:
        events = conn.execute("SELECT message_id, replay_id, outcome FROM trueup.replay_events "
                              "WHERE message_id IN ('x', 'y') ORDER BY 1, 2").fetchall()
    assert events == [("x", first.replay_id, "moved"), ("x", second.replay_id, "moved"),
                      ("y", first.replay_id, "moved"), ("y", second.replay_id, "moved")]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letter_with_an_attempt_count_past_an_integer_is_parked_and_recorded(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # trueup.replay_events.attempts is an integer: recording 3000000000 failed the batch.
    dlq, parking = unique("huge.dlq"), unique("huge.parked")
    topics.create(dlq)
    topics.track(parking)
    produce_json(kafka_bootstrap, dlq, [{"id": 1}],
                 extra_headers={headers.ATTEMPTS: "3000000000", headers.ORIGIN: "orders"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     huge={"connection": "bus", "topic": dlq, "parking": parking})

    done = replay(config, "huge")
    assert (done.moved, done.parked) == (0, 1)
    assert body_ids(read_topic(kafka_bootstrap, parking)) == ["1"]
    with psycopg.connect(state_db) as conn:
        recorded = conn.execute("SELECT outcome, attempts FROM trueup.replay_events").fetchall()
    assert recorded == [("parked", headers.MAX_ATTEMPTS)]
    assert kafka_remaining(kafka_bootstrap, dlq, replay_group("huge")) == []


# ---------------------------------------------------------------------------------------------
# RabbitMQ


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_poison_letters_replay_after_the_fix_and_exhausted_ones_are_parked(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    queue = unique("payments")
    handler = FlakyHandler({"2": 99}, permanent={"1"})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    queues.track(f"{queue}.parked")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"payments_dlq": {
                              "connection": "amqp", "queue": f"{queue}.dlq",
                              "max_attempts": POLICY.max_attempts, "backoff": BACKOFF,
                              "parking": f"{queue}.parked"}})
    for n in (1, 2, 3):
        queues.publish(queue, json.dumps({"id": n}).encode(), message_id=f"m{n}")
    with running(worker.run):
        wait_until(lambda: queues.depth(f"{queue}.dlq") == 2, "two dead letters")

    report = cli_json(config, "dlq", "payments_dlq")
    assert report["depth"] == 2
    assert report["by_error"] == {"trueup.retry.PermanentError": 1, "ConnectionError": 1}
    assert report["by_origin"] == {queue: 2}
    assert queues.depth(f"{queue}.dlq") == 2, "inspecting took letters"

    status, out, _ = cli(config, "replay", "payments_dlq", "--dry-run")
    assert status == 0
    assert "would_move  m1" in out and "would_park  m2" in out, out
    assert ": would move 1, would park 1, skipped 0 in " in out.splitlines()[-1], out
    assert queues.depth(f"{queue}.dlq") == 2, "a dry run took letters"

    handler.fixed = True
    with running(worker.run):
        done = cli_json(config, "replay", "payments_dlq")
        wait_until(lambda: "1" in handler.effects, "the replayed letter's effect")
    assert (done["moved"], done["parked"], done["skipped"]) == (1, 1, 0)
    assert handler.effects == ["3", "1"]
    assert queues.depth(f"{queue}.dlq") == 0
    parked = queues.drain(f"{queue}.parked")
    assert [p.message_id for p, _ in parked] == ["m2"]
    assert parked[0][0].headers[headers.REPLAY_ID] == str(done["replay_id"])


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_broker_made_dead_letters_are_inspected_in_place_and_replayed(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    work, short, dlq = unique("settle"), unique("settle.ttl"), unique("settle.dlq")
    queues.declare(dlq)
    dead = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
    queues.declare(work, arguments=dead)
    queues.declare(short, arguments={**dead, "x-message-ttl": 50})
    for n in range(4):
        queues.publish(short, json.dumps({"id": n}).encode())           # expire, no message id
    channel = queues.connection.channel()
    for n in range(4, 7):
        queues.publish(work, json.dumps({"id": n}).encode(), message_id=f"r{n}")
    for _ in range(3):
        method, _, _ = channel.basic_get(work, auto_ack=False)
        assert method is not None
        channel.basic_reject(method.delivery_tag, requeue=False)      # RabbitMQ dead-letters
    channel.close()
    wait_until(lambda: queues.depth(dlq) == 7, "seven broker-made dead letters")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"settle_dlq": {"connection": "amqp", "queue": dlq}})

    report = cli_json(config, "dlq", "settle_dlq")
    assert report == {**report, "depth": 7,
                      "by_error": {"rabbitmq.expired": 4, "rabbitmq.rejected": 3},
                      "by_origin": {short: 4, work: 3}}
    assert queues.depth(dlq) == 7, "inspecting took letters"

    done = cli_json(config, "replay", "settle_dlq", "--where", "error=rabbitmq.rejected")
    assert (done["moved"], done["parked"], done["skipped"]) == (3, 0, 4)
    assert queues.depth(work) == 3 and queues.depth(dlq) == 4
    replayed = queues.drain(work)
    assert sorted(p.message_id for p, _ in replayed) == ["r4", "r5", "r6"]
    table = replayed[0][0].headers
    assert table[headers.ERROR_CLASS] == "rabbitmq.rejected"
    assert table[headers.ATTEMPTS] == "1" and "x-death" not in table
    # The expired ones stayed, moved to the tail, still readable as RabbitMQ's dead letters.
    assert cli_json(config, "dlq", "settle_dlq")["by_error"] == {"rabbitmq.expired": 4}


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_rabbitmq_letter_that_waited_in_a_workers_delay_queue_counts_only_its_failures(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    # Waiting out a retry delay leaves an "expired" x-death of the worker's own delay queue:
    # no failure. Counted as one, a letter at max_attempts - 1 was parked instead of replayed.
    work, dlq = unique("count"), unique("count.dlq")
    delay = f"{work}.retry.2"
    queues.declare(dlq)
    queues.declare(work, arguments={"x-dead-letter-exchange": "",
                                    "x-dead-letter-routing-key": dlq})
    queues.declare(delay, arguments={"x-dead-letter-exchange": "",
                                     "x-dead-letter-routing-key": work, "x-message-ttl": 50})
    queues.publish(delay, b'{"id": 1}', message_id="c1",
                   headers_={headers.ATTEMPTS: "2", headers.ORIGIN: work})
    wait_until(lambda: queues.depth(work) == 1, "the retry back in its work queue")
    channel = queues.connection.channel()
    method, _, _ = channel.basic_get(work, auto_ack=False)
    assert method is not None
    channel.basic_reject(method.delivery_tag, requeue=False)  # a third failure: dead-lettered
    channel.close()
    wait_until(lambda: queues.depth(dlq) == 1, "the dead letter")
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     count={"connection": "amqp", "queue": dlq, "max_attempts": 4})

    box = open_letterbox(config, "count")
    try:
        letters = [i.letter for b in box.letters(batch_size=10, take=False) for i in b]
    finally:
        box.close()
    assert [(x.attempts, x.origin, x.error_class) for x in letters] == [
        (3, work, "rabbitmq.rejected")]
    done = replay(config, "count")
    assert (done.moved, done.parked) == (1, 0)


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_runs_of_moved_letters_between_kept_and_untouched_ones_settle_each_its_way(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    # A run of moved letters is acked with one multiple=True ack: it must stop short of a kept
    # letter (copied to the tail, then acked by itself) and of letters --max left untouched.
    dlq, target = unique("runs.dlq"), unique("runs")
    queues.declare(dlq, target)
    kinds = ["move", "move", "keep", "move", "keep", "keep", "move", "move", "move", "move"]
    for n, kind in enumerate(kinds):
        queues.publish(dlq, json.dumps({"id": n}).encode(), message_id=f"m{n}", headers_={
            headers.ORIGIN: target, headers.ATTEMPTS: "1",
            headers.ERROR_CLASS: "TimeoutError" if kind == "move" else "ValueError"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     runs={"connection": "amqp", "queue": dlq})

    # Batches 0-3 and 4-7; --max is reached at 6, in the second batch: 7 is left untouched.
    done = replay(config, "runs", ReplayOptions(where="error=TimeoutError", max_messages=4,
                                                batch_size=4))
    assert (done.moved, done.skipped) == (4, 3)
    assert sorted(json.loads(body)["id"] for _, body in queues.drain(target)) == [0, 1, 3, 6]
    # Kept letters went to the tail; the untouched ones stayed where they were, before them.
    left = [json.loads(body)["id"] for _, body in queues.drain(dlq)]
    assert left == [7, 8, 9, 2, 4, 5], left


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_letter_whose_copy_failed_is_sent_again_after_the_reconnect_not_dropped(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The connection drops while the third copy is published. The two confirmed before are
    # recorded (so they are not sent twice); the third must not be: recorded as moved, it was
    # taken for replayed after the reconnect and acked, lost.
    dlq, target = unique("drop.dlq"), unique("drop")
    queues.declare(dlq, target)
    for n in range(5):
        queues.publish(dlq, json.dumps({"id": n}).encode(), message_id=f"d{n}",
                       headers_={headers.ORIGIN: target, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     drop={"connection": "amqp", "queue": dlq})
    publish = RabbitLetterbox.publish
    calls = []

    def dropping(self: RabbitLetterbox, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            self.connection.close()  # the broker went away mid-batch
            raise pika.exceptions.StreamLostError("connection lost")
        publish(self, *args, **kwargs)

    monkeypatch.setattr(RabbitLetterbox, "publish", dropping)
    capped = replay(config, "drop", ReplayOptions(max_messages=3))
    # --max counts copies sent: the third, lost with the connection, is not one of them
    assert (capped.moved, capped.skipped) == (3, 2)  # the two confirmed first, read again
    calls.clear()
    calls.extend([1, 1, 1])  # no more drops
    done = replay(config, "drop")
    assert (done.moved, done.skipped) == (2, 0)
    assert sorted(json.loads(body)["id"] for _, body in queues.drain(target)) == [0, 1, 2, 3, 4]
    assert queues.depth(dlq) == 0
    assert sorted(_events(state_db)) == [(f"d{n}", "moved") for n in range(5)]


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_replay_of_an_unknown_queue_or_a_bad_filter_is_one_clear_line(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        tmp_path: Path) -> None:
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"gone": {"connection": "amqp",
                                                 "queue": unique("missing")}})
    for args in (["replay", "nope"], ["dlq", "gone"], ["replay", "gone", "--where", "color=red"]):
        status, out, err = cli(config, *args)
        assert status == 2, (args, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
