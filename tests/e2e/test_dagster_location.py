"""The Dagster code location: it validates, and a real ``dagster dev`` lists its assets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from assets.repairs import repairs_key
from tests.e2e.conftest import DAGSTER, REPO, dagster_dev, dagster_env, graphql, wait_for

EXAMPLE = REPO / "examples" / "trueup.yaml"

pytestmark = pytest.mark.dagster

EXPECTED_ASSETS = {
    ("postgres", "shop", "public", "orders"),          # shared by both reconciliations
    ("postgres", "billing", "billing", "invoices"),
    ("kafka", "bus", "orders_v1"),
    ("kafka", "bus", "orders_v1_dlq"),
    ("rabbitmq", "amqp", "payments_settle_dlq"),
    ("trueup", "orders_events", "differences"),
    ("trueup", "orders_invoices", "differences"),
}


def test_definitions_validate_passes(tmp_path: Path) -> None:
    done = subprocess.run([DAGSTER, "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=REPO, env=dagster_env(tmp_path, EXAMPLE), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All code locations passed validation" in done.stderr + done.stdout


def test_definitions_share_one_node_per_physical_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # the example's config while the module loads; not left set for later test files
    monkeypatch.setenv("TRUEUP_CONFIG", str(EXAMPLE))
    from pipelines.definitions import defs

    keys = {tuple(k.path) for k in defs.resolve_all_asset_keys()}
    assert keys >= EXPECTED_ASSETS, EXPECTED_ASSETS - keys
    orders = [k for k in keys if k[-1] == "orders"]
    assert orders == [("postgres", "shop", "public", "orders")]


def test_every_job_runs_its_step_in_the_runs_own_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Dagster's multiprocess default each job's one step loaded the whole code location
    again in a process of its own: seconds of CPU for every run."""
    monkeypatch.setenv("TRUEUP_CONFIG", str(EXAMPLE))
    from pipelines.definitions import defs

    executors = {j.name: j.executor_def.name for j in defs.resolve_all_job_defs()}
    assert {"reconcile_orders_events", "backfill_orders_invoices",
            "replay_payments_dlq"} <= set(executors)
    assert set(executors.values()) == {"in_process"}, executors


def test_every_run_of_a_reconciliation_or_queue_is_limited_by_deploy_s_run_queue(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only runs the sensors requested carried the tags deploy/dagster.yaml limits: a
    schedule's, the launchpad's or a partition backfill's ran side by side, and every day of
    a partition backfill of repairs but one failed on the active backfill."""
    monkeypatch.setenv("TRUEUP_CONFIG", str(EXAMPLE))
    from pipelines.definitions import defs

    def limited(instance: Path) -> set[str]:
        concurrency = yaml.safe_load(instance.read_text())["concurrency"]
        assert concurrency["pools"] == {"default_limit": 1}, instance
        limits = concurrency["runs"]["tag_concurrency_limits"]
        return {limit["key"] for limit in limits
                if limit["value"] == {"applyLimitPerUniqueValue": True} and limit["limit"] == 1}

    # tags, not only run_tags: a launchpad run or a job's partition backfill takes the job's
    # tags and nothing else
    tags = {j.name: j.tags for j in defs.resolve_all_job_defs()}
    expected = {
        **{f"{kind}_{name}": {"trueup/reconciliation": name} for kind in ("reconcile", "backfill")
           for name in ("orders_events", "orders_invoices")},
        **{f"{kind}_{name}": {"trueup/dead_letters": name} for kind in ("dead_letters", "replay")
           for name in ("orders_dlq", "payments_dlq")}}
    assert {name: tags.get(name) for name in expected} == expected
    # an asset page's partition backfill runs in Dagster's own job: the pool holds its days
    pools = {name: defs.resolve_assets_def(repairs_key(name)).op.pool
             for name in ("orders_events", "orders_invoices")}
    assert pools == {name: f"trueup_backfill_{name}" for name in pools}
    for instance in (REPO / "deploy" / "dagster.yaml", REPO / "examples" / "dagster.yaml"):
        assert limited(instance) == {"trueup/reconciliation", "trueup/dead_letters"}, instance


def test_dagster_dev_serves_the_example_assets(tmp_path: Path) -> None:
    with dagster_dev(tmp_path, EXAMPLE) as url:
        def listed() -> set[tuple[str, ...]] | None:
            nodes = graphql(url, "{ assetNodes { assetKey { path } } }")["assetNodes"]
            keys = {tuple(n["assetKey"]["path"]) for n in nodes}
            return keys if keys >= EXPECTED_ASSETS else None  # the location may still load

        wait_for("the example assets", listed)
