"""Backfill pieces that need no services: SQL over keys, message keys, pacing, lineage keys."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from psycopg import sql

from trueup import pacing
from trueup.backfill.keyspace import KeySpace, repairs_text
from trueup.backfill.model import (
    MAX_CHUNK_ROWS,
    MAX_WORKERS,
    BackfillOptions,
    WorkerOptions,
)
from trueup.backfill.upsert import split_fresh
from trueup.errors import UsageError
from trueup.fingerprint import ColumnType
from trueup.lineage import parse_key
from trueup.pacing import Pacer
from trueup.statuses import BackfillScope, KeyOrder

TEXT, INT8 = ColumnType.of("text"), ColumnType.of("int8")


def _render(composable: sql.Composable) -> str:
    # Literal quoting needs no connection for str/int values with as_string(None)
    return composable.as_string(None)


def test_a_composite_range_compares_rows_in_the_c_collation_with_open_ends() -> None:
    space = KeySpace(exprs=[sql.Identifier("region"), sql.Identifier("id")],
                     types=[TEXT, INT8])
    text = _render(space.in_range(["eu", 5], None))
    assert text.startswith('(("region" COLLATE "C"), "id") >= (')
    assert "::\"int8\"" in text and "<" not in text
    assert _render(space.in_range(None, None)) == "true"
    both = _render(space.in_range(["a", 1], ["b", 2]))
    assert ">=" in both and " < " in both


def test_a_key_list_is_matched_through_jsonb_elements() -> None:
    space = KeySpace(exprs=[sql.Identifier("id")], types=[INT8])
    text = _render(space.in_list([[1], [2]]))
    assert text.startswith('"id" IN (SELECT (j ->> 0)::"int8" FROM jsonb_array_elements(')
    assert "'[[1], [2]]'" in text


def test_only_comparisons_of_the_columns_as_they_are_count_as_served_by_the_key_index() -> None:
    def space(*names: str, order: KeyOrder = KeyOrder.C) -> KeySpace:
        return KeySpace(exprs=[sql.Identifier(f"k{i}") for i in range(len(names))],
                        types=[ColumnType.of(n) for n in names], order=order)

    assert space("int8", "uuid").indexed(ranges=True)
    assert not space("int4", "text").indexed(ranges=True)  # COLLATE "C"
    assert space("int4", "text", order=KeyOrder.NATIVE).indexed(ranges=True)
    assert not space("bpchar", order=KeyOrder.NATIVE).indexed(ranges=True)
    assert space("text", "varchar", "uuid").indexed(ranges=False)
    assert not space("bpchar").indexed(ranges=False)  # compared as text, unpadded
    assert not space("citext").indexed(ranges=False)  # ::text
    assert _render(space("int8", "text").complete) == '"k0" IS NOT NULL AND "k1" IS NOT NULL'


class _Clock:
    """A monotonic clock that moves only when slept on (stands in for ``time``)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_pacer_caps_rows_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(pacing, "time", clock)
    pace = Pacer(1000.0)
    for _ in range(4):
        pace(100, sleep=clock.sleep)  # 400 rows at 1000/s: the first at once, then 0.1 s each
    assert clock.slept == pytest.approx([0.1, 0.1, 0.1])
    clock.now += 5  # idle: no credit saved up, the next goes at once and the one after waits
    pace(100, sleep=clock.sleep)
    pace(100, sleep=clock.sleep)
    assert clock.slept[3:] == pytest.approx([0.1])

    def never(seconds: float) -> None:
        raise AssertionError(f"an unlimited pacer slept {seconds} s")

    Pacer(None)(10**9, sleep=never)


