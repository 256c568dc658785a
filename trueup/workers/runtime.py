"""What both worker runtimes share: the delivery a handler sees, and the one place that decides
what happens to a message after its handler ran (ack, retry or dead-letter)."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from types import FrameType
from typing import Any

from opentelemetry.trace import SpanKind

from trueup import metrics, tracing
from trueup.headers import Failure, now
from trueup.log import get_logger
from trueup.retry import RetryDecision, RetryPolicy

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One message as a handler sees it."""

    body: bytes | None
    key: bytes | None
    headers: Mapping[str, str]
    source: str          # the work topic or queue (not a retry topic or delay queue)
    attempt: int         # 1 for the first attempt; counts across retries and replays
    message_id: str


Handler = Callable[[Delivery], None]


class Action(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, kw_only=True)
class Settlement:
    """The decision for one delivery, and the failure record to send along with it."""

    action: Action
    failure: Failure
    decision: RetryDecision | None = None

    @property
    def delay_seconds(self) -> float:
        return self.decision.delay_seconds if self.decision else 0.0


def settle(handler: Handler, delivery: Delivery, policy: RetryPolicy, failure: Failure, *,
           at: dt.datetime | None = None) -> Settlement:
    """Run ``handler`` on ``delivery`` and decide: ack, retry after a delay, or dead-letter.

    Anything the handler raises is a failure (an ``asyncio.CancelledError`` from a handler's
    own event loop too: let through, it stopped the worker on every delivery of the message)
    but ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit``: those go through and
    leave the message unacknowledged, to be delivered again.
    """
    try:
        handler(delivery)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        decision = policy.decide(delivery.attempt, exc)
        failed = failure.failed(exc, attempt=delivery.attempt, at=at or now())
        failed = replace(failed, message_id=delivery.message_id)
        action = Action.RETRY if decision.retry else Action.DEAD_LETTER
        tracing.annotate(exc, attempt=delivery.attempt, outcome=action.value)
        log.info("worker.failed", source=delivery.source, message_id=delivery.message_id,
                 attempt=delivery.attempt, error=failed.error_class, action=action.value,
                 delay_seconds=round(decision.delay_seconds, 3))
        return Settlement(action=action, failure=failed, decision=decision)
    tracing.annotate(attempt=delivery.attempt, outcome=Action.ACK.value)
    return Settlement(action=Action.ACK, failure=failure)


@contextmanager
def forwarding(settlement: Settlement, destination: str) -> Iterator[None]:
    """A producer span around sending a message's retry or dead-letter copy. The copy's
    ``traceparent`` names this span, so the next attempt (or the replay of the dead letter)
    continues the message's trace as its child."""
    with tracing.span(f"worker.{settlement.action.value}", kind=SpanKind.PRODUCER,
                      destination=destination, attempt=settlement.failure.attempts):
        yield


@contextmanager
def serving(metrics_port: int | None, *, database: str | None = None,
            kafka: Mapping[str, Any] | None = None,
            rabbitmq: str | None = None) -> Iterator[None]:
    """While a worker runs, serve ``/metrics``, ``/healthz`` and ``/readyz`` on
    ``127.0.0.1:metrics_port`` (None: serve nothing; 0: any free port), readiness checking the
    broker and, when given, the database the handler writes to. Spans are exported when
    ``$TRUEUP_TRACES_EXPORTER`` asks (a worker's run is its process's entry point)."""
    tracing.configure_from_env()
    if metrics_port is None:
        yield
        return
    from trueup.health import serve_worker

    server = serve_worker(metrics_port, database=database, kafka=kafka, rabbitmq=rabbitmq)
    log.info("worker.serving_metrics", url=server.url)
    try:
        yield
    finally:
        server.close()


def record_settlement(worker: str, settlement: Settlement) -> None:
    """Count a settled message by outcome, and a retry by the attempt that failed."""
    metrics.WORKER_MESSAGES.labels(worker, settlement.action.value).inc()
    if settlement.action is Action.RETRY:
        metrics.WORKER_RETRIES.labels(worker, metrics.attempt_label(
            settlement.failure.attempts)).inc()


def install_stop_signals(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``stop``: the worker finishes the message in hand, commits
    or acks it, and returns. Only possible from the main thread."""
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("worker.stopping", signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


class Reconnect:
    """Growing pauses between reconnection attempts (0.2 s doubling to 5 s) of ``worker``."""

    FIRST_SECONDS = 0.2
    MAX_SECONDS = 5.0

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.pause = self.FIRST_SECONDS

    def after(self, reason: str, error: BaseException, stop: threading.Event,
              **where: Any) -> None:
        """A session ended by ``error``: counted in ``trueup_worker_reconnects_total`` by
        ``reason``, logged (with ``where``: broker, queue or topic...), then the pause."""
        metrics.WORKER_RECONNECTS.labels(self.worker, reason).inc()
        log.warning("worker.reconnecting", reason=reason, error=f"{type(error).__name__}: "
                    f"{error}", pause_seconds=self.pause, **where)
        self.wait(stop)

    def wait(self, stop: threading.Event) -> None:
        stop.wait(self.pause)
        self.pause = min(self.MAX_SECONDS, self.pause * 2)

    def reset(self) -> None:
        self.pause = self.FIRST_SECONDS


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)
