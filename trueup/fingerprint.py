"""Fingerprints: one canonical text form of a row, computed in SQL or in Python.

A reconciliation compares a Postgres row with a Postgres row on another server, or with a JSON
message. Both sides render every compared value in the canonical form of docs/fingerprint.md,
chosen by the *source* column's type, and hash the row text with Postgres's
``hashtextextended(text, 0)`` (lookup3, 64 bits). :func:`pg_hash` is the same function in Python,
so a fingerprint can be computed from a Kafka message without a database and still equal the one
Postgres computes for the source row.

Rendering per kind (``~`` stands for NULL; text-like values are length-prefixed so that no
choice of values can make two different rows render alike):

===========  ==============================================  ===========================
kind         canonical text                                  SQL
===========  ==============================================  ===========================
number       plain decimal, no exponent, no trailing zeros   ``trim_scale(x::numeric)``
text         ``<utf8 bytes>:<text>`` (uuid lowercased)       ``octet_length(x) || ':' || x``
bool         ``true`` / ``false``                            ``x::text``
timestamp    microseconds since 1970-01-01 UTC, infinity     ``extract(epoch ...) * 1e6``
date         days since 1970-01-01, infinity                 ``x - DATE '1970-01-01'``
json         ``<bytes>:<jsonb text>`` (jsonb's own layout;   ``x::jsonb::text``
             JSON ``null`` is NULL)
===========  ==============================================  ===========================
"""

from __future__ import annotations

import datetime as dt
import decimal
import fractions
import functools
import json
import math
import re
import struct
import uuid
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from psycopg import sql

from trueup.errors import TrueupError

NULL = "~"
FIELD_SEPARATOR = "|"
#: Separates key, version and fingerprint in a row hash (never inside a rendered field list).
PART_SEPARATOR = "#"
#: Prefix of a value that could not be read as its column's type: differs from every rendering.
INVALID = "!"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)
#: Infinite timestamps and dates render as Postgres prints them.
_INFINITIES = ("infinity", "-infinity")
_MASK32 = 0xFFFFFFFF


class Kind(StrEnum):
    NUMBER = "number"
    TEXT = "text"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    DATE = "date"
    JSON = "json"


#: Postgres's integer types (whole numbers in bigint's range).
INTEGER_TYPES = ("int2", "int4", "int8")

_KINDS: dict[str, Kind] = {
    "int2": Kind.NUMBER, "int4": Kind.NUMBER, "int8": Kind.NUMBER, "numeric": Kind.NUMBER,
    "float4": Kind.NUMBER, "float8": Kind.NUMBER, "oid": Kind.NUMBER,
    "text": Kind.TEXT, "varchar": Kind.TEXT, "bpchar": Kind.TEXT, "name": Kind.TEXT,
    "uuid": Kind.TEXT, "citext": Kind.TEXT,
    "bool": Kind.BOOL,
    "timestamp": Kind.TIMESTAMP, "timestamptz": Kind.TIMESTAMP,
    "date": Kind.DATE,
    "json": Kind.JSON, "jsonb": Kind.JSON,
}


class UnsupportedType(TrueupError):
    """A compared column's type has no canonical form."""


@dataclass(frozen=True, kw_only=True)
class ColumnType:
    """A column's Postgres type (``typname``) and the canonical kind it renders as."""

    name: str
    kind: Kind

    @classmethod
    def of(cls, typname: str, typtype: str = "b") -> ColumnType:
        if typtype == "e":  # enum labels compare as text
            return cls(name=typname, kind=Kind.TEXT)
        kind = _KINDS.get(typname)
        if kind is None:
            raise UnsupportedType(
                f"type {typname} has no canonical form (supported: "
                f"{', '.join(sorted(_KINDS))} and enums)")
        return cls(name=typname, kind=kind)


def storage_type(ctype: ColumnType) -> sql.Composable:
    """A built-in type that holds values of ``ctype`` in any database (mirror and stage tables,
    casts): the state database has none of the source's enums or extensions."""
    if ctype.kind is Kind.TEXT and ctype.name != "uuid":
        return sql.SQL("text")
    if ctype.kind is Kind.JSON:
        return sql.SQL("jsonb")
    return sql.Identifier(ctype.name)


# ---------------------------------------------------------------------------------------------
# SQL side


