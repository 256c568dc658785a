"""Benchmark: ``trueup replay`` of 100,000 dead letters per broker, against a floor.

The floor is the plainest consume-and-republish loop with the same guarantees, written without
trueup: Kafka, a consumer assigned from the start, batches republished with an ``acks=all``
idempotent producer, flushed (every delivery confirmed), then offsets committed synchronously;
RabbitMQ, a prefetch window, each copy published with a publisher confirm, then the batch acked.
trueup does the same plus what the floor skips: reading its headers, deciding per letter,
recording every letter in ``trueup.replay_events`` and checking ids already replayed (Kafka:
the record of batch *k* is written while batch *k+1* is sent).

Each side gets its own, identical dead-letter topic or queue. Run on the local stack::

    .venv/bin/python benchmarks/replay.py [--letters 100000] [--broker kafka|rabbitmq|both]
                                          [--rounds 3]

Not a test: it prints a table and a verdict (target: trueup at least 70% of the floor's rate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pika
import psycopg
from confluent_kafka import TopicPartition
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trueup import headers
from trueup.brokers import kafka, rabbitmq
from trueup.config import Config, parse_config
from trueup.replay import ReplayOptions, replay
from trueup.state import migrate

PG_SERVER = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
KAFKA_BOOTSTRAP = os.environ.get("BENCH_KAFKA", "127.0.0.1:9092")
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
STATE_DB = "trueup_bench_replay"
BATCH = 1000          # the floor's batch, the same as trueup's default
TARGET_RATIO = 0.70
SETTLE_SECONDS = 2.0  # after seeding: the side that went first paid for the broker's catching up
ROUNDS = 3            # a 100,000-letter run takes 1-2 s: one run is at the mercy of noise
BODY_BYTES = 200      # a small JSON order event


def _body(n: int) -> bytes:
    return json.dumps({"id": n, "status": "paid", "note": "x" * (BODY_BYTES - 40)}).encode()


def _letter_headers(origin: str, n: int) -> dict[str, str]:
    return {headers.MESSAGE_ID: f"{origin}-{n}", headers.ATTEMPTS: "2", headers.ORIGIN: origin,
            headers.ERROR_CLASS: "TimeoutError", headers.ERROR_MESSAGE: "billing timed out",
            headers.LAST_FAILURE: "2026-01-02T03:04:05.000Z"}


def _state_dsn() -> str:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(STATE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(STATE_DB)))
    dsn = f"{PG_SERVER}/{STATE_DB}"
    with psycopg.connect(dsn) as conn:
        migrate(conn)
    return dsn


def _timed(run: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    moved = run()
    return time.perf_counter() - start, moved


def _both(floor: Callable[[], int], ours: Callable[[], int], *,
          floor_first: bool) -> list[tuple[str, float, int]]:
    """Both sides of one round, timed: ``(side, seconds, letters moved)``."""
    sides = [("floor", floor), ("trueup", ours)]
    return [(side, *_timed(run)) for side, run in (sides if floor_first else sides[::-1])]


# ---------------------------------------------------------------------------------------------
# Kafka


def _kafka_seed(topic: str, target: str, letters: int) -> None:
    producer = kafka.create_producer({"bootstrap.servers": KAFKA_BOOTSTRAP}, what="seed",
                                     **{"linger.ms": 20})
    deliveries = kafka.Deliveries()
    for n in range(letters):
        kafka.produce(producer, deliveries, topic, value=_body(n), key=str(n),
                      headers=headers.to_kafka(_letter_headers(target, n)))
    kafka.confirm(producer, deliveries, what="seed")


def _kafka_floor(dlq: str, target: str, letters: int) -> int:
    properties = {"bootstrap.servers": KAFKA_BOOTSTRAP}
    consumer = kafka.create_consumer(properties, group=f"floor-{dlq}", what="floor")
    producer = kafka.create_producer(properties, what="floor")
    consumer.assign([TopicPartition(dlq, 0, 0)])
    deliveries = kafka.Deliveries()
    moved = 0
    while moved < letters:
        batch = [m for m in consumer.consume(min(BATCH, letters - moved), 1.0)
                 if m.error() is None]
        for message in batch:
            kafka.produce(producer, deliveries, target, value=message.value(),
                          key=message.key(), headers=cast(Any, message.headers()))
        kafka.confirm(producer, deliveries, what="floor")
        if batch:
            last = batch[-1].offset()
            assert last is not None
            consumer.commit(offsets=[TopicPartition(dlq, 0, last + 1)], asynchronous=False)
            moved += len(batch)
    consumer.close()
    return moved


def _bench_kafka(letters: int, state: str, *,
                 floor_first: bool) -> list[tuple[str, float, int]]:
    admin = kafka.connect_admin({"bootstrap.servers": KAFKA_BOOTSTRAP}, what="bench")
    tag = uuid.uuid4().hex[:8]
    topics = {side: (f"bench.replay.{side}.{tag}.dlq", f"bench.replay.{side}.{tag}")
              for side in ("floor", "trueup")}
    names = [t for pair in topics.values() for t in pair]
    kafka.create_topics(admin, names, partitions=1, what="bench")
    try:
        for dlq, target in topics.values():
            _kafka_seed(dlq, target, letters)
        time.sleep(SETTLE_SECONDS)
        dlq, _ = topics["trueup"]
        config = _config(state, {"bench_kafka": {"connection": "bus", "topic": dlq}})
        return _both(lambda: _kafka_floor(*topics["floor"], letters),
                     lambda: replay(config, "bench_kafka", ReplayOptions()).moved,
                     floor_first=floor_first)
    finally:
        kafka.delete_topics(admin, names, what="bench")


# ---------------------------------------------------------------------------------------------
# RabbitMQ


def _rabbit_seed(connection: pika.BlockingConnection, queue: str, target: str,
                 letters: int) -> None:
    # Seeding without confirms (fast), then waiting until the queue holds every letter.
    channel = connection.channel()
    for n in range(letters):
        channel.basic_publish("", queue, _body(n), pika.BasicProperties(
            message_id=f"{target}-{n}", delivery_mode=2, headers=_letter_headers(target, n)))
    channel.close()
    deadline = time.monotonic() + 300
    while (rabbitmq.queue_depth(connection, queue) or 0) < letters:
        if time.monotonic() > deadline:
            raise SystemExit(f"seeding {queue}: not all {letters} letters arrived")
        time.sleep(0.2)


def _rabbit_floor(queue: str, target: str, letters: int) -> int:
    connection = rabbitmq.connect(AMQP_URL, what="floor")
    channel = rabbitmq.confirmed_channel(connection, prefetch=BATCH)
    moved, pending = 0, 0
    last_tag = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=2.0):
        if method is None:
            break
        rabbitmq.publish(channel, exchange="", routing_key=target, body=body,
                         properties=properties, what="floor")
        moved, pending, last_tag = moved + 1, pending + 1, method.delivery_tag
        if pending == BATCH or moved == letters:
            channel.basic_ack(last_tag, multiple=True)
            pending = 0
        if moved == letters:
            break
    if pending:
        channel.basic_ack(last_tag, multiple=True)
    channel.cancel()
    connection.close()
    return moved


def _bench_rabbitmq(letters: int, state: str, *,
                    floor_first: bool) -> list[tuple[str, float, int]]:
    connection = rabbitmq.connect(AMQP_URL, what="bench")
    tag = uuid.uuid4().hex[:8]
    queues = {side: (f"bench.replay.{side}.{tag}.dlq", f"bench.replay.{side}.{tag}")
              for side in ("floor", "trueup")}
    names = [q for pair in queues.values() for q in pair]
    channel = connection.channel()
    for name in names:
        channel.queue_declare(name, durable=True)
    channel.close()
    try:
        for dlq, target in queues.values():
            _rabbit_seed(connection, dlq, target, letters)
        time.sleep(SETTLE_SECONDS)
        dlq, _ = queues["trueup"]
        config = _config(state, {"bench_rabbitmq": {"connection": "amqp", "queue": dlq}})
        return _both(lambda: _rabbit_floor(*queues["floor"], letters),
                     lambda: replay(config, "bench_rabbitmq", ReplayOptions()).moved,
                     floor_first=floor_first)
    finally:
        # A fresh connection: the first one sat idle (no heartbeats) through both loops.
        rabbitmq.close_quietly(connection)
        connection = rabbitmq.connect(AMQP_URL, what="bench")
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
        connection.close()


def _config(state: str, dead_letters: dict[str, object]) -> Config:
    text = json.dumps({"state": state, "connections": {
        "bus": {"kafka": {"bootstrap.servers": KAFKA_BOOTSTRAP}},
        "amqp": {"rabbitmq": AMQP_URL}}, "dead_letters": dead_letters})
    return parse_config(text, "benchmarks/replay.py", os.environ)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--letters", type=int, default=100_000)
    parser.add_argument("--broker", choices=["kafka", "rabbitmq", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="rounds per broker; the table shows each side's median")
    args = parser.parse_args()
    os.environ.setdefault("TRUEUP_LOG_LEVEL", "warning")
    state = _state_dsn()
    benches = {"kafka": _bench_kafka, "rabbitmq": _bench_rabbitmq}
    results: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for broker, bench in benches.items():
        if args.broker not in (broker, "both"):
            continue
        runs: dict[str, list[tuple[float, int]]] = {"floor": [], "trueup": []}
        for round_ in range(args.rounds):
            # Sides alternate which goes first: neither always gets the warmer broker.
            for side, seconds, moved in bench(args.letters, state, floor_first=round_ % 2 == 0):
                runs[side].append((seconds, moved))
        results[broker] = runs

    print(f"\nreplay of {args.letters:,} dead letters ({BODY_BYTES}-byte bodies), "
          f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"median of {args.rounds} rounds")
    print(f"{'broker':<9} {'side':<7} {'moved':>9} {'seconds':>8} {'range':>11} "
          f"{'letters/s':>10} {'of floor':>9}")
    verdicts = []
    for broker, runs in results.items():
        rates = {side: statistics.median(moved / seconds for seconds, moved in side_runs)
                 for side, side_runs in runs.items()}
        for side, side_runs in runs.items():
            seconds = [s for s, _ in side_runs]
            moved = min(m for _, m in side_runs)
            print(f"{broker:<9} {side:<7} {moved:>9,} {statistics.median(seconds):>8.2f} "
                  f"{f'{min(seconds):.2f}-{max(seconds):.2f}':>11} {rates[side]:>10,.0f} "
                  f"{rates[side] / rates['floor']:>8.0%}")
        ratio = rates["trueup"] / rates["floor"]
        ok = ratio >= TARGET_RATIO and all(m == args.letters for _, m in runs["trueup"])
        verdicts.append(ok)
        print(f"{broker:<9} verdict: trueup at {ratio:.0%} of the floor "
              f"(target {TARGET_RATIO:.0%}): {'ok' if ok else 'BELOW TARGET'}")
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(STATE_DB)))
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
