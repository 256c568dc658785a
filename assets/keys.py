"""Asset keys of physical things, so that two reconciliations of one table share a node.

A key names the kind, the connection and the object: ``postgres/shop/public/orders``,
``kafka/bus/orders_v1``, ``rabbitmq/amqp/payments_settle_dlq``. Dagster key parts allow
letters, digits and underscores, so other characters become ``_`` (the real name stays in the
asset's metadata). Two names that differ only there (``orders.v1`` and ``orders_v1``) would
share one node, mixing their lineage: :func:`check_distinct` refuses such a config before
anything is built (``pipelines/definitions.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import dagster as dg

from trueup.config import Config, DeadLetterConfig
from trueup.errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")

#: Run tags that deploy/dagster.yaml's run queue limits to one run per value at a time: every
#: run of a reconciliation's jobs (diff, backfill), of a dead-letter queue's (inspect, replay).
RECONCILIATION_TAG = "trueup/reconciliation"
DEAD_LETTERS_TAG = "trueup/dead_letters"


def reconciliation_tags(name: str) -> dict[str, str]:
    return {RECONCILIATION_TAG: name}


def dead_letters_tags(name: str) -> dict[str, str]:
    return {DEAD_LETTERS_TAG: name}


def repairs_pool(name: str) -> str:
    """The concurrency pool of a reconciliation's repairs asset: deploy/dagster.yaml gives
    every pool one slot, so its backfills run one at a time."""
    return f"trueup_backfill_{name}"


def _part(text: str) -> str:
    return _UNSAFE.sub("_", text)


def table_key(connection: str, table: str) -> dg.AssetKey:
    schema, _, name = table.partition(".")
    return dg.AssetKey(["postgres", _part(connection), _part(schema), _part(name)])


def topic_key(connection: str, topic: str) -> dg.AssetKey:
    return dg.AssetKey(["kafka", _part(connection), _part(topic)])


def queue_key(connection: str, queue: str) -> dg.AssetKey:
    return dg.AssetKey(["rabbitmq", _part(connection), _part(queue)])


def exchange_key(connection: str, exchange: str) -> dg.AssetKey:
    key = queue_key(connection, exchange)
    return dg.AssetKey([*key.path[:-1], f"exchange_{key.path[-1]}"])


#: By where a dead-letter entry holds its letters (DeadLetterConfig.held_in): the broker's
#: Dagster kind, how a description names such a place, and its key.
_HELD: dict[str, tuple[str, str, Callable[[str, str], dg.AssetKey]]] = {
    "topic": ("kafka", "Kafka topic", topic_key),
    "queue": ("rabbitmq", "RabbitMQ queue", queue_key),
}


def held_key(dlq: DeadLetterConfig, name: str | None = None) -> dg.AssetKey:
    """The key of the topic or queue holding ``dlq``'s letters, or of another ``name`` of the
    same kind on its connection (where they replay to)."""
    kind, own = dlq.held_in
    return _HELD[kind][2](dlq.connection, name or own)


def held_kind(dlq: DeadLetterConfig, name: str | None = None) -> tuple[str, str]:
    """The Dagster kind of ``dlq``'s broker, and ``Kafka topic T`` or ``RabbitMQ queue Q`` (its
    own, or another ``name``) as descriptions say it."""
    kind, own = dlq.held_in
    broker, place, _ = _HELD[kind]
    return broker, f"{place} {name or own}"


def check_distinct(config: Config) -> None:
    """Raise a one-line :class:`ConfigError` when two different tables, topics, queues or
    exchanges of ``config`` would get one asset key."""
    seen: dict[dg.AssetKey, tuple[str, str]] = {}  # key -> (what it names, where)

    def named(key: dg.AssetKey, what: str, where: str) -> None:
        first, first_where = seen.setdefault(key, (what, where))
        if first != what:
            raise ConfigError(config.path, where, (
                f"expected a name Dagster can tell from {first} ({first_where}): both become "
                f"the asset key {key.to_user_string()}"))

    for name, rec in config.reconciliations.items():
        for side, ends in (("source", rec.source), ("target", rec.target)):
            if ends.table is not None:
                named(table_key(ends.connection, ends.table),
                      f"table {ends.table!r} of {ends.connection}",
                      f"reconciliations.{name}.{side}.table")
        if rec.target.topic is not None:
            named(topic_key(rec.target.connection, rec.target.topic),
                  f"topic {rec.target.topic!r} of {rec.target.connection}",
                  f"reconciliations.{name}.target.topic")
    for name, dlq in config.dead_letters.items():
        kind, own = dlq.held_in
        named(held_key(dlq), f"{kind} {own!r} of {dlq.connection}",
              f"dead_letters.{name}.{kind}")
        replay_to = dlq.replay_to
        if replay_to is None:
            continue
        if replay_to.exchange is not None:
            named(exchange_key(dlq.connection, replay_to.exchange),
                  f"exchange {replay_to.exchange!r} of {dlq.connection}",
                  f"dead_letters.{name}.replay_to.exchange")
        elif replay_to.name is not None:
            named(held_key(dlq, replay_to.name),
                  f"{kind} {replay_to.name!r} of {dlq.connection}",
                  f"dead_letters.{name}.replay_to")
