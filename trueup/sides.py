"""One side of a comparison: a Postgres relation and the SQL that fingerprints its rows.

A side is a source table, a target table, or the mirror of a Kafka topic (a table in trueup's
state database). Each exposes the same expressions, so the diff never cares which it reads:
``key_text`` and ``version_text`` (canonical renderings), ``fingerprint`` (of the compared
columns) and ``row_hash`` (key, version and columns together, for segment checksums).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from trueup.db import first_line
from trueup.errors import KeysRefused, TrueupError
from trueup.fingerprint import (
    INTEGER_TYPES,
    INVALID,
    NULL,
    PART_SEPARATOR,
    ColumnType,
    Kind,
    UnsupportedType,
    fields_sql,
    render_sql,
    storage_type,
    text_hash,
    whole_double_numeric,
)
from trueup.log import get_logger

if TYPE_CHECKING:
    from trueup.config import ReconciliationConfig

log = get_logger(__name__)

_COLUMN_TYPES = """
SELECT a.attname AS name, t.typname AS typname, t.typtype AS typtype
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


class SchemaMismatch(TrueupError):
    """A configured table or column is not what the database has."""


#: Kinds a version can be (greater is newer): text would order '10' before '9'.
VERSION_KINDS = (Kind.NUMBER, Kind.TIMESTAMP, Kind.DATE)
#: Kinds an ``updated_at`` can be.
TIME_KINDS = (Kind.TIMESTAMP, Kind.DATE)


def column_types(conn: psycopg.Connection[Any], table: str) -> dict[str, ColumnType]:
    """The canonical type of every column of ``table`` (``schema.name``)."""
    schema, _, name = table.partition(".")
    regclass = sql.Identifier(schema, name).as_string(conn)
    try:
        rows = conn.execute(_COLUMN_TYPES, (regclass,)).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaMismatch(f"table {table} does not exist") from exc
    found: dict[str, ColumnType] = {}
    for row in rows:
        name_, typname, typtype = _values(row)
        try:
            found[name_] = ColumnType.of(typname, typtype)
        except TrueupError:
            continue  # only a compared column with such a type is an error, see require()
    return found


def require(types: dict[str, ColumnType], table: str, columns: Sequence[str],
            conn: psycopg.Connection[Any]) -> list[ColumnType]:
    """The types of ``columns``, or a clear error naming the first missing or unsupported one."""
    result = []
    for column in columns:
        if column not in types:
            exists = conn.execute(
                "SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = %s::regclass AND a.attname = %s AND NOT a.attisdropped",
                (sql.Identifier(*table.split(".")).as_string(conn), column)).fetchone()
            if exists:
                try:
                    ColumnType.of(_values(exists)[0])
                except UnsupportedType as exc:
                    raise UnsupportedType(f"column {column!r} of {table}: {exc}") from None
            raise SchemaMismatch(f"column {column!r} does not exist in {table}")
        result.append(types[column])
    return result


def _values(row: Any) -> list[Any]:
    return list(row.values()) if isinstance(row, dict) else list(row)


@dataclass(frozen=True, kw_only=True)
class Side:
    """A relation to compare, with canonical expressions over its columns."""

    label: str                          # "source" or "target", for messages
    dsn: str
    relation: sql.Composable            # schema-qualified identifier
    key: Sequence[sql.Composable]       # key column expressions, in key order
    key_types: list[ColumnType]         # the canonical type of each key column (the source's)
    version: sql.Composable | None
    version_type: ColumnType | None
    fingerprint: sql.Composable         # bigint expression
    row_hash: sql.Composable            # bigint expression
    updated_at: sql.Composable | None = None
    #: A cheaper checksum hash from the values' binary forms (see :func:`native_hash`)
    native_hash: sql.Composable | None = None
    #: (schema, table, first key column) of a plain table side, for the planner's statistics
    statistics: tuple[str, str, str] | None = None
    #: The canonical type each compared column is read as (a table side's; a mirror's are its
    #: shape's)
    column_types: Sequence[ColumnType] = ()

    @property
    def first_key(self) -> sql.Composable:
        """The expression segments are cut on: the first key column (C collation for text)."""
        if self.key_types[0].kind is Kind.TEXT:
            return sql.SQL("({}::text COLLATE \"C\")").format(self.key[0])
        return self.key[0]

    @property
    def key_text(self) -> sql.Composable:
        return fields_sql(self.key, self.key_types)

    @property
    def version_text(self) -> sql.Composable:
        if self.version is None or self.version_type is None:
            return sql.Literal(NULL)
        return sql.SQL("coalesce({}, {})").format(render_sql(self.version, self.version_type),
                                                  sql.Literal(NULL))


