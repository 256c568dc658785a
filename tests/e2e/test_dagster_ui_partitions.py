"""A range of partitions materialized as a Dagster backfill, launched through the webserver."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.e2e.conftest import dagster_dev, graphql, wait_for

pytestmark = [pytest.mark.dagster, pytest.mark.postgres]

LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
BACKFILL = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs { runId status tags { key value } } }
  }
}
"""
CHECKS = """
query($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      assetChecksOrError { ... on AssetChecks { checks { name
        executionForLatestMaterialization { evaluation { success } } } } }
    }
  }
}
"""


def _config(new_db: Callable[[], str], state_db: str, tmp_path: Path) -> Path:
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        for day, ids in ((dt.date(2026, 2, 1), range(1, 11)), (dt.date(2026, 2, 2),
                                                                range(11, 21))):
            conn.execute("INSERT INTO public.orders SELECT g, 1, 'new', %s FROM unnest(%s) g",
                         (dt.datetime.combine(day, dt.time(12), dt.UTC), list(ids)))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy SELECT g, 1, 'new' FROM generate_series(2, 20) g")
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state_db,
        "connections": {"shop": {"postgres": source}, "copy": {"postgres": target}},
        "reconciliations": {"orders": {
            "source": {"connection": "shop", "table": "orders", "key": ["id"],
                       "version": "version", "updated_at": "updated_at", "columns": ["status"]},
            "target": {"connection": "copy", "table": "copy", "key": ["id"],
                       "version": "version", "columns": ["status"]},
            "partitions": {"daily": {"start": "2026-02-01"}}}},
    }))
    return path


def test_a_partition_range_runs_as_a_dagster_backfill(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config = _config(new_db, state_db, tmp_path)
    with dagster_dev(tmp_path, config) as url:
        wait_for("the differences asset", lambda: graphql(url, CHECKS, {
            "path": ["trueup", "orders", "differences"]})["assetNodeOrError"].get(
                "assetChecksOrError"))
        launched = graphql(url, LAUNCH, {"params": {
            "partitionNames": ["2026-02-01", "2026-02-02"],
            "assetSelection": [{"path": ["trueup", "orders", "differences"]}],
            "fromFailure": False,
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched

        # Its runs, not the backfill's own status: the daemon marks a backfill complete only
        # on its next pass, up to 30 s after the last run ended (a fixed interval).
        def finished() -> list[dict[str, Any]] | None:
            backfill = graphql(url, BACKFILL, {"id": launched["backfillId"]})[
                "partitionBackfillOrError"]
            assert not backfill["status"].startswith(("FAILED", "CANCELED")), backfill
            runs: list[dict[str, Any]] = backfill["runs"]
            partitions = {t["value"] for r in runs for t in r["tags"]
                          if t["key"] == "dagster/partition"}
            ended = all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
            return runs if ended and partitions == {"2026-02-01", "2026-02-02"} else None

        runs = wait_for("the backfill's runs to finish", finished, seconds=240)
        assert {r["status"] for r in runs} == {"SUCCESS"}, runs
        checks: dict[str, Any] = {
            c["name"]: c["executionForLatestMaterialization"]
            for c in graphql(url, CHECKS, {"path": ["trueup", "orders", "differences"]})[
                "assetNodeOrError"]["assetChecksOrError"]["checks"]}

    with psycopg.connect(state_db) as conn:
        runs = conn.execute("SELECT partition, status, missing FROM trueup.runs "
                            "ORDER BY partition").fetchall()
    assert runs == [("2026-02-01", "succeeded", 1), ("2026-02-02", "succeeded", 0)]
    assert set(checks) >= {"missing", "orphan", "stale", "ahead", "mismatch", "in_flight",
                           "unreadable"}
