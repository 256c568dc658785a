"""Repairs in Dagster: the backfill job with launchpad config, the repairs asset's metadata,
and the auto-repair sensor with its circuit breaker."""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from assets import repairs
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
from trueup.backfill import WorkerOptions, resume_backfill, start_backfill
from trueup.backfill.model import MAX_WORKERS
from trueup.config import Config, load_config
from trueup.retry import RetryPolicy
from trueup.statuses import BackfillStatus

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
    # 3 chunks of the source's keys, one of the orphans drift() makes after them
    assert meta["status"] == "succeeded" and meta["chunks"] == meta["chunks_done"] == 4
    assert (meta["rows_repaired"], meta["rows_skipped"]) == (9, 1)
    assert "| [3] |" in meta["lineage_sample"] and "insert" in meta["lineage_sample"]
    fixed = {r[0]: r for r in target_rows(target)}
    assert all(fixed[r[0]] == r for r in source_rows(source) if r[0] != 8)


def _auto_repaired(new_db: Callable[[], str], state_db: str, tmp_path: Path
                   ) -> tuple[dg.Definitions, list[Any], dg.DagsterInstance, str]:
    """Definitions of a drifted reconciliation with auto_repair (20 at most), an instance,
    and the target's DSN."""
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    config = write_config(tmp_path, state_db, source, target,
                          auto_repair={"max_differences": 20})
    defs, assets = _defs(config)
    return defs, assets, dg.DagsterInstance.ephemeral(), target


def test_auto_repair_sensor_launches_a_backfill_of_the_run_and_opens_the_breaker_on_drift(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    defs, assets, instance, target = _auto_repaired(new_db, state_db, tmp_path)
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


def test_auto_repair_sensor_decides_on_every_run_since_its_last_tick(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    defs, assets, instance, _ = _auto_repaired(new_db, state_db, tmp_path)
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    idle = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert not idle.run_requests

    # two runs finish between two ticks (two partitions, or a manual run and a scheduled one)
    for _ in range(2):
        assert dg.materialize(assets, selection=[differences_key("orders")],
                              instance=instance).success
    tick = sensor.evaluate_tick(dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=idle.cursor))
    # both found the whole table's differences: the newer, as they are now, is repaired (two
    # backfills of one reconciliation cannot run at once: the second would fail)
    older, newer = _run_ids_in_state(state_db)
    assert _run_ids(tick) == [newer], f"expected the backfill of run {newer} only, not {older}"

    again = sensor.evaluate_tick(dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=tick.cursor))
    assert not again.run_requests, "a run was decided on twice"


