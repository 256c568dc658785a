"""Known work, then a scrape of /metrics over HTTP: the figures match the work done."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import progress_events, unused_port
from tests.integration.test_backfill_support import drift, make_tables, write_config
from tests.integration.test_workers_support import (
    POLICY,
    FlakyHandler,
    Queues,
    Topics,
    cli,
    produce_json,
    rabbit_worker,
    running,
    wait_until,
)
from tests.integration.test_workers_support import write_config as write_broker_config
from trueup import headers, metrics
from trueup.backfill import BackfillOptions, WorkerOptions, resume_backfill, start_backfill
from trueup.backfill.planner import plan
from trueup.cli import main
from trueup.config import load_config
from trueup.health import HEALTH
from trueup.replay import ReplayOptions, replay
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus
from trueup.workers.kafka import KafkaWorker
from trueup.workers.runtime import Delivery, Reconnect

pytestmark = pytest.mark.postgres

ROWS = 1000
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    running = metrics.serve_metrics(0)  # a free port on 127.0.0.1
    yield running
    running.close()



@pytest.fixture
def fresh_health() -> Iterator[None]:
    """Readiness checks of this test only (the process keeps one set)."""
    HEALTH.clear()
    yield
    HEALTH.clear()


def fetch(url: str) -> tuple[int, Any]:
    """(status, JSON body) of a health route; error statuses are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def scrape(server: metrics.MetricsServer | str) -> dict[
        tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics (of a server, or at a base URL), keyed by (name, labels)."""
    base = server if isinstance(server, str) else server.url
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        found = _SAMPLE.match(line)
        assert found, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(tuple(p.split("=", 1)) for p in
                           re.findall(r'[a-z_]+="[^"]*"', found["labels"] or ""))
        samples[(found["name"], frozenset((k, v.strip('"')) for k, v in labels))] = float(
            found["value"])
    return samples


def get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_diff_with_known_differences_shows_its_rows_and_classes_on_metrics(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, server: metrics.MetricsServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    config = write_config(tmp_path, state_db, source, target)
    before = scrape(server)

    assert main(["--config", str(config.path), "diff", "orders", "--json"]) == 1
    out, err = capsys.readouterr()
    after = scrape(server)

    summary = json.loads(out)
    assert {e["phase"] for e in progress_events(err)} >= {"checksums"}, (
        f"progress log events on a non-terminal stderr, got {err!r}")

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("trueup_rows_scanned_total", reconciliation="orders", side="source") == ROWS
    assert delta("trueup_rows_scanned_total", reconciliation="orders",
                 side="target") == summary["target_rows"] == ROWS - 3 + 2
    for cls in ("missing", "stale", "ahead", "mismatch", "orphan"):
        assert delta("trueup_differences_total", reconciliation="orders",
                     **{"class": cls}) == len(made[cls]), f"{cls}: expected {len(made[cls])}"
    assert delta("trueup_differences_total", reconciliation="orders", **{"class": "in_flight"}) == 0
    assert delta("trueup_diff_runs_total", reconciliation="orders", outcome="differences") == 1
    assert delta("trueup_diff_duration_seconds_count", reconciliation="orders") == 1


def test_a_backfill_shows_chunks_rows_durations_and_a_taken_over_lease_on_metrics(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        server: metrics.MetricsServer) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    config = write_config(tmp_path, state_db, source, target)
    before = scrape(server)

    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.ALL, chunk_size=128, workers=2), WorkerOptions(workers=2))
    assert summary.status is BackfillStatus.SUCCEEDED, summary

    # A second backfill whose chunk 0 was held by a worker that died: its lease has expired.
    drift_again = drift(target)
    with open_state(state_db) as state:
        state.autocommit = True
        second = plan(config, "orders", BackfillOptions(scope=BackfillScope.ALL,
                                                        chunk_size=500), state)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE trueup.chunks SET status = 'running', lease_owner = 'dead:1:0:x', "
                     "attempts = 1, lease_expires_at = now() - interval '1 second' "
                     "WHERE backfill_id = %s AND chunk = 0", (second,))
    assert resume_backfill(config, second).status is BackfillStatus.SUCCEEDED
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    fixed = sum(len(made[c]) for c in ("missing", "stale", "mismatch", "orphan"))
    assert fixed == sum(len(drift_again[c]) for c in ("missing", "stale", "mismatch", "orphan"))
    # each backfill: its chunks of the source's keys, and one of the orphans after them
    assert delta("trueup_backfill_chunks_total", outcome="done") == (8 + 1) + (2 + 1)
    assert delta("trueup_backfill_rows_total", outcome="repaired") == 2 * fixed
    # the ahead row is skipped (the target is newer), once per backfill
    assert delta("trueup_backfill_rows_total", outcome="skipped") == 2
    assert delta("trueup_chunk_duration_seconds_count") == 12
    assert delta("trueup_chunk_duration_seconds_sum") > 0
    assert delta("trueup_leases_taken_over_total") == 1


@pytest.mark.kafka
def test_a_kafka_worker_serves_its_partition_lag_and_readiness_on_its_metrics_port(
        kafka_bootstrap: str, unique: Callable[[str], str], topics: Topics,
        fresh_health: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # One message per poll, each taking a while: the lag is refreshed (from the poll loop)
    # while the backlog is worked off.
    monkeypatch.setattr("trueup.workers.kafka.BATCH_MESSAGES", 1)
    topic = unique("orders")
    done: list[int] = []

    def handler(delivery: Delivery) -> None:
        assert delivery.body is not None
        time.sleep(0.3)
        done.append(int(json.loads(delivery.body)["id"]))

    port = unused_port()
    worker = KafkaWorker(properties={"bootstrap.servers": kafka_bootstrap}, topic=topic,
                         group=unique("group"), handler=handler, policy=POLICY,
                         dead_letter_topic=f"{topic}.dlq", metrics_port=port,
                         lag_interval_seconds=0.1)
    topics.track(topic, *worker.retry_topics, worker.dead_letter_topic)
    worker.ensure_topics(partitions=1)
    produce_json(kafka_bootstrap, topic, [{"id": n} for n in range(10)])
    base = f"http://127.0.0.1:{port}"
    seen: list[float] = []

    def lag() -> float | None:
        try:
            samples = scrape(base)
        except OSError:
            return None  # the worker's server is not up yet
        found = samples.get(("trueup_consumer_lag", frozenset(
            {("group", worker.group), ("topic", topic), ("partition", "0")})))
        if found is not None:
            seen.append(found)
        return found

    with running(worker.run):
        wait_until(lambda: (lag() or 0) > 0, "a positive lag while the backlog is worked off")
        assert fetch(f"{base}/healthz") == (200, {"status": "ok"})
        status, body = fetch(f"{base}/readyz")
        assert status == 200 and body["checks"] == {"kafka": "ok", "progress": "ok"}, body
        wait_until(lambda: len(done) == 10 and lag() == 0,
                   "lag 0 once every message is done and committed")
    assert sorted(done) == list(range(10))
    assert max(seen) <= 10 and len({v for v in seen if v > 0}) >= 2, (
        f"expected the lag to shrink step by step from at most 10, saw {seen}")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/healthz", timeout=2)  # the server stopped with the worker
    assert metrics.REGISTRY.get_sample_value(
        "trueup_consumer_lag", {"group": worker.group, "topic": topic,
                                "partition": "0"}) is None, (
        "a stopped worker should stop reporting the lag of partitions it no longer owns")


@pytest.mark.rabbitmq
def test_a_rabbitmq_worker_answers_readiness_for_its_broker_and_database_on_its_port(
        amqp_url: str, state_db: str, unique: Callable[[str], str], queues: Queues,
        fresh_health: None) -> None:
    queue = unique("payments")
    worker = rabbit_worker(amqp_url, queue, lambda delivery: None, queues)
    worker.metrics_port, worker.database = unused_port(), state_db
    base = f"http://127.0.0.1:{worker.metrics_port}"
    with running(worker.run):
        wait_until(lambda: _answers(f"{base}/healthz"), "the worker's health server")
        status, body = fetch(f"{base}/readyz")
        assert status == 200, body
        assert body["checks"] == {"database": "ok", "rabbitmq": "ok", "progress": "ok"}, body
        assert ("trueup_last_progress_timestamp_seconds", frozenset()) in scrape(base)


@pytest.mark.rabbitmq
def test_a_rabbitmq_worker_stuck_behind_a_refused_copy_fails_readiness_and_counts_reconnects(
        amqp_url: str, unique: Callable[[str], str], queues: Queues, fresh_health: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each delivery counted as progress before it was settled, and the message whose
    dead-letter copy the broker refuses comes first after every reconnect: a worker that never
    got past it (the messages behind it never acked) answered /readyz 200, and no metric moved.
    Once the queue takes the copy, the worker gets going and is ready again by itself."""
    monkeypatch.setattr(Reconnect, "MAX_SECONDS", 1.0)  # pauses well within the stuck limit
    monkeypatch.setattr(HEALTH, "stuck_after_seconds", 4.0)
    queue = unique("payments")
    queues.declare(f"{queue}.dlq", arguments={"x-max-length": 0,
                                              "x-overflow": "reject-publish"})
    handler = FlakyHandler({}, permanent={"1"})
    worker = rabbit_worker(amqp_url, queue, handler, queues)
    worker.metrics_port = unused_port()
    base = f"http://127.0.0.1:{worker.metrics_port}"
    for n in range(1, 6):
        queues.publish(queue, json.dumps({"id": n}).encode(), message_id=f"m{n}")
    refused = {"worker": worker.name, "reason": "CopyRefused"}
    before = metrics.value("trueup_worker_reconnects_total", refused)
    with running(worker.run):
        wait_until(lambda: fetch(f"{base}/readyz")[0] == 503 if _answers(f"{base}/healthz")
                   else False, "/readyz 503 while the worker is stuck", seconds=30)
        status, body = fetch(f"{base}/readyz")
        assert status == 503 and body["checks"]["progress"].startswith("no progress for"), body
        assert body["checks"]["rabbitmq"] == "ok", body
        assert handler.effects == [], "the messages behind the stuck one were handled"
        reconnects = get(scrape(base), "trueup_worker_reconnects_total", **refused)
        assert reconnects - before >= 2, f"expected reconnects counted, saw {reconnects}"
        channel = queues.connection.channel()
        channel.queue_delete(f"{queue}.dlq")  # the reconnect declares it again, taking copies
        channel.close()
        wait_until(lambda: sorted(handler.effects) == ["2", "3", "4", "5"],
                   "the messages behind the refused one handled")
        wait_until(lambda: fetch(f"{base}/readyz")[0] == 200, "/readyz 200 again", seconds=15)
    assert queues.depth(f"{queue}.dlq") == 1 and queues.depth(queue) == 0


def _answers(url: str) -> bool:
    try:
        return fetch(url)[0] == 200
    except OSError:
        return False


@pytest.mark.kafka
def test_a_replay_counts_its_letters_on_metrics_and_prints_progress(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path, server: metrics.MetricsServer) -> None:
    dlq, target = unique("orders.dlq"), unique("orders")
    topics.create(dlq, target)
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(3)],
                 extra_headers={headers.ERROR_CLASS: "ValueError", headers.ATTEMPTS: "1",
                                headers.ORIGIN: target})
    config = write_broker_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap,
                                 amqp=amqp_url, dead_letters={
                                     "orders_dlq": {"connection": "bus", "topic": dlq}})
    before = scrape(server)
    status, out, err = cli(config, "replay", "orders_dlq", "--json")
    after = scrape(server)
    assert status == 0, err
    assert json.loads(out)["moved"] == 3
    moved = {("name", "orders_dlq"), ("outcome", "moved")}
    key = ("trueup_replayed_messages_total", frozenset(moved))
    assert after.get(key, 0.0) - before.get(key, 0.0) == 3
    events = progress_events(err)
    assert events and events[-1] == {"level": "info", "event": "progress",
                                     "phase": "letters", "done": 3, "total": 3}, (
        f"expected progress log events on a non-terminal stderr, got {err!r}")


