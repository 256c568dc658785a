"""Staging batches of Kafka messages into a mirror table, in one transaction each.

Two ways to the same staged rows:

- **In Postgres** (the fast path): the raw messages are copied in as text and Postgres parses the
  JSON, casts the fields to the source's types and renders them with the SQL of
  :mod:`trueup.fingerprint`. Parsing in C is several times faster than in Python.
- **In Python** (the fallback): :func:`trueup.fingerprint.fields_text` renders a message.
  A message takes this path when Postgres refuses it: not valid JSON text, or a field that its
  type's cast rejects (a refused batch is parsed again in halves until those messages stand
  alone). The Python path also reports *which* message was unreadable and why. Dates and
  times Python cannot read (``2024-1-1``, ``Jan 1 2024``) are read by Postgres's own input
  (the session's readers, one statement per batch), as the Postgres path would read them.

Both paths give the same canonical text for every message that either can read (a test builds
the same mirror both ways). After staging, one set of statements merges the batch: latest
message per key wins, tombstones delete, unreadable messages are recorded, and the partition
offsets advance in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from trueup.db import first_line
from trueup.fingerprint import (
    INVALID,
    PART_SEPARATOR,
    ColumnType,
    Kind,
    ReadByPostgres,
    fields_sql,
    fields_text,
    loads,
    raw_fields,
    render,
    storage_type,
    text_hash,
)
from trueup.fingerprint import copy_text as value_text
from trueup.log import get_logger
from trueup.sides import Side, create_readers, native_hash, render_reader

if TYPE_CHECKING:
    from trueup.mirror import MirrorShape

log = get_logger(__name__)


class RawMessage(NamedTuple):
    """One message as read from Kafka (a tuple: there are millions of them)."""

    partition: int
    offset: int
    key: str | None
    value: bytes | None



def _record_type(ctype: ColumnType) -> sql.Composable:
    """The type a JSON field is read as by ``json_to_record``, as the source would hold it."""
    if ctype.kind is Kind.TEXT:
        return sql.SQL("uuid") if ctype.name == "uuid" else sql.SQL("text")
    if ctype.kind is Kind.JSON:
        return sql.SQL("jsonb")
    if ctype.kind is Kind.TIMESTAMP:  # an offset always counts, as in the Python path
        return sql.SQL("timestamptz")
    return sql.Identifier(ctype.name)


def _record_value(column: sql.Composable, ctype: ColumnType) -> sql.Composable:
    if ctype.name == "bpchar":
        return sql.SQL("rtrim({}, ' ')").format(column)
    return column


#: Refused parse statements of one batch before the rest of it is read in Python: enough to
#: single out a few dozen refused messages among 20,000 (each takes about log2(20,000) = 15).
MAX_REFUSED_PARSES = 512

#: The longest column name Postgres keeps (NAMEDATALEN - 1); longer ones are cut.
MAX_NAME_BYTES = 63

#: The reader (see :func:`trueup.sides.create_readers`) of a date or time field's text: as
#: the Postgres path reads it (a timestamp always as timestamptz, see _record_type).
_TIME_READERS = {Kind.DATE: ColumnType.of("date"), Kind.TIMESTAMP: ColumnType.of("timestamptz")}

_REFUSED = "not storable in Postgres: "
UNKEYED_TOMBSTONE = "tombstone without a readable key"


class Merger:
    """Stages and merges batches for one mirror; owns the connection while it runs."""

    def __init__(self, shape: MirrorShape, conn: psycopg.Connection[Any], *,
                 parse_in_postgres: bool = True) -> None:
        self.shape = shape
        self.conn = conn
        self.parse_in_postgres = parse_in_postgres
        self.fallbacks = 0
        #: partition -> offset past messages removed before they were read (retention,
        #: DeleteRecords): stored with the next batch merged, then cleared
        self.offsets_skipped: dict[int, int] = {}
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS trueup_stage (kafka_partition integer, "
            "kafka_offset bigint, message_key text, tombstone boolean, {stored}, "
            "fields text, reason text, native bigint) ON COMMIT DELETE ROWS"
        ).format(stored=shape.stored_columns(not_null_keys=False)))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS trueup_raw (seq integer, "
                     "kafka_partition integer, kafka_offset bigint, message_key text, "
                     "value text) ON COMMIT DELETE ROWS")
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS trueup_keyed (kafka_partition integer, "
            "kafka_offset bigint, {keys}) ON COMMIT DELETE ROWS").format(keys=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c), storage_type(t))
                for c, t in zip(shape.key_columns, shape.key_types, strict=True))))
        #: Fields read as a date or a time (each as one kind only), and whether the session
        #: has the readers that read their text as the Postgres path does
        self._time_fields = self._fields_read_as_times()
        self._time_readers = bool(self._time_fields) and bool(create_readers(
            conn, shape.name, [_TIME_READERS[k] for k in set(self._time_fields.values())]))
        conn.commit()
        # what both paths stage; only Postgres adds each row's native hash (see mirror_side)
        self.columns = ["kafka_partition", "kafka_offset", "message_key", "tombstone",
                        *shape.key_columns, *(["version"] if shape.version_type else []),
                        "fields", "reason"]
        self._parse_sql = self._build_parse()
        #: JSON fields read as text (Postgres reads a field once, as the first type asking)
        self._text_fields = self._fields_read_as_text()
        self._merge_sql = self._build_merge()
        self._copy_sql = sql.SQL("COPY trueup_stage ({}) FROM STDIN").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns))

    def merge(self, messages: Sequence[RawMessage]) -> None:
        """Stage and merge one batch, committing it with its offsets.

        Postgres parses every message it can; only the messages it refuses one by one are
        read in Python, so a message reads the same whatever shares its batch."""
        if not messages:
            return
        with self.conn.transaction(), self.conn.cursor() as cur:
            in_python: list[RawMessage] = list(messages)
            if self.parse_in_postgres:
                cur.execute("SET LOCAL TimeZone = 'UTC'")
                in_postgres, in_python = self._copy_raw(cur, messages)
                in_python += [in_postgres[i] for i in self._parse(cur, len(in_postgres))]
                if in_python:
                    self.fallbacks += 1
                    log.info("mirror.messages_parsed_in_python", reconciliation=self.shape.name,
                             messages=len(in_python), batch=len(messages))
            if in_python:
                self._stage_storable(cur, self._copy_sql, list(self.python_rows(in_python)))
            self._key_unreadable(cur)
            self._finish(cur)
            if self.offsets_skipped:
                store_offsets(self.conn, self.shape, self.offsets_skipped)
        self.offsets_skipped = {}

    def _copy_raw(self, cur: psycopg.Cursor[Any], messages: Sequence[RawMessage]
                  ) -> tuple[list[RawMessage], list[RawMessage]]:
        """Copy the messages Postgres can hold as text into ``trueup_raw``, numbered from 0
        (``seq``); those and the others (not UTF-8, a NUL character)."""
        held: list[RawMessage] = []
        others: list[RawMessage] = []
        with cur.copy("COPY trueup_raw (seq, kafka_partition, kafka_offset, message_key, "
                      "value) FROM STDIN") as copy:
            for m in messages:
                try:
                    value = None if m.value is None else m.value.decode()
                except UnicodeDecodeError:
                    others.append(m)
                    continue
                if (value is not None and "\x00" in value) or (m.key and "\x00" in m.key):
                    others.append(m)
                    continue
                copy.write_row((len(held), m.partition, m.offset, m.key, value))
                held.append(m)
        return held, others

    def _parse(self, cur: psycopg.Cursor[Any], count: int) -> list[int]:
        """Parse the ``count`` raw messages into the stage; the ``seq`` of each message
        Postgres refused. A refused statement is split in halves until the refused messages
        stand alone; after :data:`MAX_REFUSED_PARSES` refusals in one batch (a topic of
        mostly unreadable messages) the messages not yet parsed are all left to Python."""
        refused: list[int] = []
        ranges = [(0, count)]
        failures = 0
        while ranges:
            lo, hi = ranges.pop()
            if failures >= MAX_REFUSED_PARSES:
                refused += range(lo, hi)
                continue
            statement = self._parse_sql if (lo, hi) == (0, count) else sql.Composed([
                self._parse_sql, sql.SQL(" WHERE r.seq >= {} AND r.seq < {}").format(
                    sql.Literal(lo), sql.Literal(hi))])
            try:
                with self.conn.transaction():  # a savepoint
                    cur.execute(statement)
            # StatementTooComplex: JSON nested past the server's stack depth
            except (psycopg.errors.DataError, psycopg.errors.StatementTooComplex) as exc:
                failures += 1
                if hi - lo == 1:
                    refused.append(lo)
                    log.debug("mirror.message_refused", reconciliation=self.shape.name,
                              reason=first_line(exc)[:200])
                else:
                    middle = (lo + hi) // 2
                    ranges += [(middle, hi), (lo, middle)]
        return refused

    def _stage_storable(self, cur: psycopg.Cursor[Any], copy_sql: sql.Composed,
                        rows: list[tuple[Any, ...]], *, stand_in: bool = True) -> None:
        """COPY ``rows`` into the stage; a row Postgres refuses (a NUL in text, a number past
        its column's range) is staged as unreadable instead (left out without ``stand_in``),
        found by halving the batch."""
        try:
            with self.conn.transaction(), cur.copy(copy_sql) as copy:  # a savepoint
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.DataError as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                self._stage_storable(cur, copy_sql, rows[:half], stand_in=stand_in)
                self._stage_storable(cur, copy_sql, rows[half:], stand_in=stand_in)
            elif not stand_in:
                return
            elif rows[0][-1] is None or not rows[0][-1].startswith(_REFUSED):
                self._stage_storable(cur, copy_sql, [self._refused(rows[0], exc)])
            else:
                raise  # even its unreadable stand-in was refused: nothing left to try

    def _refused(self, row: tuple[Any, ...], exc: psycopg.Error) -> tuple[Any, ...]:
        partition, offset, message_key, tombstone = row[:4]
        if message_key is not None:
            message_key = message_key.replace("\x00", "\N{REPLACEMENT CHARACTER}")
        blank = (None,) * (len(self.columns) - 6)  # keys, version and fields
        reason = f"{_REFUSED}{first_line(exc)}"
        return (partition, offset, message_key, tombstone, *blank, None, reason)

    def _key_unreadable(self, cur: psycopg.Cursor[Any]) -> None:
        """Give each staged unreadable message (not a tombstone) the key its message key
        names, read as a tombstone's is (:func:`keys_from_message_key`), whichever path staged
        it: it is its key's latest message, and supersedes the key's row (see
        :meth:`_build_merge`). A key its column refuses (a number past its range) stays
        unnamed."""
        shape = self.shape
        with self.conn.cursor(row_factory=tuple_row) as read:
            keyed = [(partition, offset, *keys) for partition, offset, message_key in read.execute(
                "SELECT kafka_partition, kafka_offset, message_key FROM trueup_stage "
                "WHERE reason IS NOT NULL AND NOT tombstone AND message_key IS NOT NULL")
                if (keys := keys_from_message_key(message_key, shape)) is not None]
        if not keyed:
            return
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in shape.key_columns)
        self._stage_storable(cur, sql.SQL(
            "COPY trueup_keyed (kafka_partition, kafka_offset, {}) FROM STDIN").format(columns),
            keyed, stand_in=False)
        cur.execute(sql.SQL(
            "UPDATE trueup_stage AS s SET ({columns}) = ROW({values}) FROM trueup_keyed AS k "
            "WHERE s.kafka_partition = k.kafka_partition AND s.kafka_offset = k.kafka_offset"
        ).format(columns=columns, values=sql.SQL(", ").join(
            sql.SQL("k.{}").format(sql.Identifier(c)) for c in shape.key_columns)))

    def _finish(self, cur: psycopg.Cursor[Any]) -> None:
        for statement in self._merge_sql:
            cur.execute(statement)

    # -- in Postgres ---------------------------------------------------------------------------

    def _values_read(self) -> list[tuple[str, ColumnType]]:
        """The JSON field and type of each value a row holds: keys, version, columns."""
        shape = self.shape
        return [*zip(shape.key_fields, shape.key_types, strict=True),
                *([(shape.version_field, shape.version_type)]
                  if shape.version_field and shape.version_type else []),
                *zip(shape.column_fields, shape.column_types, strict=True)]

    def _field_types(self) -> dict[str, ColumnType]:
        """Each JSON field read, with the type it is read as: that of the first value it feeds
        (a field feeding two is read once, as the first)."""
        first: dict[str, ColumnType] = {}
        for field, ctype in self._values_read():
            first.setdefault(field, ctype)
        return first

    def _build_parse(self) -> sql.Composed:
        """SQL staging ``trueup_raw`` into ``trueup_stage``: one ``json_to_record`` per
        message reads every field at once, typed as the source column (6x faster than one
        ``->>`` and cast per field; a fifth faster than ``jsonb_to_record``, which builds a
        jsonb value first; both keep the last of duplicate fields)."""
        shape = self.shape
        wanted = self._values_read()
        fields = self._field_types()
        # json_to_record finds fields by the record's column names: name them as the fields.
        # A name longer than Postgres keeps for a column would be cut, and match no field: such
        # fields are read with an operator instead.
        names = {field: sql.Identifier(field) for field in fields
                 if len(field.encode()) <= MAX_NAME_BYTES}
        record: sql.Composable = sql.SQL(", ").join(
            sql.SQL("{} {}").format(names[f], _record_type(t))
            for f, t in fields.items() if f in names)
        if not names:
            record = sql.SQL("trueup_none text")  # a record needs a column

        def read(field: str, ctype: ColumnType) -> sql.Composable:
            if field not in names:  # as json_to_record reads it: a JSON null is NULL
                if ctype.kind is Kind.JSON:
                    return sql.SQL("NULLIF((r.value::json -> {})::jsonb, 'null'::jsonb)").format(
                        sql.Literal(field))
                return _record_value(sql.SQL("(r.value::json ->> {})::{}").format(
                    sql.Literal(field), _record_type(ctype)), ctype)
            value = sql.SQL("x.{}").format(names[field])
            if _record_type(ctype).as_string(None) != _record_type(fields[field]).as_string(None):
                value = sql.SQL("({})::{}").format(value, _record_type(ctype))
            return _record_value(value, ctype)

        one_key = len(shape.key_fields) == 1

        def from_message_key(i: int, ctype: ColumnType) -> sql.Composable:
            # As keys_from_message_key reads them: a one-column key whose values may
            # themselves be a JSON array's text (text-like, JSON) is the text as it is; any
            # other one-column key given as a JSON array holds exactly one value, else the
            # text is the value. CASE, not AND: only CASE promises not to parse a key that is
            # not JSON.
            if not one_key:
                raw: sql.Composable = sql.SQL("(r.message_key::jsonb ->> {})").format(
                    sql.Literal(i))
            elif _key_text_as_is(ctype):
                raw = sql.SQL("r.message_key")
            else:
                raw = sql.SQL("(CASE WHEN left(r.message_key, 1) <> '[' THEN r.message_key "
                              "WHEN jsonb_array_length(r.message_key::jsonb) = 1 "
                              "THEN r.message_key::jsonb ->> 0 ELSE r.message_key END)")
            value = sql.SQL("{}::{}").format(_record_value(raw, ctype), storage_type(ctype))
            if one_key and ctype.kind is Kind.JSON:  # as a key field holding null: no key
                return sql.SQL("NULLIF({}, 'null'::jsonb)").format(value)
            return value

        keys = [sql.SQL("CASE WHEN r.value IS NULL THEN {} ELSE ({})::{} END").format(
            from_message_key(i, t), read(f, t), storage_type(t))
            for i, (f, t) in enumerate(zip(shape.key_fields, shape.key_types, strict=True))]
        version: list[sql.Composable] = []
        if shape.version_type is not None and shape.version_field is not None:
            version = [read(shape.version_field, shape.version_type)]
        rendered = fields_sql([read(f, t) for f, t in
                               zip(shape.column_fields, shape.column_types, strict=True)],
                              shape.column_types)
        # The row's native hash as the source computes it (see trueup.sides.native_hash): each
        # value held as the source's type, so a checksum pass can skip rendering canonical text
        native = native_hash([(sql.SQL("({})::{}").format(read(f, t), storage_type(t)), t)
                              for f, t in wanted])
        missing = [sql.SQL("WHEN {} IS NULL THEN {}").format(
            read(f, t), sql.Literal(f"no key field {f!r}"))
            for f, t in zip(shape.key_fields, shape.key_types, strict=True)]
        # a tombstone whose key cannot be read is unreadable, never ignored
        unkeyed = [sql.SQL("r.message_key IS NULL"),
                   *[sql.SQL("{} IS NULL").format(from_message_key(i, t))
                     for i, t in enumerate(shape.key_types)]]
        if not one_key:
            unkeyed.append(sql.SQL(
                "CASE WHEN jsonb_typeof(r.message_key::jsonb) = 'array' "
                "THEN jsonb_array_length(r.message_key::jsonb) END IS DISTINCT FROM {}").format(
                    sql.Literal(len(shape.key_types))))
        tombstone_reason = sql.SQL("CASE WHEN {} THEN {} END").format(
            sql.SQL(" OR ").join(unkeyed), sql.Literal(UNKEYED_TOMBSTONE))
        return sql.SQL(
            "INSERT INTO trueup_stage ({cols}) SELECT r.kafka_partition, r.kafka_offset, "
            "r.message_key, r.value IS NULL, {values}, CASE WHEN r.value IS NULL THEN NULL "
            "ELSE {fields} END, CASE WHEN r.value IS NULL THEN {tombstone} {missing} ELSE NULL "
            "END, CASE WHEN r.value IS NULL THEN NULL ELSE {native} END "
            "FROM trueup_raw AS r LEFT JOIN LATERAL json_to_record(r.value::json) AS x({record}) "
            "ON true"
        ).format(cols=sql.SQL(", ").join(sql.Identifier(c) for c in [*self.columns, "native"]),
                 values=sql.SQL(", ").join([*keys, *version]), fields=rendered, native=native,
                 missing=sql.SQL(" ").join(missing), record=record,
                 tombstone=tombstone_reason)

    # -- in Python -----------------------------------------------------------------------------

    def _fields_read_as_text(self) -> frozenset[str]:
        return frozenset(f for f, t in self._field_types().items() if t.kind is Kind.TEXT)

    def _fields_read_as_times(self) -> dict[str, Kind]:
        """The fields every value of which is a date, or every a time: their kind."""
        kinds: dict[str, set[Kind]] = {}
        for field, ctype in self._values_read():
            kinds.setdefault(field, set()).add(ctype.kind)
        return {f: next(iter(k)) for f, k in kinds.items()
                if len(k) == 1 and next(iter(k)) in _TIME_READERS}

    def _documents(self, messages: Sequence[RawMessage]) -> list[dict[str, Any] | str | None]:
        """Each message's fields (None for a tombstone, the reason for an unreadable one),
        with the dates and times only Postgres's input reads read by Postgres."""
        documents: list[dict[str, Any] | str | None] = []
        asked: dict[tuple[Kind, str], list[tuple[dict[str, Any], str]]] = {}
        for m in messages:
            if m.value is None:
                documents.append(None)
                continue
            try:
                document = loads(m.value)
            except ValueError:
                documents.append("not JSON")
                continue
            if not isinstance(document, dict):
                documents.append("not a JSON object")
                continue
            if any(not isinstance(document.get(f), str | None) for f in self._text_fields):
                # a number, boolean, object or array read as text is its JSON as written
                # (json_to_record's reading): 1e3 is "1e3", not "1000"
                raw = raw_fields(m.value)
                document = {**document, **{f: raw[f] for f in self._text_fields
                                           if not isinstance(document.get(f), str | None)}}
            for field, kind in self._time_fields.items() if self._time_readers else ():
                text = _time_text(document.get(field), kind, m.value, field)
                if text is not None:
                    asked.setdefault((kind, text), []).append((document, field))
            documents.append(document)
        if asked:
            for (kind, text), read in zip(asked, self._read_times(list(asked)), strict=True):
                if read is not None:
                    for document, field in asked[kind, text]:
                        document[field] = ReadByPostgres(kind, read)
        return documents

    def _read_times(self, texts: list[tuple[Kind, str]]) -> list[str | None]:
        """Postgres's rendering of each date or time text, as the Postgres path reads it
        (None where its input refuses it too)."""
        kinds = [k for k, _ in texts]
        with self.conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SET LOCAL TimeZone = 'UTC'")  # as the Postgres path reads them
            rows = cur.execute(sql.SQL(
                "SELECT CASE WHEN t.kind = 'date' THEN {} ELSE {} END FROM unnest(%s::text[], "
                "%s::text[]) WITH ORDINALITY AS t(kind, value, n) ORDER BY t.n").format(
                    sql.SQL("{}(t.value)").format(render_reader("date")),
                    sql.SQL("{}(t.value)").format(render_reader("timestamptz"))),
                ([k.value for k in kinds], [t for _, t in texts])).fetchall()
        return [None if r[0] is None or r[0].startswith(INVALID) else r[0] for r in rows]

    def python_rows(self, messages: Sequence[RawMessage]) -> Iterator[tuple[Any, ...]]:
        shape = self.shape
        n_keys = len(shape.key_columns)
        with_version = shape.version_type is not None
        filler: tuple[Any, ...] = (None,) * (n_keys + with_version)
        for m, document in zip(messages, self._documents(messages), strict=True):
            head = (m.partition, m.offset, m.key)
            if document is None:
                keys = keys_from_message_key(m.key, shape)
                if keys is None:
                    yield (*head, True, *filler, None, UNKEYED_TOMBSTONE)
                else:
                    yield (*head, True, *keys, *((None,) if with_version else ()), None, None)
                continue
            if isinstance(document, str):
                yield (*head, False, *filler, None, document)
                continue
            key_values = [document.get(f) for f in shape.key_fields]
            missing = [f for f, k in zip(shape.key_fields, key_values, strict=True) if k is None]
            if missing:
                yield (*head, False, *filler, None, f"no key field {missing[0]!r}")
                continue
            key_texts = [value_text(k, t) for k, t in
                         zip(key_values, shape.key_types, strict=True)]
            if any(k is None for k in key_texts):
                yield (*head, False, *filler, None, "key field of the wrong type")
                continue
            version: tuple[Any, ...] = ()
            if with_version:
                assert shape.version_field is not None and shape.version_type is not None
                raw_version = document.get(shape.version_field)
                version_text = None if raw_version is None else value_text(
                    raw_version, shape.version_type)
                if raw_version is not None and version_text is None:
                    yield (*head, False, *filler, None,
                           f"version field {shape.version_field!r} of the wrong type")
                    continue
                version = (version_text,)
            fields = fields_text((document.get(f) for f in shape.column_fields),
                                 shape.column_types)
            yield (*head, False, *key_texts, *version, fields, None)

    # -- merging -------------------------------------------------------------------------------

    def _build_merge(self) -> list[sql.Composed]:
        shape = self.shape
        keys = [sql.Identifier(c) for c in shape.key_columns]
        key_list = sql.SQL(", ").join(keys)
        staged = Side(label="target", dsn="", relation=sql.Identifier("trueup_stage"), key=keys,
                      key_types=shape.key_types,
                      version=sql.Identifier("version") if shape.version_type else None,
                      version_type=shape.version_type, fingerprint=sql.SQL("0"),
                      row_hash=sql.SQL("0"))
        version_col = sql.SQL("version, ") if shape.version_type else sql.SQL("")
        latest = sql.SQL(
            "SELECT DISTINCT ON ({keys}) * FROM trueup_stage WHERE reason IS NULL "
            "ORDER BY {keys}, kafka_offset DESC").format(keys=key_list)
        match = sql.SQL(" AND ").join(sql.SQL("m.{0} = l.{0}").format(k) for k in keys)
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in
            [*(["version"] if shape.version_type else []), "fingerprint", "row_hash",
             "native_hash", "kafka_partition", "kafka_offset"])
        row_hash = text_hash(sql.SQL("concat_ws({}, {}, {}, fields)").format(
            sql.Literal(PART_SEPARATOR), staged.key_text, staged.version_text))
        return [
            sql.SQL("CREATE TEMP TABLE trueup_latest ON COMMIT DROP AS {}").format(latest),
            sql.SQL("DELETE FROM {mirror} AS m USING trueup_latest AS l "
                    "WHERE l.tombstone AND {match}").format(mirror=shape.table, match=match),
            sql.SQL(
                "INSERT INTO {mirror} ({keys}, {version}fingerprint, row_hash, native_hash, "
                "kafka_partition, kafka_offset) SELECT {keys}, {version}"
                "{fingerprint}, {row_hash}, native, kafka_partition, kafka_offset "
                "FROM trueup_latest WHERE NOT tombstone "
                "ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            ).format(mirror=shape.table, keys=key_list, version=version_col,
                     fingerprint=text_hash(sql.Identifier("fields")), row_hash=row_hash,
                     updates=updates),
            # an unreadable message supersedes an earlier row of the key its message key
            # names (in its partition, where a key's messages go): the key's latest message,
            # what the topic's readers meet, says nothing
            sql.SQL(
                "DELETE FROM {mirror} AS m USING trueup_stage AS s "
                "WHERE s.reason IS NOT NULL AND NOT s.tombstone AND {match} "
                "AND m.kafka_partition = s.kafka_partition AND m.kafka_offset < s.kafka_offset"
            ).format(mirror=shape.table, match=sql.SQL(" AND ").join(
                sql.SQL("m.{0} = s.{0}").format(k) for k in keys)),
            # a later message of the same Kafka key supersedes an unreadable one
            sql.SQL(
                "DELETE FROM {unreadable} AS u USING trueup_stage AS s "
                "WHERE u.message_key = s.message_key AND u.kafka_partition = s.kafka_partition "
                "AND u.kafka_offset < s.kafka_offset").format(unreadable=shape.unreadable_table),
            sql.SQL(
                "INSERT INTO {unreadable} (kafka_partition, kafka_offset, message_key, reason) "
                "SELECT s.kafka_partition, s.kafka_offset, s.message_key, s.reason "
                "FROM trueup_stage AS s WHERE s.reason IS NOT NULL AND NOT EXISTS ("
                "SELECT 1 FROM trueup_stage AS later WHERE later.message_key = s.message_key "
                "AND later.kafka_partition = s.kafka_partition "
                "AND later.kafka_offset > s.kafka_offset) "
                "ON CONFLICT DO NOTHING").format(unreadable=shape.unreadable_table),
            sql.SQL(
                "INSERT INTO trueup.mirror_offsets (reconciliation, topic, partition, "
                "next_offset) SELECT {name}, {topic}, kafka_partition, max(kafka_offset) + 1 "
                "FROM trueup_stage GROUP BY kafka_partition "
                "ON CONFLICT (reconciliation, topic, partition) DO UPDATE SET next_offset = "
                "GREATEST(trueup.mirror_offsets.next_offset, excluded.next_offset), "
                "updated_at = now()").format(name=sql.Literal(shape.name),
                                             topic=sql.Literal(shape.topic)),
        ]


