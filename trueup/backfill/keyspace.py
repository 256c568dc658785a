"""SQL over a relation's key: ranges, key lists and the key as JSON, the same on every side.

A chunk is either a key range ``[key_from, key_to)`` (NULL bounds are open) or a list of keys.
Keys travel as JSON arrays of the key values (as in ``trueup.differences.key``), so the state
database never needs the user's types.

A range must mean the same rows in the source, the target and the Kafka mirror, so text keys
compare in one order on every side (the backfill's :class:`~trueup.statuses.KeyOrder`, chosen
when it is planned by :func:`key_order`): their columns' own collation when every side's key
columns share one that sorts the same wherever it runs (then the key index serves each range),
else the ``C`` collation (each range is then a filtered scan: no index in another collation
serves it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from trueup.fingerprint import ColumnType, Kind, jsonb_text, storage_type
from trueup.queries import query
from trueup.statuses import KeyOrder

#: Text-like types compared as they are; other TEXT kinds (enums, citext) go through ::text.
_PLAIN_TEXT = ("text", "varchar", "bpchar", "name")
#: Types whose ranges may compare in the column's own collation (bpchar compares padded, enums
#: and citext by their own rules: those stay in ``C``).
_NATIVE_TEXT = ("text", "varchar")
#: Types jsonb holds as numeric, and json prints as the float's own text.
_FLOAT = ("float4", "float8")
#: libc collations that sort by code point wherever they run (they have no version).
_CODE_POINT = re.compile(r"^(C|POSIX)(\..*)?$", re.IGNORECASE)


def repairs_text(key: Sequence[Any]) -> str:
    """A key (a list of JSON values) as ``trueup.repairs`` holds it, which is
    :attr:`KeySpace.repairs_text`: jsonb's text with the numbers of its top level without
    trailing zeros (jsonb compares ``9.00`` and ``9`` equal, their texts differ). One key has
    one such text, so the repairs primary key, lineage and retried chunks find a key's row by
    it. Exact for a key read with ``parse_float=Decimal``; one read with floats keeps only a
    double's digits (15 to 17 significant ones), so writers take the text from Postgres where
    they can (see "Known limits" in docs/backfills.md)."""
    return jsonb_text([_plain(value) for value in key])


def json_text(value: Any) -> str:
    """``value`` as JSON text for Postgres to read: json.dumps's, else (a key read exactly,
    its numbers :class:`~decimal.Decimal`, which json.dumps cannot write) jsonb's own."""
    try:
        return json.dumps(value)
    except TypeError:
        return jsonb_text(value)


def _plain(value: Any) -> Any:
    """A number without the zeros that end its fraction, as ``trim_scale`` leaves it: every
    other digit kept (``Decimal.normalize`` would round to 28 of them)."""
    if not isinstance(value, float | Decimal):
        return value
    number = Decimal(repr(value)) if isinstance(value, float) else value
    if not number.is_finite():
        return value
    sign, digits, exponent = number.as_tuple()
    if not any(digits):
        return Decimal(0)
    assert isinstance(exponent, int)  # a finite number's is
    while exponent < 0 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return Decimal((sign, digits, exponent))


def _plain_number(expr: sql.Composable, ctype: ColumnType) -> sql.Composable:
    """A numeric value, or a JSON value that is a number, without trailing zeros (what
    :func:`repairs_text` makes of a number at a key's top level)."""
    if ctype.kind is not Kind.JSON:
        return sql.SQL("trim_scale({})").format(expr)
    value = sql.SQL("({})::jsonb").format(expr)
    return sql.SQL("(CASE WHEN jsonb_typeof({0}) = 'number' "
                   "THEN to_jsonb(trim_scale(({0})::text::numeric)) ELSE {0} END)").format(value)


def _collated(ctype: ColumnType) -> bool:
    """Whether keys of this type compare in a collation (text-like, not uuid)."""
    return ctype.kind is Kind.TEXT and ctype.name != "uuid"


