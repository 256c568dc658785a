"""Check results kept in trueup's state: their history outlives any Dagster instance."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

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
