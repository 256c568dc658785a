"""Prepare the example shop on the local stack: databases, tables, topics, exchanges, queues.

Idempotent: run it as often as you like (``make demo`` does). Everything goes to 127.0.0.1.
Usage: python -m examples.prepare [--config examples/trueup.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pika
import psycopg
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from examples.shop.settings import shop_of
from trueup.config import Config, load_config
from trueup.errors import TrueupError
from trueup.state import open_state

HERE = Path(__file__).resolve().parent
TOPICS = {"orders.v1": 3, "orders.v1.dlq": 1, "orders.v1.parked": 1}


def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` when it does not exist (via the postgres db)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    name = str(info["dbname"])
    maintenance = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(maintenance, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def prepare(config: Config) -> None:
    """Databases, tables, topics, exchanges and queues of the shop named by ``config``."""
    shop = shop_of(config)
    for dsn in (config.state, shop.shop_dsn, shop.billing_dsn):
        ensure_database(dsn)
    open_state(config.state).close()
    for dsn, script in ((shop.shop_dsn, "shop.sql"), (shop.billing_dsn, "billing.sql")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute((HERE / "shop" / script).read_bytes())

    admin = AdminClient(dict(shop.kafka))
    existing = admin.list_topics(timeout=10).topics
    topics = {shop.orders_topic: TOPICS["orders.v1"], shop.orders_dlq: TOPICS["orders.v1.dlq"],
              shop.orders_parked: TOPICS["orders.v1.parked"]}
    wanted = [NewTopic(t, num_partitions=n, replication_factor=1)
              for t, n in topics.items() if t not in existing]
    for topic, future in (admin.create_topics(wanted).items() if wanted else []):
        future.result()
        print(f"created topic {topic}")

    with pika.BlockingConnection(pika.URLParameters(shop.amqp_url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(shop.exchange, exchange_type="direct", durable=True)
        channel.exchange_declare(shop.payments_dlx, exchange_type="direct", durable=True)
        channel.queue_declare(shop.payments_dlq, durable=True,
                              arguments={"x-queue-type": "quorum"})
        channel.queue_bind(shop.payments_dlq, shop.payments_dlx, routing_key=shop.routing_key)
        channel.queue_declare(shop.payments_queue, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": shop.payments_dlx,
            "x-dead-letter-routing-key": shop.routing_key,
        })
        channel.queue_bind(shop.payments_queue, shop.exchange, routing_key=shop.routing_key)
    print("example shop ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "trueup.yaml"))
    args = parser.parse_args()
    try:
        prepare(load_config(args.config))
    except TrueupError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
