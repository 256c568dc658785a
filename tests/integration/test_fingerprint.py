"""The Python fingerprint of a JSON message equals Postgres's fingerprint of the same row.

Hypothesis draws values of every supported type, Postgres renders them with the SQL of
trueup.fingerprint, and Python renders the JSON a producer could have written for them (numbers
as numbers or strings, timestamps in any time zone, uuids in upper case...). Both canonical texts
and both hashes must be equal.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import random
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tests.conftest import PG_ADMIN_DSN
from trueup.fingerprint import (
    ColumnType,
    copy_text,
    fields_sql,
    fields_text,
    fingerprint,
    fingerprint_sql,
    loads,
    pg_hash,
    raw_fields,
)
from trueup.sides import _PLAIN_INPUT

pytestmark = pytest.mark.postgres

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pg() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'America/New_York'")  # renderings must not depend on it
        yield conn


def _sql_text(pg: psycopg.Connection[Any], values: list[Any], types: list[str]) -> tuple[str, int]:
    ctypes = [ColumnType.of(t) for t in types]
    names = [sql.Identifier(f"c{i}") for i in range(len(types))]
    inner = sql.SQL(", ").join(sql.SQL("{}::{} AS {}").format(sql.Placeholder(), sql.SQL(t), n)
                               for t, n in zip(types, names, strict=True))
    query = sql.SQL("SELECT {}, {} FROM (SELECT {}) AS v").format(
        fields_sql(names, ctypes), fingerprint_sql(names, ctypes), inner)
    row = pg.execute(query, values).fetchone()
    assert row is not None
    return row[0], row[1]


def _python(json_values: list[Any], types: list[str]) -> tuple[str, int]:
    ctypes = [ColumnType.of(t) for t in types]
    message = loads(json.dumps(json_values, default=str))  # as a consumer reads it
    return fields_text(message, ctypes), fingerprint(message, ctypes)


def _agree(pg: psycopg.Connection[Any], value: Any, json_value: Any, type_name: str) -> None:
    sql_text, sql_fp = _sql_text(pg, [value], [type_name])
    py_text, py_fp = _python([json_value], [type_name])
    assert py_text == sql_text, f"{type_name} {value!r} sent as {json_value!r}"
    assert py_fp == sql_fp == pg_hash(sql_text)


# -- numbers -----------------------------------------------------------------------------------

decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None,
                       min_value=decimal.Decimal("-1e20"), max_value=decimal.Decimal("1e20"))


class _Raw(str):
    """A JSON number written exactly as this text."""


def _number_json(draw: st.DrawFn, value: decimal.Decimal) -> Any:
    style = draw(st.sampled_from(["string", "number", "exponent"]))
    if style == "string":
        return str(value)
    if style == "exponent":
        return _Raw(f"{value:e}") if value.adjusted() < 15 else _Raw(str(value))
    return _Raw(format(value, "f"))


@st.composite
def numeric_case(draw: st.DrawFn) -> tuple[decimal.Decimal, Any]:
    value = draw(decimals.filter(lambda d: abs(d.as_tuple().exponent) < 30))  # type: ignore[arg-type]
    return value, _number_json(draw, value)


def _dumps_raw(values: list[Any]) -> str:
    parts = [str(v) if isinstance(v, _Raw) else json.dumps(v, default=str) for v in values]
    return "[" + ", ".join(parts) + "]"


def _agree_raw(pg: psycopg.Connection[Any], value: Any, json_value: Any, type_name: str) -> None:
    sql_text, sql_fp = _sql_text(pg, [value], [type_name])
    ctypes = [ColumnType.of(type_name)]
    message = loads(_dumps_raw([json_value]))
    assert fields_text(message, ctypes) == sql_text, f"{type_name} {value!r} as {json_value!r}"
    assert fingerprint(message, ctypes) == sql_fp


@SETTINGS
@given(case=numeric_case())
def test_numeric_renders_alike_as_number_string_or_exponent(
        pg: psycopg.Connection[Any], case: tuple[decimal.Decimal, Any]) -> None:
    _agree_raw(pg, case[0], case[1], "numeric")


@SETTINGS
@given(value=st.integers(min_value=-(2**63), max_value=2**63 - 1),
       style=st.sampled_from(["int", "string", "float-text"]))
def test_bigint_renders_alike(pg: psycopg.Connection[Any], value: int, style: str) -> None:
    json_value = {"int": value, "string": str(value), "float-text": _Raw(f"{value}.0")}[style]
    _agree_raw(pg, value, json_value, "int8")


@SETTINGS
@given(value=st.floats(allow_nan=False, allow_infinity=False, width=64),
       as_string=st.booleans())
def test_double_precision_renders_alike(pg: psycopg.Connection[Any], value: float,
                                        as_string: bool) -> None:
    _agree_raw(pg, value, repr(value) if as_string else _Raw(repr(value)), "float8")


@SETTINGS
@given(value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_real_renders_alike(pg: psycopg.Connection[Any], value: float) -> None:
    # a producer of a real column writes what Postgres prints for it
    printed = pg.execute("SELECT %s::float4::text", (value,)).fetchone()
    assert printed is not None
    _agree_raw(pg, value, _Raw(printed[0]), "float4")


@SETTINGS
@given(bits=st.integers(min_value=0, max_value=2**32 - 1))
def test_every_real_renders_alike_with_all_its_digits(pg: psycopg.Connection[Any],
                                                      bits: int) -> None:
    # any real, from its bits: the shortest digits that read back as it (float4out's), or a
    # whole number's exact integer, as Python reads them written in full
    value = struct.unpack("<f", struct.pack("<I", bits))[0]
    if math.isnan(value):
        return
    exact = format(decimal.Decimal(value), "f")
    _agree_raw(pg, value, exact if math.isinf(value) else _Raw(exact), "float4")


@pytest.mark.parametrize(("one", "other", "texts"), [
    (1234567, 1234568, ("1234567", "1234568")),
    ("1.2345678", "1.2345679", ("1.2345678", "1.2345679")),
    (16777216, 16777218, ("16777216", "16777218")),
    ("0.1", "0.10000001", ("0.1", "0.10000001")),
    ("1e20", "1.0000001e20", ("100000002004087734272", "100000010800180756480")),
    ("3.4028235e38", "-1e-45", ("340282346638528859811704183484516925440",
                                "-0.000000000000000000000000000000000000000000001"))])
def test_distinct_reals_render_distinctly_with_all_their_digits(
        pg: psycopg.Connection[Any], one: Any, other: Any, texts: tuple[str, str]) -> None:
    # numeric's cast of a real keeps 6 digits: 1234567 and 1234568 were equal (and a real
    # against a numeric was compared with all of them)
    assert [_sql_text(pg, [v], ["float4"])[0] for v in (one, other)] == list(texts)
    assert [_python([_Raw(str(v))], ["float4"])[0] for v in (one, other)] == list(texts)
    assert _python([str(one)], ["float4"])[0] == texts[0]


def test_numeric_integer_and_float_columns_agree_on_one_value(
        pg: psycopg.Connection[Any]) -> None:
    texts = {_sql_text(pg, [v], [t])[0] for v, t in
             [(decimal.Decimal("1050.00"), "numeric"), (1050, "int8"), (1050.0, "float8"),
              (decimal.Decimal("1.05E+3"), "numeric")]}
    assert texts == {"1050"}


@pytest.mark.parametrize(("one", "other"), [
    (1e20, 1.0000000000000002e20), (9007199254740992.0, 9007199254740994.0),
    (2.0**60, 2.0**60 + 256), (1.7976931348623157e308, 1.7976931348623155e308),
    (-20034855448587448.0, -20034855448587452.0), (0.30000000000000004, 0.3)])
def test_distinct_doubles_render_distinctly_from_2_to_the_53_on_too(
        pg: psycopg.Connection[Any], one: float, other: float) -> None:
    # From 2^53 on the doubles are integers 2, 4, 8... apart: 15 significant digits
    # (numeric's cast) called 1e20 and the next double equal.
    assert one != other
    texts = [_sql_text(pg, [v], ["float8"])[0] for v in (one, other)]
    assert texts[0] != texts[1]
    assert texts == [_python([_Raw(repr(v))], ["float8"])[0] for v in (one, other)]


@SETTINGS
@given(value=st.floats(allow_nan=False, allow_infinity=False, width=64),
       step=st.sampled_from([-1.0, 1.0]))
def test_neighbouring_doubles_never_render_alike(pg: psycopg.Connection[Any], value: float,
                                                 step: float) -> None:
    import math
    neighbour = math.nextafter(value, math.copysign(math.inf, step))
    if neighbour == value or math.isinf(neighbour) or value == 0 == neighbour:
        return
    texts = [_sql_text(pg, [v], ["float8"])[0] for v in (value, neighbour)]
    assert texts[0] != texts[1], (value, neighbour)
    assert texts == [_python([_Raw(repr(v))], ["float8"])[0] for v in (value, neighbour)]


@pytest.mark.parametrize(("value", "text"), [
    (1e20, "100000000000000000000"), (2.0**60, "1152921504606846976"),
    (-2.0**70, "-1180591620717411303424"), (1e-05, "0.00001"), (0.1, "0.1"),
    (1.5e-7, "0.00000015"), (-0.0, "0"), (1050.0, "1050")])
def test_a_double_renders_as_the_plain_decimal_of_its_value(
        pg: psycopg.Connection[Any], value: float, text: str) -> None:
    # whole doubles as the very integer (as bigint and numeric render it), others as the
    # shortest text that reads back as the same double: the form of every number
    assert _sql_text(pg, [value], ["float8"])[0] == text
    assert _python([_Raw(repr(value))], ["float8"])[0] == text
    if float(text) == int(float(text)):
        assert _sql_text(pg, [int(float(text))], ["numeric"])[0] == text


# -- text-like ---------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=40)


@SETTINGS
@given(value=texts)
def test_text_renders_alike(pg: psycopg.Connection[Any], value: str) -> None:
    _agree(pg, value, value, "text")
    _agree(pg, value, value, "varchar")


@SETTINGS
@given(value=texts.map(lambda s: s[:8].rstrip(" ")), pad=st.booleans())
def test_char_renders_alike_with_or_without_padding(pg: psycopg.Connection[Any], value: str,
                                                    pad: bool) -> None:
    _agree(pg, value, value.ljust(8) if pad else value, "bpchar")


@SETTINGS
@given(value=st.uuids(), upper=st.booleans())
def test_uuid_renders_alike_in_any_case(pg: psycopg.Connection[Any], value: uuid.UUID,
                                        upper: bool) -> None:
    _agree(pg, value, str(value).upper() if upper else str(value), "uuid")


def test_text_fields_cannot_run_into_each_other(pg: psycopg.Connection[Any]) -> None:
    one = _sql_text(pg, ["a|b", "c"], ["text", "text"])
    other = _sql_text(pg, ["a", "b|c"], ["text", "text"])
    assert one[0] != other[0] and one[1] != other[1]


# -- booleans, times, dates --------------------------------------------------------------------


@SETTINGS
@given(value=st.booleans(), style=st.sampled_from(["json", "short", "word"]))
def test_boolean_renders_alike(pg: psycopg.Connection[Any], value: bool, style: str) -> None:
    json_value = {"json": value, "short": "t" if value else "f",
                  "word": "true" if value else "false"}[style]
    _agree(pg, value, json_value, "bool")


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m)))
instants = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                        timezones=st.just(dt.UTC))


@SETTINGS
@given(value=instants, zone=offsets, style=st.sampled_from(["iso", "space", "zulu"]))
def test_timestamptz_renders_alike_from_any_time_zone(
        pg: psycopg.Connection[Any], value: dt.datetime, zone: dt.timezone, style: str) -> None:
    local = value.astimezone(zone)
    json_value = {"iso": local.isoformat(), "space": local.isoformat(sep=" "),
                  "zulu": value.isoformat().replace("+00:00", "Z")}[style]
    _agree(pg, value, json_value, "timestamptz")


@SETTINGS
@given(value=instants, digits=st.text("0123456789", min_size=7, max_size=9),
       type_name=st.sampled_from(["timestamptz", "timestamp"]))
def test_timestamps_finer_than_microseconds_round_as_postgres_rounds(
        pg: psycopg.Connection[Any], value: dt.datetime, digits: str, type_name: str) -> None:
    # Java's Instant and Go's time write nanoseconds: Postgres rounds them to microseconds,
    # Python's fromisoformat cuts them off.
    text = value.replace(microsecond=0, tzinfo=None).isoformat() + "." + digits + "Z"
    sql_text, _ = _sql_text(pg, [text], [type_name])
    assert _python([text], [type_name])[0] == sql_text, text


@pytest.mark.parametrize("text", ["2026-01-01T00:00:00.9999995Z", "2026-12-31T23:59:59.99999951Z",
                                  "2026-01-01T00:00:00.1234565+05:30"])
def test_a_rounding_that_carries_into_the_next_second_agrees(
        pg: psycopg.Connection[Any], text: str) -> None:
    assert _python([text], ["timestamptz"])[0] == _sql_text(pg, [text], ["timestamptz"])[0]


@SETTINGS
@given(value=st.datetimes(min_value=dt.datetime(1900, 1, 1),
                          max_value=dt.datetime(2200, 1, 1)))
def test_timestamp_without_zone_renders_alike(pg: psycopg.Connection[Any],
                                              value: dt.datetime) -> None:
    _agree(pg, value, value.isoformat(), "timestamp")


@SETTINGS
@given(value=st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31)))
def test_date_renders_alike(pg: psycopg.Connection[Any], value: dt.date) -> None:
    _agree(pg, value, value.isoformat(), "date")


# -- JSON --------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), texts,
    decimals.map(lambda d: _Raw(str(d))),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children,
                                                                       max_size=4),
    max_leaves=12,
)


def _json_text(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@SETTINGS
@given(value=json_values, type_name=st.sampled_from(["jsonb", "json"]))
def test_json_renders_alike_whatever_the_key_order(pg: psycopg.Connection[Any], value: Any,
                                                   type_name: str) -> None:
    text = _json_text(value)
    sql_text, sql_fp = _sql_text(pg, [text], [type_name])
    message = loads("[" + text + "]")
    ctypes = [ColumnType.of(type_name)]
    assert fields_text(message, ctypes) == sql_text
    assert fingerprint(message, ctypes) == sql_fp


@pytest.mark.parametrize("depth", [1, 600, 900])
def test_json_nested_as_deep_as_loads_reads_renders_alike(pg: psycopg.Connection[Any],
                                                          depth: int) -> None:
    """The renderer recursed a few frames a level: past about 340 levels a message Postgres
    reads failed the Python path, and the run with it."""
    text = '{"b": ' * depth + '[1, {"zz": 2, "a": "x"}]' + "}" * depth
    sql_text, sql_fp = _sql_text(pg, [text], ["jsonb"])
    message = loads("[" + text + "]")
    ctypes = [ColumnType.of("jsonb")]
    assert fields_text(message, ctypes) == sql_text
    assert fingerprint(message, ctypes) == sql_fp


# -- whole rows --------------------------------------------------------------------------------

ROW_TYPES = ["int8", "numeric", "text", "bool", "timestamptz", "date", "uuid", "jsonb"]


@st.composite
def rows(draw: st.DrawFn) -> tuple[list[Any], list[Any]]:
    """A row (with NULLs) and the JSON values a producer could have written for it."""
    makers: list[Callable[[], tuple[Any, Any]]] = [
        lambda: (v := draw(st.integers(-(2**63), 2**63 - 1)), str(v)),
        lambda: (v := draw(decimals), str(v)),
        lambda: (v := draw(texts), v),
        lambda: (v := draw(st.booleans()), v),
        lambda: (v := draw(instants), v.astimezone(draw(offsets)).isoformat()),
        lambda: (v := draw(st.dates()), v.isoformat()),
        lambda: (v := draw(st.uuids()), str(v).upper()),
        lambda: (v := {"a": draw(st.integers()), "bb": [draw(texts)]}, v),
    ]
    pairs = [maker() if draw(st.integers(0, 4)) != 0 else (None, None) for maker in makers]
    return [p[0] if not isinstance(p[0], dict) else json.dumps(p[0]) for p in pairs], [
        p[1] for p in pairs]


@SETTINGS
@given(row=rows())
def test_whole_rows_with_nulls_fingerprint_alike(pg: psycopg.Connection[Any],
                                                 row: tuple[list[Any], list[Any]]) -> None:
    values, json_row = row
    sql_text, sql_fp = _sql_text(pg, values, ROW_TYPES)
    py_text, py_fp = _python(json_row, ROW_TYPES)
    assert py_text == sql_text
    assert py_fp == sql_fp


def test_null_and_empty_text_differ(pg: psycopg.Connection[Any]) -> None:
    assert _sql_text(pg, [None], ["text"])[0] == "~"
    assert _sql_text(pg, [""], ["text"])[0] == "0:"
    assert _sql_text(pg, ["~"], ["text"])[0] == "1:~"


def test_unreadable_value_never_equals_a_valid_rendering() -> None:
    ctypes = [ColumnType.of("int8")]
    assert fields_text(["not a number"], ctypes) == '!"not a number"'
    assert random.Random(0)  # keep the import honest for seeded cases elsewhere


def _postgres_reads(pg: psycopg.Connection[Any], json_value: str, type_name: str) -> str | None:
    """How the mirror's Postgres path reads ``{"x": json_value}`` (json_to_record, cast to the
    column's type as staging does), in canonical text; None when Postgres refuses it."""
    from trueup.staging import _record_type, _record_value
    ctype = ColumnType.of(type_name)
    column = _record_value(sql.SQL("x.x"), ctype)
    try:
        with pg.transaction():
            row = pg.execute(sql.SQL("SELECT {} FROM json_to_record(%s::json) AS x(x {})").format(
                fields_sql([column], [ctype]), _record_type(ctype)),
                ('{"x": ' + json_value + "}",)).fetchone()
    except psycopg.errors.DataError:
        return None
    assert row is not None
    return str(row[0])