@dataclass(frozen=True, kw_only=True)
class KeySpace:
    """The key expressions of one relation and the canonical (source) type of each."""

    exprs: Sequence[sql.Composable]
    types: Sequence[ColumnType]
    order: KeyOrder = KeyOrder.C

    def _native(self, ctype: ColumnType) -> bool:
        return self.order is KeyOrder.NATIVE and ctype.name in _NATIVE_TEXT

    def _comparable(self, expr: sql.Composable, ctype: ColumnType) -> sql.Composable:
        if _collated(ctype) and not self._native(ctype):
            if ctype.name not in _PLAIN_TEXT:
                expr = sql.SQL("({})::text").format(expr)
            return sql.SQL("({} COLLATE \"C\")").format(expr)
        return expr

    def _bound(self, value: Any, position: int, ctype: ColumnType) -> sql.Composable:
        # a JSON value as JSON (->): as text (->>) a JSON string "x" would read as x
        text = sql.SQL("({}::jsonb {} {})").format(
            sql.Literal(json_text(value)), sql.SQL("->" if ctype.kind is Kind.JSON else "->>"),
            sql.Literal(position))
        if self._native(ctype):
            return text  # the default collation yields to the column's own
        if _collated(ctype):
            return sql.SQL("({} COLLATE \"C\")").format(text)
        return sql.SQL("{}::{}").format(text, storage_type(ctype))

    @property
    def ordered(self) -> sql.Composable:
        """``ORDER BY`` list: the key in range order."""
        return sql.SQL(", ").join(self._comparable(e, t) for e, t in zip(self.exprs, self.types,
                                                                         strict=True))

    def ordered_in(self, collations: Sequence[str | None]) -> sql.Composable:
        """:attr:`ordered`, each text key compared in its columns' own collation (``native``)
        compared in the one ``collations`` names (as Postgres quotes a collation's name; None:
        as it is). For keys read from JSON (:meth:`from_json`), which have no column's
        collation but the database's default."""
        return sql.SQL(", ").join(
            sql.SQL("({}) COLLATE {}").format(e, sql.SQL(name))  # a name Postgres quoted
            if name and self._native(t) else self._comparable(e, t)
            for e, t, name in zip(self.exprs, self.types, collations, strict=True))

    @property
    def row(self) -> sql.Composable:
        return sql.SQL("({})").format(self.ordered) if len(self.exprs) > 1 else self.ordered

    @property
    def as_json(self) -> sql.Composable:
        """The key as a JSON array (``jsonb``), as stored in differences (repairs rows hold
        :attr:`repairs_key`'s text)."""
        return self._array("jsonb_build_array")

    @property
    def repairs_key(self) -> sql.Composable:
        """The key as ``trueup.repairs`` holds it, as jsonb (see :func:`repairs_text`): like
        :attr:`as_json`, but each ``numeric`` value, and each JSON value that is a number,
        without trailing zeros (``9.00`` is ``[9]``), as jsonb compares them equal."""
        return self._array("jsonb_build_array", plain_numbers=True)

    @property
    def repairs_text(self) -> sql.Composable:
        """:attr:`repairs_key`'s text. Built as ``json`` where the two print alike, without
        building a jsonb value to print (0.19 us a row less): everywhere but floats (jsonb
        holds them as numeric: ``1e+20`` prints as ``100000000000000000000``) and JSON values
        (jsonb orders an object's keys)."""
        if any(t.name in _FLOAT or t.kind is Kind.JSON for t in self.types):
            return sql.SQL("({})::text").format(self.repairs_key)
        return self._array("json_build_array", plain_numbers=True)

    def _array(self, build: str, *, plain_numbers: bool = False) -> sql.Composable:
        parts = [sql.SQL("({})::{}").format(e, storage_type(t)) if t.kind is Kind.TEXT
                 else _plain_number(e, t) if plain_numbers and (
                     t.name == "numeric" or t.kind is Kind.JSON)
                 else e for e, t in zip(self.exprs, self.types, strict=True)]
        return sql.SQL("{}({})").format(sql.SQL(build), sql.SQL(", ").join(parts))

    @property
    def message_key(self) -> sql.Composable:
        """The Kafka message key: the value as text, a JSON array for a composite key."""
        if len(self.exprs) == 1:
            return sql.SQL("({})::text").format(self.exprs[0])
        return sql.SQL("({})::text").format(self.as_json)

    def _literal_row(self, key: Sequence[Any]) -> sql.Composable:
        values = [self._bound(list(key), i, t) for i, t in enumerate(self.types)]
        joined = sql.SQL(", ").join(values)
        return sql.SQL("({})").format(joined) if len(values) > 1 else joined

    def in_range(self, key_from: Sequence[Any] | None,
                 key_to: Sequence[Any] | None) -> sql.Composable:
        """``key_from <= key < key_to``; a None bound is open."""
        parts: list[sql.Composable] = []
        if key_from is not None:
            parts.append(sql.SQL("{} >= {}").format(self.row, self._literal_row(key_from)))
        if key_to is not None:
            parts.append(sql.SQL("{} < {}").format(self.row, self._literal_row(key_to)))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")

    def after(self, key: Sequence[Any]) -> sql.Composable:
        """``key < the key``: what comes after a range's start."""
        return sql.SQL("{} > {}").format(self.row, self._literal_row(key))

    def indexed(self, *, ranges: bool) -> bool:
        """Whether :meth:`in_range` (``ranges``) or :meth:`in_list` compares the key columns as
        they are, so that their index can serve it (not through ``COLLATE "C"`` or ``::text``)."""
        if ranges:
            return all(not _collated(t) or self._native(t) for t in self.types)
        # bpchar: the list's values are text (compared unpadded), which its index cannot serve
        return all(t.kind is not Kind.TEXT or t.name in ("text", "varchar", "name", "uuid")
                   for t in self.types)

    @property
    def complete(self) -> sql.Composable:
        """The key has no NULL part."""
        return sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(e) for e in self.exprs)

    def from_json(self) -> KeySpace:
        """This key read from ``j``, one JSON array of its values (a key of a difference or a
        chunk), each value as its column's type."""
        # char(n) values compare without their padding (runs before 2026-11-29 stored keys
        # as read, padded: 'ab  ' must find 'ab')
        return KeySpace(exprs=[
            sql.SQL("{}::{}").format(
                sql.SQL("rtrim(j ->> {}, ' ')" if t.name == "bpchar" else
                        "(j -> {})" if t.kind is Kind.JSON else "(j ->> {})").format(
                    sql.Literal(i)), storage_type(t))
            for i, t in enumerate(self.types)], types=self.types, order=self.order)

    def in_list(self, keys: Sequence[Sequence[Any]]) -> sql.Composable:
        """The key is one of ``keys`` (JSON arrays of key values)."""
        # the column named: a bare j would be a column j of the relation, if it has one
        return sql.SQL("{} IN (SELECT {} FROM jsonb_array_elements({}::jsonb) "
                       "AS trueup_keys (j))").format(
            self._listed(), sql.SQL(", ").join(self.from_json().exprs),
            sql.Literal(json_text([list(k) for k in keys])))

    def held(self, relation: sql.Composable, keys: Sequence[Sequence[Any]]) -> sql.Composed:
        """A query of the positions (from 1, as ``n``, once or more) of the ``keys`` (JSON
        arrays of key values) that a row of ``relation`` holds, its key compared as
        :meth:`in_list` compares it: by value (a jsonb ``{"a": 2.5}`` is ``{"a": 2.50}``),
        whatever the texts. A join, not ``IN``: a semi-join hashes the whole relation where
        no index serves the comparison (citext, char(n)), for however few keys."""
        n = len(self.exprs)
        wanted = [sql.Identifier(f"trueup_w{i}") for i in range(n)]
        own = [sql.Identifier(f"trueup_o{i}") for i in range(n)]
        return sql.SQL(
            "SELECT k.n FROM (SELECT e.n, {wanted} FROM jsonb_array_elements({keys}::jsonb) "
            "WITH ORDINALITY AS e (j, n)) AS k "
            "JOIN (SELECT {own} FROM {rel} WHERE {complete}) AS r ON {on}").format(
                wanted=sql.SQL(", ").join(sql.SQL("{} AS {}").format(e, a) for e, a in zip(
                    self.from_json().exprs, wanted, strict=True)),
                keys=sql.Literal(json_text([list(k) for k in keys])),
                own=sql.SQL(", ").join(sql.SQL("{} AS {}").format(e, a) for e, a in zip(
                    self._listed_exprs(), own, strict=True)),
                rel=relation, complete=self.complete,
                on=sql.SQL(" AND ").join(sql.SQL("k.{} = r.{}").format(w, o)
                                         for w, o in zip(wanted, own, strict=True)))

    def _listed(self) -> sql.Composable:
        """The key as :meth:`in_list` compares it with keys read from JSON."""
        own = sql.SQL(", ").join(self._listed_exprs())
        return sql.SQL("({})").format(own) if len(self.exprs) > 1 else own

    def _listed_exprs(self) -> list[sql.Composable]:
        return [sql.SQL("({})::text").format(e) if t.kind is Kind.TEXT
                and t.name not in (*_PLAIN_TEXT, "uuid") else e
                for e, t in zip(self.exprs, self.types, strict=True)]


