"""The differences asset in Dagster: materializing runs the diff, checks report each class."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import yaml

from assets.differences import differences_key, reconciliation_definitions, scheduled_days
from assets.external import external_assets
from trueup.config import Config, load_config

pytestmark = [pytest.mark.dagster, pytest.mark.postgres]


def _setup(new_db: Callable[[], str], state_db: str, tmp_path: Path,
           **extra: Any) -> tuple[Config, str, str]:
    source, target = new_db(), new_db()
    day = dt.datetime(2026, 2, 1, 12, tzinfo=dt.UTC)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'new', %s "
                     "FROM generate_series(1, 50) g", (day,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy SELECT g, 1, 'new' FROM generate_series(3, 50) g")
        conn.execute("UPDATE public.copy SET status = 'old' WHERE id = 10")
    raw = {"state": state_db,
           "connections": {"shop": {"postgres": source}, "copy": {"postgres": target}},
           "reconciliations": {"orders": {
               "source": {"connection": "shop", "table": "orders", "key": ["id"],
                          "version": "version", "updated_at": "updated_at",
                          "columns": ["status"]},
               "target": {"connection": "copy", "table": "copy", "key": ["id"],
                          "version": "version", "columns": ["status"]},
               "schedule": "*/30 * * * *", **extra}}}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path), source, target


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, e.severity.value)
            for e in result.get_asset_check_evaluations()}


def test_drift_fails_error_checks_and_a_fix_makes_them_pass(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, _, target = _setup(new_db, state_db, tmp_path)
    (orders,) = reconciliation_definitions(config)
    assets = [*external_assets(config), orders.asset]

    result = dg.materialize(assets, selection=[differences_key("orders")])
    assert result.success
    checks = _checks(result)
    assert checks["missing"] == (False, "ERROR")
    assert checks["mismatch"] == (False, "ERROR")
    assert checks["orphan"] == (True, "ERROR")
    assert checks["in_flight"] == (True, "WARN")
    (materialization,) = result.asset_materializations_for_node(orders.asset.op.name)
    assert materialization.metadata["missing"].value == 2
    assert materialization.metadata["mismatch"].value == 1

    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.copy VALUES (1, 1, 'new'), (2, 1, 'new')")
        conn.execute("UPDATE public.copy SET status = 'new' WHERE id = 10")
    result = dg.materialize(assets, selection=[differences_key("orders")])
    assert all(passed for passed, _ in _checks(result).values()), _checks(result)

    with psycopg.connect(state_db) as conn:
        stored = conn.execute(
            "SELECT check_name, passed FROM trueup.check_results WHERE reconciliation = "
            "'orders' ORDER BY check_result_id").fetchall()
    assert len(stored) == 14
    assert ("missing", False) in stored[:7] and ("missing", True) in stored[7:]


def test_partitioned_reconciliation_materializes_one_day_and_schedules_today(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, _, _ = _setup(new_db, state_db, tmp_path,
                          partitions={"daily": {"start": "2026-01-01"}})
    (orders,) = reconciliation_definitions(config)
    assets = [*external_assets(config), orders.asset]

    result = dg.materialize(assets, selection=[differences_key("orders")],
                            partition_key="2026-02-01")
    (materialization,) = result.asset_materializations_for_node(orders.asset.op.name)
    assert materialization.partition == "2026-02-01"
    assert materialization.metadata["source_rows"].value == 50
    assert _checks(result)["missing"] == (False, "ERROR")

    quiet = dg.materialize(assets, selection=[differences_key("orders")],
                           partition_key="2026-02-02")
    assert all(passed for passed, _ in _checks(quiet).values())

    (schedule,) = orders.schedules
    assert schedule.cron_schedule == "*/30 * * * *"
    defs = dg.Definitions(assets=assets, jobs=[orders.job], schedules=orders.schedules)
    assert _scheduled_partitions(defs, dt.datetime(2026, 3, 4, 10, 30, tzinfo=dt.UTC)) == [
        "2026-03-04"]


def test_a_partitioned_reconciliation_launched_without_a_partition_diffs_the_whole_table(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The reconcile job of a partitioned reconciliation launched without a partition failed
    with Dagster's "Cannot access partition_key for a non-partitioned run"; it now diffs the
    whole table, as `trueup diff NAME` without --partition does."""
    config, source, _ = _setup(new_db, state_db, tmp_path,
                               partitions={"daily": {"start": "2026-01-01"}})
    with psycopg.connect(source, autocommit=True) as conn:  # a row of another day
        conn.execute("UPDATE public.orders SET updated_at = '2026-01-15 12:00Z' WHERE id = 1")
    (orders,) = reconciliation_definitions(config)
    defs = dg.Definitions(assets=[*external_assets(config), orders.asset], jobs=[orders.job])
    result = defs.resolve_job_def("reconcile_orders").execute_in_process(raise_on_error=False)
    assert result.success, [e.step_failure_data.error for e in result.get_step_failure_events()]
    (materialization,) = result.asset_materializations_for_node(orders.asset.op.name)
    assert materialization.partition is None
    assert (materialization.metadata["source_rows"].value,
            materialization.metadata["missing"].value) == (50, 2)
    with psycopg.connect(state_db) as conn:
        (run,) = conn.execute("SELECT partition FROM trueup.runs").fetchall()
    assert run == (None,)


