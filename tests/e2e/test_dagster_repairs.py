"""Repairs in Dagster: the backfill job with launchpad config, the repairs asset's metadata,
and the auto-repair sensor with its circuit breaker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from assets.differences import differences_key, reconciliation_definitions
from assets.external import external_assets
from assets.repairs import repair_definitions, repairs_key, repairs_op_name
from tests.integration.test_backfill_support import (
    drift,
    make_tables,
    source_rows,
    target_rows,
    write_config,
)
from trueup.config import Config

pytestmark = [pytest.mark.dagster, pytest.mark.postgres]


def _defs(config: Config) -> tuple[dg.Definitions, list[Any]]:
    reconciliations = reconciliation_definitions(config)
    repairs = repair_definitions(config)
    assets = [*external_assets(config), *(r.asset for r in reconciliations), *repairs.assets]
    return dg.Definitions(assets=assets, jobs=[*(r.job for r in reconciliations),
                                               *repairs.jobs],
                          sensors=repairs.sensors), assets


def test_backfill_job_repairs_the_target_and_records_progress_and_lineage_metadata(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    config = write_config(tmp_path, state_db, source, target)
    defs, _ = _defs(config)
    job = defs.resolve_job_def("backfill_orders")
    fields = job.get_config_schema_snapshot()  # the launchpad form exists
    assert fields is not None
    result = job.execute_in_process(run_config={"ops": {repairs_op_name("orders"): {
        "config": {"scope": "all", "chunk_size": 100, "workers": 2}}}})
    assert result.success
    (materialization,) = result.asset_materializations_for_node(repairs_op_name("orders"))
    meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    assert meta["status"] == "succeeded" and meta["chunks"] == meta["chunks_done"] == 3
    assert (meta["rows_repaired"], meta["rows_skipped"]) == (9, 1)
    assert "| [3] |" in meta["lineage_sample"] and "insert" in meta["lineage_sample"]
    fixed = {r[0]: r for r in target_rows(target)}
    assert all(fixed[r[0]] == r for r in source_rows(source) if r[0] != 8)


def test_auto_repair_sensor_launches_a_backfill_of_the_run_and_opens_the_breaker_on_drift(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    config = write_config(tmp_path, state_db, source, target,
                          auto_repair={"max_differences": 20})
    defs, assets = _defs(config)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    (request,) = tick.run_requests or []
    config_ = request.run_config["ops"][repairs_op_name("orders")]["config"]
    assert config_["scope"] == "run" and isinstance(config_["run_id"], int)
    # the launched run repairs that run's differences
    result = dg.materialize(assets, selection=[repairs_key("orders")], instance=instance,
                            run_config=request.run_config)
    assert result.success

    # drift beyond max_differences: the breaker opens, nothing is launched
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id <= 100")
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success
    tick = sensor.evaluate_tick(dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=tick.cursor))
    assert not tick.run_requests
    assert tick.skip_message and "circuit breaker" in tick.skip_message
    assert "100 differences" in tick.skip_message
