"""Rate limits for long work: backfill rows and replayed letters per second."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from trueup.health import HEALTH


def valid_rate(rate: float | None) -> bool:
    """Whether a :class:`Pacer` takes ``rate``: none, or a finite number above 0 (NaN would
    pace nothing, infinity fail on the first wait)."""
    return rate is None or (math.isfinite(rate) and rate > 0)


#: A wait for the rate is reported as progress (see trueup.health) at least this often.
PROGRESS_SLICE_SECONDS = 30.0


class Pacer:
    """At most ``rate`` units (rows, letters) per second over every caller of this process
    together (None: no limit). Thread-safe: several backfill workers share one."""

    def __init__(self, rate: float | None) -> None:
        if not valid_rate(rate):
            raise ValueError(f"rate: expected a positive number (got {rate})")
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def __call__(self, units: int = 1, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Return when ``units`` more are within the rate. ``sleep`` waits: a caller whose
        connection needs serving meanwhile (RabbitMQ heartbeats) passes one that serves it."""
        if not self.rate or units <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + units / self.rate
        # In slices, each one progress: waiting out the rate is what the process was asked
        # to do, and a wait of minutes must not make its readiness say it is stuck.
        while (remaining := start - time.monotonic()) > 0:
            sleep(min(remaining, PROGRESS_SLICE_SECONDS))
            HEALTH.progressed()