def whole_double_numeric(value: sql.Composable) -> sql.Composable:
    """The exact numeric of a finite whole double ``value`` (a float8 expression), from its
    bits: sign, 53-bit significand and exponent (the double's text and its numeric cast keep
    only 17 and 15 digits). Exact for any finite double, used past bigint's range."""
    bits = sql.SQL("(('x' || encode(float8send({}), 'hex'))::bit(64)::int8)").format(value)
    return sql.SQL(
        "(sign({0})::numeric * (({1} & 4503599627370495) | 4503599627370496)::numeric "
        "* power(2::numeric, (({1} >> 52) & 2047)::int4 - 1075))").format(value, bits)


def _float_sql(value: sql.Composable, type_name: str, as_double: sql.Composable,
               first: sql.Composable | None = None) -> sql.Composable:
    """A float's canonical text (``value`` of ``type_name``, ``as_double`` the same value as
    a double), after the ``first`` WHEN of a cheap case: a whole number is its exact integer
    (through bigint, or from its bits past bigint's range), any other value its shortest
    round-trip text read as numeric, without exponent."""
    return sql.SQL(
        "(CASE {first}"
        "WHEN {0} = trunc({0}) AND abs({0}) < 9223372036854775808::{type} "
        "THEN ({0})::int8::text "
        "WHEN {0} = trunc({0}) AND abs({0}) < 'Infinity'::{type} "
        "THEN trim_scale({1})::text "
        "ELSE trim_scale(({0})::text::numeric)::text END)"
    ).format(value, whole_double_numeric(as_double), first=first or sql.SQL(""),
             type=sql.SQL(type_name))


def render_sql(column: sql.Composable, ctype: ColumnType) -> sql.Composable:
    """SQL rendering one value of ``column`` in canonical text (NULL stays NULL)."""
    if ctype.kind is Kind.NUMBER:
        if ctype.name in ("int2", "int4", "int8", "oid"):
            return sql.SQL("({})::text").format(column)
        if ctype.name == "float8":
            # Every distinct double renders distinctly, in the plain decimal form of numbers.
            # From 1e-4 to 1e15 Postgres's own text is that already (the shortest round-trip
            # digits, extra_float_digits >= 1, without exponent): the cheap, common case. A
            # whole number is its exact integer (through bigint, or from its bits past bigint's
            # range: from 2^53 on Postgres's text is not always the shortest digits, and its
            # numeric cast keeps 15), -0 is 0; any other value is its shortest text read as
            # numeric (1e-05 is 0.00001).
            value = sql.SQL("(({})::float8)").format(column)
            return _float_sql(value, "float8", value, sql.SQL(
                "WHEN abs({0}) >= 1e-4::float8 AND abs({0}) < 1e15::float8 "
                "THEN ({0})::text ").format(value))
        if ctype.name == "float4":
            # The rule of doubles, in single precision (float4out's shortest text). numeric's
            # own cast keeps 6 digits: 1234567 and 1234568 were equal.
            value = sql.SQL("(({})::float4)").format(column)
            return _float_sql(value, "float4", sql.SQL("({})::float8").format(value))
        return sql.SQL("trim_scale(({})::numeric)::text").format(column)
    if ctype.kind is Kind.TEXT:
        return sql.SQL("(octet_length(({0})::text)::text || ':' || ({0})::text)").format(column)
    if ctype.kind is Kind.BOOL:
        return sql.SQL("({})::text").format(column)
    if ctype.kind is Kind.TIMESTAMP:
        return sql.SQL("(CASE WHEN isfinite({0}) THEN (extract(epoch FROM {0}) * 1000000)"
                       "::bigint::text ELSE ({0})::text END)").format(column)
    if ctype.kind is Kind.DATE:
        return sql.SQL("(CASE WHEN isfinite({0}) THEN (({0}) - DATE '1970-01-01')::text "
                       "ELSE ({0})::text END)").format(column)
    # A message cannot tell JSON null from SQL NULL, so neither does the canonical form.
    value = sql.SQL("nullif(({})::jsonb, 'null')").format(column)
    return sql.SQL("(octet_length({0}::text)::text || ':' || {0}::text)").format(value)