def day_filter(side: Side, day: dt.date | str | None) -> sql.Composable:
    """The rows of one partition, a UTC day (a date or its ISO text) of the side's
    ``updated_at``; every row without one."""
    if day is None:
        return sql.SQL("true")
    assert side.updated_at is not None
    start = dt.datetime.combine(dt.date.fromisoformat(day) if isinstance(day, str) else day,
                                dt.time(), dt.UTC)
    return sql.SQL("{col} >= {start} AND {col} < {end}").format(
        col=side.updated_at, start=sql.Literal(start),
        end=sql.Literal(start + dt.timedelta(days=1)))


def table_side(*, label: str, dsn: str, table: str, key: Sequence[str], version: str | None,
               columns: Sequence[str], as_types: Sequence[ColumnType] | None = None,
               key_as: Sequence[ColumnType] | None = None,
               version_as: ColumnType | None = None, updated_at: str | None = None,
               hashed_version: bool = True, conn: psycopg.Connection[Any]) -> Side:
    """A side over a plain table. ``*_as`` give the source's types: a target column of another
    type is cast to its source column's type, so both sides render the same canonical text.
    ``hashed_version=False`` leaves the version out of the row hashes (it is still read): when
    the target has no version, a source's would make every segment's checksum differ."""
    types = column_types(conn, table)
    own_key = require(types, table, key, conn)
    own_columns = require(types, table, columns, conn)
    require_utf8(conn, f"{label} {table}", [*own_key, *own_columns])
    own_version = require(types, table, [version], conn)[0] if version else None
    if version and own_version and (version_as or own_version).kind not in VERSION_KINDS:
        raise SchemaMismatch(
            f"column {version!r} of {table} is {_sql_name(own_version)}, which cannot be "
            f"ordered as a version (expected an integer, numeric, timestamp or date column)")
    if updated_at and require(types, table, [updated_at], conn)[0].kind not in TIME_KINDS:
        raise SchemaMismatch(
            f"column {updated_at!r} of {table} is {_sql_name(types[updated_at])}, not a time "
            f"a row was updated at (expected a timestamp or date column)")

    def cast(name: str, own: ColumnType, wanted: ColumnType | None) -> sql.Composable:
        ident = sql.Identifier(name)
        if wanted is None or wanted.name == own.name:
            return ident
        if own.name in INTEGER_TYPES and wanted.name in INTEGER_TYPES and \
                INTEGER_TYPES.index(own.name) <= INTEGER_TYPES.index(wanted.name):
            # a narrower integer is taken for a wider one as it is: a cast would keep the
            # column's index from serving the key's ranges (every segment a full scan)
            return ident
        if own.kind is Kind.JSON and wanted.kind is Kind.TEXT and wanted.name != "uuid":
            # a document copied from a text column: its text (JSON null is NULL, as ever)
            return sql.SQL("(nullif(({})::jsonb, 'null')::text)").format(ident)
        if own.kind is Kind.JSON and wanted.kind is not Kind.JSON:
            # a scalar as a message's field reads: "7" is 7
            return sql.SQL("({})::{}").format(_as_text(ident, own), sql.Identifier(wanted.name))
        if wanted.kind is Kind.JSON and own.kind is not Kind.TEXT:
            # a number, bool or time against a JSON source: its JSON (there is no cast)
            return sql.SQL("to_jsonb({})").format(ident)
        if own.name in ("float4", "float8") and wanted.name == "numeric":
            return exact_numeric(ident)
        if own.name == "oid" and wanted.name == "numeric":
            return sql.SQL("({})::int8::numeric").format(ident)  # no cast from oid to numeric
        return sql.SQL("({})::{}").format(ident, sql.Identifier(wanted.name))

    key_types = list(key_as or own_key)
    column_types_ = list(as_types or own_columns)
    for name, own, wanted in zip(key, own_key, key_types, strict=True):
        if _cuts(own, wanted):
            raise SchemaMismatch(
                f"{label} {table}: key {name} ({_sql_name(own)}; the source's is "
                f"{_sql_name(wanted)}) cannot be compared exactly: keys are read as the "
                f"source's type, and as {_sql_name(wanted)} {_CUT_EXAMPLES[wanted.kind]}. Give "
                f"the target's key the source's type, or reconcile against a view of the "
                f"target whose key is {_sql_name(wanted)}")
    key_exprs = [cast(n, o, w) for n, o, w in zip(key, own_key, key_types, strict=True)]
    readers = create_readers(conn, table, [_read_as(o, w) for o, w in zip(
        own_columns, column_types_, strict=True) if _read_may_fail(o, w)])
    col_exprs: list[sql.Composable] = []
    # the columns read by the session's readers, or checked for a cut (_ExactRead)
    reads: list[_TextRead | _ExactRead | None] = []
    for name, own, wanted in zip(columns, own_columns, column_types_, strict=True):
        if _cuts(own, wanted):
            exact = _ExactRead.of(sql.Identifier(name), own, wanted)
            col_exprs.append(exact.value)
            reads.append(exact)
            continue
        if not _read_may_fail(own, wanted):
            col_exprs.append(cast(name, own, wanted))
            reads.append(None)
            continue
        read_as = _read_as(own, wanted)
        if read_as is not wanted:
            # a json document read as jsonb (its canonical text, which a text column's is
            # too); without readers, as before: jsonb's refusal fails the run
            text: sql.Composable = sql.SQL("({})::text").format(sql.Identifier(name))
            col_exprs.append(cast(name, own, wanted))
            reads.append(_TextRead(text, read_as, plain=_plain_json(text))
                         if read_as.name in readers else None)
            continue
        text = _as_text(sql.Identifier(name), own)
        col_exprs.append(sql.SQL("({})::{}").format(text, sql.Identifier(wanted.name)))
        reads.append(_TextRead(text, wanted) if wanted.name in readers else None)
    version_type = version_as or own_version
    version_expr = (cast(version, own_version, version_type)
                    if version and own_version else None)
    fields = fields_sql(col_exprs, column_types_, [r.rendered() if r else None for r in reads])
    side = Side(
        label=label, dsn=dsn, relation=sql.Identifier(*table.split(".")), key=key_exprs,
        key_types=key_types, version=version_expr, version_type=version_type,
        fingerprint=text_hash(fields),
        row_hash=sql.Literal(0),  # replaced below, needs key_text and version_text
        updated_at=sql.Identifier(updated_at) if updated_at else None,
        statistics=(table.partition(".")[0], table.partition(".")[2], key[0]),
        column_types=column_types_,
    )
    row_hash = text_hash(sql.SQL("concat_ws({}, {}, {}, {})").format(
        sql.Literal(PART_SEPARATOR), side.key_text,
        side.version_text if hashed_version else sql.Literal(NULL), fields))
    values = [*zip(key_exprs, key_types, strict=True),
              *([(version_expr, version_type)] if version_expr and version_type
                and hashed_version else []),
              *zip(col_exprs, column_types_, strict=True)]
    first = len(values) - len(reads)  # the seed (position) of the first column
    hashed = [None] * first + [r.hashed(first + i) if r else None for i, r in enumerate(reads)]
    return replace(side, row_hash=row_hash, native_hash=native_hash(values, hashed))


