"""GX 1.x suites against the real Postgres, as Dagster asset checks; freshness and blocking
checks read from trueup's state."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from assets.external import external_assets
from assets.freshness import freshness_definitions
from assets.keys import table_key
from checks.gx import quality_definitions
from trueup.checks import failed_blocking_checks, freshness, record_check_results
from trueup.config import Config, load_config
from trueup.quality import load_suite, validate_suite
from trueup.statuses import CheckSeverity

pytestmark = [pytest.mark.postgres]

SUITE = {
    "connection": "shop", "table": "public.orders",
    "expectations": [
        {"type": "expect_column_values_to_be_between",
         "kwargs": {"column": "amount_cents", "min_value": 0}},
        {"type": "expect_column_values_to_be_in_set",
         "kwargs": {"column": "currency", "value_set": ["EUR", "USD"]}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "status"},
         "severity": "WARN"},
    ],
}


def _shop(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text, amount_cents bigint, currency text, updated_at timestamptz)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'new', 100 * g, "
                     "CASE WHEN g % 2 = 0 THEN 'EUR' ELSE 'USD' END, now() "
                     "FROM generate_series(1, 40) g")
        conn.execute("UPDATE public.orders SET amount_cents = -1 WHERE id IN (3, 7)")
        conn.execute("UPDATE public.orders SET currency = 'GBP' WHERE id = 5")


def _setup(new_db: Callable[[], str], state_db: str, tmp_path: Path) -> tuple[Config, Path, str]:
    shop, copy = new_db(), new_db()
    _shop(shop)
    with psycopg.connect(copy, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "orders.yaml").write_text(yaml.safe_dump(SUITE))
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state_db,
        "connections": {"shop": {"postgres": shop}, "copy": {"postgres": copy}},
        "reconciliations": {"orders": {
            "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                       "version": "version", "columns": ["status"]},
            "target": {"connection": "copy", "table": "public.copy", "key": ["id"],
                       "version": "version", "columns": ["status"]},
            "schedule": "*/30 * * * *"}}}))
    return load_config(path), suites, shop


def test_gx_suite_reports_unexpected_count_percent_and_sample_against_postgres(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    _, suites, shop = _setup(new_db, state_db, tmp_path)
    suite = load_suite(suites / "orders.yaml")
    outcomes = {o.name: o for o in validate_suite(suite, shop)}
    amount = outcomes["amount_cents__be_between"]
    assert (amount.passed, amount.unexpected_count, amount.unexpected_percent) == (
        False, 2, 5.0)
    assert amount.sample == [-1, -1]
    assert outcomes["currency__be_in_set"].sample == ["GBP"]
    assert outcomes["status__not_be_null"].passed
    assert outcomes["status__not_be_null"].severity is CheckSeverity.WARN


def test_gx_checks_run_in_dagster_on_the_table_asset_and_are_stored_in_state(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, suites, shop = _setup(new_db, state_db, tmp_path)
    quality = quality_definitions(config, suites)
    defs = dg.Definitions(assets=external_assets(config), asset_checks=quality.checks,
                          jobs=quality.jobs)
    job = defs.resolve_job_def("quality_shop_public_orders")

    result = job.execute_in_process()
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    amount = evaluations["amount_cents__be_between"]
    assert amount.asset_key == table_key("shop", "public.orders")
    assert not amount.passed and amount.severity is dg.AssetCheckSeverity.ERROR
    assert amount.metadata["unexpected_count"].value == 2
    assert amount.metadata["unexpected_percent"].value == 5.0
    assert amount.metadata["unexpected_sample"].value == [-1, -1]

    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET amount_cents = 1, currency = 'EUR' "
                     "WHERE amount_cents < 0 OR currency = 'GBP'")
    result = job.execute_in_process()
    assert all(e.passed for e in result.get_asset_check_evaluations())

    with psycopg.connect(state_db) as conn:
        stored = conn.execute(
            "SELECT check_name, passed, metadata->'unexpected_count' FROM trueup.check_results "
            "WHERE asset_key = %s AND check_name = 'amount_cents__be_between' "
            "ORDER BY check_result_id", ("postgres/shop/public/orders",)).fetchall()
    assert stored == [("amount_cents__be_between", False, 2),
                      ("amount_cents__be_between", True, 0)]


def test_a_suite_that_cannot_run_records_its_checks_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """A suite that errored (table renamed, no permission, server down) recorded nothing: its
    last results, passed ones too, stood in `trueup status` and did not block auto-repair."""
    config, suites, shop = _setup(new_db, state_db, tmp_path)
    quality = quality_definitions(config, suites)
    job = dg.Definitions(assets=external_assets(config), asset_checks=quality.checks,
                         jobs=quality.jobs).resolve_job_def("quality_shop_public_orders")
    assert job.execute_in_process().success
    with psycopg.connect(shop, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders RENAME TO orders_old")
    assert not job.execute_in_process(raise_on_error=False).success
    with psycopg.connect(state_db) as conn:
        latest = conn.execute(
            "SELECT DISTINCT ON (check_name) check_name, passed, severity, "
            "metadata->>'error' LIKE '%%orders%%' FROM trueup.check_results "
            "WHERE asset_key = %s ORDER BY check_name, check_result_id DESC",
            ("postgres/shop/public/orders",)).fetchall()
    assert latest == [("amount_cents__be_between", False, "ERROR", True),
                      ("currency__be_in_set", False, "ERROR", True),
                      ("status__not_be_null", False, "WARN", True)]
    assert failed_blocking_checks(state_db, "trueup/orders/differences", 0, [],
                                  ["postgres/shop/public/orders"]) != []


def test_an_expectation_that_raises_reports_one_line(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The whole SQLAlchemy message went into the check's description and error: the failed
    statement and its parameters, over many lines."""
    _, suites, shop = _setup(new_db, state_db, tmp_path)
    (suites / "orders.yaml").write_text(yaml.safe_dump({**SUITE, "expectations": [
        {"type": "expect_column_values_to_be_in_set",  # a text column against a date
         "kwargs": {"column": "currency", "value_set": [dt.date(2026, 1, 1)]}}]}))
    (outcome,) = validate_suite(load_suite(suites / "orders.yaml"), shop)
    assert not outcome.passed and outcome.error, outcome
    assert "\n" not in outcome.error and "operator does not exist" in outcome.error, outcome.error