def test_a_newer_run_that_found_nothing_to_repair_spares_the_older_run_its_backfill(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Only a newer run that asked for a backfill replaced the older one's request: a newer
    run that found the target repaired (by hand, by another backfill) launched the older run's
    backfill anyway, holding up the next ones while it ran for nothing."""
    defs, assets, instance, target = _auto_repaired(new_db, state_db, tmp_path)
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    idle = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success  # 9 differences
    with psycopg.connect(target, autocommit=True) as conn:  # repaired meanwhile
        conn.execute("TRUNCATE public.copy")
        conn.execute("INSERT INTO public.copy SELECT g, 2, 'paid', g * 1.25 "
                     "FROM generate_series(1, 300) g")
    tick = _diff_then_tick(defs, assets, instance, idle.cursor)
    older, newer = _run_ids_in_state(state_db)
    assert _run_ids(tick) == [], f"run {older}'s backfill was launched after run {newer}"
    message = tick.skip_message or ""
    assert f"run {newer} of orders found nothing to repair" in message, message
    assert f"run {older} of orders needs no backfill: a newer run of the table decides" \
        in message, message


def _one_day_one_missing(new_db: Callable[[], str]) -> tuple[str, str]:
    """Source and target databases whose orders all fall on 2026-02-01, one of them missing
    from the target."""
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET updated_at = timestamptz '2026-02-01 12:00Z'")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id = 10")
    return source, target


def test_auto_repair_decides_runs_made_before_partitions_came_or_went(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A run recorded under a day sent its day to a job without partitions, and a run of the
    whole table none to a partitioned job: either request made the tick fail, on every tick."""
    source, target = _one_day_one_missing(new_db)
    daily = {"daily": {"start": "2026-02-01"}}
    instance = dg.DagsterInstance.ephemeral()
    for before, after in [(daily, None), (None, daily)]:
        limited = {"auto_repair": {"max_differences": 20}}
        defs, assets = _defs(write_config(tmp_path, state_db, source, target, **limited,
                                          **({"partitions": before} if before else {})))
        sensor = defs.resolve_sensor_def("auto_repair_orders")
        idle = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
        assert dg.materialize(assets, selection=[differences_key("orders")], instance=instance,
                              partition_key="2026-02-01" if before else None).success
        run_id = _run_ids_in_state(state_db)[-1]
        defs, _ = _defs(write_config(tmp_path, state_db, source, target, **limited,
                                     **({"partitions": after} if after else {})))
        tick = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=defs, cursor=idle.cursor))
        if after is None:  # the day's run is backfilled as a run, with no day
            (request,) = tick.run_requests or []
            assert request.partition_key is None and _run_ids(tick) == [run_id]
            # ... unless a run of the whole table came after it
            assert dg.materialize(_defs(write_config(tmp_path, state_db, source, target,
                                                     **limited))[1],
                                  selection=[differences_key("orders")],
                                  instance=instance).success
            newer = _run_ids_in_state(state_db)[-1]
            again = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
                dg.build_sensor_context(instance=instance, definitions=defs,
                                        cursor=idle.cursor))
            assert _run_ids(again) == [newer], again.skip_message
        else:
            assert not tick.run_requests
            assert tick.skip_message == (
                f"run {run_id} of orders covered the whole table, not one of its days: "
                f"backfill it by hand if it still needs it (trueup backfill orders --run "
                f"{run_id}, or backfill_orders_unpartitioned with run_id {run_id})"), \
                tick.skip_message


