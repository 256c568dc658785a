"""Check results kept in trueup's state: their history outlives any Dagster instance."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from croniter import croniter

from trueup.db import connect
from trueup.statuses import CheckSeverity

CheckResult = tuple[str, bool, CheckSeverity, dict[str, Any]]  # name, passed, severity, metadata


def record_check_results(state_dsn: str, asset_key: str, reconciliation: str | None,
                         run_id: int | None, results: Sequence[CheckResult]) -> None:
    """Append one row per check result to ``trueup.check_results``."""
    with connect(state_dsn, what="state") as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO trueup.check_results (asset_key, check_name, reconciliation, run_id, "
            "passed, severity, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(asset_key, name, reconciliation, run_id, passed, severity.value,
              json.dumps(metadata, default=str)) for name, passed, severity, metadata in results])


# ---------------------------------------------------------------------------------------------
# Freshness: is a scheduled reconciliation still running as often as it should?

#: A reconciliation is stale once its last successful run is older than this many intervals.
FRESHNESS_INTERVALS = 2


@dataclass(frozen=True, kw_only=True)
class Freshness:
    reconciliation: str
    last_success_at: dt.datetime | None
    age_seconds: float | None
    max_age_seconds: float

    @property
    def fresh(self) -> bool:
        return self.age_seconds is not None and self.age_seconds <= self.max_age_seconds

    def describe(self) -> str:
        if self.last_success_at is None:
            return f"{self.reconciliation} has no successful run yet"
        return (f"last successful run {self.age_seconds:.0f}s ago "
                f"(limit {self.max_age_seconds:.0f}s)")

    def metadata(self) -> dict[str, Any]:
        return {"last_success_at": self.last_success_at.isoformat()
                if self.last_success_at else None,
                "age_seconds": round(self.age_seconds, 1) if self.age_seconds is not None
                else None, "max_age_seconds": self.max_age_seconds}


def schedule_interval_seconds(cron: str, now: dt.datetime | None = None) -> float:
    """The gap between the two next ticks of ``cron`` after ``now`` (UTC), in seconds."""
    moment = now or dt.datetime.now(dt.UTC)
    ticks = croniter(cron, moment)
    first: dt.datetime = ticks.get_next(dt.datetime)
    second: dt.datetime = ticks.get_next(dt.datetime)
    return (second - first).total_seconds()


def freshness(state_dsn: str, reconciliation: str, cron: str,
              now: dt.datetime | None = None) -> Freshness:
    """How old the last successful run of ``reconciliation`` is, against twice its interval."""
    moment = now or dt.datetime.now(dt.UTC)
    with connect(state_dsn, what="state", autocommit=True) as conn:
        row = conn.execute(
            "SELECT max(finished_at) AS last FROM trueup.runs "
            "WHERE reconciliation = %s AND status = 'succeeded'", (reconciliation,)).fetchone()
    last: dt.datetime | None = row["last"] if row else None
    return Freshness(
        reconciliation=reconciliation, last_success_at=last,
        age_seconds=(moment - last).total_seconds() if last is not None else None,
        max_age_seconds=FRESHNESS_INTERVALS * schedule_interval_seconds(cron, moment))


# ---------------------------------------------------------------------------------------------
# Blocking: failed ERROR checks that stop an automatic repair


def failed_blocking_checks(state_dsn: str, differences_key: str, run_id: int,
                           repairable: Sequence[str], table_keys: Sequence[str] = ()
                           ) -> list[str]:
    """Failed ERROR checks that must stop the auto-repair of run ``run_id``.

    Those are the run's own ERROR checks on the differences asset other than the
    ``repairable`` classes (the ones a backfill fixes, so their failing is why it runs: ahead
    and unreadable need a person), and the latest result of every ERROR check on the
    ``table_keys`` (a source with bad values must not be copied into the target).
    Each is returned as ``asset_key:check_name``.
    """
    with connect(state_dsn, what="state", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT asset_key, check_name FROM trueup.check_results "
            "WHERE asset_key = %s AND run_id = %s AND severity = 'ERROR' AND NOT passed "
            "AND check_name <> ALL(%s) "
            "UNION ALL "
            "SELECT asset_key, check_name FROM ("
            "  SELECT DISTINCT ON (asset_key, check_name) asset_key, check_name, passed, "
            "         severity FROM trueup.check_results WHERE asset_key = ANY(%s) "
            "  ORDER BY asset_key, check_name, at DESC, check_result_id DESC) latest "
            "WHERE severity = 'ERROR' AND NOT passed ORDER BY 1, 2",
            (differences_key, run_id, list(repairable), list(table_keys))).fetchall()
    return [f"{r['asset_key']}:{r['check_name']}" for r in rows]
