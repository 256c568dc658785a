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
import json
import math
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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
#: float types render through numeric with these significant digits (Postgres's float8_numeric).
_FLOAT_DIGITS = {"float4": 6}
#: 2^53: every double from here on is an integer and renders through numeric (15 digits).
FLOAT8_EXACT_LIMIT = 9007199254740992


class UnsupportedType(TrueupError):
    """A compared column's type has no canonical form."""


@dataclass(frozen=True, kw_only=True)
class ColumnType:
    """A column's Postgres type (``typname``) and the canonical kind it renders as."""

    name: str
    kind: Kind
    float_digits: int | None = None

    @classmethod
    def of(cls, typname: str, typtype: str = "b") -> ColumnType:
        if typtype == "e":  # enum labels compare as text
            return cls(name=typname, kind=Kind.TEXT)
        kind = _KINDS.get(typname)
        if kind is None:
            raise UnsupportedType(
                f"type {typname} has no canonical form (supported: "
                f"{', '.join(sorted(_KINDS))} and enums)")
        return cls(name=typname, kind=kind, float_digits=_FLOAT_DIGITS.get(typname))


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


def render_sql(column: sql.Composable, ctype: ColumnType) -> sql.Composable:
    """SQL rendering one value of ``column`` in canonical text (NULL stays NULL)."""
    if ctype.kind is Kind.NUMBER:
        if ctype.name in ("int2", "int4", "int8", "oid"):
            return sql.SQL("({})::text").format(column)
        if ctype.name == "float8":
            # Shortest round-trip text (extra_float_digits >= 1; + 0 turns -0 into 0, which
            # numeric and jsonb cannot tell apart either): 2 s per 5M rows cheaper than
            # going through numeric, and exact. From 2^53 on (integers only, where Postgres's
            # digits are not always the shortest) through numeric, as Python does too.
            return sql.SQL(
                "(CASE WHEN abs(({0})::float8) >= {1} AND abs(({0})::float8) <> 'Infinity' "
                "THEN trim_scale(({0})::numeric)::text ELSE (({0})::float8 + 0)::text END)"
            ).format(column, sql.Literal(FLOAT8_EXACT_LIMIT))
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


def fields_sql(columns: Sequence[sql.Composable], types: Sequence[ColumnType]) -> sql.Composable:
    """SQL for the canonical text of several values: rendered, NULL as ``~``, joined by ``|``."""
    if not columns:
        return sql.Literal("")
    parts = [sql.SQL("coalesce({}, {})").format(render_sql(c, t), sql.Literal(NULL))
             for c, t in zip(columns, types, strict=True)]
    return sql.SQL("concat_ws({}, {})").format(sql.Literal(FIELD_SEPARATOR),
                                               sql.SQL(", ").join(parts))


def fingerprint_sql(columns: Sequence[sql.Composable],
                    types: Sequence[ColumnType]) -> sql.Composable:
    """SQL for the fingerprint of the compared columns (a bigint)."""
    return sql.SQL("hashtextextended({}, 0)").format(fields_sql(columns, types))


def row_hash_sql(key: sql.Composable, version: sql.Composable,
                 fingerprint: sql.Composable) -> sql.Composable:
    """SQL for a row's hash in a segment checksum: key, version and fingerprint together.

    Hashing the key in is what makes the segment checksum (an XOR of row hashes) see two rows
    that swapped their values; a plain XOR of fingerprints would not.
    """
    sep = sql.Literal(PART_SEPARATOR)
    return sql.SQL("hashtextextended({} || {} || {} || {} || ({})::text, 0)").format(
        key, sep, version, sep, fingerprint)


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


def _number(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, bool):
        return None
    if ctype.name == "float8":
        number = float(value.strip() if isinstance(value, str) else value)
        if math.isfinite(number) and abs(number) >= FLOAT8_EXACT_LIMIT:
            return _plain_decimal(decimal.Decimal(f"{number:.15g}"))
        return float8_text(number)
    if isinstance(value, int) and ctype.float_digits is None:
        return str(value)
    if isinstance(value, str):
        value = decimal.Decimal(value.strip())
    elif isinstance(value, float):
        value = decimal.Decimal(repr(value))
    elif isinstance(value, int):
        value = decimal.Decimal(value)
    if not isinstance(value, decimal.Decimal):
        return None
    if not value.is_finite():
        if value.is_nan():
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if ctype.float_digits is not None:
        # Postgres converts float to numeric through "%.{FLT_DIG or DBL_DIG}g" of the stored
        # value; a real is stored in single precision, so round to that first.
        number = float(value)
        if ctype.name == "float4":
            number = struct.unpack("f", struct.pack("f", number))[0]
        value = decimal.Decimal(f"{number:.{ctype.float_digits}g}")
    return _plain_decimal(value)


