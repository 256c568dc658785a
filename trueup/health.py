"""Liveness and readiness of a long-running trueup process (a worker, the replayer).

``/healthz`` (liveness) answers 200 while the process serves HTTP at all: an orchestrator
restarts the process when it stops answering. ``/readyz`` (readiness) answers 200 only when
every registered dependency check passes (broker and database reachable) and the process made
progress recently: a loop that has not turned for :data:`STUCK_AFTER_SECONDS` is stuck, even if
its connections look fine. Both answer a small JSON document saying which check failed and why.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trueup.db import first_line, scrubbed

if TYPE_CHECKING:
    from trueup.metrics import MetricsServer

#: Readiness fails when the process has made no progress for this long (seconds).
STUCK_AFTER_SECONDS = 120.0
#: Dependency checks time out after this long (seconds), so a probe never hangs.
CHECK_TIMEOUT_SECONDS = 3.0

#: A check returns None when fine, or one line saying what is wrong.
Check = Callable[[], str | None]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True, kw_only=True)
class Verdict:
    ok: bool
    checks: dict[str, str]  # name -> "ok" or what is wrong

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "failing", "checks": self.checks}


class Health:
    """The process's readiness: named dependency checks and the time of its last progress."""

    def __init__(self, stuck_after_seconds: float = STUCK_AFTER_SECONDS) -> None:
        self.stuck_after_seconds = stuck_after_seconds
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()

    def add_check(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check

    def remove_check(self, name: str) -> None:
        with self._lock:
            self._checks.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._checks.clear()
            self._last_progress = time.monotonic()

    def progressed(self) -> None:
        """Record that the process's main loop turned (polled, handled, replayed)."""
        from trueup.metrics import LAST_PROGRESS

        self._last_progress = time.monotonic()
        LAST_PROGRESS.set_to_current_time()

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self._last_progress

    def readiness(self) -> Verdict:
        with self._lock:
            checks = dict(self._checks)
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that raises is a failing check, not a 500
                problem = first_line(exc)
            results[name] = problem or "ok"
        idle = self.seconds_since_progress()
        results["progress"] = ("ok" if idle <= self.stuck_after_seconds else
                               f"no progress for {idle:.0f} s (limit "
                               f"{self.stuck_after_seconds:.0f} s)")
        return Verdict(ok=all(v == "ok" for v in results.values()), checks=results)


#: The process's one Health (a process runs one worker loop; tests call ``clear()``).
HEALTH = Health()


def postgres_check(dsn: str) -> Check:
    """The database answers ``SELECT 1`` within the check timeout."""

    def check() -> str | None:
        import psycopg

        try:
            with psycopg.connect(dsn, connect_timeout=max(1, int(CHECK_TIMEOUT_SECONDS)),
                                 application_name="trueup readyz") as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"database unreachable: {scrubbed(first_line(exc), dsn)}"
        return None

    return check


def kafka_check(properties: Mapping[str, Any]) -> Check:
    """The Kafka cluster answers a metadata request within the check timeout."""

    def check() -> str | None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**properties,
                             "socket.connection.setup.timeout.ms": int(
                                 CHECK_TIMEOUT_SECONDS * 1000),
                             # the answer says what failed: librdkafka's own lines (dozens a
                             # probe while the broker is down, in plain text among JSON logs)
                             # say it again
                             "log_level": 0})
        try:
            admin.list_topics(timeout=CHECK_TIMEOUT_SECONDS)
        except KafkaException as exc:
            return f"kafka unreachable: {first_line(exc)}"
        return None

    return check


def rabbitmq_check(url: str) -> Check:
    """RabbitMQ accepts a connection within the check timeout."""

    def check() -> str | None:
        import pika

        try:
            params = pika.URLParameters(url)  # a query option it cannot read fails here
            # every stage within the timeout: the AMQP handshake's own (stack_timeout) is 15 s
            params.socket_timeout = CHECK_TIMEOUT_SECONDS
            params.stack_timeout = CHECK_TIMEOUT_SECONDS
            params.blocked_connection_timeout = CHECK_TIMEOUT_SECONDS
            params.connection_attempts = 1
            pika.BlockingConnection(params).close()
        except Exception as exc:  # pika raises outside AMQPError too (a handshake timeout)
            return f"rabbitmq unreachable: {first_line(exc) or type(exc).__name__}"
        return None

    return check


def health_app(metrics_app: WsgiApp, health: Health | None = None) -> WsgiApp:
    """A WSGI app: ``/healthz`` and ``/readyz`` here, everything else to ``metrics_app``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _reply(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            verdict = (health or HEALTH).readiness()
            return _reply(start_response, 200 if verdict.ok else 503, verdict.to_json())
        return metrics_app(environ, start_response)

    return app


def _reply(start_response: Callable[..., Any], code: int,
           document: dict[str, Any]) -> list[bytes]:
    body = json.dumps(document).encode()
    reason = {200: "OK", 503: "Service Unavailable"}[code]
    start_response(f"{code} {reason}", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(body)))])
    return [body]


def serve_worker(port: int, *, database: str | None = None,
                 kafka: Mapping[str, Any] | None = None,
                 rabbitmq: str | None = None) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz for a worker process (what ``--metrics-port N``
    of a worker's command line should call), readiness checking the given dependencies.

    The worker runtimes call it themselves when given ``metrics_port``."""
    from trueup.errors import UsageError
    from trueup.metrics import DEFAULT_HOST, serve_metrics

    if database:
        HEALTH.add_check("database", postgres_check(database))
    if kafka is not None:
        HEALTH.add_check("kafka", kafka_check(kafka))
    if rabbitmq:
        HEALTH.add_check("rabbitmq", rabbitmq_check(rabbitmq))
    try:
        return serve_metrics(port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {DEFAULT_HOST}:{port}: "
                         f"{exc.strerror or exc}") from exc
