"""The outbox relay: publishes the outbox's unpublished rows to Kafka, in order, at least once.

A batch of rows is claimed (``FOR UPDATE SKIP LOCKED``, so two relays never send the same
batch at once), handed to an idempotent ``acks=all`` producer, and marked published only after
Kafka confirmed every message of the batch. A crash in between leaves the rows unpublished, and
they are sent again: consumers see duplicates, never gaps.

Usage: python -m examples.shop.relay [--config PATH] [--once]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

import psycopg
from psycopg.rows import dict_row

from examples.shop.settings import Shop, load_shop
from trueup.brokers import kafka
from trueup.log import configure, get_logger
from trueup.workers import install_stop_signals

log = get_logger("examples.shop.relay")

BATCH_ROWS = 500
IDLE_SECONDS = 0.2  # pause when the outbox is empty


def relay_batch(shop: Shop, conn: psycopg.Connection[dict[str, Any]],
                producer: Any) -> int:
    """Publish one batch of unpublished outbox rows; return how many were published."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, topic, key, payload FROM public.outbox WHERE published_at IS NULL "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (BATCH_ROWS,)).fetchall()
        if not rows:
            return 0
        deliveries = kafka.Deliveries()
        for row in rows:
            value = None if row["payload"] is None else json.dumps(row["payload"]).encode()
            kafka.produce(producer, deliveries, row["topic"], value=value, key=row["key"])
        # Marked published only once Kafka confirmed all of them: else the rows stay unpublished.
        kafka.confirm(producer, deliveries, what="outbox relay")
        conn.execute("UPDATE public.outbox SET published_at = now() WHERE id = ANY(%s)",
                     ([r["id"] for r in rows],))
    log.info("relay.published", rows=len(rows), last_outbox_id=rows[-1]["id"])
    return len(rows)


def run(shop: Shop, stop: threading.Event, *, once: bool = False) -> int:
    producer = kafka.create_producer(shop.kafka, what="outbox relay")
    total = 0
    with psycopg.connect(shop.shop_dsn, row_factory=dict_row) as conn:
        while not stop.is_set():
            sent = relay_batch(shop, conn, producer)
            total += sent
            if not sent:
                if once:
                    break
                stop.wait(IDLE_SECONDS)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--once", action="store_true", help="publish what is there, then exit")
    args = parser.parse_args()
    configure()
    stop = threading.Event()
    install_stop_signals(stop)
    total = run(load_shop(args.config), stop, once=args.once)
    if args.once:
        print(f"relay: published {total} outbox rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
