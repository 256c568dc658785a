"""How far behind the shop's pipeline is: unpublished outbox rows, billing's consumer lag."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from examples.shop.settings import Shop
from trueup.brokers import kafka


def unpublished(shop: Shop) -> int:
    with psycopg.connect(shop.shop_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM public.outbox WHERE published_at IS NULL"
                           ).fetchone()
    return int(row[0]) if row else 0


def billing_lag(shop: Shop) -> int:
    """Messages of the orders topic the billing group has not committed yet."""
    consumer = kafka.create_consumer(shop.kafka, group=shop.billing_group, what="billing lag")
    try:
        admin = kafka.connect_admin(shop.kafka, what="billing lag")
        partitions = kafka.topic_partitions(admin, shop.orders_topic, what="billing lag") or 0
        ends = kafka.end_offsets(consumer, shop.orders_topic, partitions, what="billing lag")
        done = kafka.committed_offsets(consumer, shop.orders_topic, partitions,
                                       what="billing lag")
    finally:
        consumer.close()
    lag = 0
    for partition, (low, high) in ends.items():
        committed = done.get(partition)
        lag += high - (low if committed is None else committed)
    return lag


def invoices_behind(shop: Shop, versions: dict[int, int]) -> int:
    """How many of the orders ``{id: version}`` have no invoice at that version yet."""
    with psycopg.connect(shop.billing_dsn) as conn:
        rows = conn.execute("SELECT order_id, order_version FROM billing.invoices "
                            "WHERE order_id = ANY(%s)", (list(versions),)).fetchall()
    have = {int(r[0]): int(r[1]) for r in rows}
    return sum(1 for i, v in versions.items() if have.get(i, 0) < v)


def wait_until(what: str, probe: Callable[[], bool], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.2)


def wait_quiet(shop: Shop, seconds: float = 120.0) -> None:
    """Until the relay published everything and billing committed everything it read."""
    wait_until("the relay and the billing consumer to catch up",
               lambda: unpublished(shop) == 0 and billing_lag(shop) == 0, seconds)
