"""Kafka through confluent-kafka: admin connections, topic inspection, error translation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from trueup.errors import ConnectionFailed, TrueupError

METADATA_TIMEOUT_SECONDS = 10.0


class KafkaFailed(TrueupError):
    """A Kafka operation failed after the connection was made."""


def translate(exc: KafkaException, what: str) -> TrueupError:
    """A trueup error for a confluent-kafka exception; ``what`` names the config path."""
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    reason = error.str() if error is not None else str(exc)
    if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                              KafkaError._TIMED_OUT):
        return ConnectionFailed(f"{what}: cannot reach Kafka: {reason}")
    return KafkaFailed(f"{what}: {reason}")


def connect_admin(properties: Mapping[str, Any], *, what: str) -> AdminClient:
    """An AdminClient that has answered a metadata request (so the cluster is reachable)."""
    admin = AdminClient({**properties, "socket.connection.setup.timeout.ms": 5000})
    try:
        admin.list_topics(timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise translate(exc, what) from exc
    return admin


def topic_partitions(admin: AdminClient, topic: str, *, what: str) -> int | None:
    """The number of partitions of ``topic``, or None when it does not exist.

    Asks for the metadata of every topic: a request naming one topic makes a broker with
    ``auto.create.topics.enable`` create it, and inspecting must never create anything.
    """
    try:
        metadata = admin.list_topics(timeout=METADATA_TIMEOUT_SECONDS)
    except KafkaException as exc:
        raise translate(exc, what) from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        return None
    return len(found.partitions)
