"""The ledger worker: settles payments from RabbitMQ into billing.ledger.

Runs on trueup's RabbitMQ worker runtime (:class:`trueup.workers.rabbitmq.RabbitWorker`): a
failed payment is retried through delay queues with backoff; one that can never succeed (a
refund, before billing supports refunds) goes straight to the dead-letter queue. The bank the
ledger talks to is flaky: the first attempt of about one payment in ten times out and succeeds
on retry. Settling is idempotent (one row per payment id).

Usage: python -m examples.shop.ledger [--config PATH]
"""

from __future__ import annotations

import json
import sys
import zlib

from examples.shop.deploy import Database, Features
from examples.shop.settings import Shop, run_worker
from trueup.retry import PermanentError, RetryPolicy
from trueup.workers import Delivery
from trueup.workers.rabbitmq import RabbitWorker

FLAKY_ONE_IN = 10  # payments whose first attempt times out


class Ledger:
    def __init__(self, shop: Shop) -> None:
        self.database = Database(shop.billing_dsn)
        self.features = Features(self.database)

    def __call__(self, delivery: Delivery) -> None:
        try:
            payment = json.loads(delivery.body or b"")
            payment_id, kind = str(payment["payment_id"]), str(payment["kind"])
            values = (payment_id, int(payment["order_id"]), kind, int(payment["amount_cents"]),
                      str(payment["currency"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"not a payment: {exc}") from exc
        if kind == "refund" and "refunds" not in self.features:
            raise PermanentError(f"payment {payment_id}: the ledger does not settle refunds")
        if delivery.attempt == 1 and zlib.crc32(payment_id.encode()) % FLAKY_ONE_IN == 0:
            raise TimeoutError(f"payment {payment_id}: the bank did not answer in time")
        conn = self.database.conn
        with conn.transaction():
            conn.execute(
                "INSERT INTO billing.ledger (payment_id, order_id, kind, amount_cents, currency)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (payment_id) DO NOTHING", values)


def worker(shop: Shop, metrics_port: int | None = None) -> RabbitWorker:
    return RabbitWorker(
        url=shop.amqp_url, queue=shop.payments_queue, handler=Ledger(shop), name="ledger",
        dead_letter_queue=shop.payments_dlq,
        policy=RetryPolicy.from_config(shop.config.dead_letters["payments_dlq"]),
        # /metrics, /healthz and /readyz on 127.0.0.1 while it runs
        metrics_port=metrics_port, database=shop.billing_dsn)


def main() -> int:
    return run_worker(__doc__.splitlines()[0], worker)


if __name__ == "__main__":
    sys.exit(main())