def test_lineage_keys_accept_a_value_or_a_json_array() -> None:
    assert parse_key("42", 1) == [[42], ["42"]]
    assert parse_key("abc", 1) == [["abc"]]
    assert parse_key('["eu", 1]', 2) == [["eu", 1], ["eu", "1"]]
    assert parse_key("[7]", 1) == [[7], ["7"], ["[7]"]]
    assert parse_key("NaN", 1) == [["NaN"]]  # JSON to Python, not to Postgres
    assert parse_key("1e400", 1) == [["1e400"]]  # Infinity as a double: its text
    with pytest.raises(UsageError, match="JSON array of 2"):
        parse_key("[1.5, 1e400]", 2)  # no such key: one line, not a jsonb error
    with pytest.raises(UsageError, match="JSON array of 2"):
        parse_key("eu", 2)


@pytest.mark.parametrize("text, parts, stored", [
    # a text key that reads as JSON: also looked up as that text
    ('["x"]', 1, ["[\"x\"]"]),
    # a uuid as Postgres prints it, whatever case or braces it was written in
    ("6F9619FF-8B86-D011-B42D-00C04FC964FF", 1, ["6f9619ff-8b86-d011-b42d-00c04fc964ff"]),
    ("{6f9619ff-8b86-d011-b42d-00c04fc964ff}", 1, ["6f9619ff-8b86-d011-b42d-00c04fc964ff"]),
    # each part of a composite key in each form: digits of an integer column written as text
    ('["acme", "1"]', 2, ["acme", 1]),
    ("[7, 3]", 2, ["7", "3"]),
    # the text of a single key that reads as a longer array (it was refused: "one value")
    ("[1,2]", 1, ["[1,2]"]),
    # a time in any zone or spelling as runs store it: ISO, in UTC (only +00:00 was found)
    ("2025-12-31T22:00:00.123456Z", 1, ["2025-12-31T22:00:00.123456+00:00"]),
    ("2026-01-01 00:00:00.123456+02", 1, ["2025-12-31T22:00:00.123456+00:00"]),
    ("2025-12-31 22:00:00", 1, ["2025-12-31T22:00:00"]),  # a timestamp without time zone
    ('["eu", "2025-12-31T23:00:00+01:00"]', 2, ["eu", "2025-12-31T22:00:00+00:00"]),
    # a fraction as Postgres writes it (repairs rows, runs since), and as isoformat did (runs
    # before): 10:30:00.5 was found in one table, never in both
    ("2026-01-01T10:30:00.5Z", 1, ["2026-01-01T10:30:00.5+00:00"]),
    ("2026-01-01 11:30:00.500+01", 1, ["2026-01-01T10:30:00.5+00:00"]),
    ("2026-01-01T10:30:00.5Z", 1, ["2026-01-01T10:30:00.500000+00:00"]),
    ("2026-01-01 10:30:00.120", 1, ["2026-01-01T10:30:00.12"]),
])
def test_a_lineage_key_is_looked_up_in_every_form_it_may_be_stored_in(
        text: str, parts: int, stored: list[Any]) -> None:
    """Only the exact JSON types were: an upper-case uuid, a composite key of an integer and
    a text column written all as text, a text key that reads as JSON found nothing."""
    assert stored in parse_key(text, parts)


@pytest.mark.parametrize("text, parts", [
    ('"\\u0000"', 1), ("a\x00b", 1), ("\udcff", 1), ('["eu", "\\u0000"]', 2)])
def test_a_lineage_key_no_stored_key_can_be_is_refused_in_one_line(text: str, parts: int) -> None:
    """A NUL (jsonb has none) or text not UTF-8 (bytes a shell passed on: surrogates) reached
    Postgres: a traceback and 'unexpected error'."""
    with pytest.raises(UsageError, match="cannot be a stored key"):
        parse_key(text, parts)