def _scheduled_partitions(defs: dg.Definitions, tick: dt.datetime) -> list[str | None]:
    schedule = defs.resolve_schedule_def("reconcile_orders_schedule")
    context = dg.build_schedule_context(scheduled_execution_time=tick,
                                        repository_def=defs.get_repository_def())
    requests = schedule.evaluate_tick(context).run_requests or []
    assert len({r.run_key for r in requests}) == len(requests), "run keys must differ"
    return [r.partition_key for r in requests]


@pytest.mark.parametrize("cron", ["*/30 * * * *", "0 2 * * *"])
def test_first_tick_of_a_day_also_checks_the_day_before_so_no_hour_goes_unchecked(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, cron: str) -> None:
    config, _, _ = _setup(new_db, state_db, tmp_path, schedule=cron,
                          partitions={"daily": {"start": "2026-01-01"}})
    (orders,) = reconciliation_definitions(config)
    defs = dg.Definitions(assets=[*external_assets(config), orders.asset], jobs=[orders.job],
                          schedules=orders.schedules)
    first = dt.datetime(2026, 3, 4, 0 if cron.startswith("*/30") else 2, tzinfo=dt.UTC)
    assert _scheduled_partitions(defs, first) == ["2026-03-03", "2026-03-04"], (
        "the first tick of a day must check the day before, which ended after its last tick")
    if cron.startswith("*/30"):
        later = dt.datetime(2026, 3, 4, 0, 30, tzinfo=dt.UTC)
        assert _scheduled_partitions(defs, later) == ["2026-03-04"]
    # the partitions start on 2026-01-01: there is no day before to check
    assert _scheduled_partitions(defs, first.replace(month=1, day=1)) == ["2026-01-01"]


def test_a_tick_before_the_partitions_start_requests_nothing_and_says_why(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, _, _ = _setup(new_db, state_db, tmp_path,
                          partitions={"daily": {"start": "2026-01-01"}})
    (orders,) = reconciliation_definitions(config)
    defs = dg.Definitions(assets=[*external_assets(config), orders.asset], jobs=[orders.job],
                          schedules=orders.schedules)
    eve = dt.datetime(2025, 12, 31, 23, 30, tzinfo=dt.UTC)
    assert scheduled_days("*/30 * * * *", eve, dt.date(2026, 1, 1)) == []
    context = dg.build_schedule_context(scheduled_execution_time=eve,
                                        repository_def=defs.get_repository_def())
    tick = defs.resolve_schedule_def("reconcile_orders_schedule").evaluate_tick(context)
    assert not tick.run_requests, f"expected no run before the first partition: {tick}"
    assert tick.skip_message and "start on 2026-01-01" in tick.skip_message, tick.skip_message
    # the first tick of the first day checks that day only
    assert _scheduled_partitions(defs, eve + dt.timedelta(minutes=30)) == ["2026-01-01"]


def test_reconcile_job_and_schedule_are_named_after_the_reconciliation(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, _, _ = _setup(new_db, state_db, tmp_path)
    (orders,) = reconciliation_definitions(config)
    defs = dg.Definitions(assets=[*external_assets(config), orders.asset], jobs=[orders.job],
                          schedules=orders.schedules)
    job = defs.resolve_job_def("reconcile_orders")
    assert job.asset_layer.executable_asset_keys == {differences_key("orders")}
    assert defs.resolve_schedule_def("reconcile_orders_schedule").job_name == "reconcile_orders"


def test_a_diff_that_cannot_run_fails_its_step_with_one_line(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A missing target table failed the step with Dagster's wrapper around a traceback;
    the other steps (backfill, replay, GX) say what is wrong in one line."""
    config, _, target = _setup(new_db, state_db, tmp_path)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DROP TABLE public.copy")
    (orders,) = reconciliation_definitions(config)
    result = dg.materialize([*external_assets(config), orders.asset],
                            selection=[differences_key("orders")], raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    data = failure.step_failure_data
    assert data.user_failure_data is not None, data.error
    assert re.fullmatch(r"diff orders: run \d+ failed: table public\.copy does not exist",
                        data.user_failure_data.description), data.user_failure_data.description
