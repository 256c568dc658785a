"""The demo's path, end to end: the example shop runs (orders service, outbox relay, billing
consumer, payments, ledger) with faults injected; through Dagster's GraphQL API, as a user
clicking through the UI would, the checks fail and the dead-letter queues are deep; the fix is
deployed, both queues replayed, both reconciliations backfilled; then every check passes.

The shop runs on databases, topics, an exchange and queues of its own (unique names)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import psycopg
import pytest
import yaml
from confluent_kafka.admin import AdminClient

from examples.shop import procs
from examples.shop.demo import DEMO_FAULTS, start
from examples.shop.deploy import set_feature
from examples.shop.settings import Shop, load_shop
from examples.shop.watch import wait_quiet, wait_until
from tests.e2e.conftest import REPOSITORIES, RUN, dagster_dev, graphql, launch_job, wait_for
from trueup.statuses import DifferenceClass

pytestmark = [pytest.mark.dagster, pytest.mark.postgres, pytest.mark.kafka,
              pytest.mark.rabbitmq, pytest.mark.stack]

ORDERS = 300
CHECKS = """
query($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      assetChecksOrError { ... on AssetChecks { checks { name
        executionForLatestMaterialization { runId evaluation { success
          metadataEntries { label ... on IntMetadataEntry { intValue } } } } } } }
    }
  }
}
"""
CLASSES = [c.value for c in DifferenceClass]


def shop_config(tmp_path: Path, *, shop: str, billing: str, state: str, kafka: str, amqp: str,
                topic: str, exchange: str) -> Path:
    """examples/trueup.yaml with the shop's own names (and a 1 s grace: no waiting)."""
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"shop": {"postgres": shop}, "billing": {"postgres": billing},
                        "bus": {"kafka": {"bootstrap.servers": kafka}},
                        "amqp": {"rabbitmq": amqp}},
        "reconciliations": {
            "orders_events": {
                "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                           "version": "version", "updated_at": "updated_at",
                           "columns": ["status", "amount_cents", "currency"]},
                "target": {"connection": "bus", "topic": topic, "format": "json", "key": ["id"],
                           "version": "version",
                           "columns": {c: c for c in ("status", "amount_cents", "currency")}},
                "grace": "1s", "partitions": {"daily": {"start": "2026-01-01"}},
                "repair": "republish"},
            "orders_invoices": {
                "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                           "version": "version", "columns": ["status", "amount_cents"]},
                "target": {"connection": "billing", "table": "billing.invoices",
                           "key": ["order_id"], "version": "order_version",
                           "columns": {"status": "status", "amount_cents": "total_cents"}},
                "repair": "upsert"}},
        "dead_letters": {
            "orders_dlq": {"connection": "bus", "topic": f"{topic}.dlq", "replay_to": topic,
                           "max_attempts": 5, "parking": f"{topic}.parked",
                           "backoff": {"initial": "1s", "multiplier": 2, "max": "10m"}},
            "payments_dlq": {"connection": "amqp", "queue": f"{exchange}.settle.dlq",
                             "replay_to": {"exchange": exchange, "routing_key": "settle"},
                             "max_attempts": 5}},
    }, sort_keys=False))
    return path


def _cleanup(shop: Shop) -> None:
    admin = AdminClient(dict(shop.kafka))
    ours = [t for t in admin.list_topics(timeout=10).topics
            if t.startswith(shop.orders_topic)]
    if ours:
        for future in admin.delete_topics(ours, operation_timeout=30).values():
            future.exception()
    with pika.BlockingConnection(pika.URLParameters(shop.amqp_url)) as connection:
        channel = connection.channel()
        for queue in [shop.payments_queue, shop.payments_dlq,
                      *(f"{shop.payments_queue}.retry.{n}" for n in range(1, 6))]:
            channel.queue_delete(queue)
        for exchange in (shop.exchange, shop.payments_dlx):
            channel.exchange_delete(exchange)


@pytest.fixture
def running_shop(new_db: Callable[[], str], state_db: str, kafka_bootstrap: str,
                 amqp_url: str, unique: Callable[[str], str], tmp_path: Path
                 ) -> Iterator[tuple[Shop, Path]]:
    config = shop_config(tmp_path, shop=new_db(), billing=new_db(), state=state_db,
                         kafka=kafka_bootstrap, amqp=amqp_url, topic=f"{unique('orders')}.v1",
                         exchange=unique("payments"))
    shop = load_shop(str(config))
    run = tmp_path / "run"
    try:
        start(shop, run, orders=ORDERS, faults=DEMO_FAULTS)
        yield shop, run
    finally:
        procs.stop(run)
        _cleanup(shop)


# ---------------------------------------------------------------------------------------------
# Dagster through GraphQL, as the UI drives it


