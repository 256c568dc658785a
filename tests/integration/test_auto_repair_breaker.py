"""The auto-repair sensor's circuit breaker reads trueup's state: which backfill holds it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from assets.repairs import blocking_backfill
from trueup.state import open_state

pytestmark = [pytest.mark.postgres]


def _backfill(conn: psycopg.Connection[dict[str, Any]], status: str, created: str,
              finished: str | None, *, alongside: bool = False) -> int:
    row = conn.execute(
        "INSERT INTO trueup.backfills (reconciliation, scope, status, chunk_size, created_at, "
        "finished_at, alongside, error) VALUES ('orders', 'all', %s, 10, %s, %s, %s, %s) "
        "RETURNING backfill_id",
        (status, created, finished, alongside,
         "chunk 3: boom" if status == "failed" else None)).fetchone()
    assert row is not None
    return int(row["backfill_id"])


def test_the_backfill_that_ended_last_holds_the_breaker_when_backfills_overlapped(
        state_db: str) -> None:
    """An --all failed after a backfill run --alongside it had succeeded: the newest planned
    (the alongside one) was taken for the latest, and auto-repair went on after the failure."""
    with open_state(state_db) as state:
        state.autocommit = True
        failed = _backfill(state, "failed", "2026-12-01 10:00+00", "2026-12-01 12:00+00")
        _backfill(state, "succeeded", "2026-12-01 11:00+00", "2026-12-01 11:05+00",
                  alongside=True)
    held = blocking_backfill(state_db, "orders")
    assert held is not None and held["backfill_id"] == failed
    with open_state(state_db) as state:  # a later success clears it
        state.autocommit = True
        _backfill(state, "succeeded", "2026-12-01 12:30+00", "2026-12-01 13:00+00")
    assert blocking_backfill(state_db, "orders") is None
