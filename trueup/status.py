"""``trueup status``: the newest runs, backfills and replays, and the latest check results."""

from __future__ import annotations

from typing import Any

import psycopg

from trueup.queries import query

DEFAULT_LIMIT = 20


def status(conn: psycopg.Connection[Any], *, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The status document printed by ``trueup status --json`` (newest first)."""
    params = {"limit": limit}
    runs = conn.execute(query("recent_runs"), params).fetchall()
    for run in runs:
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
