"""Keys and versions as the state tables and ``--show`` hold them (JSON)."""

from __future__ import annotations

import decimal
import json
from typing import Any

import pytest

from trueup.runs import json_value


def _strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("value", "expected"), [
    (float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity"),
    (decimal.Decimal("NaN"), "NaN"), (decimal.Decimal("Infinity"), "Infinity"),
    (decimal.Decimal("-Infinity"), "-Infinity"), ([2, float("nan")], [2, "NaN"]),
    (decimal.Decimal("2.50"), "2.50"), (decimal.Decimal("7"), 7), (0.5, 0.5)])
def test_keys_and_versions_are_json_even_when_not_finite(value: Any, expected: Any) -> None:
    """A float or numeric key or version of NaN or Infinity made the run's differences
    unwritable (jsonb refuses NaN; Decimal Infinity overflowed int()): the run failed."""
    assert _strict(json.dumps(json_value(value))) == expected
