"""The freshness rule of scheduled reconciliations: stale once a whole scheduled tick was missed,
whatever the gaps between ticks (office hours, weekdays)."""

from __future__ import annotations

import datetime as dt

import pytest

from trueup.checks import freshness_of


def _at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, minute, tzinfo=dt.UTC)  # 2026-03-04 is a Wednesday


@pytest.mark.parametrize(("cron", "now", "last_success", "fresh"), [
    # every 30 minutes: the 10:00 tick's run must have succeeded by 10:45
    ("*/30 * * * *", _at(4, 10, 45), _at(4, 10, 1), True),
    ("*/30 * * * *", _at(4, 10, 45), _at(4, 9, 59), False),
    # office hours: at 20:00 the evening is no reason to be stale ...
    ("*/30 9-17 * * *", _at(4, 20), _at(4, 17, 31), True),
    ("*/30 9-17 * * *", _at(4, 20), _at(4, 17, 1), True),   # 17:30 missed: one tick tolerated
    ("*/30 9-17 * * *", _at(4, 20), _at(4, 16, 59), False),  # 17:00 and 17:30 missed
    # ... nor the night before the first tick of the next day
    ("*/30 9-17 * * *", _at(5, 8, 59), _at(4, 17, 31), True),
    # weekdays at 09:00: on Sunday, Friday's run is recent enough ...
    ("0 9 * * 1-5", _at(8, 12), _at(6, 9, 2), True),
    # ... and Thursday's too (Friday's tick alone was missed), Wednesday's not
    ("0 9 * * 1-5", _at(8, 12), _at(5, 9, 2), True),
    ("0 9 * * 1-5", _at(8, 12), _at(4, 9, 2), False),
])
def test_stale_only_once_a_whole_scheduled_tick_was_missed(
        cron: str, now: dt.datetime, last_success: dt.datetime, fresh: bool) -> None:
    state = freshness_of("orders", cron, last_success, now)
    assert state.fresh is fresh, (
        f"{cron} at {now:%a %H:%M}, last success {last_success:%a %H:%M}: expected "
        f"{'fresh' if fresh else 'stale'} ({state.describe()})")
    assert state.max_age_seconds == (now - state.due_since).total_seconds()


def test_no_successful_run_is_stale() -> None:
    state = freshness_of("orders", "*/30 * * * *", None, _at(4, 10))
    assert not state.fresh and state.describe() == "orders has no successful run yet"
    assert state.metadata()["last_success_at"] is None


def test_the_description_names_the_tick_a_run_was_due_since() -> None:
    state = freshness_of("orders", "0 9 * * 1-5", _at(4, 9, 2), _at(8, 12))
    assert state.due_since == _at(5, 9)
    assert "2026-03-05T09:00:00+00:00" in state.describe()