def _python_reads(json_value: str, type_name: str) -> str:
    """How the mirror's Python path reads the same field (a value that is no string read as
    text is its JSON as written)."""
    ctype = ColumnType.of(type_name)
    value = loads('{"x": ' + json_value + "}")["x"]
    if ctype.kind.value == "text" and not isinstance(value, str | None):
        value = raw_fields('{"x": ' + json_value + "}")["x"]
    return fields_text([value], [ctype])


@pytest.mark.parametrize(("json_value", "type_name"), [
    ("1e3", "text"), ("-0", "text"), ('{"b":1,  "a":2}', "text"), ("2.50E+2", "varchar"),
    ("[1.0, null]", "text"), ("true", "text"), ("1e3", "bpchar"),
    ('"ye"', "bool"), ('"of"', "bool"), ('" ON "', "bool"), ('"Tr"', "bool"),
    ('"2026-01-01 00:00:00 UTC"', "timestamptz"), ('"2026-01-01 00:00:00 utc"', "timestamp"),
    ('"2026-01-01 00:00:00 Europe/Paris"', "timestamptz"),
    ('"2026-11-01 01:30:00 America/New_York"', "timestamptz"),  # happens twice
    ('"2026-03-08 02:30:00 America/New_York"', "timestamptz"),  # never happens
    ('"2026-01-01 00:00:00 America/Port-au-Prince"', "timestamptz"),
    ('"2026-01-01 00:00:00 Etc/GMT+5"', "timestamptz"),
    ('"2026-01-01T24:00:00Z"', "timestamptz"), ('"2026-12-31T23:59:60Z"', "timestamp"),
    ('"epoch"', "timestamptz"), ('"EPOCH"', "timestamp"), ('"epoch"', "date"),
    ('"2026-01-01T00:00:00Z"', "date"), ('"2026-03-04 00:00:00"', "date"),
    ('"2026-01-01 23:00:00-05"', "date"), ('"2026-01-01T23:59:59.9999995Z"', "date"),
    ('"2026-01-01T24:00:00"', "date"), ('"2026-01-01 10:00 Europe/Paris"', "date"),
    ('"0x10"', "float8"), ('"-nan"', "float8"), ('" 1.5 "', "numeric"), ('"inf"', "numeric"),
    ("1e20", "float8"), ("9007199254740993", "float8"), ("1e-320", "float8"),
    ('"{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"', "uuid"),
    ('"a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"', "uuid"),
    ("16777217", "float4"), ('"1.00000005960464477539062500001"', "float4"),
])
def test_both_mirror_paths_read_a_field_alike(pg: psycopg.Connection[Any], json_value: str,
                                              type_name: str) -> None:
    """A batch of messages is read by Postgres, or by Python when Postgres refuses any message
    of it: a message must read the same either way (Postgres's reading is the reference)."""
    expected = _postgres_reads(pg, json_value, type_name)
    assert expected is not None and not expected.startswith("!")
    assert _python_reads(json_value, type_name) == expected