def test_auto_repair_skips_a_run_of_a_day_the_partitions_no_longer_have(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The partitions' start moved past a day with a run to decide: the tick requested a
    backfill of a partition the job no longer has and failed, on every tick after it."""
    source, target = _one_day_one_missing(new_db)
    instance = dg.DagsterInstance.ephemeral()
    limited = {"auto_repair": {"max_differences": 20}}
    defs, assets = _defs(write_config(tmp_path, state_db, source, target, **limited,
                                      partitions={"daily": {"start": "2026-01-01"}}))
    idle = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs))
    assert dg.materialize(assets, selection=[differences_key("orders")], instance=instance,
                          partition_key="2026-02-01").success
    run_id = _run_ids_in_state(state_db)[-1]
    defs, _ = _defs(write_config(tmp_path, state_db, source, target, **limited,
                                 partitions={"daily": {"start": "2026-03-01"}}))
    tick = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs, cursor=idle.cursor))
    assert not tick.run_requests
    assert tick.skip_message == (
        f"run {run_id} of orders covered 2026-02-01, no longer one of its days (they start "
        f"2026-03-01): backfill it by hand if it still needs it (trueup backfill orders --run "
        f"{run_id})")
    assert tick.cursor is not None and int(tick.cursor) > int(idle.cursor or 0)


def _run_ids(tick: dg.SensorExecutionData) -> list[int]:
    return [r.run_config["ops"][repairs_op_name("orders")]["config"]["run_id"]
            for r in tick.run_requests or []]


def _run_ids_in_state(state_db: str) -> list[int]:
    with psycopg.connect(state_db) as conn:
        return [r[0] for r in conn.execute("SELECT run_id FROM trueup.runs ORDER BY run_id")]


def _diff_then_tick(defs: dg.Definitions, assets: list[Any], instance: dg.DagsterInstance,
                    cursor: str | None) -> dg.SensorExecutionData:
    """Materialize the differences (one run), then one tick of the auto-repair sensor."""
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success
    return defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor))


def _backfills(state_db: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(state_db) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT backfill_id, status FROM trueup.backfills ORDER BY backfill_id")]


#: A target that refuses every write: each chunk of a backfill fails.
REFUSE_WRITES = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'copy is read-only today'; END $$;
CREATE TRIGGER refuse BEFORE INSERT OR UPDATE OR DELETE ON public.copy
    FOR EACH ROW EXECUTE FUNCTION refuse();
"""


def test_auto_repair_pauses_after_a_failed_backfill_until_it_is_resumed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a chunk fails the backfill at its first error (not after 5 attempts and 15 s of backoff)
    monkeypatch.setattr(repairs, "WorkerOptions", functools.partial(
        WorkerOptions, retry=RetryPolicy(max_attempts=1)))
    defs, assets, instance, target = _auto_repaired(new_db, state_db, tmp_path)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(REFUSE_WRITES)
    tick = _diff_then_tick(defs, assets, instance, None)
    (request,) = tick.run_requests or []
    assert not dg.materialize(assets, selection=[repairs_key("orders")], instance=instance,
                              run_config=request.run_config, raise_on_error=False).success
    ((backfill_id, status),) = _backfills(state_db)
    assert status == "failed"
    with psycopg.connect(state_db, autocommit=True) as conn:  # a dry run repairs nothing
        conn.execute("INSERT INTO trueup.backfills (reconciliation, scope, status, chunk_size, "
                     "dry_run) VALUES ('orders', 'all', 'succeeded', 100, true)")

    # the next run finds the same differences: no backfill that would fail the same way
    tick = _diff_then_tick(defs, assets, instance, tick.cursor)
    assert not tick.run_requests, "a backfill was launched after the last one failed"
    message = tick.skip_message or ""
    assert f"backfill {backfill_id} failed (chunk 0: copy is read-only today)" in message, message
    assert f"`trueup backfill --resume {backfill_id}`" in message, message
    assert len(_backfills(state_db)) == 2

    # fixed and resumed: the auto-repair carries on with the next run's differences
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse ON public.copy")
        conn.execute("DELETE FROM public.copy WHERE order_id = 200")
    config = load_config(tmp_path / "trueup.yaml")
    assert resume_backfill(config, backfill_id).status is BackfillStatus.SUCCEEDED
    tick = _diff_then_tick(defs, assets, instance, tick.cursor)
    assert len(tick.run_requests or []) == 1, tick.skip_message


def test_auto_repair_waits_while_a_backfill_of_the_reconciliation_is_active(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    defs, assets, instance, _ = _auto_repaired(new_db, state_db, tmp_path)
    with psycopg.connect(state_db, autocommit=True) as conn:  # someone's `trueup backfill`
        row = conn.execute("INSERT INTO trueup.backfills (reconciliation, scope, status, "
                           "chunk_size) VALUES ('orders', 'all', 'running', 100) "
                           "RETURNING backfill_id").fetchone()
    assert row is not None
    tick = _diff_then_tick(defs, assets, instance, None)
    assert not tick.run_requests, "a backfill was launched while another one runs"
    message = tick.skip_message or ""
    assert f"backfill {row[0]} is still running" in message, message
    assert f"`trueup backfill --resume {row[0]}`" in message, message

    # Held, not skipped for good (the cursor moved past it: its differences waited for the
    # next diff, never for a partition's past day): launched once the backfill is done.
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE trueup.backfills SET status = 'succeeded' WHERE backfill_id = %s",
                     (row[0],))
    again = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs, cursor=tick.cursor))
    assert _run_ids(again) == _run_ids_in_state(state_db)


