"""A range of partitions materialized as a Dagster backfill, launched through the webserver."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.e2e.conftest import REPO, dagster_dev, graphql, wait_for

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


#: Each target row written waits a moment: two backfills launched together then overlap.
SLOW_WRITES = """
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON public.copy FOR EACH ROW EXECUTE FUNCTION slow();
"""


def test_a_partition_backfill_of_repairs_from_the_asset_page_repairs_one_day_at_a_time(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Its days run in Dagster's own asset job, without trueup's run tags: on an instance
    that limits runs by those tags only, both days planned at once and one failed ("backfill
    N of orders is already running"). The repairs asset's pool holds them one at a time."""
    config = _config(new_db, state_db, tmp_path)
    document = yaml.safe_load(config.read_text())
    document["reconciliations"]["orders"]["repair"] = "upsert"
    config.write_text(yaml.safe_dump(document))
    target = document["connections"]["copy"]["postgres"]
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE id IN (2, 3, 4, 12, 13, 14)")  # 3 a day
        conn.execute(SLOW_WRITES)
    instance = REPO / "examples" / "dagster.yaml"  # make demo's, with deploy/'s limits
    with dagster_dev(tmp_path, config, instance) as url:
        wait_for("the repairs asset", lambda: graphql(url, CHECKS, {
            "path": ["trueup", "orders", "repairs"]})["assetNodeOrError"])
        launched = graphql(url, LAUNCH, {"params": {
            "partitionNames": ["2026-02-01", "2026-02-02"],
            "assetSelection": [{"path": ["trueup", "orders", "repairs"]}],
            "fromFailure": False,
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched

        def finished() -> list[dict[str, Any]] | None:
            runs: list[dict[str, Any]] = graphql(url, BACKFILL, {"id": launched["backfillId"]})[
                "partitionBackfillOrError"]["runs"]
            ended = all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
            return runs if ended and len(runs) == 2 else None

        runs = wait_for("the backfill's runs to finish", finished, seconds=240)
    with psycopg.connect(state_db) as conn:
        backfills = conn.execute("SELECT status, error FROM trueup.backfills "
                                 "ORDER BY backfill_id").fetchall()
    assert {r["status"] for r in runs} == {"SUCCESS"}, (runs, backfills)
    assert backfills == [("succeeded", None), ("succeeded", None)], backfills
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM public.copy").fetchone() == (20,)
