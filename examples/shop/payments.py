"""The payments publisher: asks the ledger to settle payments, over RabbitMQ with confirms.

Each payment is one persistent message to the payments exchange with the settle routing key,
its ``message_id`` the payment id; the call returns once the broker confirmed it (publisher
confirms, ``mandatory``: a message no queue takes is an error, not a silent loss).

Usage: python -m examples.shop.payments [--limit 100] [--config PATH]
   (settles the paid, shipped and delivered orders, up to --limit of them)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pika

from examples.shop.orders import Order, connect
from examples.shop.settings import Shop, load_shop
from trueup.brokers import rabbitmq

PERSISTENT = 2


@dataclass(frozen=True, kw_only=True)
class Payment:
    payment_id: str
    order_id: int
    kind: str            # settle | refund
    amount_cents: int    # negative for a refund
    currency: str


def settlement(order: Order) -> Payment:
    return Payment(payment_id=f"pay-{order.id}", order_id=order.id, kind="settle",
                   amount_cents=order.amount_cents, currency=order.currency)


def refund(order: Order) -> Payment:
    return Payment(payment_id=f"refund-{order.id}", order_id=order.id, kind="refund",
                   amount_cents=-order.amount_cents, currency=order.currency)


def publish_payments(shop: Shop, payments: Iterable[Payment]) -> int:
    """Publish each payment and wait for the broker's confirm; return how many."""
    connection = rabbitmq.connect(shop.amqp_url, what="payments publisher")
    count = 0
    try:
        channel = rabbitmq.confirmed_channel(connection)
        for payment in payments:
            rabbitmq.publish(
                channel, exchange=shop.exchange, routing_key=shop.routing_key,
                body=json.dumps(asdict(payment)).encode(),
                properties=pika.BasicProperties(
                    message_id=payment.payment_id, content_type="application/json",
                    delivery_mode=PERSISTENT),
                what="payments publisher")
            count += 1
    finally:
        rabbitmq.close_quietly(connection)
    return count


def payable_orders(shop: Shop, limit: int) -> list[Order]:
    with connect(shop) as conn:
        rows = conn.execute("SELECT * FROM public.orders WHERE status IN "
                            "('paid', 'shipped', 'delivered') ORDER BY id LIMIT %s",
                            (limit,)).fetchall()
    return [Order(**{k: r[k] for k in ("id", "customer_id", "status", "amount_cents",
                                         "currency", "version")}) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    shop = load_shop(args.config)
    count = publish_payments(shop, map(settlement, payable_orders(shop, args.limit)))
    print(f"payments: published {count} settlements to exchange {shop.exchange} "
          f"(routing key {shop.routing_key}), each confirmed by the broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