@pytest.mark.parametrize(("json_value", "type_name"), [
    ('"1_000"', "numeric"), ('"1_000"', "float8"), ('"1_000"', "int8"), ("1e-400", "float8"),
    ("1e400", "float8"), ("3.5e38", "float4"), ("1e-50", "float4"), ('"sNaN"', "numeric"),
    ('"+NaN"', "numeric"), ('"\u0661"', "numeric"), ('"\u00a01"', "float8"),
    ('"ye s"', "bool"), ('"o"', "bool"), ('"2026-01-01 00:00:00 Nowhere/Land"', "timestamptz"),
    ('"2026-01-01T23:59:60.5Z"', "timestamptz"), ('"2026-01-01 00:00:00+01 UTC"', "timestamptz"),
    # uuid.UUID reads these, Postgres's uuid input does not (nor a comma for the point)
    ('"urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', "uuid"),
    ('"a-0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', "uuid"),
    ('"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-"', "uuid"),
    ('"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', "uuid"),
    ('" a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', "uuid"),
    ('"2024-01-01T08:00:00,0Z"', "timestamptz"), ('"2024-01-01 08:00:00,5"', "timestamp"),
])
def test_python_refuses_what_postgres_refuses(pg: psycopg.Connection[Any], json_value: str,
                                              type_name: str) -> None:
    """Read leniently in Python, 1e-400 would be a float 0 and "1_000" the number 1000, equal
    to a source's: such a message must show up as a mismatch, as its value is no such thing."""
    assert _postgres_reads(pg, json_value, type_name) is None
    assert _python_reads(json_value, type_name).startswith("!")