def test_a_fresh_chunk_s_copy_lines_split_into_target_rows_and_repairs_rows_escapes_and_all(
        ) -> None:
    """COPY text escapes tabs, newlines and backslashes inside fields: each field passes on
    as it is, and the split keeps lines whole."""
    data = (b'[1]\t-5\t1\t2\ta\\tb\t1.25\n'
            b'["x\\\\y", 2]\t7\tx\\\\y\t2\t\\N\tline\\nbreak\n')
    rows, repairs, n = split_fresh(data, b"\t!\n")
    assert n == 2
    assert rows == b"1\t2\ta\\tb\t1.25\nx\\\\y\t2\t\\N\tline\\nbreak\n"
    assert repairs == (b"[1]\tinsert\t\\N\t-5\t!\n"
                       b'["x\\\\y", 2]\tinsert\t\\N\t7\t!\n')
    assert split_fresh(b"", b"\n") == (b"", b"", 0)


@pytest.mark.parametrize("options, message", [
    ({"chunk_size": 0}, "chunk_size: expected a positive integer (got 0)"),
    ({"chunk_size": MAX_CHUNK_ROWS + 1}, f"chunk_size: expected at most {MAX_CHUNK_ROWS} "
                                         f"(got {MAX_CHUNK_ROWS + 1})"),
    ({"workers": -1}, f"workers: expected 1 to {MAX_WORKERS} (got -1)"),
    # 100,000 threads filled the server's connections, and the process outlived its backfill
    ({"workers": MAX_WORKERS + 1}, f"workers: expected 1 to {MAX_WORKERS} "
                                   f"(got {MAX_WORKERS + 1}); more processes serve"),
    ({"rate": 0.0}, "rate: expected a positive number of rows per second (got 0.0)"),
    ({"rate": float("inf")}, "rate: expected a positive number of rows per second (got inf)"),
    ({"scope": BackfillScope.RUN}, "scope run needs run_id"),
    ({"scope": BackfillScope.PARTITION}, "scope partition needs a partition"),
    # the launchpad passed run_id on with every scope: 0 failed on the backfills' foreign key
    # with a traceback, another reconciliation's run was recorded on the backfill
    ({"run_id": 0}, "run_id: only scope run repairs one run's differences (scope is all;"),
    ({"scope": BackfillScope.PARTITION, "partition": "2026-02-01", "run_id": 3},
     "run_id: only scope run repairs one run's differences (scope is partition;"),
])
def test_backfill_options_no_backfill_can_run_are_refused_wherever_they_come_from(
        options: dict[str, Any], message: str) -> None:
    """The CLI and the Dagster launchpad build the same options: one place refuses them."""
    with pytest.raises(UsageError) as refused:
        BackfillOptions(**{"scope": BackfillScope.ALL, **options})
    assert str(refused.value).startswith(message), refused.value
    assert BackfillOptions(scope=BackfillScope.ALL, chunk_size=MAX_CHUNK_ROWS, rate=0.5,
                           workers=MAX_WORKERS)
    if "workers" in options:  # --resume builds only these, from the same --workers
        with pytest.raises(UsageError, match=r"^workers: expected 1 to"):
            WorkerOptions(workers=options["workers"])


@pytest.mark.parametrize(("key_json", "text"), [
    ("[9.00]", "[9]"), ("[0.00]", "[0]"), ("[-0.0]", "[0]"), ("[100]", "[100]"),
    ("[1e2]", "[100]"), ("[1.50e-7]", "[0.00000015]"),
    ("[12345678901234567890123456789.10]", "[12345678901234567890123456789.1]"),
    ("[0.1000000000000000000000000000001]", "[0.1000000000000000000000000000001]"),
    ('[2.50, "2.50", {"a": 2.50}, true, null]', '[2.5, "2.50", {"a": 2.50}, true, null]'),
])
def test_repairs_text_trims_a_keys_numbers_as_trim_scale_does_and_keeps_every_digit(
        key_json: str, text: str) -> None:
    """Postgres's trim_scale drops the zeros ending a fraction and rounds nothing; Decimal's
    normalize() would round past 28 digits, giving two keys one text."""
    assert repairs_text(json.loads(key_json, parse_float=Decimal)) == text