def store_offsets(conn: psycopg.Connection[Any], shape: MirrorShape,
                  offsets: dict[int, int]) -> None:
    """Store each partition's next offset to read (never moving one back), in the caller's
    transaction."""
    conn.execute(
        "INSERT INTO trueup.mirror_offsets (reconciliation, topic, partition, next_offset) "
        "SELECT %s, %s, p, o FROM unnest(%s::integer[], %s::bigint[]) AS t(p, o) "
        "ON CONFLICT (reconciliation, topic, partition) DO UPDATE SET next_offset = "
        "GREATEST(trueup.mirror_offsets.next_offset, excluded.next_offset), updated_at = now()",
        (shape.name, shape.topic, list(offsets), list(offsets.values())))


def _time_text(value: Any, kind: Kind, payload: bytes, field: str) -> str | None:
    """The text of the date or time ``field`` of a message (``payload``) that Python's
    reading refuses, to ask Postgres for, as ``json_to_record`` reads it (a number as
    written); None when Python reads it, or when it is an object or an array (no date's or
    time's input reads one)."""
    if value is None or isinstance(value, dict | list):
        return None
    rendered = render(value, _TIME_READERS[kind])
    if rendered is None or not rendered.startswith(INVALID):
        return None
    if isinstance(value, str):
        return None if "\x00" in value else value  # a NUL no text holds, nor reads
    if isinstance(value, bool):
        return "true" if value else "false"
    return raw_fields(payload)[field]


