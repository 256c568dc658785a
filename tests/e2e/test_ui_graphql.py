"""The Dagster UI as users drive it, through its GraphQL API: schedules, a drifted
reconciliation failing its checks, the backfill job repairing it, and a GX suite on a table.

The tests share one ``dagster dev`` on one drifted shop (starting it is most of their time);
each leaves the shop as another expects it, whatever their order: the schedule is stopped
again, the GX test fixes only the shop (the copy's drift stays failing until the backfill),
and the backfill only the copy."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.conftest import create_database, drop_database
from tests.e2e.conftest import RUN, dagster_dev, graphql, launch_job, wait_for

pytestmark = [pytest.mark.dagster, pytest.mark.postgres]

REPOSITORIES = """
{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name }
    schedules { name scheduleState { status } } } } } }
"""
START_SCHEDULE = """
mutation($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) {
    __typename
    ... on ScheduleStateResult { scheduleState { id status } }
    ... on PythonError { message }
  }
}
"""
STOP_SCHEDULE = """
mutation($id: String!) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
  }
}
"""
CHECKS = """
query($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      assetChecksOrError { ... on AssetChecks { checks { name
        executionForLatestMaterialization { runId status evaluation { success
          metadataEntries { label ... on IntMetadataEntry { intValue }
                                    ... on FloatMetadataEntry { floatValue } } } } } } }
    }
  }
}
"""
DIFFERENCES = ["trueup", "orders", "differences"]
ORDERS_TABLE = ["postgres", "shop", "public", "orders"]
REPAIRS_OP = "trueup__orders__repairs"
SUITE = {
    "connection": "shop", "table": "public.orders",
    "expectations": [
        {"type": "expect_column_values_to_be_between",
         "kwargs": {"column": "amount_cents", "min_value": 0}},
        {"type": "expect_column_values_to_be_in_set",
         "kwargs": {"column": "currency", "value_set": ["EUR", "USD"]}},
    ],
}


def drifted_shop(new_db: Callable[[], str], state_db: str, tmp_path: Path
                 ) -> tuple[Path, Path, str, str]:
    """A shop with 200 orders (two with a negative amount), a copy with missing, stale,
    mismatched and orphan rows; the config (scheduled, repaired by upsert) and a suites folder."""
    shop, copy = new_db(), new_db()
    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint NOT NULL,"
                     " status text NOT NULL, amount_cents bigint NOT NULL, currency text)")
        conn.execute("INSERT INTO public.orders SELECT g, 2, 'paid', 100 * g, 'EUR' "
                     "FROM generate_series(1, 200) g")
        conn.execute("UPDATE public.orders SET amount_cents = -50 WHERE id IN (11, 12)")
    with psycopg.connect(copy, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text, amount_cents bigint)")
        conn.execute("INSERT INTO public.copy SELECT g, 2, 'paid', 100 * g "
                     "FROM generate_series(1, 200) g")
        conn.execute("UPDATE public.copy SET amount_cents = -50 WHERE id IN (11, 12)")
        conn.execute("DELETE FROM public.copy WHERE id IN (3, 4)")                  # missing
        conn.execute("UPDATE public.copy SET version = 1, status = 'new' WHERE id = 7")  # stale
        conn.execute("UPDATE public.copy SET amount_cents = 1 WHERE id = 9")         # mismatch
        conn.execute("INSERT INTO public.copy VALUES (9999, 1, 'ghost', 0)")          # orphan
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "shop.public.orders.yaml").write_text(yaml.safe_dump(SUITE))
    config = tmp_path / "trueup.yaml"
    config.write_text(yaml.safe_dump({
        "state": state_db,
        "connections": {"shop": {"postgres": shop}, "copy": {"postgres": copy}},
        "reconciliations": {"orders": {
            "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                       "version": "version", "columns": ["status", "amount_cents"]},
            "target": {"connection": "copy", "table": "public.copy", "key": ["id"],
                       "version": "version", "columns": ["status", "amount_cents"]},
            "schedule": "*/30 * * * *", "repair": "upsert"}}}))
    return config, suites, shop, copy


@dataclass(frozen=True)
class Shop:
    url: str    # the dagster dev serving it
    shop: str   # DSNs
    copy: str


@contextlib.contextmanager
def drifted_shop_in_dagster(new_db: Callable[[], str], state_db: str,
                            tmp_path: Path) -> Iterator[Shop]:
    """``dagster dev`` on a drifted shop (its suites folder in TRUEUP_CHECKS_DIR)."""
    config, suites, shop, copy = drifted_shop(new_db, state_db, tmp_path)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRUEUP_CHECKS_DIR", str(suites))
        with dagster_dev(tmp_path, config) as url:
            wait_for("the code location", lambda: checks(url, DIFFERENCES))
            yield Shop(url, shop, copy)


@pytest.fixture(scope="module")
def shop_in_dagster(tmp_path_factory: pytest.TempPathFactory,
                    state_template: str) -> Iterator[Shop]:
    """One drifted shop in ``dagster dev`` for every test of this module."""
    names = [f"t_{uuid.uuid4().hex[:10]}" for _ in range(3)]
    databases = iter(names[1:])
    try:
        state_db = create_database(names[0], template=state_template)
        with drifted_shop_in_dagster(lambda: create_database(next(databases)), state_db,
                                     tmp_path_factory.mktemp("shop")) as shop:
            yield shop
    finally:
        for name in names:
            drop_database(name)


def repository(url: str) -> dict[str, Any]:
    (repo,) = graphql(url, REPOSITORIES)["repositoriesOrError"]["nodes"]
    return repo  # type: ignore[no-any-return]


def run_status(url: str, run_id: str, seconds: float = 90) -> str:
    def finished() -> str | None:
        status: str = graphql(url, RUN, {"id": run_id})["runOrError"]["status"]
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None
    return str(wait_for(f"run {run_id} to finish", finished, seconds=seconds))


def checks(url: str, path: list[str]) -> dict[str, dict[str, Any]]:
    """Every check of the asset at ``path`` with its latest execution (or None)."""
    node = graphql(url, CHECKS, {"path": path})["assetNodeOrError"]
    found = (node or {}).get("assetChecksOrError") or {}
    return {c["name"]: c["executionForLatestMaterialization"] for c in found.get("checks", [])}


def outcomes(url: str, path: list[str], run_id: str) -> dict[str, bool]:
    """Passed or not, per check evaluated in ``run_id``."""
    return {name: bool(e["evaluation"]["success"]) for name, e in checks(url, path).items()
            if e and e["runId"] == run_id and e["evaluation"]}


def test_schedules_exist_and_can_be_turned_on_and_off(shop_in_dagster: Shop) -> None:
    url = shop_in_dagster.url
    repo = repository(url)
    schedules = {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
    assert schedules == {"reconcile_orders_schedule": "STOPPED"}, schedules
    started = graphql(url, START_SCHEDULE, {"selector": {
        "repositoryLocationName": repo["location"]["name"],
        "repositoryName": repo["name"], "scheduleName": "reconcile_orders_schedule"}})[
            "startSchedule"]
    assert started["__typename"] == "ScheduleStateResult", started
    assert started["scheduleState"]["status"] == "RUNNING"
    assert {s["name"]: s["scheduleState"]["status"] for s in repository(url)["schedules"]
            } == {"reconcile_orders_schedule": "RUNNING"}
    stopped = graphql(url, STOP_SCHEDULE, {"id": started["scheduleState"]["id"]})[
        "stopRunningSchedule"]
    assert stopped["__typename"] == "ScheduleStateResult", stopped
    assert {s["name"]: s["scheduleState"]["status"] for s in repository(url)["schedules"]
            } == {"reconcile_orders_schedule": "STOPPED"}


def test_drift_fails_checks_backfill_repairs_and_the_next_run_passes(
        shop_in_dagster: Shop) -> None:
    url = shop_in_dagster.url
    run = launch_job(url, "reconcile_orders")
    assert run_status(url, run) == "SUCCESS"
    first = outcomes(url, DIFFERENCES, run)
    assert {k: first[k] for k in ("missing", "stale", "mismatch", "orphan")} == {
        "missing": False, "stale": False, "mismatch": False, "orphan": False}, first
    assert first["ahead"] and first["fresh"]  # it just ran

    backfill = launch_job(url, "backfill_orders",
                          {"ops": {REPAIRS_OP: {"config": {"scope": "all", "chunk_size": 50}}}})
    assert run_status(url, backfill) == "SUCCESS"

    again = launch_job(url, "reconcile_orders")
    assert run_status(url, again) == "SUCCESS"
    second = outcomes(url, DIFFERENCES, again)
    assert second and all(second.values()), second
    with psycopg.connect(shop_in_dagster.copy) as conn:
        assert conn.execute("SELECT count(*) FROM public.copy").fetchone() == (200,)


def test_gx_check_fails_on_bad_values_and_passes_once_fixed(shop_in_dagster: Shop) -> None:
    url = shop_in_dagster.url
    run = launch_job(url, "quality_shop_public_orders")
    assert run_status(url, run) == "SUCCESS"
    result = outcomes(url, ORDERS_TABLE, run)
    assert result == {"amount_cents__be_between": False, "currency__be_in_set": True}, result
    failed = checks(url, ORDERS_TABLE)["amount_cents__be_between"]
    metadata = {m["label"]: m.get("intValue", m.get("floatValue"))
                for m in failed["evaluation"]["metadataEntries"]}
    assert metadata["unexpected_count"] == 2 and metadata["unexpected_percent"] == 1.0

    with psycopg.connect(shop_in_dagster.shop, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET amount_cents = 50 WHERE amount_cents < 0")
    run = launch_job(url, "quality_shop_public_orders")
    assert run_status(url, run) == "SUCCESS"
    assert outcomes(url, ORDERS_TABLE, run) == {
        "amount_cents__be_between": True, "currency__be_in_set": True}