@pytest.mark.parametrize("payload", [b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": Infinity}',
                                     b'\xef\xbb\xbf{"x": 1}', '{"x": 1}'.encode("utf-16")])
def test_messages_postgres_cannot_parse_are_not_json_in_python_either(
        pg: psycopg.Connection[Any], payload: bytes) -> None:
    with pytest.raises((psycopg.errors.DataError, UnicodeDecodeError)), pg.transaction():
        pg.execute("SELECT %s::json", (payload.decode(),))
    with pytest.raises(ValueError):
        loads(payload)


@pytest.mark.parametrize("type_name", ["timestamptz", "timestamp", "date"])
@pytest.mark.parametrize("spelling", ["infinity", "-infinity", "Infinity", "+infinity"])
def test_infinite_times_render_alike(pg: psycopg.Connection[Any], type_name: str,
                                     spelling: str) -> None:
    value = "-infinity" if spelling.startswith("-") else "infinity"
    _agree(pg, value, spelling, type_name)
    assert copy_text(spelling, ColumnType.of(type_name)) == value


@pytest.mark.parametrize("type_name", sorted(_PLAIN_INPUT))
def test_text_read_by_a_plain_cast_is_text_the_type_always_takes(
        pg: psycopg.Connection[Any], type_name: str) -> None:
    """The texts a target's text column is read by a plain cast (trueup.sides._PLAIN_INPUT)
    must never make that cast fail: the pattern admits a subset of what the type's input
    accepts, whatever the text it generates."""
    pattern = _PLAIN_INPUT[type_name]

    query = sql.SQL("SELECT bool_and(t ~ {}), count(t::{}) FROM unnest(%s::text[]) AS t").format(
        sql.Literal(pattern), sql.Identifier(type_name))
    edges = [t for t in _edge_texts() if re.fullmatch(pattern, t)]
    assert len(edges) >= 3
    assert pg.execute(query, (edges,)).fetchone() == (True, len(edges))

    @settings(SETTINGS, max_examples=30)  # 30 lists of up to 100 texts, one query each
    @given(st.lists(st.from_regex(pattern, fullmatch=True), min_size=1, max_size=100))
    def cast(texts: list[str]) -> None:
        assert pg.execute(query, (texts,)).fetchone() == (True, len(texts))

    cast()


def _edge_texts() -> list[str]:
    """Texts at the edges of every type's range, valid or not; each pattern keeps its own."""
    digits = [sign + "9" * n + tail for sign in ("", "-") for n in range(1, 21)
              for tail in ("", ".5", "." + "9" * 15)]
    digits += ["9" * 100 + "." + "9" * 100, "9" * 101, "0.0", "-0"]
    days = [f"{y:04d}-{m:02d}-{d:02d}" for y in (999, 1000, 1900, 2023, 2024, 9999)
            for m in range(0, 14) for d in range(0, 33)]
    times = ["00:00:00", "23:59:59.999999", "24:00:00", "23:60:00", "12:00:00.1234567"]
    stamps = [f"{day}{sep}{time}{zone}" for day in days[::7] for sep in (" ", "T")
              for time in times for zone in ("", "Z", "+14:59", "-1459", "+15:00", "+00")]
    words = ["t", "f", "true", "false", "TRUE", "yes", "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
             "00000000-0000-0000-0000-000000000000", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]
    return digits + days + stamps + words