def test_freshness_fails_until_a_run_succeeds_since_the_second_to_last_tick(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config, _, _ = _setup(new_db, state_db, tmp_path)
    now = dt.datetime.now(dt.UTC)
    assert not freshness(state_db, "orders", "*/30 * * * *").fresh  # never ran
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("INSERT INTO trueup.runs (reconciliation, status, started_at, finished_at) "
                     "VALUES ('orders', 'succeeded', %s, %s)",
                     (now - dt.timedelta(minutes=61), now - dt.timedelta(minutes=61)))
    stale = freshness(state_db, "orders", "*/30 * * * *")
    # due since the second-to-last tick: 30 to 60 minutes ago
    assert not stale.fresh and 1800 < stale.max_age_seconds <= 3600
    # a run of an old day, by hand, is not the schedule's (it made the check pass)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("INSERT INTO trueup.runs (reconciliation, partition, status, started_at, "
                     "finished_at) VALUES ('orders', '2026-02-01', 'succeeded', now(), now())")
    assert not freshness(state_db, "orders", "*/30 * * * *").fresh

    fresh = freshness_definitions(config)
    defs = dg.Definitions(assets=external_assets(config), asset_checks=fresh.checks,
                          jobs=fresh.jobs, sensors=fresh.sensors)
    result = defs.resolve_job_def("freshness_orders").execute_in_process()
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "fresh" and not evaluation.passed

    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("INSERT INTO trueup.runs (reconciliation, status, started_at, finished_at) "
                     "VALUES ('orders', 'succeeded', now(), now())")
    (evaluation,) = defs.resolve_job_def("freshness_orders").execute_in_process(
        ).get_asset_check_evaluations()
    assert evaluation.passed
    sensor = defs.resolve_sensor_def("freshness_orders")
    first = sensor.evaluate_tick(dg.build_sensor_context(definitions=defs))
    assert first.run_requests and first.cursor == "fresh"
    again = sensor.evaluate_tick(dg.build_sensor_context(definitions=defs, cursor="fresh"))
    assert not again.run_requests


