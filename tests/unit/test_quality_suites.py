"""Suite files: their format, the check names they produce, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from checks.gx import DEFAULT_SUITES, check_result, quality_definitions
from trueup import quality
from trueup.config import parse_config
from trueup.errors import ConfigError
from trueup.quality import (
    CACHE_DIR_ENV,
    ExpectationOutcome,
    ExpectationSpec,
    _raised,
    load_suite,
    load_suites,
    suites_for,
)
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
    # the same expectation under two names: GX keeps one, the other never had a result
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_not_be_null\n"
     "    kwargs: {column: a}\n  - type: expect_column_values_to_not_be_null\n"
     "    kwargs: {column: a}\n    name: a_again\n    severity: WARN\n",
     "expectations.1: expected each expectation once (the same "
     "expect_column_values_to_not_be_null and kwargs as expectations.0)"),
    # kwargs that read apart but GX takes for equal: every run failed ("GX returned no result")
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_be_between\n"
     "    kwargs: {column: a, min_value: 0}\n  - type: expect_column_values_to_be_between\n"
     "    kwargs: {column: a, min_value: 0.0}\n    name: again\n",
     "expectations.1: expected each expectation once (GX takes this "
     "expect_column_values_to_be_between for expectations.0"),
    ("connection: shop\ntable: t\nexpectations:\n  - type: expect_column_values_to_be_between\n"
     "    kwargs: {column: a, min_value: 0}\n  - type: expect_column_values_to_be_between\n"
     "    kwargs: {column: a, min_value: 0, mostly: 1}\n    name: again\n",
     "expectations.1: expected each expectation once (GX takes this"),
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


GOOD = ("connection: shop\ntable: public.orders\nexpectations:\n"
        "  - type: expect_column_values_to_be_between\n    kwargs: {column: a, min_value: 0}\n")
BAD_KWARGS = ("connection: shop\ntable: public.orders\nexpectations:\n"
              "  - type: expect_column_values_to_be_between\n    kwargs: {min_value: 0}\n")


def _gx_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The expectation types built with GX from now on (each built for real)."""
    built: list[str] = []
    real = quality._expectation

    def counted(spec: ExpectationSpec) -> Any:
        built.append(spec.type)
        return real(spec)

    monkeypatch.setattr(quality, "_expectation", counted)
    return built


def test_a_suite_gx_accepted_once_is_not_built_again_until_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process loading the code location (each Dagster run's) imported GX, seconds of
    CPU, to check suites that had not changed."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    built = _gx_builds(monkeypatch)
    path = tmp_path / "orders.yaml"
    path.write_text(GOOD)
    first, second = load_suite(path), load_suite(path)
    assert first == second and built == ["expect_column_values_to_be_between"]
    assert len(list((tmp_path / "cache").rglob("*"))) == 2  # gx-accepted/ and one marker

    path.write_text(GOOD.replace("min_value: 0", "min_value: 1"))
    assert load_suite(path).expectations[0].kwargs["min_value"] == 1
    assert len(built) == 2


def test_a_suite_gx_rejected_is_checked_every_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    built = _gx_builds(monkeypatch)
    path = tmp_path / "orders.yaml"
    path.write_text(BAD_KWARGS)
    for _ in range(2):
        with pytest.raises(ConfigError, match="kwargs: not valid"):
            load_suite(path)
    assert len(built) == 2 and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_still_checks_the_suite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "file" / "cache"))
    path = tmp_path / "orders.yaml"
    path.write_text(GOOD)
    assert load_suite(path).table == "public.orders"
    path.write_text(BAD_KWARGS)
    with pytest.raises(ConfigError, match="kwargs: not valid"):
        load_suite(path)


def test_only_the_suites_of_the_configs_tables_are_checked_with_gx(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    (tmp_path / "other.yaml").write_text(BAD_KWARGS.replace("public.orders", "public.other"))
    (tmp_path / "orders.yaml").write_text(GOOD)
    config = parse_config(EXAMPLE.read_text(), "trueup.yaml", {})
    assert [s.table for s in load_suites(tmp_path, config)] == ["public.orders"]
    with pytest.raises(ConfigError, match=r"other\.yaml"):
        load_suites(tmp_path)
    # nor read further: a mistake in another config's suite is not this config's to report
    (tmp_path / "broken.yaml").write_text("connection: shop\ntable: other\nexpectations: []\n")
    assert [s.table for s in load_suites(tmp_path, config)] == ["public.orders"]
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_suites(tmp_path)
    # a file whose table cannot be told is read, and its mistake reported
    (tmp_path / "unknown.yaml").write_text("connection: [shop]\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml"):
        load_suites(tmp_path, config)


def test_values_that_read_alike_but_differ_in_type_are_remembered_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyed by JSON with repr for the rest, a date GX accepted once let through the string
    of its repr, which GX rejects."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "orders.yaml"
    path.write_text(GOOD.replace("min_value: 0", "min_value: 2024-01-01"))
    load_suite(path)
    path.write_text(GOOD.replace("min_value: 0", "min_value: 'datetime.date(2024, 1, 1)'"))
    with pytest.raises(ConfigError, match="kwargs: not valid"):
        load_suite(path)


def test_a_mapping_whose_keys_mix_types_is_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML reads ``on:`` as True: sorting such keys for the cache raised a TypeError, which
    stopped the code location with a traceback."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    built = _gx_builds(monkeypatch)
    path = tmp_path / "orders.yaml"
    path.write_text(GOOD.replace("min_value: 0}", "min_value: 0, meta: {on: call, owner: x}}"))
    assert load_suite(path) == load_suite(path) and len(built) == 1


def test_a_cache_that_cannot_be_read_still_checks_the_suite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "orders.yaml"
    path.write_text(BAD_KWARGS)

    def refused(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(ConfigError, match="kwargs: not valid"):
        load_suite(path)


def test_two_tables_whose_quality_jobs_would_share_a_name_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job names join the table's key parts with ``_``: shop/a_b/c and shop/a/b_c both made
    quality_shop_a_b_c, and Dagster refused the code location with an error of its own."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    raw = yaml.safe_load(EXAMPLE.read_text())
    invoices = raw["reconciliations"]["orders_invoices"]
    for name, table in (("one", "a_b.c"), ("two", "a.b_c")):
        raw["reconciliations"][name] = {**invoices, "source": {**invoices["source"],
                                                               "table": table}}
        (tmp_path / f"{name}.yaml").write_text(GOOD.replace("public.orders", table))
    config = parse_config(yaml.safe_dump(raw), "trueup.yaml", {})
    with pytest.raises(ConfigError) as raised:
        quality_definitions(config, tmp_path)
    assert str(raised.value) == (
        f"{tmp_path / 'two.yaml'}: table: expected a table whose job name differs from that "
        f"of a_b.c ({tmp_path / 'one.yaml'}): both make quality_shop_a_b_c")


def test_a_failed_expectation_on_the_whole_table_says_what_it_observed() -> None:
    """A failed row count (or a mean on an empty column) had no unexpected values to show:
    its check said only "failed"."""
    outcome = ExpectationOutcome(
        name="rows", type="expect_table_row_count_to_be_between", passed=False,
        severity=CheckSeverity.ERROR, element_count=None, unexpected_count=None,
        unexpected_percent=None, sample=[], observed_value=0,
        kwargs={"min_value": 1, "max_value": None})
    result = check_result(dg.AssetKey(["postgres", "shop", "public", "orders"]), outcome)
    assert not result.passed and result.description == "failed: observed 0"
