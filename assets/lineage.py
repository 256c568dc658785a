"""The asset graph's lineage beyond the tables and topics themselves.

- ``trueup/<name>/mirror``: the Postgres mirror of a reconciled Kafka topic (table
  ``trueup_mirror.<name>`` in the state database, refreshed by each diff), between the topic
  and the differences asset.
- Dead-letter topics and queues drawn beside what they feed: a Kafka DLQ depends on the topic
  its letters are replayed to; a RabbitMQ dead-letter queue on the exchange they came through.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from assets.keys import exchange_key, held_key, held_kind, topic_key
from trueup.config import Config


def mirror_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["trueup", name, "mirror"])


def mirror_assets(config: Config) -> list[dg.AssetSpec]:
    """One AssetSpec per reconciliation whose target is a Kafka topic."""
    specs = []
    for name, rec in config.reconciliations.items():
        if rec.target.topic is None:
            continue
        specs.append(dg.AssetSpec(
            mirror_key(name), deps=[topic_key(rec.target.connection, rec.target.topic)],
            description=f"Latest message per key of Kafka topic {rec.target.topic}, mirrored "
                        f"into trueup_mirror.{name} (state database) by each diff of {name}.",
            group_name="reconciliations", kinds={"postgres", "kafka"},
            metadata={"reconciliation": name, "table": f"trueup_mirror.{name}"}))
    return specs


def with_dead_letter_lineage(specs: Sequence[dg.AssetSpec], config: Config
                             ) -> list[dg.AssetSpec]:
    """``specs`` with each dead-letter topic or queue depending on what it feeds back into
    (adding a spec for a RabbitMQ exchange or Kafka topic not otherwise named)."""
    by_key = {s.key: s for s in specs}
    for dlq in config.dead_letters.values():
        replay_to = dlq.replay_to
        if replay_to is None:
            continue
        dlq_key = held_key(dlq)
        if replay_to.exchange is not None:  # RabbitMQ only
            feeds = exchange_key(dlq.connection, replay_to.exchange)
            kind, what = "rabbitmq", f"RabbitMQ exchange {replay_to.exchange}"
        else:
            assert replay_to.name is not None
            feeds, (kind, what) = held_key(dlq, replay_to.name), held_kind(dlq, replay_to.name)
        by_key.setdefault(feeds, dg.AssetSpec(
            feeds, description=f"{what} (connection {dlq.connection}).",
            group_name="dead_letters", kinds={kind},
            metadata={"connection": dlq.connection}))
        if dlq_key in by_key:
            spec = by_key[dlq_key]
            by_key[dlq_key] = spec.replace_attributes(
                deps=[*spec.deps, dg.AssetDep(feeds)],
                metadata={**spec.metadata, "dead_letters_of": what})
    return list(by_key.values())