def test_circuit_breaker_of_the_newest_run_holds_back_the_older_runs_of_its_tick(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    defs, assets, instance, target = _auto_repaired(new_db, state_db, tmp_path)
    idle = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs))
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success  # 9 differences: repairable alone
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM public.copy WHERE order_id <= 100")
    tick = _diff_then_tick(defs, assets, instance, idle.cursor)  # 102: more than 20
    with psycopg.connect(state_db) as conn:
        first, second = (r[0] for r in conn.execute(
            "SELECT run_id FROM trueup.runs ORDER BY run_id"))
    assert not tick.run_requests, (
        f"run {first}'s backfill was launched although run {second} opened the breaker")
    message = tick.skip_message or ""
    assert message.startswith(f"circuit breaker: run {second} of orders found 102 "
                              "differences, more than auto_repair.max_differences (20)"), message
    assert f"run {first} of orders needs no backfill: a newer run of the table decides" \
        in message, message


def _orders_of_two_days(new_db: Callable[[], str], deleted: str) -> tuple[str, str]:
    """Source and target of 300 orders, 1-150 updated on 2026-02-01 and the rest the next
    day, the target's rows ``deleted`` (a WHERE clause) gone."""
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET updated_at = CASE WHEN id <= 150 "
                     "THEN timestamptz '2026-02-01 12:00Z' ELSE timestamptz '2026-02-02 12:00Z' "
                     "END")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"DELETE FROM public.copy WHERE {deleted}")
    return source, target


def _two_days_diffed(new_db: Callable[[], str], state_db: str, tmp_path: Path,
                     deleted: str) -> tuple[dg.Definitions, dg.DagsterInstance,
                                            dg.SensorExecutionData]:
    """A reconciliation by day (orders 1-150 on 2026-02-01, the rest the next day) with
    auto_repair (20 at most), target rows ``deleted`` (a WHERE clause) gone, the sensor's first
    tick, then both days diffed: the definitions, the instance and that first tick."""
    source, target = _orders_of_two_days(new_db, deleted)
    config = write_config(tmp_path, state_db, source, target, auto_repair={
        "max_differences": 20}, partitions={"daily": {"start": "2026-02-01"}})
    defs, assets = _defs(config)
    instance = dg.DagsterInstance.ephemeral()
    idle = defs.resolve_sensor_def("auto_repair_orders").evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=defs))
    for day in ("2026-02-01", "2026-02-02"):
        assert dg.materialize(assets, selection=[differences_key("orders")], instance=instance,
                              partition_key=day).success
    return defs, instance, idle