def require_utf8(conn: psycopg.Connection[Any], what: str, types: Sequence[ColumnType]) -> None:
    """Refuse text compared in a database that is not UTF-8: the canonical form's lengths and
    hashes are of the server's bytes, so a LATIN1 'é' would differ from a UTF-8 one, and every
    row holding one would be a mismatch."""
    encoding = conn.info.parameter_status("server_encoding")
    texts = [t.name for t in types if t.kind in (Kind.TEXT, Kind.JSON) and t.name != "uuid"]
    if encoding not in (None, "UTF8") and texts:
        raise UnsupportedType(
            f"{what}: its database's encoding is {encoding}; trueup compares text as UTF-8, so "
            f"text and JSON columns ({', '.join(sorted(set(texts)))} here) need a UTF8 database")


def exact_numeric(value: sql.Composable) -> sql.Composable:
    """A ``real`` or ``double precision`` ``value`` as the exact ``numeric`` of its bits.

    Its own cast keeps 15 digits (6 for real), so 0.30000000000000004 would be 0.3. A whole
    number within bigint goes through bigint (2^60 is 1152921504606846976, which its shortest
    text is not); a larger one as a bigint times a power of two (2^70 is
    1180591620717411303424, its shortest text 1.1805916207174113e+21); any other value through
    its shortest exact text (extra_float_digits=1), NaN and the infinities included."""
    return sql.SQL(
        "(CASE WHEN {0} = trunc({0}) AND abs({0}) < 9.2e18 THEN ({0})::int8::numeric "
        "WHEN {0} = trunc({0}) AND abs({0}) < 'Infinity' THEN {1} "
        "ELSE ({0})::text::numeric END)").format(
            value, whole_double_numeric(sql.SQL("({})::float8").format(value)))


# -- reading text as another type -------------------------------------------------------------
#
# A target column of text (or JSON) compared with a source column of another type is read as
# that type. A plain cast would fail the whole run on the first value the type's input refuses
# (``abc`` against an integer); such a value is a mismatch instead, rendered ``!abc`` and
# hashed as that text. Two functions per type in the session's own temporary schema do it,
# one rendering a text's value in canonical form, one hashing it natively: each reads the text
# once, in a subtransaction that catches the refusal. Text the type's plain pattern admits
# (below), which every Postgres version's input accepts, is read by a plain cast instead,
# without the function or its subtransaction.

