"""Asset keys of physical things, so that two reconciliations of one table share a node.

A key names the kind, the connection and the object: ``postgres/shop/public/orders``,
``kafka/bus/orders_v1``, ``rabbitmq/amqp/payments_settle_dlq``. Dagster key parts allow
letters, digits and underscores, so other characters become ``_`` (the real name stays in the
asset's metadata).
"""

from __future__ import annotations

import re

import dagster as dg

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def _part(text: str) -> str:
    return _UNSAFE.sub("_", text)


def table_key(connection: str, table: str) -> dg.AssetKey:
    schema, _, name = table.partition(".")
    return dg.AssetKey(["postgres", _part(connection), _part(schema), _part(name)])


def topic_key(connection: str, topic: str) -> dg.AssetKey:
    return dg.AssetKey(["kafka", _part(connection), _part(topic)])


def queue_key(connection: str, queue: str) -> dg.AssetKey:
    return dg.AssetKey(["rabbitmq", _part(connection), _part(queue)])