def _key_text_as_is(ctype: ColumnType) -> bool:
    """Whether a one-column key of ``ctype`` is its message key's text as it is, never a
    one-element JSON array unwrapped: its values may themselves read as one (the text
    ``["a"]``, the JSON array ``[1]``). A uuid, number, bool, date or time cannot."""
    return (ctype.kind is Kind.TEXT and ctype.name != "uuid") or ctype.kind is Kind.JSON


def keys_from_message_key(message_key: str | None, shape: MirrorShape) -> list[str] | None:
    """Key values of a tombstone, from the Kafka message key: the key's value as text (a
    JSON key's as JSON text), or a JSON array (of one value for a one-column key of a type
    whose values never start with ``[``)."""
    if message_key is None:
        return None
    if len(shape.key_fields) == 1:
        ctype = shape.key_types[0]
        if _key_text_as_is(ctype):
            if ctype.kind is not Kind.JSON:
                values: list[Any] = [message_key]
            else:  # read as Postgres reads the text as jsonb
                try:
                    values = [loads(message_key)]
                except ValueError:
                    return None
        else:
            try:
                parsed = loads(message_key) if message_key.startswith("[") else None
            except ValueError:
                parsed = None
            values = parsed if isinstance(parsed, list) and len(parsed) == 1 else [message_key]
    else:
        try:
            values = loads(message_key)
        except ValueError:
            return None
        if not isinstance(values, list) or len(values) != len(shape.key_fields):
            return None
    texts: list[str] = []
    for v, t in zip(values, shape.key_types, strict=True):
        text = value_text(v, t)
        if text is None:
            return None
        texts.append(text)
    return texts
