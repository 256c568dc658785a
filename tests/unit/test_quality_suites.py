"""Suite files: their format, the check names they produce, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from checks.gx import DEFAULT_SUITES
from trueup.config import parse_config
from trueup.errors import ConfigError
from trueup.quality import ExpectationSpec, _raised, load_suite, load_suites, suites_for
from trueup.statuses import CheckSeverity

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trueup.yaml"


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


def test_a_suite_table_without_its_schema_is_the_configs_public_table(tmp_path: Path) -> None:
    """The config reads ``orders`` as ``public.orders``; a suite naming ``orders`` was matched
    against nothing and silently dropped (no GX checks, nothing for auto-repair to wait on)."""
    path = tmp_path / "orders.yaml"
    path.write_text("connection: shop\ntable: orders\nexpectations:\n"
                    "  - type: expect_column_values_to_not_be_null\n    kwargs: {column: id}\n")
    suite = load_suite(path)
    assert (suite.table, suite.schema_name, suite.table_name) == (
        "public.orders", "public", "orders")
    config = parse_config(EXAMPLE.read_text(), "trueup.yaml", {})
    assert suites_for(config, [suite]) == [suite]


@pytest.mark.parametrize(("info", "expected"), [
    ({"raised_exception": True, "exception_message": "boom"}, "boom"),
    ({"('column_values.nonnull.unexpected_count', 'abc', ())": {
        "raised_exception": True, "exception_message": 'column "nope" does not exist',
        "exception_traceback": "..."}}, 'column "nope" does not exist'),
    ({"raised_exception": False}, None), ({}, None), (None, None)])
def test_an_expectation_that_raised_keeps_its_reason(info: object, expected: str | None) -> None:
    """GX 1.x reports a failed metric under the metric's id, not at the top."""
    assert _raised(info) == expected
