"""SQL over a relation's key: ranges, key lists and the key as JSON, the same on every side.

A chunk is either a key range ``[key_from, key_to)`` (NULL bounds are open) or a list of keys.
Keys travel as JSON arrays of the key values (as in ``trueup.differences.key``), so the state
database never needs the user's types. Text keys compare in the ``C`` collation on every side:
a range means the same rows in the source, the target and the Kafka mirror.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from trueup.fingerprint import ColumnType, Kind, storage_type

#: Text-like types compared as they are; other TEXT kinds (enums, citext) go through ::text.
_PLAIN_TEXT = ("text", "varchar", "bpchar", "name")



@dataclass(frozen=True, kw_only=True)
class KeySpace:
    """The key expressions of one relation and the canonical (source) type of each."""

    exprs: Sequence[sql.Composable]
    types: Sequence[ColumnType]

    def _comparable(self, expr: sql.Composable, ctype: ColumnType) -> sql.Composable:
        if ctype.kind is Kind.TEXT and ctype.name != "uuid":
            if ctype.name not in _PLAIN_TEXT:
                expr = sql.SQL("({})::text").format(expr)
            return sql.SQL("({} COLLATE \"C\")").format(expr)
        return expr

    def _bound(self, value: Any, position: int, ctype: ColumnType) -> sql.Composable:
        text = sql.SQL("({}::jsonb ->> {})").format(sql.Literal(json.dumps(value)),
                                                    sql.Literal(position))
        if ctype.kind is Kind.TEXT and ctype.name != "uuid":
            return sql.SQL("({} COLLATE \"C\")").format(text)
        return sql.SQL("{}::{}").format(text, storage_type(ctype))

    @property
    def ordered(self) -> sql.Composable:
        """``ORDER BY`` list: the key in range order."""
        return sql.SQL(", ").join(self._comparable(e, t) for e, t in zip(self.exprs, self.types,
                                                                         strict=True))

    @property
    def row(self) -> sql.Composable:
        return sql.SQL("({})").format(self.ordered) if len(self.exprs) > 1 else self.ordered

    @property
    def as_json(self) -> sql.Composable:
        """The key as a JSON array (``jsonb``), as stored in differences and repairs."""
        parts = [sql.SQL("({})::{}").format(e, storage_type(t)) if t.kind is Kind.TEXT
                 else e for e, t in zip(self.exprs, self.types, strict=True)]
        return sql.SQL("jsonb_build_array({})").format(sql.SQL(", ").join(parts))

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

    def in_list(self, keys: Sequence[Sequence[Any]]) -> sql.Composable:
        """The key is one of ``keys`` (JSON arrays of key values)."""
        wanted = sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.SQL("(j ->> {})").format(sql.Literal(i)),
                                     storage_type(t))
            for i, t in enumerate(self.types))
        exprs = [sql.SQL("({})::text").format(e) if t.kind is Kind.TEXT
                 and t.name not in (*_PLAIN_TEXT, "uuid") else e
                 for e, t in zip(self.exprs, self.types, strict=True)]
        own = sql.SQL(", ").join(exprs)
        if len(exprs) > 1:
            own = sql.SQL("({})").format(own)
        return sql.SQL("{} IN (SELECT {} FROM jsonb_array_elements({}::jsonb) AS j)").format(
            own, wanted, sql.Literal(json.dumps([list(k) for k in keys])))


def scope_condition(space: KeySpace, key_from: Sequence[Any] | None,
                    key_to: Sequence[Any] | None,
                    keys: Sequence[Sequence[Any]] | None) -> sql.Composable:
    """The rows of one chunk: its key list, else its key range."""
    if keys is not None:
        return space.in_list(keys)
    return space.in_range(key_from, key_to)
