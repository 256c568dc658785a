"""Prometheus metrics: every figure trueup exports, in one registry, and the server for it.

All names start with ``trueup_`` and carry their unit (``_seconds``, ``_total`` for counters).
The engine records into :data:`REGISTRY` as it works; a long-running process (a worker, the
replayer, a backfill worker) serves it with :func:`serve_metrics`, which also answers the
``/healthz`` and ``/readyz`` probes of :mod:`trueup.health`. Short CLI runs record too, but
nobody scrapes them: batch work run by Dagster reports the same figures as run metadata.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import make_wsgi_app

from trueup import threads

#: Where the metrics server listens unless told otherwise: never a public interface by default.
DEFAULT_HOST = "127.0.0.1"

REGISTRY = CollectorRegistry(auto_describe=True)

# --- diff -----------------------------------------------------------------------------------
ROWS_SCANNED = Counter(
    "trueup_rows_scanned_total", "Rows a diff read from each side.",
    ["reconciliation", "side"], registry=REGISTRY)
DIFFERENCES = Counter(
    "trueup_differences_total", "Differences a diff found, by class.",
    ["reconciliation", "class"], registry=REGISTRY)
DIFF_RUNS = Counter(
    "trueup_diff_runs_total", "Diff runs, by outcome (consistent, differences, failed).",
    ["reconciliation", "outcome"], registry=REGISTRY)
DIFF_DURATION = Histogram(
    "trueup_diff_duration_seconds", "Wall time of a diff run.", ["reconciliation"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600), registry=REGISTRY)

# --- backfill -------------------------------------------------------------------------------
BACKFILL_CHUNKS = Counter(
    "trueup_backfill_chunks_total",
    "Backfill chunks finished by this process, by outcome (done, retry, failed, lease_lost).",
    ["outcome"], registry=REGISTRY)
BACKFILL_ROWS = Counter(
    "trueup_backfill_rows_total", "Rows of finished chunks, by outcome (repaired, skipped).",
    ["outcome"], registry=REGISTRY)
CHUNK_DURATION = Histogram(
    "trueup_chunk_duration_seconds", "Wall time of one backfill chunk attempt.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
LEASES_TAKEN_OVER = Counter(
    "trueup_leases_taken_over_total",
    "Chunks claimed after their previous worker's lease expired (a worker died or stalled), "
    "or reopened so by a resume.",
    registry=REGISTRY)

# --- dead letters, replay, workers ----------------------------------------------------------
DLQ_DEPTH = Gauge(
    "trueup_dlq_depth", "Dead letters not yet replayed.", ["name"], registry=REGISTRY)
DLQ_OLDEST_AGE = Gauge(
    "trueup_dlq_oldest_age_seconds", "Age of the oldest dead letter not yet replayed.",
    ["name"], registry=REGISTRY)
REPLAYED = Counter(
    "trueup_replayed_messages_total",
    "Dead letters handled by replay, by outcome (moved, parked, skipped).",
    ["name", "outcome"], registry=REGISTRY)
WORKER_MESSAGES = Counter(
    "trueup_worker_messages_total",
    "Messages a worker settled, by outcome (ack, retry, dead_letter).",
    ["worker", "outcome"], registry=REGISTRY)
WORKER_RETRIES = Counter(
    "trueup_worker_retries_total",
    "Messages scheduled for another try, by the attempt that failed.",
    ["worker", "attempt"], registry=REGISTRY)
WORKER_RECONNECTS = Counter(
    "trueup_worker_reconnects_total",
    "Times a worker started its session again, by the error that ended it: a RabbitMQ "
    "connection (a class name of trueup.workers.rabbitmq.RECONNECT_REASONS, else other), "
    "a Kafka copy not confirmed (CopyUnconfirmed).",
    ["worker", "reason"], registry=REGISTRY)
WORKER_DATABASE_WAITS = Counter(
    "trueup_worker_database_waits_total",
    "Waits of a worker for the database its handler depends on, each begun by a failed "
    "message it held, neither retried nor dead-lettered, until the database answered.",
    ["worker"], registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "trueup_consumer_lag",
    "Messages a consumer group is behind the end of a partition (Kafka workers).",
    ["group", "topic", "partition"], registry=REGISTRY)
LAST_PROGRESS = Gauge(
    "trueup_last_progress_timestamp_seconds",
    "Unix time of the last progress this process made (readiness judges staleness by it).",
    registry=REGISTRY)


def attempt_label(attempt: int) -> str:
    """Attempts 1..9 as themselves, the long tail as ``10+``: label values stay few."""
    return str(attempt) if attempt < 10 else "10+"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: no log noise
        pass


class _Server(ThreadingHTTPServer, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """A running metrics and health server; ``close()`` stops it (tests, clean shutdown)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{DEFAULT_HOST}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread.

    ``port=0`` picks a free port (see :attr:`MetricsServer.port`). Built like prometheus
    client's ``start_http_server`` (its WSGI app on a threading server) with the health routes
    of :mod:`trueup.health` in front.
    """
    from trueup.health import health_app

    app = health_app(make_wsgi_app(REGISTRY))
    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    thread = threads.thread(server.serve_forever, name="trueup-metrics")
    thread.start()
    return MetricsServer(server, thread)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (0 when never recorded): for tests and summaries."""
    found = REGISTRY.get_sample_value(name, labels or {})
    return float(found) if found is not None else 0.0


def record_diff(summary: Any) -> None:
    """Count a finished diff run (a :class:`trueup.runs.RunSummary`)."""
    name = summary.reconciliation
    ROWS_SCANNED.labels(name, "source").inc(summary.source_rows)
    ROWS_SCANNED.labels(name, "target").inc(summary.target_rows)
    for cls in ("missing", "orphan", "stale", "ahead", "mismatch", "in_flight", "unreadable"):
        DIFFERENCES.labels(name, cls).inc(getattr(summary, cls))
    DIFF_RUNS.labels(name, "consistent" if summary.consistent else "differences").inc()
    DIFF_DURATION.labels(name).observe(summary.seconds)


def record_chunk(outcome: str, seconds: float, *, repaired: int = 0, skipped: int = 0) -> None:
    """Count one backfill chunk attempt and its rows."""
    BACKFILL_CHUNKS.labels(outcome).inc()
    CHUNK_DURATION.observe(seconds)
    if repaired:
        BACKFILL_ROWS.labels("repaired").inc(repaired)
    if skipped:
        BACKFILL_ROWS.labels("skipped").inc(skipped)
