#!/usr/bin/env python3
"""Readiness probes for the local stack (used by scripts/stack).

    probe.py rabbitmq --url amqp://guest:guest@127.0.0.1:5672/%2F --timeout 60
    probe.py kafka --bootstrap 127.0.0.1:9092 --timeout 90

Each probe retries until it succeeds or the deadline passes. Exit status 0 means
the service really answered (a confirmed publish for RabbitMQ, a metadata
response naming at least one broker for Kafka); 1 means it did not in time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid


def probe_rabbitmq(url: str, deadline: float, verbose: bool) -> bool:
    import logging

    import pika

    # pika logs every refused connection at ERROR level; the retries are expected.
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    last_error: object = None
    while True:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = 3
        params.blocked_connection_timeout = 5
        connection = None
        try:
            connection = pika.BlockingConnection(params)
            channel = connection.channel()
            channel.confirm_delivery()
            queue = f"trueup.probe.{uuid.uuid4().hex}"
            channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
            # With confirm_delivery, basic_publish raises when the broker nacks
            # or (mandatory=True) returns the message as unroutable.
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=b"probe",
                mandatory=True,
            )
            channel.queue_delete(queue=queue)
            return True
        except Exception as exc:
            last_error = exc
        finally:
            if connection is not None and connection.is_open:
                with contextlib.suppress(Exception):
                    connection.close()
        if time.monotonic() >= deadline:
            if verbose:
                print(f"rabbitmq probe failed: {last_error!r}", file=sys.stderr)
            return False
        time.sleep(0.5)


def probe_kafka(bootstrap: str, deadline: float, verbose: bool) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            # Silence librdkafka's "connection refused" chatter while we wait.
            "log_level": 0,
            "socket.connection.setup.timeout.ms": 2000,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 500,
        }
    )
    last_error: object = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            metadata = admin.list_topics(timeout=max(1.0, min(5.0, remaining)))
            if metadata.brokers:
                return True
            last_error = "metadata named no brokers"
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            if verbose:
                print(f"kafka probe failed: {last_error!r}", file=sys.stderr)
            return False
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="service", required=True)
    rabbit = sub.add_parser("rabbitmq", help="publish with confirm to a temporary queue")
    rabbit.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    kafka = sub.add_parser("kafka", help="AdminClient metadata request")
    kafka.add_argument("--bootstrap", default="127.0.0.1:9092")
    for p in (rabbit, kafka):
        p.add_argument("--timeout", type=float, default=60.0, help="seconds to keep trying")
        p.add_argument("--quiet", action="store_true", help="no error message on failure")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    if args.service == "rabbitmq":
        ok = probe_rabbitmq(args.url, deadline, not args.quiet)
    else:
        ok = probe_kafka(args.bootstrap, deadline, not args.quiet)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
