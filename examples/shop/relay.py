"""The outbox relay: publishes the outbox's unpublished rows to Kafka, in order, at least once.

A batch of rows is claimed (``FOR UPDATE SKIP LOCKED``, so two relays never send the same
batch at once), handed to an idempotent ``acks=all`` producer, and marked published only after
Kafka confirmed every message of the batch. A crash in between leaves the rows unpublished, and
they are sent again: consumers see duplicates, never gaps.

The relay outlives its database and Kafka: a lost connection (a restart, a terminated backend)
is opened again, and a batch Kafka did not confirm stays unpublished and is sent again by a new
producer; after each failure, logged once, a pause that grows from 0.2 s to 5 s (reset by a
batch that goes through). A message Kafka refuses for good (too large for the topic, not
authorized) stops the relay with that error, its row unpublished: sent again as it is, it
could not succeed.

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

from examples.shop.deploy import Database
from examples.shop.settings import Shop, load_shop
from trueup.brokers import kafka
from trueup.errors import ConnectionFailed
from trueup.log import configure, get_logger
from trueup.workers import install_stop_signals
from trueup.workers.runtime import Reconnect

log = get_logger("examples.shop.relay")

BATCH_ROWS = 500
IDLE_SECONDS = 0.2  # pause when the outbox is empty
#: Failures a later batch may get past: the database or Kafka away. Each leaves the batch's
#: rows unpublished (the transaction rolled back), to be sent again after a pause. A message
#: Kafka refuses for good (too large, not authorized) stops the relay instead, saying which:
#: sent again as it is it cannot succeed, and every row after it would wait behind it.
SURVIVED = (psycopg.OperationalError, kafka.KafkaUnconfirmed, ConnectionFailed)


def relay_batch(shop: Shop, conn: psycopg.Connection[Any], producer: Any) -> int:
    """Publish one batch of unpublished outbox rows; return how many were published."""
    with conn.transaction():
        rows = conn.cursor(row_factory=dict_row).execute(
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
    """Relay until ``stop`` is set (or, ``once``, until the outbox is empty); return how many
    rows were published. A failure in :data:`SURVIVED` ends no more than its batch."""
    producer = kafka.create_producer(shop.kafka, what="outbox relay")
    database = Database(shop.shop_dsn)  # opened again when a failure left it closed or broken
    reconnect = Reconnect("relay")
    total = 0
    try:
        while not stop.is_set():
            try:
                sent = relay_batch(shop, database.conn, producer)
            except SURVIVED as exc:
                # the batch rolled back: its rows stay unpublished, sent again after the pause
                if not isinstance(exc, psycopg.OperationalError):
                    # by a new producer: the old one may be failed for good (a fatal error of
                    # the idempotent producer); what it still holds is purged (one already in
                    # flight may still land: a duplicate, never a gap)
                    producer.purge()
                    producer = kafka.create_producer(shop.kafka, what="outbox relay")
                reconnect.after(type(exc).__name__, exc, stop, service="outbox relay")
                continue
            reconnect.reset()
            total += sent
            if not sent:
                if once:
                    break
                stop.wait(IDLE_SECONDS)
    finally:
        database.close()
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
