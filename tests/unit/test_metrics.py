"""The metrics registry, its recording helpers, and the /metrics, /healthz, /readyz server."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.conftest import unused_port
from trueup import metrics
from trueup.health import (
    CHECK_TIMEOUT_SECONDS,
    Health,
    health_app,
    kafka_check,
    rabbitmq_check,
)


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    running = metrics.serve_metrics(0)
    yield running
    running.close()


def test_every_metric_is_named_trueup_with_its_unit() -> None:
    names = {m.name for m in metrics.REGISTRY.collect()}
    assert names, "the registry holds no metrics"
    assert all(n.startswith("trueup_") for n in names), names
    assert {"trueup_rows_scanned", "trueup_differences", "trueup_backfill_chunks",
            "trueup_backfill_rows", "trueup_chunk_duration_seconds",
            "trueup_leases_taken_over", "trueup_dlq_depth", "trueup_dlq_oldest_age_seconds",
            "trueup_replayed_messages", "trueup_worker_retries", "trueup_consumer_lag",
            "trueup_worker_reconnects"} <= names


def test_a_diff_summary_counts_rows_by_side_and_differences_by_class() -> None:
    summary = SimpleNamespace(reconciliation="unit_diff", source_rows=10, target_rows=9,
                              missing=1, orphan=0, stale=2, ahead=0, mismatch=3, in_flight=0,
                              unreadable=0, seconds=0.5, consistent=False)
    metrics.record_diff(summary)
    assert metrics.value("trueup_rows_scanned_total",
                         {"reconciliation": "unit_diff", "side": "source"}) == 10
    assert metrics.value("trueup_rows_scanned_total",
                         {"reconciliation": "unit_diff", "side": "target"}) == 9
    assert metrics.value("trueup_differences_total",
                         {"reconciliation": "unit_diff", "class": "mismatch"}) == 3
    # classes with nothing found are exported as 0, so alerts can rate() them from the start
    assert metrics.REGISTRY.get_sample_value(
        "trueup_differences_total", {"reconciliation": "unit_diff", "class": "orphan"}) == 0
    assert metrics.value("trueup_diff_runs_total",
                         {"reconciliation": "unit_diff", "outcome": "differences"}) == 1


def test_a_chunk_is_counted_by_outcome_with_its_rows_and_duration() -> None:
    before = metrics.value("trueup_chunk_duration_seconds_count")
    done = metrics.value("trueup_backfill_chunks_total", {"outcome": "done"})
    repaired = metrics.value("trueup_backfill_rows_total", {"outcome": "repaired"})
    metrics.record_chunk("done", 0.2, repaired=5, skipped=1)
    assert metrics.value("trueup_backfill_chunks_total", {"outcome": "done"}) == done + 1
    assert metrics.value("trueup_backfill_rows_total", {"outcome": "repaired"}) == repaired + 5
    assert metrics.value("trueup_chunk_duration_seconds_count") == before + 1


def test_attempt_labels_stay_few() -> None:
    assert [metrics.attempt_label(a) for a in (1, 9, 10, 250)] == ["1", "9", "10+", "10+"]


def test_reconnect_reasons_stay_few() -> None:
    """The reason label of trueup_worker_reconnects_total is a class name of a fixed set."""
    import pika.exceptions

    from trueup.workers.rabbitmq import CopyRefused, reconnect_reason

    errors = [CopyRefused("nack"), pika.exceptions.StreamLostError("gone"),
              pika.exceptions.ConnectionClosedByBroker(320, "shutdown"),
              ConnectionResetError("reset"), ValueError("not a reconnect error")]
    assert [reconnect_reason(e) for e in errors] == [
        "CopyRefused", "StreamLostError", "ConnectionClosedByBroker", "ConnectionError",
        "other"]


def test_the_server_serves_metrics_in_prometheus_text(server: metrics.MetricsServer) -> None:
    metrics.LEASES_TAKEN_OVER.inc(0)
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE trueup_leases_taken_over_total counter" in body


def test_liveness_answers_ok(server: metrics.MetricsServer) -> None:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok"}


def test_readiness_fails_naming_the_failing_check() -> None:
    health = Health()
    health.add_check("database", lambda: None)
    health.add_check("broker", lambda: "kafka unreachable: refused")
    verdict = health.readiness()
    assert not verdict.ok
    assert verdict.checks == {"database": "ok", "broker": "kafka unreachable: refused",
                              "progress": "ok"}


def test_readiness_fails_when_no_progress_for_too_long() -> None:
    health = Health(stuck_after_seconds=0.0)
    health.add_check("database", lambda: None)
    verdict = health.readiness()
    assert not verdict.ok and verdict.checks["progress"].startswith("no progress for")
    health.stuck_after_seconds = 60.0
    health.progressed()
    assert health.readiness().ok


def test_a_check_that_raises_fails_readiness_instead_of_erroring() -> None:
    health = Health()

    def broken() -> str | None:
        raise RuntimeError("boom")

    health.add_check("database", broken)
    assert health.readiness().checks["database"] == "boom"


def test_readyz_answers_503_with_the_checks_when_not_ready() -> None:
    health = Health()
    health.add_check("broker", lambda: "down")
    app = health_app(lambda env, start: [b"metrics"], health)
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": "/readyz"}, lambda status, headers: seen.append(status)))
    assert seen == ["503 Service Unavailable"]
    assert json.loads(body)["checks"]["broker"] == "down"
    assert b"".join(app({"PATH_INFO": "/metrics"}, lambda s, h: None)) == b"metrics"


def test_readyz_over_http_is_503_when_a_check_fails(server: metrics.MetricsServer) -> None:
    from trueup.health import HEALTH

    HEALTH.add_check("unit_broker", lambda: "down")
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{server.url}/readyz", timeout=5)
        assert caught.value.code == 503
    finally:
        HEALTH.clear()


def test_two_groups_consuming_one_topic_in_one_process_each_report_their_own_lag() -> None:
    """Labelled by topic and partition only, the second group's lag overwrote the first's,
    and a group losing the partition removed the other's."""
    from trueup.retry import RetryPolicy
    from trueup.workers.kafka import KafkaWorker

    def worker(group: str) -> KafkaWorker:
        made = KafkaWorker(properties={"bootstrap.servers": "127.0.0.1:9"}, topic="unit.lag",
                           group=group, handler=lambda message: None,
                           policy=RetryPolicy(max_attempts=2), dead_letter_topic="unit.lag.dlq")
        made._assigned.add(("unit.lag", 0))
        return made

    def stats(lag: int) -> str:
        return json.dumps({"topics": {"unit.lag": {"partitions": {
            "0": {"consumer_lag": lag}, "-1": {"consumer_lag": -1}}}}})

    def reported(group: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(
            "trueup_consumer_lag", {"group": group, "topic": "unit.lag", "partition": "0"})

    billing, audit = worker("unit-billing"), worker("unit-audit")
    billing._on_stats(stats(7))
    audit._on_stats(stats(40_000))
    assert (reported("unit-billing"), reported("unit-audit")) == (7, 40_000)
    audit._forget_lag([("unit.lag", 0)])
    assert (reported("unit-billing"), reported("unit-audit")) == (7, None)
    billing._forget_lag([("unit.lag", 0)])


def test_a_rabbitmq_that_accepts_but_never_answers_fails_its_check_within_the_timeout(
) -> None:
    """pika's AMQP handshake has a timeout of its own (15 s), and raised outside AMQPError:
    the check took 15 s and lost its "rabbitmq unreachable" prefix."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the connection; nothing ever speaks AMQP
        port = silent.getsockname()[1]
        began = time.monotonic()
        problem = rabbitmq_check(f"amqp://guest:guest@127.0.0.1:{port}/%2F")()
        took = time.monotonic() - began
    assert problem is not None and problem.startswith("rabbitmq unreachable: "), problem
    assert took < CHECK_TIMEOUT_SECONDS + 7, f"the check took {took:.1f}s"  # not 15 s


def test_a_rabbitmq_url_pika_cannot_read_fails_its_check_saying_why() -> None:
    """The URL was read outside the check's guard: the check raised instead of answering."""
    problem = rabbitmq_check("amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=soon")()
    assert problem is not None and problem.startswith("rabbitmq unreachable: "), problem
    assert "heartbeat" in problem


def test_a_kafka_check_against_a_broker_that_is_down_says_so_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    """librdkafka printed its own %3|...|FAIL| lines on stderr (dozens a probe, plain text
    among the JSON logs) besides the check's answer."""
    port = unused_port()
    problem = kafka_check({"bootstrap.servers": f"127.0.0.1:{port}"})()
    assert problem is not None and problem.startswith("kafka unreachable: "), problem
    err = capfd.readouterr().err
    assert "|FAIL|" not in err, err[:300]