def succeed(url: str, runs: dict[str, str]) -> None:
    """Wait for every run of ``{run id: job}`` (launched together, run side by side)."""
    def finished() -> dict[str, str] | None:
        status = {r: graphql(url, RUN, {"id": r})["runOrError"]["status"] for r in runs}
        done = all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in status.values())
        return status if done else None

    status = wait_for(f"runs of {sorted(runs.values())} to finish", finished, seconds=150)
    assert all(s == "SUCCESS" for s in status.values()), {
        runs[r]: s for r, s in status.items()}


def counts(url: str, path: list[str], run_id: str) -> dict[str, tuple[bool, int | None]]:
    """Per check evaluated in ``run_id``: passed, and its count (or depth) metadata."""
    node = graphql(url, CHECKS, {"path": path})["assetNodeOrError"]
    found = {}
    for check in node["assetChecksOrError"]["checks"]:
        execution = check["executionForLatestMaterialization"]
        if execution and execution["runId"] == run_id and execution["evaluation"]:
            entries = {e["label"]: e.get("intValue")
                       for e in execution["evaluation"]["metadataEntries"]}
            found[check["name"]] = (bool(execution["evaluation"]["success"]),
                                    entries.get("count", entries.get("depth")))
    return found


def days(shop: Shop) -> list[str]:
    """The daily partitions (UTC) the shop's orders fall in."""
    with psycopg.connect(shop.shop_dsn) as conn:
        rows = conn.execute("SELECT DISTINCT (updated_at AT TIME ZONE 'UTC')::date "
                            "FROM public.orders ORDER BY 1").fetchall()
    return [d.isoformat() for (d,) in rows if isinstance(d, dt.date)]


def reconcile(url: str, shop: Shop) -> dict[str, dict[str, int]]:
    """Run both reconciliations (every day with orders) and both DLQ inspections from Dagster;
    return the checks that failed, with their counts."""
    runs: dict[str, tuple[str, list[str]]] = {}
    for name, partitions in (("orders_invoices", [None]), ("orders_events", days(shop))):
        for partition in partitions:
            runs[launch_job(url, f"reconcile_{name}", partition=partition)] = (
                name, ["trueup", name, "differences"])
    for name in ("orders_dlq", "payments_dlq"):
        runs[launch_job(url, f"dead_letters_{name}")] = (name, ["trueup", name, "dead_letters"])
    succeed(url, {r: name for r, (name, _) in runs.items()})
    failed: dict[str, dict[str, int]] = {}
    for run_id, (name, path) in runs.items():
        result = counts(url, path, run_id)
        assert set(result) >= ({"within_limits"} if name.endswith("_dlq") else set(CLASSES)), (
            name, result)
        for check, (passed, count) in result.items():
            if not passed:
                failed.setdefault(name, {})
                failed[name][check] = failed[name].get(check, 0) + (count or 0)
    return failed


def test_demo_shop_checks_fail_then_replay_and_backfill_from_dagster_turn_them_green(
        running_shop: tuple[Shop, Path], tmp_path: Path) -> None:
    shop, _ = running_shop
    with dagster_dev(tmp_path, Path(shop.config_path)) as url:
        wait_for("the code location", lambda: graphql(url, REPOSITORIES)[
            "repositoriesOrError"].get("nodes"))

        failed = reconcile(url, shop)
        assert failed == {
            # dropped-events (6 stale), corrupted-field (4 mismatch)
            "orders_events": {"stale": 6, "mismatch": 4},
            # deleted-rows (7), dropped-events and poison refunds (6 + 120 stale),
            # bad-deploy (25 mismatch)
            "orders_invoices": {"missing": 7, "stale": 126, "mismatch": 25},
            "orders_dlq": {"within_limits": 120},
            "payments_dlq": {"within_limits": 120},
        }, failed

        set_feature(shop, "refunds", True)  # python -m examples.shop.deploy refunds
        repairs = {launch_job(url, f"replay_{name}", {"ops": {f"replay_{name}_op": {
            "config": {"dry_run": False}}}}): f"replay_{name}"
            for name in ("orders_dlq", "payments_dlq")}
        repairs[launch_job(url, "backfill_orders_invoices", {"ops": {
            "trueup__orders_invoices__repairs": {"config": {"scope": "all"}}}})] = "invoices"
        repairs[launch_job(url, "backfill_orders_events", {"ops": {
            "trueup__orders_events__repairs": {"config": {"scope": "all"}}}},
            partition=days(shop)[-1])] = "events"
        succeed(url, repairs)
        wait_quiet(shop)  # billing applied the replayed and republished events

        def refunds_settled() -> bool:
            with psycopg.connect(shop.billing_dsn) as conn:
                row = conn.execute("SELECT count(*) FROM billing.ledger "
                                   "WHERE kind = 'refund'").fetchone()
            return bool(row and row[0] == 120)

        wait_until("the ledger to settle the replayed refunds", refunds_settled, 60)
        assert reconcile(url, shop) == {}, "checks still failing after the repairs"
