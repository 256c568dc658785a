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
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

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
    shop, billing = config.connections["shop"].postgres, config.connections["billing"].postgres
    assert shop and billing
    for dsn in (config.state, shop, billing):
        ensure_database(dsn)
    open_state(config.state).close()
    for dsn, script in ((shop, "shop.sql"), (billing, "billing.sql")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute((HERE / "shop" / script).read_bytes())

    kafka = config.connections["bus"].kafka
    assert kafka
    admin = AdminClient(dict(kafka))
    existing = admin.list_topics(timeout=10).topics
    wanted = [NewTopic(t, num_partitions=n, replication_factor=1)
              for t, n in TOPICS.items() if t not in existing]
    for topic, future in (admin.create_topics(wanted).items() if wanted else []):
        future.result()
        print(f"created topic {topic}")

    url = config.connections["amqp"].rabbitmq
    assert url
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.exchange_declare("payments", exchange_type="direct", durable=True)
        channel.exchange_declare("payments.dlx", exchange_type="direct", durable=True)
        channel.queue_declare("payments.settle.dlq", durable=True,
                              arguments={"x-queue-type": "quorum"})
        channel.queue_bind("payments.settle.dlq", "payments.dlx", routing_key="settle")
        channel.queue_declare("payments.settle", durable=True, arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "payments.dlx",
            "x-dead-letter-routing-key": "settle",
        })
        channel.queue_bind("payments.settle", "payments", routing_key="settle")
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