def test_a_long_backfill_counts_as_progress_for_readiness(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A CLI backfill served /readyz (TRUEUP_METRICS_PORT) but never reported progress: two
    minutes in, the process answered 503 'no progress' while it repaired chunk after chunk."""
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    drift(target)
    config = write_config(tmp_path, state_db, source, target)
    metrics.LAST_PROGRESS.set(0)
    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.ALL, chunk_size=256))
    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert metrics.LAST_PROGRESS._value.get() > 0  # set by HEALTH.progressed() only
    assert HEALTH.seconds_since_progress() < 60


@pytest.mark.kafka
def test_a_replay_counts_each_batch_on_metrics_as_it_goes_even_if_it_then_fails(
        kafka_bootstrap: str, amqp_url: str, state_db: str, unique: Callable[[str], str],
        topics: Topics, tmp_path: Path) -> None:
    """Counted once the replay finished, a long replay showed no pace and one that failed
    none of the letters it had moved."""
    dlq, target = unique("orders.dlq"), unique("orders")
    topics.create(dlq, target)
    produce_json(kafka_bootstrap, dlq, [{"id": n} for n in range(6)],
                 extra_headers={headers.ERROR_CLASS: "ValueError", headers.ATTEMPTS: "1",
                                headers.ORIGIN: target})
    config = load_config(write_broker_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"orders_dlq": {"connection": "bus", "topic": dlq}}))
    moved = metrics.REPLAYED.labels("orders_dlq", "moved")
    before = moved._value.get()
    metrics.LAST_PROGRESS.set(0)
    batches: list[int] = []

    def fails_at_the_fourth_batch(done: int, total: int) -> None:
        batches.append(done)
        if len(batches) == 4:  # by now the first batches are recorded and settled
            raise RuntimeError("the replay stops here")

    with pytest.raises(RuntimeError, match="stops here"):
        replay(config, "orders_dlq", ReplayOptions(batch_size=1),
               progress=fails_at_the_fourth_batch)
    assert moved._value.get() - before >= 1, "letters moved before the failure went uncounted"
    assert metrics.LAST_PROGRESS._value.get() > 0