#: Text that the type's input accepts on any Postgres version, read by a plain cast. (Text is
#: read as numeric against any integer, see compared_type; other types have no pattern and
#: every value of theirs goes through the function.)
_PLAIN_INPUT = {
    "oid": r"^[0-9]{1,9}$",
    "numeric": r"^-?[0-9]{1,100}(\.[0-9]{1,100})?$",
    "float4": r"^-?[0-9]{1,15}(\.[0-9]{1,15})?$",
    "float8": r"^-?[0-9]{1,15}(\.[0-9]{1,15})?$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "bool": r"^(t|f|true|false)$",
    "date": r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$",
    "timestamp": (r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[ T]"
                  r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?$"),
    "timestamptz": (r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[ T]"
                    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
                    r"(Z|[+-](0[0-9]|1[0-4])(:?[0-5][0-9])?)?$"),
}

#: A reader: the text's value as ``{give}``, or ``{refused}`` where the type's input refuses it.
_READER = """CREATE OR REPLACE FUNCTION {name}({params}) RETURNS {returns}
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE v {type};
BEGIN
    BEGIN
        v := value::{type};
    EXCEPTION WHEN data_exception THEN
        RETURN {refused};
    END;
    RETURN {give};
END $$"""


def _read_may_fail(own: ColumnType, wanted: ColumnType) -> bool:
    """Whether some values of ``own`` cannot be read as ``wanted``: text or JSON read as a
    number, uuid, bool, time or (text) JSON, and ``json`` read in any way (its input takes
    documents jsonb's input refuses: a ``\\u0000``, a lone surrogate, a number past numeric's
    range; every reading of a document goes through jsonb). Every other pair the diff's types
    choose is read by a cast that cannot fail."""
    if own.name == "json":
        return True
    if own.kind not in (Kind.TEXT, Kind.JSON) or own.name == wanted.name:
        return False
    return wanted.name == "uuid" or wanted.kind not in (Kind.TEXT, own.kind)


#: The type a ``json`` document is read as against a JSON or text-like column: its canonical
#: text is the same in both (``<bytes>:<jsonb text>``), and so is its hash.
_JSONB = ColumnType.of("jsonb")


def _read_as(own: ColumnType, wanted: ColumnType) -> ColumnType:
    """The type the session's readers read a column of ``own`` as, compared as ``wanted``."""
    if own.name == "json" and (wanted.kind is Kind.JSON or (
            wanted.kind is Kind.TEXT and wanted.name != "uuid")):
        return _JSONB
    return wanted


def _plain_json(text: sql.Composable) -> sql.Composable:
    """Whether the text of a ``json`` document is one jsonb's input takes on any version: no
    ``\\u`` escape (``\\u0000`` and lone surrogates are refused), no exponent and not long
    enough for a number past numeric's range (131,072 digits; 16,383 after the point)."""
    return sql.SQL("(octet_length({0}) <= 16000 AND strpos({0}, '\\u') = 0 "
                   "AND {0} !~ '[0-9][eE]')").format(text)


def _reader(what: str, type_name: str) -> sql.Identifier:
    return sql.Identifier("pg_temp", f"trueup_{what}_{type_name}")


def render_reader(type_name: str) -> sql.Identifier:
    """The session's reader rendering a text as ``type_name`` (see :func:`create_readers`)."""
    return _reader("render", type_name)


def create_readers(conn: psycopg.Connection[Any], table: str,
                   types: Sequence[ColumnType]) -> set[str]:
    """Create the session's readers of each type (see above); the names of the types it has.

    A session that cannot create them (a read-only standby, no TEMPORARY privilege) reads by
    plain casts: every form the type takes is read, but a value it refuses fails the run."""
    wanted = {t.name: t for t in types}
    if not wanted:
        return set()
    value, seed = sql.Identifier("v"), sql.Identifier("seed")
    refused = sql.SQL("{} || value").format(sql.Literal(INVALID))
    # in the C collation: the value takes the collation of the column it is called on
    refused_hash = text_hash(refused, seed)
    try:
        with conn.transaction():
            for name, ctype in sorted(wanted.items()):
                for what, params, returns, give, refusal in (
                        ("render", "value text", "text", render_sql(value, ctype), refused),
                        ("hash", "value text, seed int8", "int8", _hashed(value, ctype, seed),
                         refused_hash)):
                    conn.execute(sql.SQL(_READER).format(  # json is read as jsonb, whose
                        name=_reader(what, name), params=sql.SQL(params),  # input refuses more
                        returns=sql.SQL(returns), type=storage_type(ctype), give=give,
                        refused=refusal))
    except psycopg.Error as exc:
        log.warning("compare.plain_casts", table=table, reason=first_line(exc))
        return set()
    return set(wanted)


def _as_text(ident: sql.Composable, own: ColumnType) -> sql.Composable:
    """A value as the text it is read from: a JSON scalar without its quotes."""
    if own.name == "json":
        # jsonb's input would refuse some documents, and #>> a string holding a \u0000 (or a
        # lone surrogate): those are read as written, which no other type's input takes
        return sql.SQL(
            "(CASE json_typeof({0}) WHEN 'null' THEN NULL WHEN 'string' THEN CASE WHEN "
            "({0})::text ~ '\\\\u(0000|[dD][89abAB])' THEN ({0})::text ELSE {0} #>> '{{}}' "
            "END ELSE ({0})::text END)").format(ident)
    if own.kind is Kind.JSON:
        return sql.SQL("(({})::jsonb #>> '{{}}')").format(ident)
    return sql.SQL("({})::text").format(ident)


@dataclass(frozen=True)
class _TextRead:
    """A column's ``text`` read as ``wanted`` by the session's readers; ``plain`` says when
    a plain cast reads it (see :data:`_PLAIN_INPUT`)."""

    text: sql.Composable
    wanted: ColumnType
    plain: sql.Composable | None = None

    def rendered(self) -> sql.Composable:
        """Its canonical text (``!<text>`` where refused, NULL for NULL)."""
        return self._either(render_sql(self._cast, self.wanted),
                            sql.SQL("{}({})").format(_reader("render", self.wanted.name),
                                                     self.text))

    def hashed(self, seed: int) -> sql.Composable:
        """Its native hash at position ``seed`` (of ``!<text>`` where refused, NULL for NULL)."""
        return self._either(_hashed(self._cast, self.wanted, seed),
                            sql.SQL("{}({}, {})").format(_reader("hash", self.wanted.name),
                                                         self.text, sql.Literal(seed)))

    @property
    def _cast(self) -> sql.Composable:
        return sql.SQL("({})::{}").format(self.text, sql.Identifier(self.wanted.name))

    def _either(self, plain: sql.Composable, read: sql.Composable) -> sql.Composable:
        when = self.plain
        pattern = _PLAIN_INPUT.get(self.wanted.name)
        if when is None and pattern is not None:
            when = sql.SQL("{} ~ {}").format(self.text, sql.Literal(pattern))
        if when is None:
            return read
        return sql.SQL("(CASE WHEN {} THEN {} ELSE {} END)").format(when, plain, read)


def _cuts(own: ColumnType, wanted: ColumnType) -> bool:
    """Whether reading a target column of ``own`` as its source's ``wanted`` would make
    different values one: a timestamp read as a date loses its time of day (13:45 and
    midnight are the same day), a number read as a bool is true for anything but 0 (its cast;
    and only integer has one). A cast from every other pair the diff's types choose keeps
    each value distinct, or refuses it (a text read as a number, see _read_may_fail)."""
    return (wanted.kind is Kind.DATE and own.kind is Kind.TIMESTAMP) or (
        wanted.kind is Kind.BOOL and own.kind is Kind.NUMBER)


#: What reading a key as the source's type would do, for the message refusing it.
_CUT_EXAMPLES = {
    Kind.DATE: "the times of one day are one key (00:00 and 13:00 of 2026-01-01 are both "
               "2026-01-01)",
    Kind.BOOL: "every number but 0 is true (1 and 5 are one key)",
}


@dataclass(frozen=True)
class _ExactRead:
    """A target column of ``own`` compared as its source's ``wanted`` where the cast would cut
    (see :func:`_cuts`): a value the cast keeps unchanged (a timestamp at midnight UTC, the
    number 0 or 1) is read as ``wanted`` (``value``), any other renders as ``!`` and its text,
    as a value a type's input refuses does (one ``mismatch``, equal to nothing)."""

    value: sql.Composable       # the value as ``wanted`` (NULL where not ``exact``)
    exact: sql.Composable       # whether the value survives the cast unchanged
    text: sql.Composable        # its text, for ``!<text>``
    wanted: ColumnType

    @classmethod
    def of(cls, ident: sql.Composable, own: ColumnType, wanted: ColumnType) -> _ExactRead:
        text = sql.SQL("({})::text").format(ident)
        if wanted.kind is Kind.DATE:
            # the day of the instant in UTC, whatever the session's zone (infinity is itself)
            utc = (sql.SQL("(({}) AT TIME ZONE 'UTC')").format(ident)
                   if own.name == "timestamptz" else sql.SQL("({})").format(ident))
            return cls(value=sql.SQL("({})::date").format(utc),
                       exact=sql.SQL("({0} = date_trunc('day', {0}))").format(utc),
                       text=text, wanted=wanted)
        return cls(value=sql.SQL("(CASE WHEN {0} = 0 THEN false WHEN {0} = 1 THEN true END)"
                                 ).format(ident),
                   exact=sql.SQL("({0} = 0 OR {0} = 1)").format(ident), text=text,
                   wanted=wanted)

    def rendered(self) -> sql.Composable:
        """Its canonical text (``!<text>`` where the cast would cut it, NULL for NULL)."""
        return sql.SQL("(CASE WHEN {} THEN {} ELSE {} || {} END)").format(
            self.exact, render_sql(self.value, self.wanted), sql.Literal(INVALID), self.text)

    def hashed(self, seed: int) -> sql.Composable:
        """Its native hash at position ``seed`` (of ``!<text>`` where the cast would cut it,
        as the session's readers hash a refused value; NULL for NULL)."""
        refused = sql.SQL("{} || {}").format(sql.Literal(INVALID), self.text)
        return sql.SQL("(CASE WHEN {} THEN {} ELSE {} END)").format(
            self.exact, _hashed(self.value, self.wanted, seed),
            text_hash(refused, sql.Literal(seed)))


#: The extended (seeded) hash function of each type's default hash operator class: the
#: functions ``hash_record_extended`` would call, called directly.
_NATIVE_HASH_FUNCTIONS = {
    "int2": "hashint2extended", "int4": "hashint4extended", "int8": "hashint8extended",
    "oid": "hashoidextended", "numeric": "hash_numeric_extended",
    "float4": "hashfloat4extended", "float8": "hashfloat8extended",
    "uuid": "uuid_hash_extended", "timestamp": "timestamp_hash_extended",
}


def native_hash(values: Sequence[tuple[sql.Composable, ColumnType]],
                hashed: Sequence[sql.Composable | None] | None = None) -> sql.Composable:
    """A row hash from the values' own binary hash functions.

    Each value is hashed by its type's extended hash function, seeded with its position (so
    two columns that swap values change the hash), NULL being a constant of its own per
    position; the parts are XORed and the result hashed once more, which ties them to one row
    before the segment's XOR over rows. About a quarter faster than
    ``hash_record_extended(ROW(...))``, which calls the same functions but builds a record per
    row first (2.1 s -> 1.6 s per 5M rows of 8 columns).

    Some values hash to the seed itself: a float's 0 and -0, a numeric's NaN and infinities
    (``hash_numeric_extended`` gives all three the seed). NULL must not be the seed, or a NULL
    against a 0 would leave a segment's checksum unchanged and the difference unseen; a
    numeric hashing to the seed is hashed as its text, so that NaN and the infinities differ
    too. ``hashed`` gives a value's hash where it is not its expression's (a text column read
    by the session's readers, see :func:`table_side`).

    It has the canonical form's notion of equal: numerics ignore their scale, char its
    padding, timestamps compare as instants (``timestamptz`` in UTC, whatever the session's
    zone), -0 equals 0. Text is hashed in the C collation (a nondeterministic collation would
    call different strings equal) and json through its canonical text. Both sides must hold
    the same types, which table-to-table runs ensure by casting to a common type, and a Kafka
    mirror by hashing each message's fields read as the source's types when it stages them.
    It only points at the segments and rows that may differ: every difference reported is
    confirmed in canonical form.
    """
    given = hashed or [None] * len(values)
    parts = [sql.SQL("coalesce({}, {})").format(own or _hashed(e, t, seed),
                                                sql.Literal(_null_hash(seed)))
             for seed, ((e, t), own) in enumerate(zip(values, given, strict=True))]
    return sql.SQL("pg_catalog.hashint8extended({}, 0)").format(sql.SQL(" # ").join(parts))


#: What a NULL in position ``seed`` hashes to: ``_NULL_HASH ^ seed``, no value's hash but by
#: a 2^-64 chance (the seed itself is the hash of several values, see native_hash).
_NULL_HASH = int.from_bytes(hashlib.sha256(b"trueup native hash: NULL").digest()[:8], "big",
                            signed=True)


def _null_hash(seed: int) -> int:
    return _NULL_HASH ^ seed


def _hashed(expr: sql.Composable, ctype: ColumnType,
            seed: int | sql.Composable) -> sql.Composable:
    """A value of ``ctype`` hashed by its type's extended hash function (NULL for NULL)."""
    function, value = _hash_function(expr, ctype)
    if isinstance(seed, int):
        seed = sql.Literal(seed)
    hashed = sql.SQL("{}({}, {})").format(sql.Identifier("pg_catalog", function), value, seed)
    if ctype.name != "numeric":
        return hashed
    # NaN and the infinities hash to the seed: those (and a 2^-64 chance of a finite value,
    # then only compared in canonical form) are hashed as their text. An int8 comparison
    # costs nothing measurable where testing the value for the three costs 0.15 us a row.
    return sql.SQL(
        "coalesce(nullif({hashed}, {seed}), pg_catalog.hashtextextended(({value})::text, {seed}))"
    ).format(value=value, seed=seed, hashed=hashed)


def _hash_function(expr: sql.Composable, ctype: ColumnType) -> tuple[str, sql.Composable]:
    """The extended hash function for a value of ``ctype``, and the value as it takes it."""
    if ctype.kind is Kind.JSON:
        return "hashtextextended", sql.SQL("nullif(({})::jsonb, 'null')::text").format(expr)
    if ctype.name in _NATIVE_HASH_FUNCTIONS:
        return _NATIVE_HASH_FUNCTIONS[ctype.name], expr
    if ctype.kind is Kind.TEXT:  # text, varchar, char, name, citext, enums
        return "hashtextextended", sql.SQL("({})::text COLLATE \"C\"").format(expr)
    if ctype.name == "timestamptz":
        return "timestamp_hash_extended", sql.SQL("({}) AT TIME ZONE 'UTC'").format(expr)
    if ctype.name == "date":
        return "timestamp_hash_extended", sql.SQL("({})::timestamp").format(expr)
    if ctype.name == "bool":
        return "hashint4extended", sql.SQL("({})::int4").format(expr)
    raise AssertionError(f"no native hash for type {ctype.name}")


def common_type(source: ColumnType, target: ColumnType) -> ColumnType:
    """The type both sides are compared as when a target column's type differs.

    Integers of different widths compare as bigint, other numbers of different types as
    numeric, and text-like values as text, so no cast can round or cut a value (a numeric
    target cast to a bigint source would round 10.5).
    Otherwise the target is read as the source's type; where that would cut a value (a
    timestamp read as a date, a number as a bool: see :func:`_cuts`), a compared column's
    value the cast does not keep unchanged renders as refused (:class:`_ExactRead`), and such
    a key is refused (:func:`table_side`).
    """
    if source.name == target.name:
        return source
    if source.name in INTEGER_TYPES and target.name in INTEGER_TYPES:
        return ColumnType.of("int8")  # holds both; neither side's column needs a cast
    if source.kind is Kind.NUMBER and target.kind is Kind.NUMBER:
        return ColumnType.of("numeric")
    if source.kind is Kind.TEXT and target.kind is Kind.TEXT and "uuid" not in (
            source.name, target.name):
        return ColumnType.of("text")
    return source


def compared_type(source: ColumnType, target: ColumnType) -> ColumnType:
    """The type a compared column is read as on both sides: :func:`common_type`, except that
    numbers a text or JSON target column holds against an integer or ``numeric`` source
    compare as ``numeric``, as a message's do: ``1.0``, ``1e0`` or JSON ``"1"`` against an
    integer 1 are equal (an integer's input would refuse the first two), ``1.5`` against 2 is
    not. Against a ``real`` or ``double precision`` source they are read as that type, as a
    message's are (``123456789`` is the real 123456792)."""
    if source.name in (*INTEGER_TYPES, "numeric") and target.kind in (Kind.TEXT, Kind.JSON) \
            and target.name != "uuid":
        return ColumnType.of("numeric")
    return common_type(source, target)


@dataclass(frozen=True)
class SharedTypes:
    """The types both sides of a table-to-table comparison read their values as."""

    columns: list[ColumnType]       # compared_type of each compared column
    keys: list[ColumnType]          # common_type of each key column
    version: ColumnType | None      # common_type of the versions, when both sides have one
    #: the target's key columns that may hold a value their shared type refuses (see
    #: :func:`refusable_keys`)
    refusable_keys: list[str] = field(default_factory=list)


def shared_types(conn: psycopg.Connection[Any], table: str, *, columns: Sequence[str],
                 key: Sequence[str], version: str | None,
                 source_columns: Sequence[ColumnType], source_key: Sequence[ColumnType],
                 source_version: ColumnType | None) -> SharedTypes:
    """The types a target ``table`` (its ``columns``, ``key`` and ``version`` named in the
    source's order) and its source are compared as."""
    found = column_types(conn, table)
    own = require(found, table, columns, conn)
    own_key = require(found, table, key, conn)
    shared_version = None
    if version and source_version is not None:
        own_version = require(found, table, [version], conn)[0]
        # a timestamp version under a date one compares as the timestamp (the date at its
        # midnight, in trueup's UTC sessions): as a date, 13:45 of the day would be no newer
        shared_version = own_version if (
            source_version.kind is Kind.DATE and own_version.kind is Kind.TIMESTAMP) else \
            common_type(source_version, own_version)
    keys = [common_type(s, t) for s, t in zip(source_key, own_key, strict=True)]
    return SharedTypes(
        columns=[compared_type(s, t) for s, t in zip(source_columns, own, strict=True)],
        keys=keys, version=shared_version,
        refusable_keys=refusable_keys(key, own_key, keys, source_key))


#: Type names as SQL spells them, where the catalog's differ (``int8`` is ``bigint``).
_SQL_NAMES = {"int2": "smallint", "int4": "integer", "int8": "bigint", "float4": "real",
              "float8": "double precision", "bool": "boolean", "varchar": "character varying",
              "bpchar": "character", "timestamptz": "timestamp with time zone",
              "timestamp": "timestamp without time zone", "timetz": "time with time zone"}


def _sql_name(ctype: ColumnType) -> str:
    return _SQL_NAMES.get(ctype.name, ctype.name)


def refusable_keys(names: Sequence[str], own: Sequence[ColumnType],
                   read_as: Sequence[ColumnType], source: Sequence[ColumnType]) -> list[str]:
    """The target's key columns (``names``, of types ``own``) that may hold a value their
    type ``read_as`` refuses (a text key read as bigint), each as ``"id (text; the source's
    is bigint)"``."""
    return [f"{name} ({_sql_name(o)}; the source's is {_sql_name(s)})"
            for name, o, r, s in zip(names, own, read_as, source, strict=True)
            if _read_may_fail(o, r)]


def keys_refused(table: str, refusable: Sequence[str], error: BaseException
                 ) -> KeysRefused | None:
    """What to report when reading the keys of the target ``table`` failed with ``error``,
    if that is a value one of its ``refusable`` key columns cannot hold: the key order both
    sides are compared in is the source's, so a key outside the source's type has no place in
    it. None for any other error."""
    if not refusable or not isinstance(error, psycopg.errors.DataError):
        return None
    return KeysRefused(
        f"target {table} holds a key the source's key type cannot hold ({first_line(error)}): "
        f"key {', '.join(refusable)}. Both sides' keys are read as the source's type, in its "
        f"order; give the target's key that type, or reconcile against a view of the target "
        f"that converts or leaves out such keys")


def reconciled_types(rec: ReconciliationConfig, source: psycopg.Connection[Any],
                     target: psycopg.Connection[Any]) -> tuple[SharedTypes, list[ColumnType]]:
    """The types a table-to-table reconciliation compares its sides as, and the source's own
    types of its compared columns. A diff and a backfill both take them from here, so that what
    one reports the other repairs."""
    src, dst = rec.source, rec.target
    assert dst.table is not None
    own = column_types(source, src.table)
    columns = require(own, src.table, src.columns, source)
    shared = shared_types(
        target, dst.table, columns=[dst.columns[c] for c in src.columns], key=dst.key,
        version=dst.version, source_columns=columns,
        source_key=require(own, src.table, src.key, source),
        source_version=require(own, src.table, [src.version], source)[0] if src.version else None)
    return shared, columns


def mirror_side(*, dsn: str, relation: sql.Composable, key: Sequence[str],
                key_types: Sequence[ColumnType], version_type: ColumnType | None) -> Side:
    """A side over a Kafka mirror table, whose fingerprints and row hashes are stored.

    Rows staged in Postgres store their native hash as the source computes it; rows staged in
    Python (see :mod:`trueup.staging`) have none and stand in with their canonical row hash
    inverted, which matches a native hash only by chance: their segments are then compared
    row by row in canonical form, exact either way, only slower."""
    return Side(
        label="target", dsn=dsn, relation=relation,
        key=[sql.Identifier(k) for k in key], key_types=list(key_types),
        version=sql.Identifier("version") if version_type else None, version_type=version_type,
        fingerprint=sql.Identifier("fingerprint"), row_hash=sql.Identifier("row_hash"),
        native_hash=sql.SQL("coalesce(native_hash, ~row_hash)"),
    )


def version_order(version: Any) -> tuple[Any, ...] | None:
    """A version as Postgres orders it (and so the upsert's guard): NaN, of ``numeric`` or
    ``double precision``, equal to itself and above every number, infinities included. In
    Python a NaN equals nothing and is below nothing, and a ``Decimal`` NaN refuses ``<``."""
    if version is None:
        return None
    if isinstance(version, float | decimal.Decimal) and version != version:
        return (1,)
    return (0, version)