def test_circuit_breaker_on_one_day_holds_back_only_that_day_s_runs_not_another_day_s(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A breaker that opened on one day held back the other days' runs of its tick, and the
    cursor moved past them: their differences were never repaired."""
    # 1 difference on the first day, 30 the next
    defs, instance, idle = _two_days_diffed(
        new_db, state_db, tmp_path, "order_id = 10 OR order_id BETWEEN 200 AND 229")
    first_day, second_day = _run_ids_in_state(state_db)
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                        cursor=idle.cursor))
    assert _run_ids(tick) == [first_day], (
        f"expected the backfill of run {first_day} (2026-02-01) beside the breaker of run "
        f"{second_day} (2026-02-02): {tick.skip_message}")
    assert [r.partition_key for r in tick.run_requests or []] == ["2026-02-01"]
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                         cursor=tick.cursor))
    assert not again.run_requests
    message = again.skip_message or ""
    assert message == (f"circuit breaker: run {second_day} of orders found 30 differences, "
                       f"more than auto_repair.max_differences (20); not repairing "
                       f"automatically"), message

    # a run of the day that tripped it, in the same tick, is held back with it
    target = load_config(tmp_path / "trueup.yaml").connections["copy"].postgres
    assert target is not None
    with psycopg.connect(target, autocommit=True) as conn:  # someone repaired most of it
        conn.execute("INSERT INTO public.copy SELECT g, 2, 'paid', g * 1.25 "
                     "FROM generate_series(200, 225) g")
    assert dg.materialize(_defs(load_config(tmp_path / "trueup.yaml"))[1],
                          selection=[differences_key("orders")], instance=instance,
                          partition_key="2026-02-02").success
    newer = _run_ids_in_state(state_db)[-1]
    held = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                        cursor=tick.cursor))
    assert not held.run_requests, f"run {newer} was launched beside run {second_day}'s breaker"
    assert f"held back with run {second_day}: the backfill of run {newer}" in (
        held.skip_message or ""), held.skip_message


def test_backfill_job_refuses_non_positive_workers_chunk_size_and_rate_before_planning(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 30)
    drift(target)
    config = write_config(tmp_path, state_db, source, target)
    job = _defs(config)[0].resolve_job_def("backfill_orders")
    for field, value, expected in [
            ("workers", 0, f"workers: expected 1 to {MAX_WORKERS} (got 0); more processes "
                           f"serve one backfill together beyond that"),
            ("chunk_size", 0, "chunk_size: expected a positive integer (got 0)"),
            ("rate", -1.0, "rate: expected a positive number of rows per second (got -1.0)"),
            ("rate", math.nan, "rate: expected a positive number of rows per second (got nan)")]:
        _assert_refused(job, {"scope": "all", field: value}, None, expected)
    _assert_no_backfill(state_db)


def _assert_refused(job: Any, form: dict[str, Any], partition: str | None,
                    expected: str) -> None:
    """A launch of backfill job ``job`` with launchpad ``form`` fails with ``expected``."""
    op = repairs_op_name("orders", by_day=job.name == "backfill_orders")
    result = job.execute_in_process(raise_on_error=False, partition_key=partition,
                                    run_config={"ops": {op: {"config": form}}})
    assert not result.success, f"{form} was accepted"
    (failure,) = result.get_step_failure_events()
    user = failure.step_failure_data.user_failure_data
    assert user is not None and user.description == expected, failure.step_failure_data


def _assert_no_backfill(state_db: str) -> None:
    with psycopg.connect(state_db) as conn:
        left = conn.execute("SELECT backfill_id, status FROM trueup.backfills").fetchall()
    assert left == [], f"a refused launch left backfills behind: {left}"


def test_launchpad_run_id_and_partition_that_contradict_the_launch_fail_in_one_line(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """run_id 0 (read as no run_id) failed on the backfills' foreign key with a traceback; a
    partition in the form backfilled another day than the one materialized."""
    source, target = new_db(), new_db()
    make_tables(source, target, 30)
    config = write_config(tmp_path, state_db, source, target,
                          partitions={"daily": {"start": "2026-02-01"}})
    defs = _defs(config)[0]
    job, whole = (defs.resolve_job_def(n) for n in ("backfill_orders",
                                                    "backfill_orders_unpartitioned"))
    launch_only = "only scope run repairs one run's differences"
    for form, partition, expected in [
            ({"run_id": 0}, "2026-02-01",
             f"run_id: {launch_only} (scope is partition; set scope run, or leave run_id empty)"),
            ({"scope": "all", "run_id": 0}, None,
             f"run_id: {launch_only} (scope is all; set scope run, or leave run_id empty)"),
            ({"partition": "2026-02-09"}, "2026-02-01",
             "partition: this run materializes partition 2026-02-01; leave partition empty, "
             "or launch partition 2026-02-09 (got '2026-02-09')"),
            ({"scope": "run", "run_id": 0}, "2026-02-01", "backfill orders: no run 0")]:
        _assert_refused(job if partition else whole, form, partition, expected)
    _assert_no_backfill(state_db)
    # an empty field is no partition: the day launched is backfilled
    result = job.execute_in_process(partition_key="2026-02-01", run_config={"ops": {
        repairs_op_name("orders"): {"config": {"partition": ""}}}})
    assert result.success


def test_a_launched_partition_refuses_a_backfill_of_another_day_s_run(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Partition 2026-02-02 launched with scope run and a run of 2026-02-01 backfilled that
    run, recorded as 2026-02-02 repaired. (Scope all covers the day: the whole table.)"""
    source, target = _orders_of_two_days(new_db, "order_id IN (10, 200)")
    config = write_config(tmp_path, state_db, source, target,
                          partitions={"daily": {"start": "2026-02-01"}})
    defs, assets = _defs(config)
    for day in ("2026-02-01", None):  # a run of the first day, then one of the whole table
        assert dg.materialize(assets, selection=[differences_key("orders")],
                              partition_key=day).success
    day_run, table_run = _run_ids_in_state(state_db)
    job = defs.resolve_job_def("backfill_orders")
    for form, expected in [
            ({"scope": "run", "run_id": day_run},
             f"run_id: run {day_run} diffed partition 2026-02-01, and this run materializes "
             f"partition 2026-02-02; launch partition 2026-02-01, or set scope partition "
             f"(got {day_run})"),
            ({"scope": "run", "run_id": table_run},
             f"run_id: run {table_run} diffed the whole table, and this run materializes "
             f"partition 2026-02-02; launch no partition, or set scope partition "
             f"(got {table_run})")]:
        _assert_refused(job, form, "2026-02-02", expected)
    _assert_no_backfill(state_db)
    # the run's own day is backfilled under it
    result = job.execute_in_process(partition_key="2026-02-01", run_config={"ops": {
        repairs_op_name("orders"): {"config": {"scope": "run", "run_id": day_run}}}})
    (materialization,) = result.asset_materializations_for_node(repairs_op_name("orders"))
    assert materialization.partition == "2026-02-01"
    assert materialization.metadata["rows_repaired"].value == 1
    # the whole table covers the day: what is left (order 200, of the next day) is repaired
    result = job.execute_in_process(partition_key="2026-02-01", run_config={"ops": {
        repairs_op_name("orders"): {"config": {"scope": "all"}}}})
    (materialization,) = result.asset_materializations_for_node(repairs_op_name("orders"))
    assert materialization.metadata["rows_repaired"].value == 1


def test_a_partitioned_reconciliation_s_unpartitioned_backfill_job_backfills_what_its_form_asks(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Launched without a partition, the backfill job of a partitioned reconciliation failed
    with Dagster's "Cannot access partition_key for a non-partitioned run" once the
    differences had a materialization (Dagster reads the partitioned upstream's version): a
    backfill of no one day has a job (and an unpartitioned repairs asset) of its own."""
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    config = write_config(tmp_path, state_db, source, target,
                          partitions={"daily": {"start": "2026-02-01"}})
    defs, assets = _defs(config)
    by_day = defs.resolve_job_def("backfill_orders")
    refused = by_day.execute_in_process(raise_on_error=False)  # no partition
    assert [e.step_failure_data.error.message for e in refused.get_step_failure_events()
            ] == ["dagster._core.definitions.events.Failure: backfill_orders backfills one "
                  "day, its partition: launch it for a day, or launch "
                  "backfill_orders_unpartitioned for a run of the whole table, a day given in "
                  "partition, or the whole table\n"]
    instance = dg.DagsterInstance.ephemeral()
    for day in ("2026-02-01", None):
        assert dg.materialize(assets, selection=[differences_key("orders")], instance=instance,
                              partition_key=day).success
    job = defs.resolve_job_def("backfill_orders_unpartitioned")
    op = repairs_op_name("orders", by_day=False)
    for form in [{"dry_run": True}, {"scope": "partition", "partition": "2026-02-01"}]:
        result = job.execute_in_process(raise_on_error=False, instance=instance,
                                        run_config={"ops": {op: {"config": form}}})
        assert result.success, [e.step_failure_data.error for e in
                                result.get_step_failure_events()]
        (materialization,) = result.asset_materializations_for_node(op)
        assert materialization.partition is None
        assert materialization.asset_key == repairs_key("orders", by_day=False)
    with psycopg.connect(state_db) as conn:
        planned = conn.execute("SELECT scope, partition, dry_run, status FROM trueup.backfills "
                               "ORDER BY backfill_id").fetchall()
    assert [tuple(r) for r in planned] == [("all", None, True, "succeeded"),
                                           ("partition", "2026-02-01", False, "succeeded")]


def test_a_stopped_backfill_run_cancels_its_backfill_so_the_next_launch_can_start(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Dagster run terminated mid-way left its backfill running with nobody serving it:
    every later launch failed ("already running"), and the auto-repair waited for ever."""
    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    config = write_config(tmp_path, state_db, source, target)
    job = _defs(config)[0].resolve_job_def("backfill_orders")

    def stopped_after_a_chunk(config: Config, name: str, options: Any, worker: Any,
                              progress: Any) -> Any:
        def then_stop(*done: Any) -> None:
            progress(*done)
            # Terminating a run signals its process, and Dagster raises the interruption in
            # the step's thread; this worker claims no chunk after it
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            deadline = time.monotonic() + 10
            while _backfills(state_db)[-1][1] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
        return start_backfill(config, name, options, worker, then_stop)

    monkeypatch.setattr(repairs, "start_backfill", stopped_after_a_chunk)
    run_config = {"ops": {repairs_op_name("orders"): {"config": {"scope": "all",
                                                                 "chunk_size": 100}}}}
    stopped = job.execute_in_process(run_config=run_config, raise_on_error=False)
    monkeypatch.undo()
    assert not stopped.success
    ((backfill_id, status),) = _backfills(state_db)
    assert status == "cancelled", f"backfill {backfill_id} of the stopped run is {status}"
    with psycopg.connect(state_db) as conn:
        chunks: dict[str, int] = dict(conn.execute(
            "SELECT status, count(*) FROM trueup.chunks WHERE backfill_id = %s GROUP BY status",
            (backfill_id,)).fetchall())
    assert chunks == {"done": 1, "cancelled": 3}, chunks

    # a fresh launch starts, and the stopped backfill still resumes its unfinished chunks
    assert job.execute_in_process(run_config=run_config).success
    resumed = resume_backfill(load_config(tmp_path / "trueup.yaml"), backfill_id)
    assert (resumed.status, resumed.chunks_done) == (BackfillStatus.SUCCEEDED, 4)


def test_auto_repair_launches_one_backfill_a_tick_and_each_partition_s_in_turn(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A schedule's first tick of a day diffs yesterday and today: both runs were launched in
    one tick, the second backfill failed at once ("another backfill is running") and its
    partition's differences were never repaired."""
    defs, instance, idle = _two_days_diffed(new_db, state_db, tmp_path,
                                            "order_id IN (10, 200)")  # one a day
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    first_day, second_day = _run_ids_in_state(state_db)

    ticks = [idle]
    for _ in range(3):
        ticks.append(sensor.evaluate_tick(dg.build_sensor_context(
            instance=instance, definitions=defs, cursor=ticks[-1].cursor)))
    assert [_run_ids(t) for t in ticks[1:]] == [[first_day], [second_day], []]
    assert [r.partition_key for t in ticks[1:3] for r in t.run_requests or []] == [
        "2026-02-01", "2026-02-02"]


def test_auto_repair_waits_for_a_launched_backfill_run_not_yet_in_the_state(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A backfill job run queued or starting has no backfill row yet: launching another
    beside it made one of the two fail."""
    defs, assets, instance, _ = _auto_repaired(new_db, state_db, tmp_path)
    launched = instance.create_run_for_job(defs.resolve_job_def("backfill_orders"),
                                           status=dg.DagsterRunStatus.STARTING)
    tick = _diff_then_tick(defs, assets, instance, None)
    assert not tick.run_requests
    message = tick.skip_message or ""
    assert f"run {launched.run_id} of backfill_orders is starting" in message, message
    instance.report_run_canceled(launched)
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    again = sensor.evaluate_tick(dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=tick.cursor))
    assert len(again.run_requests or []) == 1, again.skip_message


def _backfill_job(config_path: str) -> dg.JobDefinition:
    """Job backfill_orders of ``config_path``, run in process: rebuilt by Dagster to re-execute
    a run (see dg.build_reconstructable_job)."""
    config = load_config(config_path)
    repairs = repair_definitions(config)
    defs = dg.Definitions(
        assets=[*external_assets(config), *(r.asset for r in reconciliation_definitions(config)),
                *repairs.assets],
        jobs=repairs.jobs, executor=dg.in_process_executor)
    return defs.resolve_job_def("backfill_orders")


def test_a_re_executed_run_continues_the_backfill_its_dead_run_left_running(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/dagster.yaml retries failed runs; the retry planned anew, met the backfill its
    dead run left running ("already running") and failed. It now continues that one, and only
    that one: a run that is not its retry still meets it as any second caller does."""
    from trueup.backfill import BackfillOptions
    from trueup.backfill.planner import plan
    from trueup.state import open_state
    from trueup.statuses import BackfillScope

    source, target = new_db(), new_db()
    make_tables(source, target, 300)
    drift(target)
    write_config(tmp_path, state_db, source, target)
    job = dg.build_reconstructable_job("tests.e2e.test_dagster_repairs", "_backfill_job",
                                       reconstructable_args=(str(tmp_path / "trueup.yaml"),))
    run_config = {"ops": {repairs_op_name("orders"): {
        "config": {"scope": "all", "chunk_size": 100}}}}

    def dies_after_planning(config: Config, name: str, options: Any, *_: Any) -> Any:
        with open_state(config.state) as state:
            state.autocommit = True
            plan(config, name, options, state)
        raise RuntimeError("the run's process died")

    with dg.instance_for_test() as instance:
        monkeypatch.setattr(repairs, "start_backfill", dies_after_planning)
        first = dg.execute_job(job, instance, run_config=run_config, raise_on_error=False)
        monkeypatch.undo()
        assert not first.success
        with psycopg.connect(state_db) as conn:
            left = conn.execute("SELECT backfill_id, launched_by FROM trueup.backfills "
                                "WHERE status = 'running'").fetchall()
        assert [b for _, b in left] == [first.run_id]

        other = dg.execute_job(job, instance, run_config=run_config, raise_on_error=False)
        assert not other.success  # not a retry of the first: "already running; resume it"

        retried = dg.execute_job(job, instance, raise_on_error=False,
                                 reexecution_options=dg.ReexecutionOptions.from_failure(
                                     first.run_id, instance))
        assert retried.success
        (materialization,) = retried.asset_materializations_for_node(repairs_op_name("orders"))
        meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        assert (meta["backfill_id"], meta["status"]) == (left[0][0], "succeeded")

        # someone's `trueup backfill` runs: a run that met it, retried, does not join it
        with open_state(state_db) as state:
            state.autocommit = True
            cli = plan(load_config(tmp_path / "trueup.yaml"), "orders",
                       BackfillOptions(scope=BackfillScope.ALL, chunk_size=100), state)
        refused = dg.execute_job(job, instance, run_config=run_config, raise_on_error=False)
        assert not refused.success
        again = dg.execute_job(job, instance, raise_on_error=False,
                               reexecution_options=dg.ReexecutionOptions.from_failure(
                                   refused.run_id, instance))
        assert not again.success
        with psycopg.connect(state_db) as conn:
            chunks = conn.execute("SELECT count(*) FILTER (WHERE status = 'done') FROM "
                                  "trueup.chunks WHERE backfill_id = %s", (cli,)).fetchone()
        assert chunks == (0,), "a retried run served someone else's backfill"
    fixed = {r[0]: r for r in target_rows(target)}
    assert all(fixed[r[0]] == r for r in source_rows(source) if r[0] != 8)