def fields_sql(columns: Sequence[sql.Composable], types: Sequence[ColumnType],
               rendered: Sequence[sql.Composable | None] | None = None) -> sql.Composable:
    """SQL for the canonical text of several values: rendered, NULL as ``~``, joined by ``|``.

    ``rendered`` gives a value's canonical text where it is not its expression's (a text
    column read by the session's readers, see :func:`trueup.sides.table_side`)."""
    if not columns:
        return sql.Literal("")
    given = rendered or [None] * len(columns)
    parts = [sql.SQL("coalesce({}, {})").format(own or render_sql(c, t), sql.Literal(NULL))
             for c, t, own in zip(columns, types, given, strict=True)]
    return sql.SQL("concat_ws({}, {})").format(sql.Literal(FIELD_SEPARATOR),
                                               sql.SQL(", ").join(parts))


#: The seed of a fingerprint's and a row hash's ``hashtextextended``.
NO_SEED = sql.Literal(0)


def text_hash(text: sql.Composable, seed: sql.Composable = NO_SEED) -> sql.Composable:
    """SQL hashing a canonical ``text`` as the fingerprint and row hash do (a bigint):
    ``hashtextextended`` of its bytes (with ``seed``: a refused value's native hash). The text
    is hashed in the ``C`` collation: it takes a compared column's collation, and under a
    nondeterministic one (``deterministic=false``, case- or accent-insensitive)
    ``hashtextextended`` hashes the collation's sort key, not the bytes (``hello`` hashes as
    ``Hello``, and neither as the same text of the other side). Under a deterministic
    collation it hashes the bytes anyway, so the value is the same. Schema-qualified: the
    session's readers (functions in ``pg_temp``) use it too."""
    return sql.SQL("pg_catalog.hashtextextended(({}) COLLATE \"C\", {})").format(text, seed)


def fingerprint_sql(columns: Sequence[sql.Composable],
                    types: Sequence[ColumnType]) -> sql.Composable:
    """SQL for the fingerprint of the compared columns (a bigint)."""
    return text_hash(fields_sql(columns, types))


def row_hash_sql(key: sql.Composable, version: sql.Composable,
                 fingerprint: sql.Composable) -> sql.Composable:
    """SQL for a row's hash in a segment checksum: key, version and fingerprint together.

    Hashing the key in is what makes the segment checksum (an XOR of row hashes) see two rows
    that swapped their values; a plain XOR of fingerprints would not.
    """
    sep = sql.Literal(PART_SEPARATOR)
    return text_hash(sql.SQL("{} || {} || {} || {} || ({})::text").format(
        key, sep, version, sep, fingerprint))


# ---------------------------------------------------------------------------------------------
# Python side


def render(value: Any, ctype: ColumnType) -> str | None:
    """Canonical text of one value read from JSON (or Python), as its column's type would be.

    Values that cannot be read as that type render as ``!<json>``, which differs from every
    valid rendering: the row is then reported as a mismatch, never silently equal.
    """
    if value is None:
        return None
    try:
        text = _RENDERERS[ctype.kind](value, ctype)
    except (ValueError, TypeError, ArithmeticError, struct.error):
        text = None
    if text is None:
        return INVALID + json.dumps(value, default=str, sort_keys=True)
    return text


def copy_text(value: Any, ctype: ColumnType) -> str | None:
    """A JSON value as text Postgres reads into a column of ``ctype`` (None when unreadable).

    Used for the typed key and version columns of the Kafka mirror: ``42.0`` becomes ``42``
    for a bigint, a timestamp in any zone becomes UTC, a uuid lower case.
    """
    if value is None:
        return None
    try:
        if ctype.kind is Kind.NUMBER:
            text = _number(value, ctype)
            if text is not None and ctype.name in ("int2", "int4", "int8", "oid") \
                    and not text.lstrip("-").isdigit():
                return None
            return text
        if ctype.kind is Kind.TEXT:
            rendered = _text(value, ctype)
            return None if rendered is None else rendered.partition(":")[2]
        if ctype.kind is Kind.BOOL:
            return _bool(value, ctype)
        if ctype.kind is Kind.TIMESTAMP:
            micros = _timestamp(value, ctype)
            if micros is None or micros in _INFINITIES:
                return micros
            moment = _EPOCH + dt.timedelta(microseconds=int(micros))
            return moment.isoformat() if ctype.name == "timestamptz" else \
                moment.replace(tzinfo=None).isoformat()
        if ctype.kind is Kind.DATE:
            days = _date(value, ctype)
            if days is None or days in _INFINITIES:
                return days
            return (_EPOCH_DATE + dt.timedelta(days=int(days))
                                              ).isoformat()
        return jsonb_text(value)
    except (ValueError, TypeError, ArithmeticError, OverflowError, struct.error):
        return None


