"""Seed the example shop with orders, their events and invoices, and a known amount of drift.

Deterministic: the same drift every time, so the README can show what ``trueup diff`` prints.
Re-seeding replaces everything (the orders.v1 topic is recreated).
Usage: python -m examples.seed [--orders 10000] [--config examples/trueup.yaml]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from examples.prepare import TOPICS, prepare
from trueup.config import Config, load_config
from trueup.mirror import SCHEMA as MIRROR_SCHEMA

HERE = Path(__file__).resolve().parent
STATUSES = ["new", "paid", "shipped", "cancelled"]

# The drift the README shows, by order id.
EVENTS_DROPPED = {17, 2_000, 4_321, 8_888}          # missing from orders.v1
EVENTS_OLD_VERSION = {42, 4_242}                    # stale on orders.v1
EVENTS_CORRUPTED = {777}                             # mismatch on orders.v1
INVOICES_LOST = {5, 1_234, 6_000, 9_999, 10}        # missing in billing.invoices
INVOICES_OLD = {99, 3_000}                           # stale in billing.invoices
INVOICES_BAD_DEPLOY = {250, 251, 252}                # wrong amounts in billing.invoices
ORPHAN_INVOICE = 1_000_001                           # an invoice for an order that is gone


def _orders(count: int, now: dt.datetime) -> list[tuple[int, int, str, int, str, int, dt.datetime]]:
    rng = random.Random(7)
    return [(i, rng.randint(1, 500), rng.choice(STATUSES), rng.randint(100, 100_000),
             rng.choice(["EUR", "USD"]), rng.randint(1, 3),
             now - dt.timedelta(hours=2, minutes=rng.randint(0, 3 * 24 * 60)))
            for i in range(1, count + 1)]


def _recreate_topic(admin: AdminClient, topic: str, partitions: int) -> None:
    if topic in admin.list_topics(timeout=10).topics:
        for future in admin.delete_topics([topic]).values():
            future.result()
        while topic in admin.list_topics(timeout=10).topics:
            time.sleep(0.2)
    for _ in range(50):  # the broker may still be finishing the deletion
        try:
            for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
                future.result()
            return
        except Exception:  # TOPIC_ALREADY_EXISTS while the deletion completes
            time.sleep(0.2)
    raise RuntimeError(f"could not recreate topic {topic}")


def seed(config: Config, count: int) -> None:
    prepare(config)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    orders = _orders(count, now)
    shop, billing = config.connections["shop"].postgres, config.connections["billing"].postgres
    assert shop and billing
    with psycopg.connect(shop) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE public.orders, public.outbox")
        with cur.copy("COPY public.orders (id, customer_id, status, amount_cents, currency, "
                      "version, updated_at) FROM STDIN") as copy:
            for row in orders:
                copy.write_row(row)
    with psycopg.connect(billing) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE billing.invoices")
        with cur.copy("COPY billing.invoices (order_id, order_version, status, total_cents) "
                      "FROM STDIN") as copy:
            for i, _, status, amount, _, version, _ in orders:
                if i in INVOICES_LOST:
                    continue
                copy.write_row((i, version - 1 if i in INVOICES_OLD else version, status,
                                amount * 100 if i in INVOICES_BAD_DEPLOY else amount))
            copy.write_row((ORPHAN_INVOICE, 1, "paid", 1_000))

    with psycopg.connect(config.state, autocommit=True) as conn:
        # the mirror of the old topic holds its offsets: start it over with the new topic
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}").format(
            sql.Identifier(MIRROR_SCHEMA)))
        conn.execute("DELETE FROM trueup.mirror_offsets WHERE topic = 'orders.v1'")
    kafka = config.connections["bus"].kafka
    assert kafka
    _recreate_topic(AdminClient(dict(kafka)), "orders.v1", TOPICS["orders.v1"])
    producer = Producer({**kafka, "acks": "all", "enable.idempotence": True, "linger.ms": 20})
    for i, _, status, amount, currency, version, _ in orders:
        if i in EVENTS_DROPPED:
            continue
        event = {"id": i, "version": version - 1 if i in EVENTS_OLD_VERSION else version,
                 "status": status, "currency": currency,
                 "amount_cents": -1 if i in EVENTS_CORRUPTED else amount}
        producer.produce("orders.v1", key=str(i), value=json.dumps(event))
        producer.poll(0)
    producer.produce("orders.v1", key="garbled", value=b"{not json")  # an unreadable event
    if producer.flush(60):
        raise RuntimeError("orders.v1: messages still undelivered after 60 s")
    print(f"seeded {count} orders, their events on orders.v1 and their invoices, with drift")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "trueup.yaml"))
    parser.add_argument("--orders", type=int, default=10_000)
    args = parser.parse_args()
    seed(load_config(args.config), args.orders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
