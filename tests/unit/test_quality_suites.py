"""Suite files: their format, the check names they produce, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from checks.gx import DEFAULT_SUITES
from trueup.errors import ConfigError
from trueup.quality import ExpectationSpec, load_suite, load_suites
from trueup.statuses import CheckSeverity


def test_example_suites_load_with_readable_unique_check_names() -> None:
    suites = {(s.connection, s.table): s for s in load_suites(DEFAULT_SUITES)}
    orders = suites[("shop", "public.orders")]
    names = [e.check_name for e in orders.expectations]
    assert "amount_cents__be_between" in names and "currency__be_in_set" in names
    assert ("billing", "billing.invoices") in suites


def test_check_name_defaults_to_column_and_short_type_and_severity_to_error() -> None:
    spec = ExpectationSpec(type="expect_column_values_to_be_between",
                           kwargs={"column": "amount_cents", "min_value": 0})
    assert spec.check_name == "amount_cents__be_between"
    assert spec.severity is CheckSeverity.ERROR
    assert ExpectationSpec(type="expect_table_row_count_to_be_between",
                           name="enough_rows").check_name == "enough_rows"


@pytest.mark.parametrize(("text", "expected"), [
    ("connection: shop\ntable: t\nexpectations: []\n", "expectations"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_nothing_at_all\n",
     "unknown GX expectation"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_be_between\n"
     "    kwargs: {min_value: 0}\n", "kwargs: not valid"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: not_an_expectation\n",
     "expected a GX expectation type"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_not_be_null\n"
     "    kwargs: {column: a}\n    severity: FATAL\n", "severity"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_not_be_null\n"
     "    kwargs: {column: a}\n  - type: expect_column_values_to_not_be_null\n"
     "    kwargs: {column: a}\n", "unique check name"),
])
def test_a_bad_suite_is_one_line_naming_the_file_and_field(
        tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_suite(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "\n" not in message
