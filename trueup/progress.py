"""Progress of long CLI work (diff, backfill, replay) on stderr.

On a terminal a one-line bar redrawn in place (``checksums [#######.....] 412/1000 41%``);
elsewhere ``progress`` log events (:mod:`trueup.log`: a JSON object with ``phase``, ``done``,
``total`` and the work's own fields, or ``progress phase=checksums done=412 total=1000`` in
the text format), so a log pipeline reads them like every other line. Updates are throttled
(:data:`MIN_INTERVAL_SECONDS` on a terminal, :data:`PLAIN_INTERVAL_SECONDS` otherwise); a
phase's first and last update always show. ``TRUEUP_PROGRESS=off`` silences it, ``=plain``
forces log events, ``=bar`` forces the bar.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from trueup.health import HEALTH
from trueup.log import get_logger

log = get_logger(__name__)

#: Redraw a terminal bar at most this often (seconds).
MIN_INTERVAL_SECONDS = 0.1
#: Log a progress event at most this often (seconds), so logs stay short.
PLAIN_INTERVAL_SECONDS = 5.0
BAR_WIDTH = 30
MODE_ENV = "TRUEUP_PROGRESS"


class ProgressBar:
    """A ``progress(phase, done, total, **extra)`` callable; ``total=0`` means unknown.
    ``stream`` is where a bar is drawn (stderr); log events go where :mod:`trueup.log`'s do."""

    def __init__(self, stream: TextIO | None = None, *, mode: str | None = None,
                 interval_seconds: float | None = None) -> None:
        self.stream = stream or sys.stderr
        chosen = (mode or os.environ.get(MODE_ENV, "")).strip().lower()
        if chosen not in ("bar", "plain", "off"):
            chosen = "bar" if _isatty(self.stream) else "plain"
        self.mode = chosen
        self.interval_seconds = (interval_seconds if interval_seconds is not None else
                                 MIN_INTERVAL_SECONDS if chosen == "bar" else
                                 PLAIN_INTERVAL_SECONDS)
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._last_shown = 0.0
        self._drawn = False
        self._started = time.monotonic()

    def __call__(self, phase: str, done: int, total: int, **extra: float | int | str) -> None:
        HEALTH.progressed()  # whether shown or not: the work moves (see trueup.health)
        if self.mode == "off":
            return
        with self._lock:
            now = time.monotonic()
            new_phase = phase != self._phase
            finished = total > 0 and done >= total
            if new_phase and self._phase is not None and self.mode == "bar":
                self._end_line()
            if new_phase:
                self._phase, self._started = phase, now
            elif not finished and now - self._last_shown < self.interval_seconds:
                return
            self._last_shown = now
            if self.mode == "bar":
                self._draw(phase, done, total, now, extra)
                if finished:
                    self._end_line()
                    self._phase = None
            else:
                log.info("progress", phase=phase, done=done, total=total,
                         **{k: round(v, 1) if isinstance(v, float) else v
                            for k, v in extra.items()})

    def close(self) -> None:
        """End a bar left mid-line (work stopped early), so the next output starts clean."""
        with self._lock:
            if self.mode == "bar":
                self._end_line()
            self._phase = None

    def _draw(self, phase: str, done: int, total: int, now: float,
              extra: dict[str, float | int | str]) -> None:
        elapsed = max(now - self._started, 1e-6)
        fields = "  ".join(f"{k} {_fmt(v)}" for k, v in extra.items())
        if total > 0:
            part = min(done / total, 1.0)
            filled = int(part * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            eta = (elapsed / part - elapsed) if 0 < part < 1 else 0.0
            text = (f"{phase:<10} [{bar}] {done}/{total} {part:4.0%}  "
                    f"{_duration(elapsed)} elapsed, {_duration(eta)} left")
        else:
            text = f"{phase:<10} {done} done  {done / elapsed:,.0f}/s  {_duration(elapsed)}"
        if fields:
            text += f"  {fields}"
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._drawn = True

    def _end_line(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(value: float | int | str) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
