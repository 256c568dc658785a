"""``trueup status``: the newest runs, backfills and replays, and the latest check results."""

from __future__ import annotations

from typing import Any

import psycopg

from trueup.queries import query
from trueup.runs import PROCESS_DIED, abandon_runs

DEFAULT_LIMIT = 20


def status(conn: psycopg.Connection[Any], *, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The status document printed by ``trueup status --json`` (newest first)."""
    params = {"limit": limit}
    dead = _dead_runs(conn)
    runs = conn.execute(query("recent_runs"), params).fetchall()
    for run in runs:
        if run["run_id"] in dead and run["status"] == "running":
            run.update(status="failed", error=PROCESS_DIED)
        if isinstance(run["seconds"], float):
            # to the millisecond, as a finished run's: failed runs recorded before fail_run
            # rounded theirs hold every digit (0.037412806996144354)
            run["seconds"] = round(run["seconds"], 3)
    return {
        "runs": runs,
        "backfills": conn.execute(query("recent_backfills"), params).fetchall(),
        "replays": conn.execute(query("recent_replays"), params).fetchall(),
        "checks": conn.execute(query("latest_check_results")).fetchall(),
    }


def _dead_runs(conn: psycopg.Connection[Any]) -> set[int]:
    """Mark failed the runs whose process died (see :func:`trueup.runs.abandon_runs`); for a
    user who may not write, the ids of those to show failed, unrecorded."""
    try:
        abandon_runs(conn, None)
        return set()
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction):
        conn.rollback()
    with conn.transaction():  # its commit releases the locks tried
        return {int(r["run_id"]) for r in conn.execute(query("dead_runs")).fetchall()}
