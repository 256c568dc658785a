"""When a new version of trueup rebuilds a Kafka mirror: only when its renderings changed."""

from __future__ import annotations

import hashlib
import json

from trueup.fingerprint import ColumnType
from trueup.mirror import MirrorShape


def _shape(column_type: str) -> MirrorShape:
    return MirrorShape(name="orders", topic="orders.v1", key_fields=["id"], key_columns=["id"],
                       key_types=[ColumnType.of("int8")], version_field="version",
                       version_type=ColumnType.of("int8"), column_fields=["status", "total"],
                       column_types=[ColumnType.of("text"), ColumnType.of(column_type)])


def _before_reals(shape: MirrorShape) -> str:
    """The signature of 2026-11-30 (renderings v3)."""
    parts = [shape.topic, shape.key_fields, shape.key_columns, ["int8"], shape.version_field,
             "int8", shape.column_fields, [t.name for t in shape.column_types], "v3"]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def test_a_mirror_without_reals_keeps_its_signature_across_the_upgrade() -> None:
    """A rebuild loses the keys whose messages a topic's retention removed: reals rendering
    with all their digits rebuilt every mirror, reals or not."""
    shape = _shape("numeric")
    assert shape.signature == _before_reals(shape)


def test_a_mirror_with_a_real_is_rebuilt_once_for_its_digits() -> None:
    shape = _shape("float4")
    assert shape.signature != _before_reals(shape)