def _succeeded_run(state_db: str) -> int:
    """The id of a succeeded run of reconciliation ``orders``, made for the test."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        row = conn.execute("INSERT INTO trueup.runs (reconciliation, status) "
                           "VALUES ('orders', 'succeeded') RETURNING run_id").fetchone()
    assert row is not None
    return int(row[0])


def test_blocking_checks_are_unrepairable_run_errors_and_failing_source_table_errors(
        state_db: str) -> None:
    run_id = _succeeded_run(state_db)
    diff_key, table = "trueup/orders/differences", "postgres/shop/public/orders"
    record_check_results(state_db, diff_key, "orders", run_id, [
        ("missing", False, CheckSeverity.ERROR, {}), ("in_flight", False, CheckSeverity.WARN, {}),
        ("ahead", True, CheckSeverity.ERROR, {})])
    repairable = ["missing", "orphan", "stale", "mismatch"]
    assert failed_blocking_checks(state_db, diff_key, run_id, repairable, [table]) == []

    record_check_results(state_db, table, None, None, [
        ("amount__be_between", False, CheckSeverity.ERROR, {}),
        ("status__not_be_null", False, CheckSeverity.WARN, {})])
    record_check_results(state_db, diff_key, "orders", run_id, [
        ("unreadable", False, CheckSeverity.ERROR, {})])
    assert failed_blocking_checks(state_db, diff_key, run_id, repairable, [table]) == [
        f"{table}:amount__be_between", f"{diff_key}:unreadable"]
    # the table's latest result counts: fixed values unblock
    record_check_results(state_db, table, None, None, [
        ("amount__be_between", True, CheckSeverity.ERROR, {})])
    assert failed_blocking_checks(state_db, diff_key, run_id, repairable, [table]) == [
        f"{diff_key}:unreadable"]
    # only the latest suite run counts: a check since removed from the suite (failing when it
    # last ran) blocked for ever, for nothing could record a newer result of it
    record_check_results(state_db, table, None, None, [
        ("currency__be_in_set", False, CheckSeverity.ERROR, {}),
        ("amount__be_between", True, CheckSeverity.ERROR, {})])
    assert f"{table}:currency__be_in_set" in failed_blocking_checks(
        state_db, diff_key, run_id, repairable, [table])
    record_check_results(state_db, table, None, None, [
        ("amount__be_between", True, CheckSeverity.ERROR, {})])
    assert failed_blocking_checks(state_db, diff_key, run_id, repairable, [table]) == [
        f"{diff_key}:unreadable"]


def test_status_lists_every_checks_latest_result_but_those_its_recorder_left_out(
        state_db: str) -> None:
    from trueup.state import open_state
    from trueup.status import status

    run_id = _succeeded_run(state_db)
    diff_key, table = "trueup/orders/differences", "postgres/shop/public/orders"
    record_check_results(state_db, diff_key, "orders", run_id, [
        ("missing", False, CheckSeverity.ERROR, {}), ("in_flight", True, CheckSeverity.WARN, {})])
    record_check_results(state_db, diff_key, "orders", run_id, [
        ("missing", True, CheckSeverity.ERROR, {}), ("in_flight", False, CheckSeverity.WARN, {})])
    # the freshness check records on the same asset, alone: the class checks stay listed
    record_check_results(state_db, diff_key, "orders", None, [
        ("fresh", True, CheckSeverity.ERROR, {})])
    record_check_results(state_db, table, None, None, [
        ("currency__be_in_set", False, CheckSeverity.ERROR, {}),
        ("amount__be_between", True, CheckSeverity.ERROR, {})])
    # the suite lost an expectation: its last (failing) result is no longer listed
    record_check_results(state_db, table, None, None, [
        ("amount__be_between", False, CheckSeverity.ERROR, {})])
    with open_state(state_db) as conn:
        checks = status(conn)["checks"]
    assert [(c["asset_key"], c["check_name"], c["passed"]) for c in checks] == [
        (table, "amount__be_between", False),
        (diff_key, "fresh", True), (diff_key, "in_flight", False), (diff_key, "missing", True)]


@pytest.mark.dagster
def test_a_failed_error_check_on_the_source_table_blocks_the_auto_repair(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    from assets.differences import differences_key, reconciliation_definitions
    from assets.repairs import repair_definitions
    from tests.integration.test_backfill_support import drift, make_tables, write_config

    source, target = new_db(), new_db()
    make_tables(source, target, 100)
    drift(target)
    config = write_config(tmp_path, state_db, source, target,
                          auto_repair={"max_differences": 50})
    repairs = repair_definitions(config)
    assets = [*external_assets(config), *(r.asset for r in reconciliation_definitions(config)),
              *repairs.assets]
    defs = dg.Definitions(assets=assets, jobs=repairs.jobs, sensors=repairs.sensors)
    instance = dg.DagsterInstance.ephemeral()
    record_check_results(state_db, "postgres/shop/public/orders", None, None, [
        ("amount__be_between", False, CheckSeverity.ERROR, {"unexpected_count": 3})])
    assert dg.materialize(assets, selection=[differences_key("orders")],
                          instance=instance).success

    sensor = defs.resolve_sensor_def("auto_repair_orders")
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert not tick.run_requests
    assert tick.skip_message and "blocked" in tick.skip_message
    assert "postgres/shop/public/orders:amount__be_between" in tick.skip_message

    # the suite is gone (no table has one): its last results no longer block
    unchecked = repair_definitions(config, suite_tables=frozenset())
    defs = dg.Definitions(assets=[*assets[:-len(repairs.assets)], *unchecked.assets],
                          jobs=unchecked.jobs, sensors=unchecked.sensors)
    sensor = defs.resolve_sensor_def("auto_repair_orders")
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert tick.run_requests and len(tick.run_requests) == 1, tick.skip_message


def test_a_suite_on_a_mixed_case_table_of_numerics_and_dates_reports_plain_json(
        new_db: Callable[[], str], tmp_path: Path) -> None:
    """GX folded an unquoted "Ledger" to ledger (every run failed: no such relation), and its
    samples of numeric and date values (Decimal, date), like a date written in the suite,
    made Dagster's JSON metadata refuse the whole check step."""
    from checks.gx import check_result

    dsn = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE TABLE public."Ledger" (id bigint PRIMARY KEY, '
                     'amount numeric(10,2), booked date)')
        conn.execute("""INSERT INTO public."Ledger" SELECT g, g * 1.5, DATE '2026-01-01' + g
                        FROM generate_series(1, 20) g""")
        conn.execute('UPDATE public."Ledger" SET amount = -2.50, booked = DATE \'2025-12-01\' '
                     "WHERE id = 4")
    path = tmp_path / "ledger.yaml"
    path.write_text(yaml.safe_dump({
        "connection": "shop", "table": "public.Ledger", "expectations": [
            {"type": "expect_column_values_to_be_between",
             "kwargs": {"column": "amount", "min_value": 0}},
            {"type": "expect_column_values_to_be_between",
             "kwargs": {"column": "booked", "min_value": dt.date(2026, 1, 1)}}]}))
    outcomes = {o.name: o for o in validate_suite(load_suite(path), dsn)}
    amount, booked = outcomes["amount__be_between"], outcomes["booked__be_between"]
    assert (amount.passed, amount.unexpected_count, amount.sample) == (False, 1, ["-2.50"])
    assert (booked.passed, booked.sample) == (False, ["2025-12-01"])
    assert booked.kwargs["min_value"] == "2026-01-01"
    for outcome in outcomes.values():
        result = check_result(table_key("shop", "public.Ledger"), outcome)
        assert result.metadata["unexpected_sample"].value == outcome.sample
