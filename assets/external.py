"""External assets: the tables, topics and queues trueup watches but does not produce."""

from __future__ import annotations

import dagster as dg

from assets.keys import held_key, held_kind, table_key, topic_key
from trueup.config import Config


def external_assets(config: Config) -> list[dg.AssetSpec]:
    """One AssetSpec per physical table, topic and dead-letter queue named in the config
    (:func:`assets.keys.check_distinct` has made sure no two of them share a key)."""
    specs: dict[dg.AssetKey, dg.AssetSpec] = {}

    def table(connection: str, name: str) -> None:
        key = table_key(connection, name)
        specs.setdefault(key, dg.AssetSpec(
            key, description=f"Postgres table {name} (connection {connection}).",
            group_name="data", kinds={"postgres"},
            metadata={"connection": connection, "table": name},
        ))

    for rec in config.reconciliations.values():
        table(rec.source.connection, rec.source.table)
        if rec.target.table is not None:
            table(rec.target.connection, rec.target.table)
        elif rec.target.topic is not None:
            key = topic_key(rec.target.connection, rec.target.topic)
            specs.setdefault(key, dg.AssetSpec(
                key, description=f"Kafka topic {rec.target.topic} "
                                 f"(connection {rec.target.connection}).",
                group_name="data", kinds={"kafka"},
                metadata={"connection": rec.target.connection, "topic": rec.target.topic},
            ))
    for name, dlq in config.dead_letters.items():
        key, (kind, what) = held_key(dlq), held_kind(dlq)
        specs.setdefault(key, dg.AssetSpec(
            key, description=f"{what} (dead letters {name}).", group_name="dead_letters",
            kinds={kind}, metadata={"connection": dlq.connection, "dead_letters": name},
        ))
    return list(specs.values())
