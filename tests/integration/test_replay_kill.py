"""kill -9 of the replayer at random points, then a restart: no dead letter is lost.

Every letter ends in the target (or still in the dead-letter queue), counted by message id;
duplicates appear only for letters confirmed but not yet recorded and removed when the process
died (at least once): at most one batch per kill.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pika
import psycopg
import pytest

from tests.integration.test_workers_support import (
    Queues,
    Topics,
    kafka_remaining,
    read_topic,
    write_config,
)
from trueup import headers
from trueup.brokers import kafka, rabbitmq
from trueup.letterboxes.kafka import replay_group
from trueup.replay import BATCH_SIZE

LETTERS = 3000
KILLS = 3
RATE = 600           # letters per second: every run lasts long enough to be killed in
START_SECONDS = 60.0  # the most a replayer may take to start its replay
SEED_ENV = "TRUEUP_TEST_KILL_SEED"
REPO = Path(__file__).resolve().parents[2]



def _letter_headers(origin: str, n: int) -> dict[str, str]:
    return {headers.MESSAGE_ID: f"id-{n}", headers.ATTEMPTS: "1", headers.ORIGIN: origin,
            headers.ERROR_CLASS: "ValueError"}


def _replayer(config: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trueup.cli", "--config", config, "replay", name,
         "--rate", str(RATE), "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TRUEUP_LOG_LEVEL": "warning"})


def _seed() -> int:
    """The seed of the kill points: ``$TRUEUP_TEST_KILL_SEED`` to run a failure's again, else
    the clock. Printed, and in every assertion message of :func:`_check`."""
    seed = int(os.environ.get(SEED_ENV) or time.time())
    print(f"kill points seed {seed} (set {SEED_ENV}={seed} to use it again)")
    return seed


def _await_running(state: str, name: str, after: int, process: subprocess.Popen[str],
                   seed: int) -> int:
    """The id of the replay ``process`` started: its row of ``trueup.replays``, newer than
    ``after``, 'running'. Start-up (imports, connections) takes ~0.5 s idle and much longer on
    a busy machine; a kill before the row exists kills no replay at all."""
    deadline = time.monotonic() + START_SECONDS
    with psycopg.connect(state, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT max(replay_id) FROM trueup.replays WHERE name = %s "
                               "AND status = 'running' AND replay_id > %s",
                               (name, after)).fetchone()
            if row is not None and row[0] is not None:
                return int(row[0])
            if process.poll() is not None:
                _, err = process.communicate()
                raise AssertionError(f"the replayer ended before its replay started "
                                     f"(seed {seed}): {err}")
            assert time.monotonic() < deadline, (
                f"no replay running {START_SECONDS:.0f}s after the replayer started "
                f"(seed {seed})")
            time.sleep(0.05)


def _kill_and_restart(config: str, name: str, state: str, seed: int) -> None:
    """Kill the replayer KILLS times at random points of its replay, then let one run to the
    end. Each kill waits for its replay's row to be 'running', then a random 0-1 s: a full run
    lasts ~5 s at RATE, so every kill lands mid-replay (not in start-up, however slow), and the
    last run still has letters to move."""
    rng = random.Random(seed)
    last = 0
    for _ in range(KILLS):
        process = _replayer(config, name)
        last = _await_running(state, name, last, process, seed)
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    process = _replayer(config, name)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 0, f"seed {seed}: {err}"


def _check(found: Counter[str], remaining: Counter[str], state: str, seed: int) -> None:
    expected = {f"id-{n}" for n in range(LETTERS)}
    lost = expected - set(found) - set(remaining)
    assert not lost, f"{len(lost)} dead letters lost, e.g. {sorted(lost)[:5]} (seed {seed})"
    assert not remaining, (
        f"{len(remaining)} letters still in the queue after the last run (seed {seed})")
    duplicates = sum(count - 1 for count in found.values())
    assert duplicates <= KILLS * BATCH_SIZE, (
        f"{duplicates} duplicates for {KILLS} kills (seed {seed})")
    with psycopg.connect(state) as conn:
        statuses = [r[0] for r in conn.execute(
            "SELECT status FROM trueup.replays ORDER BY replay_id").fetchall()]
    assert statuses[-1] == "succeeded", f"{statuses} (seed {seed})"
    assert all(s in ("failed", "succeeded") for s in statuses), f"{statuses} (seed {seed})"
    # A kill mid-run leaves its replay 'running'; the next run marks it failed.
    assert "failed" in statuses, f"no kill landed during a replay: {statuses} (seed {seed})"
    print(f"replays {statuses}, {duplicates} duplicates, seed {seed}")


@pytest.mark.kafka
@pytest.mark.postgres
def test_kafka_replayer_killed_at_random_points_loses_no_dead_letter(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    dlq, target = unique("kill.dlq"), unique("kill.target")
    topics.create(dlq, target)
    producer = kafka.create_producer({"bootstrap.servers": kafka_bootstrap}, what="test")
    deliveries = kafka.Deliveries()
    for n in range(LETTERS):
        kafka.produce(producer, deliveries, dlq, value=json.dumps({"id": n}).encode(),
                      key=str(n), headers=headers.to_kafka(_letter_headers(target, n)))
    kafka.confirm(producer, deliveries, what="test")
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"kill": {"connection": "bus", "topic": dlq}})

    seed = _seed()
    _kill_and_restart(config, "kill", state_db, seed)

    found = Counter(headers.from_kafka(m.headers())[headers.MESSAGE_ID]
                    for m in read_topic(kafka_bootstrap, target))
    remaining = Counter(headers.from_kafka(m.headers())[headers.MESSAGE_ID]
                        for m in kafka_remaining(kafka_bootstrap, dlq, replay_group("kill")))
    _check(found, remaining, state_db, seed)


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_rabbitmq_replayer_killed_at_random_points_loses_no_dead_letter(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq, target = unique("kill.dlq"), unique("kill.target")
    queues.declare(dlq, target)
    channel = rabbitmq.confirmed_channel(queues.connection)
    for n in range(LETTERS):
        rabbitmq.publish(channel, exchange="", routing_key=dlq,
                         body=json.dumps({"id": n}).encode(),
                         properties=pika.BasicProperties(
                             message_id=f"id-{n}", delivery_mode=2,
                             headers=_letter_headers(target, n)), what="test")
    channel.close()
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"kill": {"connection": "amqp", "queue": dlq}})

    seed = _seed()
    _kill_and_restart(config, "kill", state_db, seed)

    found = Counter(p.message_id for p, _ in queues.drain(target))
    remaining = Counter(p.message_id for p, _ in queues.drain(dlq))
    _check(found, remaining, state_db, seed)