def fields_text(values: Iterable[Any], types: Sequence[ColumnType]) -> str:
    rendered = (render(v, t) for v, t in zip(values, types, strict=True))
    return FIELD_SEPARATOR.join(NULL if r is None else r for r in rendered)


def fingerprint(values: Iterable[Any], types: Sequence[ColumnType]) -> int:
    """The fingerprint of a row's compared values: equal to :func:`fingerprint_sql`'s."""
    return pg_hash(fields_text(values, types))


def row_hash(key_text: str, version_text: str, fp: int) -> int:
    return pg_hash(f"{key_text}{PART_SEPARATOR}{version_text}{PART_SEPARATOR}{fp}")


#: The whitespace Postgres's input functions skip around a value (C's isspace).
PG_SPACE = " \t\n\r\v\f"
#: A number as Postgres's numeric and integer inputs read it (ASCII digits: no ``1_000``).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
#: numeric's words: NaN (no sign) and the infinities, in any case.
_NUMERIC_WORD = re.compile(r"nan|[+-]?inf(?:inity)?", re.IGNORECASE)
#: A float's words as strtod reads them, and its hexadecimal form (``0x1p3``).
_FLOAT_WORD = re.compile(r"[+-]?(?:nan|inf(?:inity)?)", re.IGNORECASE)
_FLOAT_HEX = re.compile(
    r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?")


def _number_text(text: str, ctype: ColumnType) -> decimal.Decimal | float:
    """A string as the type's input function reads it (ValueError when it refuses it)."""
    text = text.strip(PG_SPACE)
    if _DECIMAL_TEXT.fullmatch(text):
        return decimal.Decimal(text)
    if ctype.name in ("float4", "float8"):
        if _FLOAT_WORD.fullmatch(text):
            return float(text)
        if _FLOAT_HEX.fullmatch(text):
            return float.fromhex(text)
    elif _NUMERIC_WORD.fullmatch(text):
        return decimal.Decimal(text.lstrip("+"))
    raise ValueError(f"not a number: {text!r}")


def _as_double(value: Any) -> float:
    """A JSON number or numeric text as float8's input reads it: out of range (rounding to
    zero or past the largest double) is refused, as Postgres refuses it."""
    number = float(value)
    if isinstance(value, decimal.Decimal) and value.is_finite() and (
            math.isinf(number) or (number == 0 and not value.is_zero())):
        raise ValueError(f"{value} is out of range for type double precision")
    return number


def _number(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = _number_text(value, ctype)
    if ctype.name == "float8":
        return float8_text(_as_double(value))
    if ctype.name == "float4":
        return float4_text(_as_real(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        value = decimal.Decimal(repr(value))
    elif isinstance(value, int):
        value = decimal.Decimal(value)
    if not isinstance(value, decimal.Decimal):
        return None
    if not value.is_finite():
        if value.is_nan():
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    return _plain_decimal(value)


def float8_text(number: float) -> str:
    """The canonical text of a double: every distinct double renders distinctly, in the plain
    decimal form of numbers. A whole number is its exact integer (``1e20`` is
    ``100000000000000000000``, ``2^60`` is ``1152921504606846976``), any other value the
    shortest digits that read back as the same double (Python's ``repr``, Postgres's
    ``float8out``) without exponent (``0.1``, ``0.00001``); ``0`` for -0."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number.is_integer():
        return str(int(number))  # -0 too: it equals 0, and numeric and jsonb cannot hold it
    return _plain_decimal(decimal.Decimal(repr(number)))


#: Single precision (real): the significand's bits, the smallest normal exponent and the
#: largest real.
_REAL_BITS = 24
_REAL_MIN_EXPONENT = -126
_REAL_LARGEST = fractions.Fraction(2**128 - 2**104)


def _real_ulp(magnitude: fractions.Fraction) -> fractions.Fraction:
    """The unit in the last place of the reals around ``magnitude`` (> 0)."""
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if fractions.Fraction(2) ** exponent > magnitude:
        exponent -= 1  # now 2**exponent <= magnitude < 2**(exponent + 1)
    return fractions.Fraction(2) ** (max(exponent, _REAL_MIN_EXPONENT) - _REAL_BITS + 1)


def _as_real(value: Any) -> float:
    """A number as float4's input reads it (``strtof``: the nearest real, ties to even, from
    the exact value, not through a double), as a Python float. Out of range (rounding to
    zero or past the largest real) is refused, as Postgres refuses it."""
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not (
            isinstance(value, decimal.Decimal) and value.is_finite())):
        return number  # NaN and the infinities, written as such
    if number == 0 or math.isinf(number):  # past a double's range: past a real's too
        if isinstance(value, decimal.Decimal) and not value.is_zero():
            raise ValueError(f"{value} is out of range for type real")
        return number
    exact = abs(fractions.Fraction(value))
    ulp = _real_ulp(exact)
    units, rest = divmod(exact, ulp)
    if rest > ulp / 2 or (rest == ulp / 2 and units % 2):
        units += 1
    rounded = units * ulp
    if rounded == 0 or rounded > _REAL_LARGEST:
        raise ValueError(f"{value} is out of range for type real")
    return math.copysign(float(rounded), number)


def float4_text(number: float) -> str:
    """The canonical text of a real (``number`` holds one exactly), by the rule of doubles
    (:func:`float8_text`) in single precision: a whole number is its exact integer, any other
    value the shortest digits that read back as the same real (Postgres's ``float4out``)
    without exponent; ``0`` for -0."""
    if math.isnan(number) or math.isinf(number) or number.is_integer():
        return float8_text(number)
    return _plain_decimal(_real_shortest(number))


def _real_shortest(number: float) -> decimal.Decimal:
    """The shortest decimal that reads back as the real ``number`` (finite, not 0), the
    nearest to it of those (ties to an even last digit): Ryu's choice, float4out's."""
    exact = abs(fractions.Fraction(number))
    ulp = _real_ulp(exact)
    units = exact / ulp
    # Reads back as ``number``: within half a unit of it (below a power of two, where the
    # unit halves, a quarter). Never a bound, though one rounds to ``number`` when its
    # significand is even: Postgres's Ryu leaves them out (not STRICTLY_SHORTEST), lest a
    # reader round ties otherwise.
    below = ulp / 4 if units == 2 ** (_REAL_BITS - 1) and ulp > _real_ulp(exact / 2) \
        else ulp / 2
    low, high = exact - below, exact + ulp / 2

    def reads_back(candidate: fractions.Fraction) -> bool:
        return low < candidate < high

    top = decimal.Decimal(number).adjusted()  # the exponent of its first digit
    for digits in range(1, 10):
        scale = fractions.Fraction(10) ** (top - digits + 1)
        floor = exact // scale
        candidates = [floor, floor + 1]
        gap_down, gap_up = exact - floor * scale, (floor + 1) * scale - exact
        if gap_up < gap_down or (gap_up == gap_down and floor % 2):
            candidates.reverse()  # the nearest first
        for count in candidates:
            if reads_back(count * scale):
                found = decimal.Decimal(count).scaleb(top - digits + 1)
                return found.copy_negate() if number < 0 else found
    raise AssertionError(f"no decimal reads back as the real {number!r}")


def _plain_decimal(value: decimal.Decimal) -> str:
    if value.is_zero():
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


#: What Postgres's uuid input reads: 32 hex digits, a hyphen after any group of 4 but the
#: last, in braces or not (no ``urn:uuid:`` prefix, no spaces, no hyphen elsewhere).
_UUID_HEX = r"[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}"
_UUID_TEXT = re.compile(rf"\{{({_UUID_HEX})\}}|({_UUID_HEX})", re.ASCII)


def _text(value: Any, ctype: ColumnType) -> str | None:
    # a number, boolean, object or array read as text prints as Postgres's jsonb does
    text = value if isinstance(value, str) else jsonb_text(value)
    if ctype.name == "uuid":
        found = _UUID_TEXT.fullmatch(text)
        if found is None:
            return None
        text = str(uuid.UUID(hex=(found.group(1) or found.group(2)).replace("-", "")))
    elif ctype.name == "bpchar":
        text = text.rstrip(" ")
    return f"{len(text.encode())}:{text}"


#: What Postgres's boolin reads, after trimming whitespace and in any case: its words, any
#: prefix of them that is not ambiguous (``o`` is), ``1`` and ``0``.
_BOOL_WORDS = {
    **{w[:n]: "true" for w in ("true", "yes") for n in range(1, len(w) + 1)},
    **{w[:n]: "false" for w in ("false", "no") for n in range(1, len(w) + 1)},
    "on": "true", "of": "false", "off": "false", "1": "true", "0": "false",
}


def _bool(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value in (0, 1):
        return "true" if value else "false"
    if isinstance(value, str):
        return _BOOL_WORDS.get(value.strip(PG_SPACE).lower())
    return None


#: Fractional seconds finer than microseconds (Java's Instant, Go's time write nanoseconds).
_FINE_FRACTION = re.compile(r"\.(\d{7,})")
#: A zone named after the time (``2026-01-01 00:00:00 UTC``, ``... Europe/Paris``).
_ZONE_NAME = re.compile(r"(?<=[\d\s])\s*([A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*)$")
#: Names of UTC that Postgres reads whatever its abbreviation settings.
_UTC_NAMES = frozenset({"z", "utc", "gmt", "ut", "zulu", "etc/utc", "etc/gmt", "etc/zulu",
                        "etc/universal", "universal", "etc/uct", "uct", "etc/greenwich",
                        "greenwich"})
#: Hour 24 (the midnight that ends a day) and second 60 (a leap second), which Postgres reads
#: as the next day's midnight and the next minute's first second.
_HOUR_24 = re.compile(r"(?<=[T ])24:00(?::00(?:\.0*)?)?(?=$|[^\d.:])")
_SECOND_60 = re.compile(r"(?<=:\d\d:)60(?:\.0*)?(?![\d.])")


@functools.cache
def _zone_names() -> dict[str, str]:
    """IANA zone names by their lower case: Postgres finds them in any case."""
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def _zone(name: str) -> dt.tzinfo:
    """A zone named in a time, as Postgres reads it. Only UTC's names and IANA region names
    (``Europe/Paris``): abbreviations (``EST``, ``CET``) mean what Postgres's
    timezone_abbreviations setting says, which Python cannot know, so they are refused."""
    lowered = name.lower()
    if lowered in _UTC_NAMES:
        return dt.UTC
    if "/" in lowered and lowered in _zone_names():
        return zoneinfo.ZoneInfo(_zone_names()[lowered])
    raise ValueError(f"time zone {name!r} not read")


def _localize(moment: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """A wall-clock time in ``zone`` as Postgres places it: in a jump back (an hour that
    happens twice) after the jump, in a jump forward (an hour that never happens) before it;
    the smaller of the two offsets either way."""
    first = moment.replace(tzinfo=zone, fold=0)
    second = moment.replace(tzinfo=zone, fold=1)
    offset = min(first.utcoffset() or dt.timedelta(0), second.utcoffset() or dt.timedelta(0))
    return moment.replace(tzinfo=dt.timezone(offset))


def _split_time(text: str) -> tuple[str, dt.tzinfo | None, dt.timedelta]:
    """An ISO 8601 time as Postgres reads it: the text ``fromisoformat`` reads, the zone named
    after it (if any) and what to add (hour 24, second 60)."""
    zone: dt.tzinfo | None = None
    named = _ZONE_NAME.search(text)
    if named is not None:
        zone = _zone(named.group(1))
        text = text[:named.start()]
    extra = dt.timedelta(0)
    if _HOUR_24.search(text):
        text, extra = _HOUR_24.sub("00:00:00", text), dt.timedelta(days=1)
    elif _SECOND_60.search(text):
        text, extra = _SECOND_60.sub("59", text), dt.timedelta(seconds=1)
    return text, zone, extra


def _parse_instant(text: str) -> dt.datetime:
    """An ISO 8601 time, its fraction rounded to microseconds as Postgres rounds it (``rint``
    of the fraction read as a double), where ``fromisoformat`` would cut it off; a zone may
    be named after it, as Postgres reads it (see :func:`_zone`)."""
    if "," in text:  # fromisoformat takes a comma for the point; Postgres's input does not
        raise ValueError(f"not a time: {text!r}")
    text, zone, extra = _split_time(text)
    fine = _FINE_FRACTION.search(text)
    if fine is not None:
        micros = round(float("0." + fine.group(1)) * 1_000_000)  # round half to even, as rint
        carry, micros = divmod(micros, 1_000_000)
        text = f"{text[:fine.start()]}.{micros:06d}{text[fine.end():]}"
        extra += dt.timedelta(seconds=carry)
    moment = dt.datetime.fromisoformat(text)
    if zone is not None:
        if moment.tzinfo is not None:
            raise ValueError("both an offset and a time zone")
        moment = _localize(moment, zone)
    return moment + extra


def _special_time(value: Any) -> str | None:
    """``infinity``, ``-infinity`` or ``epoch`` for Postgres's spellings of them, else None.

    Postgres also reads ``now``, ``today``, ``tomorrow`` and ``yesterday``: times of the moment
    the message is read, never what it meant. They are not read here (a mismatch)."""
    if isinstance(value, str):
        text = value.strip(PG_SPACE).lower()
        if text in ("infinity", "+infinity"):
            return "infinity"
        if text == "-infinity":
            return "-infinity"
        if text == "epoch":
            return "epoch"
    return None


class ReadByPostgres(NamedTuple):
    """A date or time only Postgres's input reads (``2024-1-1``, ``Jan 1 2024``,
    ``20240101T080000Z``), as Postgres rendered it (:func:`render_sql`) for the Python path:
    days or microseconds since the epoch, or an infinity."""

    kind: Kind
    text: str


def _timestamp(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, ReadByPostgres):
        return value.text if value.kind is Kind.TIMESTAMP else None
    special = _special_time(value)
    if special == "epoch":
        return "0"
    if special is not None:
        return special
    if isinstance(value, str):
        value = _parse_instant(value.strip(PG_SPACE))
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # a naive value is read as UTC
    return str((value - _EPOCH) // dt.timedelta(microseconds=1))


#: Where the date ends and a time begins in an ISO 8601 string.
_DATE_TIME = re.compile(r"(\d{4}-?\d{2}-?\d{2})[T ](.+)$", re.ASCII)


def _date(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, ReadByPostgres):
        return value.text if value.kind is Kind.DATE else None
    special = _special_time(value)
    if special == "epoch":
        return "0"
    if special is not None:
        return special
    if isinstance(value, str):
        text, _, _ = _split_time(value.strip(PG_SPACE))  # the zone is checked, not applied
        parts = _DATE_TIME.match(text)
        if parts is not None:
            # Postgres's date input takes a time and an offset, and keeps the date as written
            _parse_instant(f"2000-01-01T{parts.group(2)}")
            text = parts.group(1)
        value = dt.date.fromisoformat(text)
    if isinstance(value, dt.datetime):
        value = value.date()
    if not isinstance(value, dt.date):
        return None
    return str((value - _EPOCH_DATE).days)


def _json(value: Any, ctype: ColumnType) -> str | None:
    text = jsonb_text(value)
    return f"{len(text.encode())}:{text}"


_RENDERERS = {
    Kind.NUMBER: _number, Kind.TEXT: _text, Kind.BOOL: _bool, Kind.TIMESTAMP: _timestamp,
    Kind.DATE: _date, Kind.JSON: _json,
}


def jsonb_text(value: Any) -> str:
    """``value::jsonb::text`` as Postgres prints it: keys ordered by length then bytes,
    ``", "`` and ``": "`` separators, numbers as numeric text (scale kept), non-ASCII as is.

    Written without recursion: a document nested as deep as :func:`loads` reads (about a
    thousand levels, far past Python's stack at a few frames a level) still renders."""
    out: list[str] = []
    todo: list[Any] = [value]  # values to render, and _Text pieces to write as they are
    while todo:
        item = todo.pop()
        if isinstance(item, _Text):
            out.append(item.text)
        elif isinstance(item, dict):
            items = sorted(item.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
            parts: list[Any] = [_Text("{")]
            for i, (k, v) in enumerate(items):
                parts += [_Text(f"{', ' if i else ''}{_jsonb_string(k)}: "), v]
            todo += reversed([*parts, _Text("}")])
        elif isinstance(item, list | tuple):
            parts = [_Text("[")]
            for i, v in enumerate(item):
                parts += [_Text(", "), v] if i else [v]
            todo += reversed([*parts, _Text("]")])
        else:
            out.append(_jsonb_scalar(item))
    return "".join(out)


class _Text(NamedTuple):
    """A piece of :func:`jsonb_text`'s output, told apart from a JSON string to render."""

    text: str


def _jsonb_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _jsonb_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        value = decimal.Decimal(repr(value))
    if isinstance(value, decimal.Decimal):
        text = format(value, "f")
        return text.lstrip("-") if value.is_zero() else text
    raise TypeError(f"not a JSON value: {type(value).__name__}")


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                 "\t": "\\t"}


def _jsonb_string(text: str) -> str:
    out = []
    for ch in text:
        escaped = _JSON_ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_float=decimal.Decimal, parse_constant=_no_constant)
_JSON_SPACE = " \t\n\r"


def loads(payload: bytes | str) -> Any:
    """Parse a JSON message keeping numbers exact (decimals stay :class:`decimal.Decimal`).

    Reads what Postgres's json reads: UTF-8 only (no UTF-16 guessed from the bytes, no byte
    order mark), no bare ``NaN`` or ``Infinity``. Raises ValueError for anything that cannot
    be read, JSON nested too deeply included."""
    try:
        text = payload.decode() if isinstance(payload, bytes | bytearray) else payload
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def raw_fields(payload: bytes | str) -> dict[str, str]:
    """The JSON text of each field of a JSON object, exactly as the message writes it (the
    last of duplicate fields): what Postgres's ``json_to_record`` and ``->>`` give for a field
    that is not a string read as text (``1e3``, ``-0``, ``{"b":1,  "a":2}``)."""
    text = payload.decode() if isinstance(payload, bytes | bytearray) else payload
    raw: dict[str, str] = {}

    def skip(at: int) -> int:
        while at < len(text) and text[at] in _JSON_SPACE:
            at += 1
        return at

    at = skip(0)
    if text[at:at + 1] != "{":
        raise ValueError("not a JSON object")
    at = skip(at + 1)
    if text[at:at + 1] == "}":
        return raw
    while True:
        if text[at:at + 1] != '"':
            raise ValueError("expected a field name")
        name, at = _DECODER.raw_decode(text, at)
        at = skip(at)
        if text[at:at + 1] != ":":
            raise ValueError("expected ':'")
        at = skip(at + 1)
        _, end = _DECODER.raw_decode(text, at)
        raw[name] = text[at:end]
        at = skip(end)
        if text[at:at + 1] == "}":
            return raw
        if text[at:at + 1] != ",":
            raise ValueError("expected ',' or '}'")
        at = skip(at + 1)


# ---------------------------------------------------------------------------------------------
# Postgres's hash_bytes_extended (src/common/hashfn.c), little-endian, in Python


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK32; a ^= _rot(c, 4); c = (c + b) & _MASK32  # noqa: E702
    b = (b - a) & _MASK32; b ^= _rot(a, 6); a = (a + c) & _MASK32  # noqa: E702
    c = (c - b) & _MASK32; c ^= _rot(b, 8); b = (b + a) & _MASK32  # noqa: E702
    a = (a - c) & _MASK32; a ^= _rot(c, 16); c = (c + b) & _MASK32  # noqa: E702
    b = (b - a) & _MASK32; b ^= _rot(a, 19); a = (a + c) & _MASK32  # noqa: E702
    c = (c - b) & _MASK32; c ^= _rot(b, 4); b = (b + a) & _MASK32  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c ^= b; c = (c - _rot(b, 14)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK32  # noqa: E702
    return a, b, c


def pg_hash(text: str, seed: int = 0) -> int:
    """``hashtextextended(text, seed)`` of Postgres (deterministic collation), as a signed int64."""
    data = text.encode()
    length = len(data)
    a = b = c = (0x9E3779B9 + length + 3923095) & _MASK32
    if seed:
        seed &= 0xFFFFFFFFFFFFFFFF
        a = (a + (seed >> 32)) & _MASK32
        b = (b + (seed & _MASK32)) & _MASK32
        a, b, c = _mix(a, b, c)
    offset = 0
    while length - offset >= 12:
        a = (a + int.from_bytes(data[offset:offset + 4], "little")) & _MASK32
        b = (b + int.from_bytes(data[offset + 4:offset + 8], "little")) & _MASK32
        c = (c + int.from_bytes(data[offset + 8:offset + 12], "little")) & _MASK32
        a, b, c = _mix(a, b, c)
        offset += 12
    tail = data[offset:]
    if tail:
        # the lowest byte of c is reserved for the length: its bytes start at bit 8
        a = (a + int.from_bytes(tail[0:4], "little")) & _MASK32
        b = (b + int.from_bytes(tail[4:8], "little")) & _MASK32
        c = (c + (int.from_bytes(tail[8:11], "little") << 8)) & _MASK32
    a, b, c = _final(a, b, c)
    value = (b << 32) | c
    return value - (1 << 64) if value >= 1 << 63 else value
