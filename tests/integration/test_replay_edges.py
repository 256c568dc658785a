"""Edges of ``trueup dlq`` and ``trueup replay`` found in review, against the real brokers: odd
producer timestamps, a destination the broker refuses, a very low ``--rate``, and letters a
Kafka replay keeps for good."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from tests.integration.test_workers_support import (
    Queues,
    Topics,
    body_ids,
    cli,
    cli_json,
    kafka_remaining,
    produce_json,
    read_topic,
    write_config,
)
from trueup import headers
from trueup import replay as replay_module
from trueup.brokers import kafka, rabbitmq
from trueup.config import Config, load_config
from trueup.dlq import inspect
from trueup.errors import Conflict, NotFound
from trueup.letterboxes.kafka import KafkaLetterbox, replay_group
from trueup.letterboxes.rabbitmq import RabbitLetterbox
from trueup.letters import Destination
from trueup.replay import ReplayOptions, _batch_size, replay

#: 2026-01-01T00:00:00Z in milliseconds, as many AMQP producers write the ``timestamp``
#: property (seconds by the spec).
NEW_YEAR_MS = 1767225600000


def _loaded(tmp_path: Path, state: str, bootstrap: str, amqp: str,
            **dead_letters: dict[str, Any]) -> Config:
    return load_config(write_config(tmp_path, state=state, bootstrap=bootstrap, amqp=amqp,
                                    dead_letters=dead_letters))


def _events(state: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(state) as conn:
        rows = conn.execute("SELECT replay_id, message_id, outcome FROM trueup.replay_events "
                            "ORDER BY replay_id, message_id").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _publish(queues: Queues, queue: str, message_id: str, *, origin: str,
             timestamp: int | None = None) -> None:
    channel = rabbitmq.confirmed_channel(queues.connection)
    rabbitmq.publish(channel, exchange="", routing_key=queue,
                     body=json.dumps({"id": message_id}).encode(),
                     properties=pika.BasicProperties(
                         message_id=message_id, timestamp=timestamp, delivery_mode=2,
                         headers={headers.ORIGIN: origin, headers.ATTEMPTS: "1"}),
                     what="test")
    channel.close()


# ---------------------------------------------------------------------------------------------
# A producer's timestamp in milliseconds


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_letter_stamped_in_milliseconds_is_inspected_and_replayed_with_the_others(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    # No trueup failure time and no x-death: the AMQP timestamp is the letter's time. Read as
    # seconds, 1767225600000 is the year 57971 and failed the inspection and replay of the
    # whole queue (exit 2, nothing moved).
    dlq, target = unique("stamp.dlq"), unique("stamp")
    queues.declare(dlq, target)
    _publish(queues, dlq, "a", origin=target)
    _publish(queues, dlq, "b", origin=target, timestamp=NEW_YEAR_MS)
    _publish(queues, dlq, "c", origin=target)
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"stamped": {"connection": "amqp", "queue": dlq}})

    report = cli_json(config, "dlq", "stamped")
    assert (report["depth"], report["by_origin"]) == (3, {target: 3})
    assert report["oldest_age_seconds"] is not None and report["oldest_age_seconds"] >= 0
    done = cli_json(config, "replay", "stamped")
    assert (done["moved"], done["parked"], done["skipped"]) == (3, 0, 0)
    assert queues.depth(dlq) == 0
    assert sorted(p.message_id for p, _ in queues.drain(target)) == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# A destination the broker refuses


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_replay_to_a_missing_exchange_fails_at_once_in_one_line_and_moves_nothing(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The broker closes the channel (404 NOT_FOUND) when a copy goes to an exchange that does
    # not exist: no outage, so no 20 reconnects over ~84 s ending in "unexpected error". The
    # replay now asks for replay_to before sending anything; an exchange deleted after that
    # question still meets the broker's refusal (the second run, the question skipped).
    dlq, missing = unique("refused.dlq"), unique("no.such.exchange")
    queues.declare(dlq)
    for n in range(2):
        _publish(queues, dlq, f"r{n}", origin="payments")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"refused": {
                              "connection": "amqp", "queue": dlq,
                              "replay_to": {"exchange": missing, "routing_key": "settle"}}})

    for asked in (True, False):
        if not asked:
            monkeypatch.setattr(RabbitLetterbox, "require", lambda self, destination: None)
        started = time.monotonic()
        status, out, err = cli(config, "replay", "refused")
        seconds = time.monotonic() - started
        assert status == 2, (out, err)
        # (an outage is retried for about 1.5 minutes; the CLI itself takes seconds on a busy
        # machine, with a test file running in the other xdist worker)
        assert seconds < 30, f"the refused copy took {seconds:.0f}s to fail (retried as an outage?)"
        said = [line for line in err.splitlines() if not line.startswith("{")]  # not the logs
        assert len(said) == 1 and "unexpected error" not in err and "Traceback" not in err, err
        if asked:
            assert said == [f"dead_letters.refused: the letters' destination, exchange "
                            f"{missing!r}, does not exist"]
        else:
            assert missing in said[0] and "404" in said[0], said
        assert queues.depth(dlq) == 2, "letters left the DLQ though their copies were refused"
        assert _events(state_db) == []
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT status FROM trueup.replays").fetchall() == [("failed",)] * 2


def _three_letters(queues: Queues, unique: Callable[[str], str], name: str, tmp_path: Path,
                   state: str, bootstrap: str, amqp: str) -> tuple[str, str, Config]:
    """RabbitMQ DLQ ``<name>.dlq`` holding three letters from queue ``<name>``, and a config
    whose dead-letter queue ``name`` is it: (dlq, origin queue, config)."""
    dlq, target = unique(f"{name}.dlq"), unique(name)
    queues.declare(dlq, target)
    for n in range(3):
        _publish(queues, dlq, f"{name[0]}{n}", origin=target)
    return dlq, target, _loaded(tmp_path, state, bootstrap, amqp,
                                **{name: {"connection": "amqp", "queue": dlq}})


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_channel_closed_for_another_reason_is_reconnected_through(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 406 (a delivery unacknowledged past the broker's consumer_timeout) closes the channel
    # as a 404 does, but is no answer to the copy: a new connection gets past it.
    dlq, target, config = _three_letters(queues, unique, "closed", tmp_path, state_db,
                                         kafka_bootstrap, amqp_url)
    publish, closes = rabbitmq.publish, list[int]()

    def closed_once(channel: Any, **kwargs: Any) -> None:
        if not closes:
            closes.append(1)
            raise pika.exceptions.ChannelClosedByBroker(
                406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out")
        publish(channel, **kwargs)

    monkeypatch.setattr(rabbitmq, "publish", closed_once)
    summary = replay(config, "closed")
    assert (summary.moved, summary.skipped, closes) == (3, 0, [1])
    assert queues.depth(dlq) == 0 and queues.depth(target) == 3


def test_a_paced_replay_reads_no_more_than_five_minutes_of_letters_ahead() -> None:
    assert _batch_size(ReplayOptions(rate=0.03)) == 9
    assert _batch_size(ReplayOptions(rate=100.0)) == ReplayOptions().batch_size
    # finite, but its product with the batch time is not: no OverflowError
    assert _batch_size(ReplayOptions(rate=1e306)) == ReplayOptions().batch_size
    assert _batch_size(ReplayOptions(rate=0.001)) == 1
    assert _batch_size(ReplayOptions()) == ReplayOptions().batch_size


# ---------------------------------------------------------------------------------------------
# A very low --rate on RabbitMQ


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_replay_paced_slower_than_the_heartbeat_keeps_its_connection(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a 2 s heartbeat, 7 s between letters: a pacer that sleeps without serving the
    # connection lets the broker drop it after each copy (RabbitMQ drops a connection silent
    # for 2 to 3 heartbeat timeouts, 4-6 s here); the letter whose ack was lost is read again
    # after the reconnect and counted as skipped. A pacer that serves it sends a heartbeat
    # every 1 s: only a stall of 3 s or more on a busy machine drops it (a 1 s heartbeat let a
    # 1.5 s stall drop it).
    dlq, target, config = _three_letters(queues, unique, "slow", tmp_path, state_db,
                                         kafka_bootstrap, amqp_url)
    connect = rabbitmq.connect_retrying
    connections: list[str] = []

    def short_heartbeat(url: str, *, what: str, heartbeat: int = 10) -> Any:
        connections.append(what)
        return connect(url, what=what, heartbeat=2)

    monkeypatch.setattr(rabbitmq, "connect_retrying", short_heartbeat)
    done = replay(config, "slow", ReplayOptions(rate=1 / 7))
    assert len(connections) == 1, f"{len(connections) - 1} reconnects during a paced replay"
    assert (done.moved, done.parked, done.skipped) == (3, 0, 0)
    assert done.seconds >= 13.5, f"3 letters at 1/7 per second took {done.seconds:.1f}s"
    assert queues.depth(dlq) == 0
    assert sorted(p.message_id for p, _ in queues.drain(target)) == ["s0", "s1", "s2"]


# ---------------------------------------------------------------------------------------------
# Letters a Kafka replay keeps for good


def _kafka_dlq(name: str, letters: list[tuple[str, int, str]], *, bootstrap: str, amqp: str,
               state: str, unique: Callable[[str], str], topics: Topics,
               tmp_path: Path) -> tuple[str, str, str]:
    """Kafka DLQ ``<name>.dlq`` holding ``(message id, attempts, error class)`` letters, in
    order, from topic ``<name>``, and a config file whose dead letters ``name`` are it
    (``max_attempts`` 4, no parking): (dlq, origin topic, config path)."""
    dlq, target = unique(f"{name}.dlq"), unique(name)
    topics.create(dlq, target)
    for message_id, attempts, error in letters:
        produce_json(bootstrap, dlq, [{"id": message_id}], extra_headers={
            headers.MESSAGE_ID: message_id, headers.ORIGIN: target,
            headers.ATTEMPTS: str(attempts), headers.ERROR_CLASS: error})
    config = write_config(tmp_path, state=state, bootstrap=bootstrap, amqp=amqp, dead_letters={
        name: {"connection": "bus", "topic": dlq, "max_attempts": 4}})
    return dlq, target, config


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_exhausted_letters_without_parking_go_to_the_dlq_tail_so_the_depth_drops(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # Without parking a letter at max_attempts stays. Kept in place, it blocked its partition's
    # commit: the depth never dropped, and every replay read and recorded the letters behind
    # it again. Copied to the tail (confirmed) and committed past, like RabbitMQ's.
    dlq, target, config = _kafka_dlq(
        "kept", [("x", 4, "ValueError"), ("a", 1, "ValueError"), ("b", 1, "ValueError")],
        bootstrap=kafka_bootstrap, amqp=amqp_url, state=state_db, unique=unique, topics=topics,
        tmp_path=tmp_path)

    first = cli_json(config, "replay", "kept")
    assert (first["moved"], first["parked"], first["skipped"]) == (2, 0, 1)
    assert cli_json(config, "dlq", "kept")["depth"] == 1, "the moved letters stayed counted"
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["a", "b"]
    left = kafka_remaining(kafka_bootstrap, dlq, replay_group("kept"))
    assert body_ids(left) == ["x"]
    text = headers.from_kafka(left[0].headers())
    assert (text[headers.MESSAGE_ID], text[headers.ATTEMPTS]) == ("x", "4")
    assert headers.REPLAY_ID not in text, "a kept copy was taken for one a replay made"

    for _ in range(2):
        again = cli_json(config, "replay", "kept")
        assert (again["moved"], again["parked"], again["skipped"]) == (0, 0, 1)
        assert cli_json(config, "dlq", "kept")["depth"] == 1
    assert len(read_topic(kafka_bootstrap, dlq)) == 3 + 3, "one copy of x per replay, no more"
    events = _events(state_db)
    assert [(m, o) for _, m, o in events] == [
        ("a", "moved"), ("b", "moved"), ("x", "skipped"), ("x", "skipped"), ("x", "skipped")]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_exhausted_letter_behind_a_filtered_out_one_is_not_copied_until_reached(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    # A letter --where did not select still blocks its partition (a later replay may want
    # it): the kept letter behind it is read again next time, so copying it to the tail now
    # would only duplicate it.
    dlq, target, path = _kafka_dlq(
        "held", [("f", 1, "KeyError"), ("x", 4, "ValueError"), ("a", 1, "ValueError")],
        bootstrap=kafka_bootstrap, amqp=amqp_url, state=state_db, unique=unique, topics=topics,
        tmp_path=tmp_path)
    config = load_config(path)

    filtered = replay(config, "held", ReplayOptions(where="error=ValueError"))
    assert (filtered.moved, filtered.skipped) == (1, 2)
    assert len(read_topic(kafka_bootstrap, dlq)) == 3, "the blocked kept letter was copied"
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("held"))) == 3

    rest = replay(config, "held")
    assert (rest.moved, rest.skipped) == (1, 2)     # f moved; x kept; a moved before
    assert sorted(body_ids(read_topic(kafka_bootstrap, target))) == ["a", "f"]
    assert body_ids(kafka_remaining(kafka_bootstrap, dlq, replay_group("held"))) == ["x"]


class _Killed(BaseException):
    """A stop no ``except Exception`` catches, as close as a test gets to kill -9."""


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_replay_stopped_between_a_kept_letters_tail_copy_and_its_commit_loses_nothing(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The copy is confirmed before the commit past the letter: stopped in between, the letter
    # is in the DLQ twice (both kept from then on, never more copies than that), never lost.
    dlq, target, path = _kafka_dlq(
        "stop", [("x", 4, "ValueError"), ("a", 1, "ValueError")], bootstrap=kafka_bootstrap,
        amqp=amqp_url, state=state_db, unique=unique, topics=topics, tmp_path=tmp_path)
    config = load_config(path)
    to_tail = KafkaLetterbox._to_tail

    def stopped(self: KafkaLetterbox, items: list[Any]) -> None:
        to_tail(self, items)
        raise _Killed

    monkeypatch.setattr(KafkaLetterbox, "_to_tail", stopped)
    with pytest.raises(_Killed):
        replay(config, "stop")
    monkeypatch.setattr(KafkaLetterbox, "_to_tail", to_tail)
    assert body_ids(read_topic(kafka_bootstrap, target)) == ["a"]
    assert sorted(body_ids(kafka_remaining(kafka_bootstrap, dlq, replay_group("stop")))) == [
        "a", "x", "x"]

    # a is recognised as moved (then committed past); x is kept, both copies, no more
    for skipped in (3, 2):
        again = replay(config, "stop")
        assert (again.moved, again.skipped) == (0, skipped)
        left = body_ids(kafka_remaining(kafka_bootstrap, dlq, replay_group("stop")))
        assert left == ["x", "x"], left
    assert body_ids(read_topic(kafka_bootstrap, target)) == ["a"]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_replay_positions_outlive_the_replay_group_s_offsets(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """A group that never has members loses its offsets after offsets.retention.minutes
    (deleting the group does it now): the depth then counted every letter already replayed,
    and the next replay copied each kept letter to the tail once more."""
    dlq, _, config = _kafka_dlq(
        "aged", [("x", 4, "ValueError"), ("a", 1, "ValueError"), ("b", 1, "ValueError")],
        bootstrap=kafka_bootstrap, amqp=amqp_url, state=state_db, unique=unique, topics=topics,
        tmp_path=tmp_path)
    first = cli_json(config, "replay", "aged")
    assert (first["moved"], first["skipped"]) == (2, 1)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_consumer_groups([replay_group("aged")]).values():
        future.result()

    assert cli_json(config, "dlq", "aged")["depth"] == 1
    again = cli_json(config, "replay", "aged")
    assert (again["moved"], again["parked"], again["skipped"]) == (0, 0, 1)
    assert len(read_topic(kafka_bootstrap, dlq)) == 3 + 2, "one copy of x per replay, no more"
    assert cli_json(config, "dlq", "aged")["depth"] == 1


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_replay_whose_lock_session_is_lost_stops_and_sends_nothing_twice(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's session sat idle while the replay ran: once it was gone (a failover,
    idle_session_timeout), a second replay started and both sent every letter."""
    monkeypatch.setattr(replay_module, "HOLD_CHECK_SECONDS", 0.2)
    dlq, target = unique("locked.dlq"), unique("orders")
    topics.create(dlq, target)
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(40)],
                 extra_headers={headers.ORIGIN: target, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     locked={"connection": "bus", "topic": dlq})
    outcome: list[BaseException | None] = []

    def first() -> None:
        try:
            replay(config, "locked", ReplayOptions(rate=10))  # 4 s for 40 letters
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(1.0)
    with psycopg.connect(state_db, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    assert killed == [(True,)], killed
    thread.join(30)
    (error,) = outcome
    assert isinstance(error, Conflict), repr(error)
    assert "session holding this replay's lock was lost" in str(error)
    second = replay(config, "locked")
    copies = body_ids(read_topic(kafka_bootstrap, target))
    assert sorted(copies, key=int) == [str(n) for n in range(40)], (
        f"{len(copies)} copies of 40 letters; the second replay moved {second.moved}")
    with psycopg.connect(state_db) as conn:
        statuses = conn.execute("SELECT status FROM trueup.replays ORDER BY replay_id").fetchall()
    assert statuses == [("failed",), ("succeeded",)]


# ---------------------------------------------------------------------------------------------
# A letter whose origin is gone, and letters without an origin or a key


def _produce_letter(bootstrap: str, topic: str, message_id: str, *, origin: str | None,
                    key: str | None = None) -> None:
    """One Kafka letter with trueup's headers (``origin`` None: no origin header; ``key``
    None: a null key)."""
    producer = kafka.create_producer({"bootstrap.servers": bootstrap}, what="test")
    deliveries = kafka.Deliveries()
    text = {headers.MESSAGE_ID: message_id, headers.ATTEMPTS: "1",
            headers.ERROR_CLASS: "ValueError"}
    if origin is not None:
        text[headers.ORIGIN] = origin
    kafka.produce(producer, deliveries, topic, value=json.dumps({"id": message_id}).encode(),
                  key=key, headers=headers.to_kafka(text))
    kafka.confirm(producer, deliveries, what="test")


def _counts(state: str) -> list[tuple[bool, str, int, int, int]]:
    """``(dry_run, status, moved, parked, skipped)`` of each replay, oldest first."""
    with psycopg.connect(state) as conn:
        rows = conn.execute("SELECT dry_run, status, moved, parked, skipped FROM trueup.replays "
                            "ORDER BY replay_id").fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_dry_run_stops_at_a_letter_whose_origin_topic_is_gone_as_the_replay_does(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """The dry run said the letter would move and exited 0; the replay then stopped at it
    (exit 2). The dry run now asks for each origin as the replay's publish does, and makes
    nothing."""
    dlq, origin, gone = unique("drygone.dlq"), unique("drygone.orders"), unique("gone")
    topics.create(dlq, origin)
    topics.track(gone)  # deleted afterwards, should it be made after all
    for message_id, to in (("m-ok1", origin), ("m-gone", gone), ("m-ok2", origin)):
        _produce_letter(kafka_bootstrap, dlq, message_id, origin=to)
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"drygone": {"connection": "bus", "topic": dlq}})

    said = []
    for dry_run in (["--dry-run"], ["--dry-run", "--json"]):
        status, out, err = cli(config, "replay", "drygone", *dry_run)
        assert status == 2, f"the dry run exited {status}: {out}"
        said.append(err.strip().splitlines()[-1])
    assert said[0] == said[1] == (
        f"dead_letters.drygone: the letters' destination, Kafka topic {gone!r}, does not "
        f"exist: it is where letter m-gone came from, and every replay stops at that letter. "
        f"Create it, set replay_to, or leave such letters out with --where 'origin!={gone}'")
    assert kafka.topic_partitions(topics.admin, gone, what="test") is None
    assert read_topic(kafka_bootstrap, origin) == []
    assert len(kafka_remaining(kafka_bootstrap, dlq, replay_group("drygone"))) == 3

    status, _, err = cli(config, "replay", "drygone")  # the replay says the same
    assert status == 2 and err.strip().splitlines()[-1] == said[0], err
    # each run recorded m-ok1, the letter before the one it stopped at
    assert _counts(state_db) == [(True, "failed", 1, 0, 0)] * 2 + [(False, "failed", 1, 0, 0)]


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_dry_run_stops_at_a_letter_whose_origin_queue_is_gone_asking_each_once(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dlq, origin, gone = unique("drygone.dlq"), unique("drygone.orders"), unique("gone")
    queues.declare(dlq, origin)
    queues.track(gone)  # deleted afterwards, should it be made after all
    for n, to in enumerate((origin, origin, origin, gone, origin)):
        queues.publish(dlq, json.dumps({"id": n}).encode(), message_id=f"h{n}",
                       headers_={headers.ORIGIN: to, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     drygone={"connection": "amqp", "queue": dlq})
    asked: list[str | None] = []
    require = RabbitLetterbox.require

    def counted(self: RabbitLetterbox, destination: Destination) -> None:
        asked.append(destination.name)
        require(self, destination)

    monkeypatch.setattr(RabbitLetterbox, "require", counted)
    stopped = (f"dead_letters.drygone: the letters' destination, RabbitMQ queue {gone!r}, does "
               f"not exist: it is where letter h3 came from, and every replay stops at that "
               f"letter. Create it, set replay_to, or leave such letters out with --where "
               f"'origin!={gone}'")
    with pytest.raises(NotFound) as dry:
        replay(config, "drygone", ReplayOptions(dry_run=True))
    assert str(dry.value) == stopped
    assert asked == [origin, gone], "each origin asked for once, until the one that is gone"
    assert queues.depth(dlq) == 5 and queues.depth(origin) == 0
    assert rabbitmq.queue_depth(queues.connection, gone) is None, "the dry run made the queue"

    with pytest.raises(NotFound) as real:  # what the replay itself says
        replay(config, "drygone")
    assert str(real.value) == stopped


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_where_an_empty_origin_or_key_selects_the_letters_without_one(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """``origin=''`` selected none of the letters ``trueup dlq`` lists under unknown, and
    ``origin!=''`` selected them all, those included."""
    dlq, target = unique("empty.dlq"), unique("empty.orders")
    topics.create(dlq, target)
    for message_id, origin, key in (("a", "orders", "1"), ("b", None, "2"),
                                    ("c", "orders", None), ("d", None, None)):
        _produce_letter(kafka_bootstrap, dlq, message_id, origin=origin, key=key)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     empty={"connection": "bus", "topic": dlq, "replay_to": target})
    assert inspect(config, "empty").by_origin == {"orders": 2, "unknown": 2}

    def selected(where: str) -> list[str]:
        chosen: list[str] = []
        replay(config, "empty", ReplayOptions(dry_run=True, where=where),
               listing=lambda letter, plan: chosen.append(letter.message_id))
        return chosen

    assert selected("origin=''") == ["b", "d"]
    assert selected('origin!=""') == ["a", "c"]
    assert selected("key=''") == ["c", "d"]
    assert selected("key!='', origin=orders|''") == ["a", "b"]
    done = replay(config, "empty", ReplayOptions(where="origin='' and key!=''"))
    assert (done.moved, done.skipped) == (1, 3)
    assert body_ids(read_topic(kafka_bootstrap, target)) == ["b"]


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_letters_moved_before_the_letter_a_replay_stops_at_are_committed_and_counted(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """They were delivered and recorded but never committed, and the failed replay's record
    said skipped 0 though it recognised a duplicate: every later replay read them again (and
    stopped at the same letter)."""
    dlq, origin, gone = unique("ahead.dlq"), unique("ahead.orders"), unique("gone")
    topics.create(dlq, origin)
    for message_id, to in (("a", origin), ("a", origin), ("b", origin), ("g", gone),
                           ("c", origin)):
        _produce_letter(kafka_bootstrap, dlq, message_id, origin=to)
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     ahead={"connection": "bus", "topic": dlq})

    for _ in range(2):
        with pytest.raises(NotFound, match="it is where letter g came from"):
            replay(config, "ahead", ReplayOptions(batch_size=100))
        assert body_ids(read_topic(kafka_bootstrap, origin)) == ["a", "b"]
        assert body_ids(kafka_remaining(kafka_bootstrap, dlq, replay_group("ahead"))) == [
            "g", "c"], "the letters moved before g are still in the DLQ"
        assert inspect(config, "ahead").depth == 2
    assert _counts(state_db) == [(False, "failed", 2, 0, 1), (False, "failed", 0, 0, 0)]
    assert [(m, o) for _, m, o in _events(state_db)] == [("a", "moved"), ("b", "moved")]


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_letters_moved_before_the_letter_a_replay_stops_at_are_acked_and_counted(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq, origin, gone = unique("ahead.dlq"), unique("ahead.orders"), unique("gone")
    queues.declare(dlq, origin)
    for n, (message_id, to) in enumerate((("a", origin), ("a", origin), ("b", origin),
                                          ("g", gone), ("c", origin))):
        queues.publish(dlq, json.dumps({"id": n}).encode(), message_id=message_id,
                       headers_={headers.ORIGIN: to, headers.ATTEMPTS: "1"})
    config = _loaded(tmp_path, state_db, kafka_bootstrap, amqp_url,
                     ahead={"connection": "amqp", "queue": dlq})

    for _ in range(2):
        with pytest.raises(NotFound, match="it is where letter g came from"):
            replay(config, "ahead", ReplayOptions(batch_size=100))
        assert queues.depth(dlq) == 2, "the letters moved before g are still in the DLQ"
    assert [json.loads(body)["id"] for _, body in queues.drain(origin)] == [0, 2]
    assert [p.message_id for p, _ in queues.drain(dlq)] == ["g", "c"]
    assert _counts(state_db) == [(False, "failed", 2, 0, 1), (False, "failed", 0, 0, 0)]
    assert [(m, o) for _, m, o in _events(state_db)] == [("a", "moved"), ("b", "moved")]
