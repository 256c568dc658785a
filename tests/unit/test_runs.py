"""Keys and versions as the state tables and ``--show`` hold them (JSON)."""

from __future__ import annotations

import argparse
import decimal
import json
from pathlib import Path
from typing import Any

import pytest

from trueup import diff
from trueup.cli import EXIT_DIFFERENCES
from trueup.config import load_config
from trueup.runs import Difference, RunSummary, json_value
from trueup.statuses import DifferenceClass

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trueup.yaml"


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


@pytest.mark.parametrize(("flags", "summary_on"), [
    ({"show": True, "json": False}, "stderr"), ({"show": False, "json": False}, "stdout")],
    ids=["show", "summary only"])
def test_show_leaves_stdout_to_its_json_lines_and_tells_the_summary_on_stderr(
        flags: dict[str, bool], summary_on: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Scripts pipe ``diff --show`` to jq: the human summary printed after the JSON lines
    broke them. Without --show the summary is the output, on stdout as before."""
    found = [Difference(key=[1], cls=DifferenceClass.MISSING, source_version=3),
             Difference(key=[2], cls=DifferenceClass.ORPHAN, target_version=1)]

    def run(config: Any, name: str, **kwargs: Any) -> RunSummary:
        for difference in found:
            kwargs["on_difference"](difference)
        return RunSummary(reconciliation=name, run_id=7, partition=None, source_rows=20,
                          target_rows=19, missing=1, orphan=1, seconds=0.5)

    monkeypatch.setattr(diff, "diff", run)
    args = argparse.Namespace(name="orders_events", partition=None, **flags)
    assert diff.cmd_diff(load_config(EXAMPLE, environ={}), args) == EXIT_DIFFERENCES
    printed = capsys.readouterr()
    summary = ["orders_events: run 7, 20 source rows, 19 target rows, 0.50 s",
               "  missing 1  orphan 1  stale 0  ahead 0  mismatch 0  in_flight 0  unreadable 0",
               "  differences found"]
    out = printed.out.splitlines()
    if flags["show"]:
        assert [_strict(line) for line in out] == [d.to_json() for d in found], printed.out
    else:
        assert out == summary
    assert (printed.err if summary_on == "stderr" else printed.out).splitlines()[-3:] == summary
