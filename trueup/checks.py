"""Check results kept in trueup's state: their history outlives any Dagster instance."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from croniter import croniter

from trueup.state import open_state
from trueup.statuses import CheckSeverity

CheckResult = tuple[str, bool, CheckSeverity, dict[str, Any]]  # name, passed, severity, metadata


def _state(state_dsn: str) -> psycopg.Connection[dict[str, Any]]:
    """The state, migrated (a check or sensor can be the first to touch a new one), in
    autocommit: reads only."""
    conn = open_state(state_dsn)
    conn.autocommit = True
    return conn


def record_check_results(state_dsn: str, asset_key: str, reconciliation: str | None,
                         run_id: int | None, results: Sequence[CheckResult]) -> None:
    """Append one row per check result to ``trueup.check_results``."""
    with open_state(state_dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO trueup.check_results (asset_key, check_name, reconciliation, run_id, "
            "passed, severity, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(asset_key, name, reconciliation, run_id, passed, severity.value,
              json.dumps(metadata, default=str)) for name, passed, severity, metadata in results])


# ---------------------------------------------------------------------------------------------
# Freshness: is a scheduled reconciliation still running as often as it should?


@dataclass(frozen=True, kw_only=True)
class Freshness:
    """A reconciliation is fresh while it has succeeded since its second-to-last scheduled tick:
    the run of the last tick may still be going, the one before must have finished. One missed
    tick is tolerated; a schedule that only runs on weekdays or office hours is not stale at
    night or on Sunday."""

    reconciliation: str
    last_success_at: dt.datetime | None
    age_seconds: float | None
    due_since: dt.datetime        # the second-to-last tick before now
    max_age_seconds: float        # from due_since to now

    @property
    def fresh(self) -> bool:
        return self.last_success_at is not None and self.last_success_at >= self.due_since

    def describe(self) -> str:
        if self.last_success_at is None:
            return f"{self.reconciliation} has no successful run yet"
        return (f"last successful run {self.age_seconds:.0f}s ago (limit "
                f"{self.max_age_seconds:.0f}s: a run since the tick of "
                f"{self.due_since.isoformat()})")

    def metadata(self) -> dict[str, Any]:
        return {"last_success_at": self.last_success_at.isoformat()
                if self.last_success_at else None,
                "age_seconds": round(self.age_seconds, 1) if self.age_seconds is not None
                else None, "max_age_seconds": round(self.max_age_seconds, 1),
                "due_since": self.due_since.isoformat()}


def due_since(cron: str, now: dt.datetime) -> dt.datetime:
    """The second-to-last tick of ``cron`` (UTC) before ``now``: its run has had a whole
    interval to succeed."""
    ticks = croniter(cron, now.astimezone(dt.UTC))
    ticks.get_prev(dt.datetime)
    second: dt.datetime = ticks.get_prev(dt.datetime)
    return second


def freshness_of(reconciliation: str, cron: str, last_success_at: dt.datetime | None,
                 now: dt.datetime) -> Freshness:
    """The freshness of ``reconciliation`` at ``now``, given its last successful run."""
    due = due_since(cron, now)
    return Freshness(
        reconciliation=reconciliation, last_success_at=last_success_at,
        age_seconds=(now - last_success_at).total_seconds()
        if last_success_at is not None else None,
        due_since=due, max_age_seconds=(now - due).total_seconds())


def freshness(state_dsn: str, reconciliation: str, cron: str,
              now: dt.datetime | None = None) -> Freshness:
    """How fresh ``reconciliation`` is, from its last successful run in ``trueup.runs``: of
    the whole table, or of a day its schedule runs then (the day it finished or the one
    before): a run of an older day, launched by hand, says nothing of the schedule."""
    with _state(state_dsn) as conn:
        row = conn.execute(
            "SELECT max(finished_at) AS last FROM trueup.runs "
            "WHERE reconciliation = %s AND status = 'succeeded' AND (partition IS NULL "
            "OR partition >= to_char((finished_at AT TIME ZONE 'UTC')::date - 1, "
            "'YYYY-MM-DD'))",
            (reconciliation,)).fetchone()
    last: dt.datetime | None = row["last"] if row else None
    return freshness_of(reconciliation, cron, last, now or dt.datetime.now(dt.UTC))


# ---------------------------------------------------------------------------------------------
# Blocking: failed ERROR checks that stop an automatic repair


def failed_blocking_checks(state_dsn: str, differences_key: str, run_id: int,
                           repairable: Sequence[str], table_keys: Sequence[str] = ()
                           ) -> list[str]:
    """Failed ERROR checks that must stop the auto-repair of run ``run_id``.

    Those are the run's own ERROR checks on the differences asset other than the
    ``repairable`` classes (the ones a backfill fixes, so their failing is why it runs: ahead
    and unreadable need a person), and the failed ERROR checks of the latest suite run on each
    of the ``table_keys`` (a source with bad values must not be copied into the target). A
    suite run records all its results in one transaction, so they share its ``at``: a check
    since removed from the suite (or a suite since removed) blocks no longer.
    Each is returned as ``asset_key:check_name``.
    """
    with _state(state_dsn) as conn:
        rows = conn.execute(
            "SELECT asset_key, check_name FROM trueup.check_results "
            "WHERE asset_key = %s AND run_id = %s AND severity = 'ERROR' AND NOT passed "
            "AND check_name <> ALL(%s) "
            "UNION ALL "
            "SELECT c.asset_key, c.check_name FROM trueup.check_results AS c "
            "JOIN (SELECT asset_key, max(at) AS at FROM trueup.check_results "
            "      WHERE asset_key = ANY(%s) GROUP BY asset_key) AS latest "
            "  ON c.asset_key = latest.asset_key AND c.at = latest.at "
            "WHERE c.severity = 'ERROR' AND NOT c.passed ORDER BY 1, 2",
            (differences_key, run_id, list(repairable), list(table_keys))).fetchall()
    return [f"{r['asset_key']}:{r['check_name']}" for r in rows]
