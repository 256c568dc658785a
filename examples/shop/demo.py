"""The demo: the shop running on the local stack, with traffic, faults and dead letters.

``start`` prepares and resets the shop (its tables, topics, queues and trueup's state), starts
the outbox relay, the billing consumer and the ledger in the background (pid files and logs in
``.stack/demo/``), sends traffic through the real services (orders service, relay, billing
consumer, payments publisher, ledger), injects faults, and prints what trueup now finds.
``stop`` stops exactly the workers it started; ``status`` shows them.

Usage: python -m examples.shop.demo [start|stop|status] [--orders 2000] [--config PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import pika.exceptions
import psycopg
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from examples.prepare import TOPICS, prepare
from examples.shop import procs
from examples.shop.faults import inject
from examples.shop.orders import advance, create_orders
from examples.shop.payments import payable_orders, publish_payments, settlement
from examples.shop.settings import Shop, load_shop, run_dir
from examples.shop.watch import wait_quiet
from trueup.brokers import rabbitmq
from trueup.diff import diff
from trueup.dlq import inspect
from trueup.letterboxes.kafka import replay_group
from trueup.mirror import SCHEMA as MIRROR_SCHEMA
from trueup.retry import RetryPolicy
from trueup.state import open_state

#: the faults ``start`` injects, in this order
DEMO_FAULTS = ["duplicated-events", "consumer-crash", "stalled-consumer", "dropped-events",
               "corrupted-field", "bad-deploy", "deleted-rows", "poison-messages"]
SEED = 8


def _retry_tiers(shop: Shop, name: str) -> int:
    return max(1, RetryPolicy.from_config(shop.config.dead_letters[name]).retries)


def _recreate_topics(shop: Shop) -> None:
    admin = AdminClient(dict(shop.kafka))
    partitions = TOPICS["orders.v1"]
    topics = {shop.orders_topic: partitions, shop.orders_dlq: TOPICS["orders.v1.dlq"],
              shop.orders_parked: TOPICS["orders.v1.parked"],
              **{f"{shop.orders_topic}.retry.{n}": partitions
                 for n in range(1, _retry_tiers(shop, "orders_dlq") + 1)}}
    doomed = [t for t in topics if t in admin.list_topics(timeout=10).topics]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result()
    # committed offsets of the old topics must not carry over to the new ones
    groups = [shop.billing_group, replay_group("orders_dlq")]
    for future in admin.delete_consumer_groups(groups).values():
        with contextlib.suppress(Exception):  # GROUP_ID_NOT_FOUND: nothing to forget
            future.result()
    deadline = time.monotonic() + 60
    while any(t in admin.list_topics(timeout=10).topics for t in doomed):
        if time.monotonic() > deadline:  # the broker finishes deletions in the background
            raise TimeoutError(f"topics {doomed} still there 60 s after their deletion")
        time.sleep(0.3)
    while True:
        try:
            for future in admin.create_topics(
                    [NewTopic(t, n, 1) for t, n in topics.items()]).values():
                future.result()
            return
        except Exception:  # TOPIC_ALREADY_EXISTS while a deletion completes
            if time.monotonic() > deadline:
                raise
            existing = admin.list_topics(timeout=10).topics
            topics = {t: n for t, n in topics.items() if t not in existing}
            if not topics:
                return
            time.sleep(0.3)


def _purge_queues(shop: Shop) -> None:
    connection = rabbitmq.connect(shop.amqp_url, what="demo reset")
    try:
        queues = [shop.payments_queue, shop.payments_dlq,
                  *(f"{shop.payments_queue}.retry.{n}"
                    for n in range(1, _retry_tiers(shop, "payments_dlq") + 1))]
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_purge(queue)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet: the ledger declares its delay queues
    finally:
        rabbitmq.close_quietly(connection)


def reset(shop: Shop) -> None:
    """Empty the shop: tables, topics, queues, and trueup's state (runs, replays, repairs)."""
    with psycopg.connect(shop.shop_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE public.orders, public.outbox")
    with psycopg.connect(shop.billing_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE billing.invoices, billing.ledger, billing.features")
    _recreate_topics(shop)
    _purge_queues(shop)
    with psycopg.connect(shop.state_dsn, autocommit=True) as conn:
        # replayed-letter ids and mirrored offsets start over with the new topics
        for schema in ("trueup", MIRROR_SCHEMA):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))
    open_state(shop.state_dsn).close()


def traffic(shop: Shop, orders: int, rng: random.Random) -> None:
    created = create_orders(shop, orders, rng)
    updated = 0
    for _ in range(3):  # new -> paid -> shipped -> delivered, for ever fewer orders
        updated += len(advance(shop, int(orders * 0.6), rng))
    payments = publish_payments(shop, map(settlement, payable_orders(shop, orders)))
    wait_quiet(shop)
    print(f"traffic: {len(created)} orders created and {updated} updated through the orders "
          f"service; {payments} payments published to the ledger", flush=True)


def start(shop: Shop, run: Path, *, orders: int, faults: list[str]) -> None:
    stopped = procs.stop(run)
    if stopped:
        print(f"stopped the previous demo's {', '.join(stopped)}")
    prepare(shop.config)
    reset(shop)
    for service in procs.WORKERS:
        pid = procs.start(service, shop.config_path, run)
        print(f"started {service} (pid {pid}, log {procs.log_file(run, service)})", flush=True)
    rng = random.Random(SEED)
    traffic(shop, orders, rng)
    inject(shop, faults, run=run, seed=SEED)
    wait_quiet(shop)
    time.sleep(2)  # the ledger's last retries
    report(shop)


def report(shop: Shop) -> None:
    print("\nwhat trueup finds now:")
    for name in shop.config.reconciliations:
        summary = diff(shop.config, name)
        counts = "  ".join(f"{c} {getattr(summary, c)}" for c in
                           ("missing", "orphan", "stale", "ahead", "mismatch", "in_flight",
                            "unreadable"))
        print(f"  {name}: {counts}")
    for name in shop.config.dead_letters:
        print(f"  {name}: depth {inspect(shop.config, name, breakdown=False).depth}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--no-faults", action="store_true", help="traffic only")
    parser.add_argument("--config")
    parser.add_argument("--run-dir", help="pid files and logs (default .stack/demo)")
    args = parser.parse_args()
    run = run_dir(args.run_dir)
    if args.action == "stop":
        stopped = procs.stop(run)
        print(f"stopped {', '.join(stopped)}" if stopped else "no demo workers running")
        return 0
    if args.action == "status":
        for service, pid in procs.status(run).items():
            print(f"{service:8} {'up    pid ' + str(pid) if pid else 'down'}")
        return 0
    start(load_shop(args.config), run, orders=args.orders,
          faults=[] if args.no_faults else DEMO_FAULTS)
    print(f"\nthe workers keep running in the background (pids in {run}); stop them with "
          f"`make demo-stop` or `python -m examples.shop.demo stop`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
