"""The rate limit of backfills and replays."""

from __future__ import annotations

import pytest

from trueup import pacing
from trueup.health import HEALTH
from trueup.pacing import Pacer


def test_a_long_wait_for_the_rate_is_progress_slice_by_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A paced replay or backfill waits minutes between batches; readiness, which fails after
    120 s without progress, took such a process for stuck."""
    monkeypatch.setattr(pacing, "PROGRESS_SLICE_SECONDS", 0.02)
    marks: list[float] = []
    monkeypatch.setattr(HEALTH, "progressed", lambda: marks.append(0.0))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        import time
        time.sleep(seconds)

    pace = Pacer(rate=10.0)
    pace(1, sleep=sleep)  # the first unit goes at once
    assert slept == [] and marks == []
    pace(1, sleep=sleep)  # then 0.1 s: five slices or so, each one progress
    assert len(slept) >= 4 and max(slept) <= 0.02 + 1e-9
    assert len(marks) == len(slept)
