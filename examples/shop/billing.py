"""The billing consumer: keeps billing.invoices in step with the orders topic.

A consumer group on trueup's Kafka worker runtime (:class:`trueup.workers.kafka.KafkaWorker`):
the handler only writes; the runtime commits offsets, retries failures on retry topics and
dead-letters what cannot be handled to the orders dead-letter topic. Delivery is at least once,
so the write is guarded by version: an event older than (or as old as) the invoice changes
nothing, and a duplicate or a replay is harmless.

Usage: python -m examples.shop.billing [--config PATH]
"""

from __future__ import annotations

import json
import sys

from examples.shop.deploy import Database, Features
from examples.shop.settings import Shop, run_worker
from trueup.retry import PermanentError, RetryPolicy
from trueup.workers import Delivery
from trueup.workers.kafka import KafkaWorker

SESSION_TIMEOUT_MS = 6000
UPSERT = """
INSERT INTO billing.invoices AS i (order_id, order_version, status, total_cents)
VALUES (%s, %s, %s, %s)
ON CONFLICT (order_id) DO UPDATE
   SET order_version = excluded.order_version, status = excluded.status,
       total_cents = excluded.total_cents, updated_at = now()
 WHERE i.order_version < excluded.order_version
"""


class Billing:
    """The handler: one event in, one guarded upsert (or delete, for a tombstone) out."""

    def __init__(self, shop: Shop) -> None:
        self.database = Database(shop.billing_dsn)
        self.features = Features(self.database)

    def __call__(self, delivery: Delivery) -> None:
        if delivery.body is None:  # a tombstone: the order is gone
            try:
                order_id = int((delivery.key or b"").decode() or "0")
            except ValueError as exc:  # not a number, or not UTF-8 (UnicodeDecodeError)
                raise PermanentError(f"not an order tombstone: key {delivery.key!r}") from exc
            conn = self.database.conn
            with conn.transaction():
                conn.execute("DELETE FROM billing.invoices WHERE order_id = %s", (order_id,))
            return
        try:
            event = json.loads(delivery.body)
            order_id, version = int(event["id"]), int(event["version"])
            status, amount = str(event["status"]), int(event["amount_cents"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"not an order event: {exc}") from exc
        if status == "refunded" and "refunds" not in self.features:
            raise PermanentError(f"order {order_id}: billing does not know status 'refunded'")
        total = amount // 100 if "amounts_in_euros" in self.features else amount
        conn = self.database.conn
        with conn.transaction():
            conn.execute(UPSERT, (order_id, version, status, total))


def worker(shop: Shop, metrics_port: int | None = None) -> KafkaWorker:
    return KafkaWorker(
        properties=shop.kafka, topic=shop.orders_topic, group=shop.billing_group,
        handler=Billing(shop), dead_letter_topic=shop.orders_dlq,
        policy=RetryPolicy.from_config(shop.config.dead_letters["orders_dlq"]),
        # a crashed member's partitions move on after 6 s, not Kafka's default 45 s
        consumer_overrides={"session.timeout.ms": SESSION_TIMEOUT_MS,
                            "heartbeat.interval.ms": 1000},
        # /metrics, /healthz and /readyz on 127.0.0.1 while it runs
        metrics_port=metrics_port, database=shop.billing_dsn)


def ready_worker(shop: Shop, metrics_port: int | None) -> KafkaWorker:
    consumer = worker(shop, metrics_port)
    consumer.ensure_topics()
    return consumer


def main() -> int:
    return run_worker(__doc__.splitlines()[0], ready_worker)


if __name__ == "__main__":
    sys.exit(main())