def scope_condition(space: KeySpace, key_from: Sequence[Any] | None,
                    key_to: Sequence[Any] | None,
                    keys: Sequence[Sequence[Any]] | None) -> sql.Composable:
    """The rows of one chunk: its key list, else its key range."""
    if keys is not None:
        return space.in_list(keys)
    return space.in_range(key_from, key_to)


# ---------------------------------------------------------------------------------------------
# Choosing the order at planning


@dataclass(frozen=True, kw_only=True)
class KeyColumns:
    """Where one side keeps its key: a connection, and a table with its key columns (None: a
    table that may not exist yet, whose columns take the database's default collation)."""

    conn: psycopg.Connection[Any]
    table: str | None
    columns: Sequence[str]


def key_order(types: Sequence[ColumnType], sides: Sequence[KeyColumns]) -> KeyOrder:
    """:attr:`KeyOrder.NATIVE` when every text key column on every side is ``text`` or
    ``varchar`` and all of them sort in one deterministic collation that sorts the same on any
    machine (a recorded version, or code point order); else :attr:`KeyOrder.C`."""
    texts = [i for i, t in enumerate(types) if _collated(t)]
    if not texts or any(types[i].name not in _NATIVE_TEXT for i in texts):
        return KeyOrder.C
    seen: set[str] = set()
    for side in sides:
        try:
            with side.conn.transaction():  # a savepoint when the caller is in a transaction
                found = _text_key_collations(side, texts)
        except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedColumn):
            return KeyOrder.C  # before PostgreSQL 15 a server does not report enough
        for column in found:
            if column is None or column["type"] not in _NATIVE_TEXT or \
                    not _sorts_alike_everywhere(column["collation"]):
                return KeyOrder.C
            seen.add(json.dumps(column["collation"], sort_keys=True))
    return KeyOrder.NATIVE if len(seen) == 1 else KeyOrder.C


def _text_key_collations(side: KeyColumns, texts: Sequence[int]) -> list[dict[str, Any] | None]:
    """``{"type", "collation"}`` of the side's key columns at ``texts`` (None: no such column);
    a column in the database's default collation gets the database's."""
    default = side.conn.execute(query("default_collation")).fetchone()
    assert default is not None
    found: list[dict[str, Any] | None] = []
    for i in texts:
        column: dict[str, Any] | None = {"type": "text", "collation": None}
        if side.table is not None:
            column = side.conn.execute(query("column_collation"), {
                "table": sql.Identifier(*side.table.split(".")).as_string(side.conn),
                "column": side.columns[i]}).fetchone()
        if column is not None:
            column = {"type": column["type"],
                      "collation": column["collation"] or default["collation"]}
        found.append(column)
    return found


def _sorts_alike_everywhere(collation: dict[str, Any]) -> bool:
    if not collation["deterministic"]:
        return False
    if collation["version"] is not None:
        return True  # ICU, glibc: the same version sorts the same
    return collation["provider"] == "c" and all(
        _CODE_POINT.match(collation[part] or "") for part in ("collate", "ctype"))
