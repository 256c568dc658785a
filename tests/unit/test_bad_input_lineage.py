"""Bad input to `trueup lineage NAME KEY`: a KEY nested past what Python reads, a number
written as Postgres reads it but JSON does not (007, +5), a composite key of many parts."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from trueup.errors import UsageError
from trueup.lineage import MAX_FORMS, lineage, parse_key

DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("depth", [101, 500, 990, 3000])
def test_a_single_key_nested_too_deeply_is_looked_up_as_its_text(depth: int) -> None:
    """`trueup lineage NAME "[[[...]]]"` printed "unexpected error: RecursionError": json
    raises it past a thousand levels, and what took the key on recursed a level at a time."""
    text = "[" * depth + "]" * depth
    assert parse_key(text, 1) == [[text]]


def test_a_composite_key_nested_too_deeply_is_refused_in_one_line() -> None:
    with pytest.raises(UsageError, match=r"^lineage: KEY: expected a JSON array of 2 values"):
        parse_key(DEEP, 2)


def test_a_key_nested_as_deep_as_max_depth_is_still_json() -> None:
    text = "[" * 100 + "]" * 100
    forms = parse_key(text, 1)
    assert forms[-1] == [text] and isinstance(forms[0][0], list), forms[:1]


@pytest.mark.parametrize(("text", "number"), [
    ("007", 7), ("0005", 5), ("+5", 5), ("\t+5 ", 5), ("-007", -7), ("+0", 0),
    (".5", Decimal("0.5")), ("5.", Decimal(5)), ("-007.50", Decimal("-7.50")),
    ("+1e2", Decimal("1E+2")),
])
def test_a_value_postgres_reads_as_a_number_is_also_looked_up_as_that_number(
        text: str, number: Any) -> None:
    """`trueup lineage orders 007` found nothing: Postgres reads '007'::bigint as 7, but the
    value was looked up as a number only when it was JSON. Its text is still looked up first
    (a text column holding 007), and is KEY as read."""
    forms = parse_key(text, 1)
    assert forms[0] == [text]
    assert [number] in forms, forms
    assert [text, number] in parse_key(json.dumps([text, text]), 2)


@pytest.mark.parametrize("text", ["0x1F", "1_000", "5 5", "+-5", "NaN", "Infinity", "1e400",
                                  "\u0667"])  # ARABIC-INDIC DIGIT SEVEN
def test_text_postgres_15_reads_as_no_number_is_looked_up_as_text_only(text: str) -> None:
    assert parse_key(text, 1) == [[text]]


def test_every_form_of_every_part_of_a_long_composite_key_is_looked_up() -> None:
    """Forms were cut at MAX_FORMS in itertools.product's order, which varies the last part
    first: of a key of seven parts (two forms each, 128 in all) every form looked up had the
    first part as a number, and a key whose first column is text ("1") was never found."""
    forms = parse_key(json.dumps([1, 2, 3, 4, 5, 6, 7]), 7)
    assert len(forms) == MAX_FORMS
    assert forms[0] == [1, 2, 3, 4, 5, 6, 7]  # KEY as read comes first
    for i in range(7):
        one_text: list[Any] = [1, 2, 3, 4, 5, 6, 7]
        one_text[i] = str(one_text[i])
        assert one_text in forms, i
    assert ["1", "2", 3, 4, 5, 6, 7] in forms  # two text columns, too
    assert len({json.dumps(f) for f in forms}) == len(forms)  # each form once
    # a key with fewer forms than the limit: all of them, each once
    few = parse_key('["a", 1, 2]', 3)
    assert sorted(map(json.dumps, few)) == sorted(map(json.dumps, [
        ["a", 1, 2], ["a", "1", 2], ["a", 1, "2"], ["a", "1", "2"]]))


@pytest.mark.postgres
def test_lineage_of_007_finds_the_key_7_in_the_state(state_db: str) -> None:
    """End to end against the state: the run that found bigint key 7, and the text key
    "007" (a different key) as itself; a KEY nested too deeply finds nothing, quietly."""
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        run = conn.execute("INSERT INTO trueup.runs (reconciliation, status) "
                           "VALUES ('orders', 'succeeded') RETURNING run_id").fetchone()
        assert run is not None
        for seq, key in enumerate(([7], ["007"], ["1", 2, 3, 4, 5, 6, 7])):
            conn.execute("INSERT INTO trueup.differences (run_id, seq, reconciliation, key, "
                         "class) VALUES (%s, %s, 'orders', %s, 'missing')",
                         (run["run_id"], seq, json.dumps(key)))
        for text, found in (("007", [[7], ["007"]]), ("0007", [[7]]), ("+7", [[7]]),
                            (" 7", [[7]]), ("7", [[7]])):
            document = lineage(conn, "orders", parse_key(text, 1))
            assert sorted(r["seq"] for r in conn.execute(
                "SELECT seq FROM trueup.differences WHERE key = ANY(%s::jsonb[])",
                ([json.dumps(k) for k in found],)).fetchall()) == [0, 1][:len(found)]
            assert len(document["runs"]) == len(found), (text, document)
            assert document["key"] in found, (text, document["key"])
        composite = lineage(conn, "orders", parse_key("[1, 2, 3, 4, 5, 6, 7]", 7))
        assert composite["key"] == ["1", 2, 3, 4, 5, 6, 7]
        assert len(composite["runs"]) == 1
        nothing = lineage(conn, "orders", parse_key(DEEP, 1))
        assert (nothing["runs"], nothing["repairs"], nothing["key"]) == ([], [], [DEEP])
