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
    #: the handler failed while the database it depends on did not answer: neither retried
    #: nor dead-lettered, the message waits for the database (see :class:`DatabaseGate`)
    HOLD = "hold"


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
           at: dt.datetime | None = None, gate: DatabaseGate | None = None) -> Settlement:
    """Run ``handler`` on ``delivery`` and decide: ack, retry after a delay, or dead-letter;
    or hold, when it failed while ``gate``'s database does not answer (the attempt is not
    counted: an outage must not use up a message's attempts and send it to the dead letters).

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
        down = gate.down() if gate else None
        action = (Action.HOLD if down is not None else Action.RETRY if decision.retry
                  else Action.DEAD_LETTER)
        tracing.annotate(exc, attempt=delivery.attempt, outcome=action.value)
        log.info("worker.failed", source=delivery.source, message_id=delivery.message_id,
                 attempt=delivery.attempt, error=failed.error_class, action=action.value,
                 **({"database": down} if down is not None
                    else {"delay_seconds": round(decision.delay_seconds, 3)}))
        if action is Action.HOLD:  # the attempt not counted: the failure record unchanged
            return Settlement(action=action, failure=failure)
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


#: While a message waits for the database, the broker's session is serviced this often.
SERVICE_SECONDS = 0.2


class DatabaseGate:
    """The database a worker's handler depends on (its ``database`` DSN), asked after a
    handler failed: while it does not answer, the message is held (:attr:`Action.HOLD`), not
    retried or dead-lettered. Without a DSN nothing is held."""

    def __init__(self, worker: str, database: str | None) -> None:
        from trueup.health import postgres_check

        self.worker = worker
        self._check = postgres_check(database) if database else None

    def down(self) -> str | None:
        """None when the database answers (or none was given), else what is wrong."""
        return self._check() if self._check else None

    def wait(self, stop: threading.Event, service: Callable[[float], bool]) -> bool:
        """Wait, asking again after pauses of 0.2 s doubling to 5 s, until the database
        answers: True. False when ``stop`` was set first, or ``service`` (called with the
        seconds to spend: it keeps the broker's session alive meanwhile) says the message in
        hand is no longer this worker's."""
        metrics.WORKER_DATABASE_WAITS.labels(self.worker).inc()
        log.warning("worker.waiting_for_database", worker=self.worker)
        started = time.monotonic()
        pause = Reconnect.FIRST_SECONDS
        while True:
            until = time.monotonic() + pause
            while (left := until - time.monotonic()) > 0:
                if stop.is_set() or not service(min(left, SERVICE_SECONDS)):
                    return False
            pause = min(Reconnect.MAX_SECONDS, pause * 2)
            if stop.is_set():
                return False
            down = self.down()
            if down is None:
                log.info("worker.database_back", worker=self.worker,
                         waited_seconds=round(time.monotonic() - started, 1))
                return True
            log.debug("worker.database_down", worker=self.worker, database=down)


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