def float8_text(number: float) -> str:
    """``number::float8::text`` as Postgres 12+ prints it: the shortest text that reads back as
    the same double, in exponent form below 1e-4 and from 1e15 on (two exponent digits at
    least). Python's ``repr`` finds the same shortest digits; only the layout differs."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number == 0:
        return "0"  # -0 too: it equals 0, and numeric and jsonb cannot hold it
    sign = "-" if number < 0 else ""
    digits_tuple = decimal.Decimal(repr(abs(number))).as_tuple()
    digits = "".join(map(str, digits_tuple.digits)).rstrip("0") or "0"
    exponent = len(digits_tuple.digits) + int(digits_tuple.exponent) - 1
    if exponent < -4 or exponent >= 15:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent < 0:
        return f"{sign}0.{'0' * (-exponent - 1)}{digits}"
    whole, fraction = digits[:exponent + 1].ljust(exponent + 1, "0"), digits[exponent + 1:]
    return f"{sign}{whole}" + (f".{fraction}" if fraction else "")


def _plain_decimal(value: decimal.Decimal) -> str:
    if value.is_zero():
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _text(value: Any, ctype: ColumnType) -> str | None:
    # a number, boolean, object or array read as text prints as Postgres's jsonb does
    text = value if isinstance(value, str) else jsonb_text(value)
    if ctype.name == "uuid":
        text = str(uuid.UUID(text))
    elif ctype.name == "bpchar":
        text = text.rstrip(" ")
    return f"{len(text.encode())}:{text}"


def _bool(value: Any, ctype: ColumnType) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value in (0, 1):
        return "true" if value else "false"
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("t", "true", "y", "yes", "on", "1"):
            return "true"
        if lowered in ("f", "false", "n", "no", "off", "0"):
            return "false"
    return None


def _infinity(value: Any) -> str | None:
    """``infinity`` or ``-infinity`` for Postgres's spellings of an infinite time, else None."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("infinity", "+infinity"):
            return "infinity"
        if text == "-infinity":
            return "-infinity"
    return None


#: Fractional seconds finer than microseconds (Java's Instant, Go's time write nanoseconds).
_FINE_FRACTION = re.compile(r"\.(\d{7,})")


def _parse_instant(text: str) -> dt.datetime:
    """An ISO 8601 time, its fraction rounded to microseconds as Postgres rounds it (``rint``
    of the fraction read as a double), where ``fromisoformat`` would cut it off."""
    fine = _FINE_FRACTION.search(text)
    if fine is None:
        return dt.datetime.fromisoformat(text)
    micros = round(float("0." + fine.group(1)) * 1_000_000)  # round half to even, as rint
    carry, micros = divmod(micros, 1_000_000)
    moment = dt.datetime.fromisoformat(f"{text[:fine.start()]}.{micros:06d}{text[fine.end():]}")
    return moment + dt.timedelta(seconds=carry)


def _timestamp(value: Any, ctype: ColumnType) -> str | None:
    infinite = _infinity(value)
    if infinite is not None:
        return infinite
    if isinstance(value, str):
        value = _parse_instant(value.strip())
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # a naive value is read as UTC
    return str((value - _EPOCH) // dt.timedelta(microseconds=1))


def _date(value: Any, ctype: ColumnType) -> str | None:
    infinite = _infinity(value)
    if infinite is not None:
        return infinite
    if isinstance(value, str):
        value = dt.date.fromisoformat(value.strip())
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
    ``", "`` and ``": "`` separators, numbers as numeric text (scale kept), non-ASCII as is."""
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
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
        inner = ", ".join(f"{_jsonb_string(k)}: {jsonb_text(v)}" for k, v in items)
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
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


def loads(payload: bytes | str) -> Any:
    """Parse a JSON message keeping numbers exact (decimals stay :class:`decimal.Decimal`).

    Raises ValueError for anything that cannot be read, JSON nested too deeply included."""
    try:
        return json.loads(payload, parse_float=decimal.Decimal)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


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
