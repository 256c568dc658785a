"""Parsing messages in Postgres and in Python builds the same mirror, row for row."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from trueup.config import ReconciliationConfig
from trueup.mirror import MirrorShape, _ensure_tables, shape_of
from trueup.sides import mirror_side, table_side
from trueup.staging import Merger, RawMessage

pytestmark = pytest.mark.postgres

#: One column of every supported kind, the source of both tests.
ITEMS_DDL = ("CREATE TABLE public.items (id bigint PRIMARY KEY, version bigint, status text, "
             "amount numeric(12,2), price double precision, flag boolean, at timestamptz, "
             "naive timestamp, day date, doc jsonb, ref uuid, code char(4))")

COLUMNS = ["status", "amount", "price", "flag", "at", "naive", "day", "doc", "ref", "code"]


def _shape(source: str, name: str) -> MirrorShape:
    rec = ReconciliationConfig.model_validate({
        "source": {"connection": "s", "table": "public.items", "key": ["id"],
                   "version": "version", "columns": COLUMNS},
        "target": {"connection": "b", "topic": "t", "key": ["id"], "version": "v",
                   "columns": {c: f"j_{c}" for c in COLUMNS}},
    })
    with psycopg.connect(source, row_factory=dict_row) as conn:
        side = table_side(label="source", dsn=source, table="public.items", key=["id"],
                          version="version", columns=COLUMNS, conn=conn)
    return shape_of(name, rec, side)


def _messages(count: int) -> list[RawMessage]:
    rng = random.Random(11)
    out = []
    for i in range(count):
        at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            seconds=rng.randint(0, 10**8), microseconds=rng.randint(0, 999999))
        zone = dt.timezone(dt.timedelta(minutes=rng.choice([-420, 0, 60, 330])))
        amount = decimal.Decimal(rng.randint(-10**6, 10**6)) / 100
        doc: dict[str, Any] = {
            "id": rng.choice([i, str(i)]),
            "v": rng.choice([1, "2", None]),
            "j_status": rng.choice(["paid", "", "é|x", None, 42, True]),
            "j_amount": rng.choice([str(amount), float(amount), f"{amount:e}"]),
            "j_price": rng.choice([0.1 + 0.2, 1e20, -0.0, 3, "2.5"]),
            "j_flag": rng.choice([True, False, "t", "false", None]),
            "j_at": rng.choice([at.astimezone(zone).isoformat(), at.isoformat().replace(
                "+00:00", "Z"), at.astimezone(zone).isoformat(sep=" "), "Infinity"]),
            "j_naive": rng.choice([at.replace(tzinfo=None).isoformat(), "infinity"]),
            "j_day": rng.choice([at.date().isoformat(), at.date().isoformat(), "-infinity"]),
            "j_doc": rng.choice([{"b": 1, "a": [1, "x"]}, None, [], {"long key": {"z": None}}]),
            "j_ref": rng.choice([str(uuid.UUID(int=i)).upper(), str(uuid.UUID(int=i))]),
            "j_code": rng.choice(["ab", "ab  ", None]),
        }
        if rng.random() < 0.1:
            del doc["j_status"]
        value = json.dumps(doc, default=str)
        if isinstance(doc["j_amount"], str) and "e" in doc["j_amount"]:
            value = value.replace(f'"{doc["j_amount"]}"', doc["j_amount"])  # a bare exponent
        out.append(RawMessage(i % 3, i, str(i), value.encode()))
    # tombstones and a key that is sent twice (the later one wins)
    out.append(RawMessage(0, count, "3", None))
    out.append(RawMessage(1, count + 1, "4", json.dumps({"id": 4, "v": 9}).encode()))
    # a field written twice: the last one counts, in Postgres as in Python
    out.append(RawMessage(2, count + 2, "5",
                          b'{"id": 5, "v": 1, "j_status": "first", "j_status": "last"}'))
    return out


def _odd_tombstones(count: int) -> list[RawMessage]:
    """Tombstones after ``_messages(count)``: those whose key cannot be read are unreadable,
    never ignored; a key of one column given as a JSON array holds exactly one value."""
    return [RawMessage(1, count + 3, None, None), RawMessage(0, count + 5, "[8]", None),
            RawMessage(1, count + 6, "[null]", None)]


#: Fields Postgres reads in its own way, as written (its reading is what a source would hold):
#: a number, object or boolean read as text is its JSON as written, bool words may be cut
#: short, a time may name its zone or be "epoch", a date may carry a time.
_WRITTEN_AS_IS = [
    '"j_status": 1e3', '"j_status": -0', '"j_status": {"b":1,  "a":2}', '"j_status": 2.50E+2',
    '"j_status": [1.0, true]', '"j_code": 1e0', '"j_flag": "ye"', '"j_flag": "of"',
    '"j_flag": " ON "', '"j_at": "2026-01-01 00:00:00 UTC"', '"j_at": "epoch"',
    '"j_at": "2026-11-01 01:30:00 America/New_York"', '"j_at": "2026-01-01T24:00:00Z"',
    '"j_naive": "2026-01-01 00:00:00 Europe/Paris"', '"j_day": "2026-01-01T00:00:00Z"',
    '"j_day": "2026-03-04 00:00:00"', '"j_day": "2026-01-01 23:30:00-05"', '"j_day": "epoch"',
    '"j_price": 1e20', '"j_price": 1.0000000000000002e20', '"j_price": 9007199254740993',
    '"j_price": "0x10"', '"j_price": 1e-5', '"j_amount": " 1.5 "', '"j_amount": "Infinity"',
]


def _written_as_is(first: int) -> list[RawMessage]:
    return [RawMessage(i % 3, first + i, str(first + i),
                       f'{{"id": {first + i}, "v": 1, {field}}}'.encode())
            for i, field in enumerate(_WRITTEN_AS_IS)]


def _mirror(conn: psycopg.Connection[Any], shape: MirrorShape) -> list[tuple[Any, ...]]:
    return conn.execute(sql.SQL("SELECT id, version, fingerprint, row_hash FROM {} ORDER BY id"
                                ).format(shape.table)).fetchall()


def test_postgres_and_python_parsing_build_identical_mirrors(
        new_db: Callable[[], str], state_db: str) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    messages = _messages(600) + _odd_tombstones(600) + _written_as_is(700)
    mirrors = []
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        for name, in_postgres in (("fast", True), ("slow", False)):
            shape = _shape(source, name)
            _ensure_tables(conn, shape)
            merger = Merger(shape, conn, parse_in_postgres=in_postgres)
            for start in range(0, len(messages), 250):
                merger.merge(messages[start:start + 250])
            assert merger.fallbacks == 0
            conn.row_factory = psycopg.rows.tuple_row  # type: ignore[assignment]
            unreadable = conn.execute(sql.SQL(
                "SELECT kafka_partition, kafka_offset, message_key, reason FROM {} "
                "ORDER BY 2").format(shape.unreadable_table)).fetchall()
            mirrors.append((_mirror(conn, shape), unreadable))
            conn.row_factory = dict_row  # type: ignore[assignment]
    (fast, fast_unreadable), (slow, slow_unreadable) = mirrors
    assert len(fast) == 598 + len(_WRITTEN_AS_IS)  # 600 keys, 3 and 8 tombstoned
    assert fast == slow
    assert fast_unreadable == slow_unreadable == [
        (1, 603, None, "tombstone without a readable key"),
        (1, 606, "[null]", "tombstone without a readable key")]


def test_a_batch_postgres_refuses_is_parsed_in_python_and_its_bad_messages_recorded(
        new_db: Callable[[], str], state_db: str) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    good = _messages(20)
    bad = [RawMessage(0, 100, "x", b"{not json"), RawMessage(0, 101, "y", b"[1, 2]"),
           RawMessage(0, 102, "z", json.dumps({"id": "seven"}).encode()),
           RawMessage(0, 103, "w", json.dumps({"id": 5.5}).encode()),
           # a tombstone of two values for a one-column key: not the first of them
           RawMessage(0, 104, "[6, 7]", None)]
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        shape = _shape(source, "mixed")
        _ensure_tables(conn, shape)
        merger = Merger(shape, conn)
        merger.merge(good + bad)
        assert merger.fallbacks == 1
        reasons = conn.execute(sql.SQL("SELECT kafka_offset, reason FROM {} ORDER BY 1").format(
            shape.unreadable_table)).fetchall()
        count = conn.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(shape.table)
                             ).fetchone()
    assert [(r["kafka_offset"], r["reason"]) for r in reasons] == [
        (100, "not JSON"), (101, "not a JSON object"), (102, "key field of the wrong type"),
        (103, "key field of the wrong type"), (104, "tombstone without a readable key")]
    assert count is not None and count["n"] == 19  # 3 tombstoned; 6 is still there


def test_rows_staged_in_postgres_store_the_native_hash_the_source_computes(
        new_db: Callable[[], str], state_db: str) -> None:
    """A checksum pass compares the source's native row hashes with the mirror's stored ones:
    equal rows must hash alike however their messages wrote the values, and a row staged in
    Python (no native hash) must never pass for equal."""
    source = new_db()
    messages = _messages(600)
    latest: dict[str, bytes | None] = {}
    for m in messages:
        assert m.key is not None
        latest[m.key] = m.value
    documents = [json.loads(v) for v in latest.values() if v is not None]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
        # each field cast straight to its column: another reading than the mirror's
        conn.execute(
            "INSERT INTO public.items SELECT (d->>'id')::bigint, (d->>'v')::bigint, "
            "d->>'j_status', (d->>'j_amount')::numeric, (d->>'j_price')::float8, "
            "(d->>'j_flag')::boolean, (d->>'j_at')::timestamptz, (d->>'j_naive')::timestamp, "
            "(d->>'j_day')::date, d->'j_doc', (d->>'j_ref')::uuid, d->>'j_code' "
            "FROM jsonb_array_elements(%s::jsonb) AS d", (json.dumps(documents),))
    with psycopg.connect(source, row_factory=dict_row) as conn:
        # the server's zone must not matter to either side
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        side = table_side(label="source", dsn=source, table="public.items", key=["id"],
                          version="version", columns=COLUMNS, conn=conn)
        assert side.native_hash is not None
        expected = {r["id"]: (r["fp"], r["native"]) for r in conn.execute(sql.SQL(
            "SELECT id, {} AS fp, {} AS native FROM public.items").format(
                side.fingerprint, side.native_hash))}
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        stored = {}
        for name, in_postgres in (("fast", True), ("slow", False)):
            shape = _shape(source, name)
            _ensure_tables(conn, shape)
            merger = Merger(shape, conn, parse_in_postgres=in_postgres)
            merger.merge(messages)
            mirror = mirror_side(dsn=state_db, relation=shape.table, key=["id"],
                                 key_types=shape.key_types, version_type=shape.version_type)
            assert mirror.native_hash is not None
            stored[name] = {r["id"]: (r["fp"], r["native"]) for r in conn.execute(sql.SQL(
                "SELECT id, fingerprint AS fp, {} AS native FROM {}").format(
                    mirror.native_hash, shape.table))}
    assert len(expected) == 599
    assert stored["fast"] == expected
    assert {k: fp for k, (fp, _) in stored["slow"].items()} == {
        k: fp for k, (fp, _) in expected.items()}
    assert not any(native == expected[k][1] for k, (_, native) in stored["slow"].items())


def test_a_tombstone_of_two_values_for_a_one_column_key_deletes_nothing(
        new_db: Callable[[], str], state_db: str) -> None:
    """'[6, 7]' is no key of one column: not the first of its values either (Postgres would
    take 6 and delete it; the batch is read in Python, which calls it unreadable)."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        shape = _shape(source, "pair")
        _ensure_tables(conn, shape)
        merger = Merger(shape, conn)
        merger.merge([*_messages(20), RawMessage(0, 100, "[6, 7]", None)])
        reasons = conn.execute(sql.SQL("SELECT kafka_offset, reason FROM {}").format(
            shape.unreadable_table)).fetchall()
        six = conn.execute(sql.SQL("SELECT count(*) AS n FROM {} WHERE id = 6").format(
            shape.table)).fetchone()
    assert [(r["kafka_offset"], r["reason"]) for r in reasons] == [
        (100, "tombstone without a readable key")]
    assert six is not None and six["n"] == 1


def test_a_tombstone_of_a_padded_char_key_deletes_it_in_either_path(
        new_db: Callable[[], str], state_db: str) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.codes (code char(4) PRIMARY KEY, version bigint, "
                     "note text)")
    rec = ReconciliationConfig.model_validate({
        "source": {"connection": "s", "table": "public.codes", "key": ["code"],
                   "version": "version", "columns": ["note"]},
        "target": {"connection": "b", "topic": "t", "key": ["code"], "version": "v",
                   "columns": ["note"]}})
    with psycopg.connect(source, row_factory=dict_row) as conn:
        side = table_side(label="source", dsn=source, table="public.codes", key=["code"],
                          version="version", columns=["note"], conn=conn)
    messages = [RawMessage(0, 0, "ab", json.dumps({"code": "ab", "v": 1, "note": "x"}).encode()),
                RawMessage(0, 1, "cd", json.dumps({"code": "cd", "v": 1, "note": "y"}).encode()),
                RawMessage(0, 2, "ab  ", None)]  # the key as char(4) prints it
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        for name, in_postgres in (("codes_fast", True), ("codes_slow", False)):
            shape = shape_of(name, rec, side)
            _ensure_tables(conn, shape)
            merger = Merger(shape, conn, parse_in_postgres=in_postgres)
            merger.merge(messages)
            assert merger.fallbacks == 0
            left = conn.execute(sql.SQL("SELECT code FROM {} ORDER BY 1").format(
                shape.table)).fetchall()
            assert [r["code"] for r in left] == ["cd"], name


def test_one_message_postgres_refuses_does_not_change_how_the_others_read(
        new_db: Callable[[], str], state_db: str) -> None:
    """A batch with one message Postgres refuses is read in Python: every other message must
    read as it would in a batch Postgres accepts (the diff's result cannot depend on which
    messages happened to share a batch)."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    good = _written_as_is(0)
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        _, alone, fallbacks = _merged(conn, source, "alone", good)
        assert fallbacks == 0
        _, with_oops, fallbacks = _merged(conn, source, "with_oops",
                                          [*good, RawMessage(0, 99, "99", b"oops")])
        assert fallbacks == 1
    assert len(alone) == len(_WRITTEN_AS_IS)
    assert alone == with_oops


def _merged(conn: psycopg.Connection[Any], source: str, name: str, batch: list[RawMessage]
            ) -> tuple[MirrorShape, list[tuple[Any, ...]], int]:
    """Mirror ``name`` (of ``_shape``) of ``batch`` merged as one batch: its shape, its rows
    (``_mirror``) and how many batches had messages read in Python."""
    shape = _shape(source, name)
    _ensure_tables(conn, shape)
    merger = Merger(shape, conn)
    merger.merge(batch)
    conn.row_factory = psycopg.rows.tuple_row  # type: ignore[assignment]
    try:
        return shape, _mirror(conn, shape), merger.fallbacks
    finally:
        conn.row_factory = dict_row  # type: ignore[assignment]


def test_fields_named_like_the_raw_message_columns_are_read_as_fields(
        new_db: Callable[[], str], state_db: str) -> None:
    """A field named ``value`` (or ``message_key``, ``kafka_offset``...) made the parse
    statement's references to the raw message's own columns ambiguous: every run failed."""
    source = new_db()
    columns = ["value", "message_key", "kafka_partition", "kafka_offset"]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.points (id bigint PRIMARY KEY, version bigint, "
                     "value numeric, message_key text, kafka_partition int, kafka_offset bigint)")
    rec = ReconciliationConfig.model_validate({
        "source": {"connection": "s", "table": "public.points", "key": ["id"],
                   "version": "version", "columns": columns},
        "target": {"connection": "b", "topic": "t", "key": ["id"], "version": "version",
                   "columns": columns}})
    with psycopg.connect(source, row_factory=dict_row) as conn:
        side = table_side(label="source", dsn=source, table="public.points", key=["id"],
                          version="version", columns=columns, conn=conn)
    messages = [RawMessage(0, i, str(i), json.dumps(
        {"id": i, "version": 1, "value": i + 0.5, "message_key": f"k{i}",
         "kafka_partition": 7, "kafka_offset": 10**12 + i}).encode()) for i in range(5)]
    mirrors = []
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        for name, in_postgres in (("fast", True), ("slow", False)):
            shape = shape_of(f"points_{name}", rec, side)
            _ensure_tables(conn, shape)
            merger = Merger(shape, conn, parse_in_postgres=in_postgres)
            merger.merge(messages)
            assert merger.fallbacks == 0
            conn.row_factory = psycopg.rows.tuple_row  # type: ignore[assignment]
            mirrors.append(_mirror(conn, shape))
            conn.row_factory = dict_row  # type: ignore[assignment]
    assert len(mirrors[0]) == 5 and mirrors[0] == mirrors[1]


#: Forms only Postgres's own input reads (Python's reading refuses them): a message holding one
#: must read the same whatever shares its batch.
_POSTGRES_ONLY = ['"j_at": "20260101T100000Z"', '"j_at": "Jan 1 2026 10:00:00 UTC"',
                  '"j_at": "2026-1-5 10:00:00Z"', '"j_day": "2026/01/05"',
                  '"j_day": "2026-1-1"', '"j_naive": "January 8, 2026 04:05:06"']


def test_only_the_messages_postgres_refuses_are_read_in_python(
        new_db: Callable[[], str], state_db: str) -> None:
    """A batch with one refused message was read in Python whole: a form only Postgres reads
    then rendered as a mismatch (or, in a key or version, an unreadable message), so a row's
    reading depended on the messages beside it."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    readable = _messages(50) + [
        RawMessage(i % 3, 1000 + i, str(1000 + i), f'{{"id": {1000 + i}, "v": 1, {f}}}'.encode())
        for i, f in enumerate(_POSTGRES_ONLY)]
    refused = [RawMessage(0, 2000, "2000", b"oops"),
               RawMessage(1, 2001, "2001", b'{"id": 2001, "v": 1, "j_day": "2024-02-30"}'),
               RawMessage(2, 2002, "2002", b'{"id": 2002, "v": "x"}'),
               RawMessage(0, 2003, "2003", b'{"id": 2003, "v": 1, "j_status": "\\u0000"}')]
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        _, alone, fallbacks = _merged(conn, source, "alone", readable)
        assert fallbacks == 0
        shape, mixed, fallbacks = _merged(conn, source, "mixed",
                                          [*refused[:2], *readable, *refused[2:]])
        assert fallbacks == 1
        unreadable = [(r["kafka_offset"], r["reason"]) for r in conn.execute(sql.SQL(
            "SELECT kafka_offset, reason FROM {} ORDER BY 1").format(shape.unreadable_table))]
    assert len(alone) == 50 - 1 + len(_POSTGRES_ONLY)  # key 3 is tombstoned
    # 2001 is read (a value its type refuses renders as a mismatch); the others are not
    assert [row for row in mixed if row[0] < 2000] == alone
    assert [row[0] for row in mixed if row[0] >= 2000] == [2001]
    assert [(offset, reason.partition(":")[0]) for offset, reason in unreadable] == [
        (2000, "not JSON"), (2002, "version field 'v' of the wrong type"),
        (2003, "not storable in Postgres")]


def test_an_unreadable_message_supersedes_its_key_s_row_alike_in_either_path(
        new_db: Callable[[], str], state_db: str) -> None:
    """An unreadable message is its key's latest: the key's earlier row (in its partition) goes,
    whichever path read it, and a message key that names no key (of another type, another
    length, past its column's range) supersedes nothing and sends no batch to Python."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.pairs (region text, id bigint, version bigint, "
                     "note text, PRIMARY KEY (region, id))")
    rec = ReconciliationConfig.model_validate({
        "source": {"connection": "s", "table": "public.pairs", "key": ["region", "id"],
                   "version": "version", "columns": ["note"]},
        "target": {"connection": "b", "topic": "t", "key": ["region", "id"], "version": "v",
                   "columns": ["note"]}})
    with psycopg.connect(source, row_factory=dict_row) as conn:
        side = table_side(label="source", dsn=source, table="public.pairs",
                          key=["region", "id"], version="version", columns=["note"], conn=conn)

    def row(partition: int, offset: int, region: str, id_: int) -> RawMessage:
        return RawMessage(partition, offset, json.dumps([region, id_]), json.dumps(
            {"region": region, "id": id_, "v": 1, "note": "x"}).encode())

    rows = [row(0, i, "eu", i) for i in range(1, 9)] + [row(1, 0, "us", 1)]
    unreadable = [
        RawMessage(0, 20, '["eu", 1]', b"{broken"),                   # not JSON
        RawMessage(0, 21, '["eu", 2]', b'{"note": "no key"}'),        # no key field
        RawMessage(0, 22, '["eu", 3]', b'{"region": "eu", "id": "three", "v": 1}'),
        RawMessage(0, 23, '["eu", 4]', b'{"region": "eu", "id": 4, "v": 1, "note": "a\\u0000"}'),
        RawMessage(0, 24, '["eu", 5, 99]', b'{"note": "no key"}'),    # three values for two
        RawMessage(0, 25, '["eu", "six"]', b'{"note": "no key"}'),    # not a bigint
        RawMessage(0, 26, '["eu", 99999999999999999999]', b'{"note": "no key"}'),
        RawMessage(0, 27, "eu", b'{"note": "no key"}'),               # not JSON either
        RawMessage(0, 28, '["us", 1]', b"{broken"),                   # row 1 of "us" is in 1
        RawMessage(0, 29, '["eu", 7]', b"{broken"),
        row(0, 30, "eu", 7),                                         # and 7 comes back
    ]
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        for name, in_postgres in (("pairs_fast", True), ("pairs_slow", False)):
            shape = shape_of(name, rec, side)
            _ensure_tables(conn, shape)
            merger = Merger(shape, conn, parse_in_postgres=in_postgres)
            merger.merge(rows)
            keyless = [m for m in unreadable if m.value and m.value.startswith(b'{"note"')]
            merger.merge([m for m in unreadable if m not in keyless])
            merger.merge(keyless)
            left = conn.execute(sql.SQL("SELECT region, id FROM {} ORDER BY 1, 2").format(
                shape.table)).fetchall()
            assert [(r["region"], r["id"]) for r in left] == [
                ("eu", 5), ("eu", 6), ("eu", 7), ("eu", 8), ("us", 1)], name
            kept = conn.execute(sql.SQL("SELECT kafka_offset FROM {} ORDER BY 1").format(
                shape.unreadable_table)).fetchall()
            assert [r["kafka_offset"] for r in kept] == [*range(20, 29)], name
            if in_postgres:  # only the batch Postgres cannot read: not the key-less one
                assert merger.fallbacks == 1


#: Dates and times only Postgres's input reads, beside those above: an hour of one digit,
#: month names, a POSIX zone, a date written as a JSON number.
_POSTGRES_ONLY_MORE = ['"j_at": "2026-01-01 8:00:00+00"', '"j_at": "Jan 1 2026"',
                       '"j_at": "2026-01-01 08:00:00 UTC+3"', '"j_naive": "2026-01-01 8:00"',
                       '"j_day": 20260105', '"j_day": "Jan 1 2026"']


def test_a_date_or_time_only_postgres_reads_reads_alike_when_python_reads_its_message(
        new_db: Callable[[], str], state_db: str) -> None:
    """A message Postgres refuses (here for its key, written 2.0 for a bigint) is read in
    Python, whose ``fromisoformat`` refused ``2026-1-5`` and the like: the same field was
    equal in one message and a mismatch in the next. Python now asks Postgres for them."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
    fields = _POSTGRES_ONLY + _POSTGRES_ONLY_MORE

    def batch(key: str) -> list[RawMessage]:
        return [RawMessage(i % 3, i, str(i), f'{{"id": {i}{key}, "v": 1, {f}}}'.encode())
                for i, f in enumerate(fields)]

    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        _, in_postgres, fallbacks = _merged(conn, source, "times_pg", batch(""))
        assert fallbacks == 0
        _, in_python, fallbacks = _merged(conn, source, "times_py", batch(".0"))
        assert fallbacks == 1
        shape = _shape(source, "times_slow")
        _ensure_tables(conn, shape)
        Merger(shape, conn, parse_in_postgres=False).merge(batch(""))
        conn.row_factory = psycopg.rows.tuple_row  # type: ignore[assignment]
        slow = _mirror(conn, shape)
    assert len(in_postgres) == len(fields)
    assert in_python == in_postgres
    assert slow == in_postgres


def _keyed_mirrors(source: str, state_db: str, ddl: str, key_type: str,
                   messages: list[RawMessage]) -> dict[str, tuple[list[Any], list[Any]]]:
    """Each path's mirror of ``messages`` (keys left, unreadable messages) for a table keyed
    by one column ``k`` of ``key_type``."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(f"CREATE TABLE public.keyed (k {key_type} PRIMARY KEY, note text)")
    rec = ReconciliationConfig.model_validate({
        "source": {"connection": "s", "table": "public.keyed", "key": ["k"],
                   "columns": ["note"]},
        "target": {"connection": "b", "topic": "t", "key": ["k"], "columns": ["note"]}})
    with psycopg.connect(source, row_factory=dict_row) as conn:
        side = table_side(label="source", dsn=source, table="public.keyed", key=["k"],
                          version=None, columns=["note"], conn=conn)
    found = {}
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        for name, in_postgres in (("fix3_fast", True), ("fix3_slow", False)):
            shape = shape_of(name, rec, side)
            _ensure_tables(conn, shape)
            Merger(shape, conn, parse_in_postgres=in_postgres).merge(messages)
            left = [r["k"] for r in conn.execute(sql.SQL("SELECT k::text AS k FROM {} ORDER BY 1")
                                                 .format(shape.table))]
            kept = [(r["kafka_offset"], r["message_key"], r["reason"]) for r in conn.execute(
                sql.SQL("SELECT kafka_offset, message_key, reason FROM {} ORDER BY 1").format(
                    shape.unreadable_table))]
            found[name] = (left, kept)
    return found


@pytest.mark.parametrize("key_type", ["text", "varchar(10)", "char(5)", "citext", "mood"])
def test_a_text_key_s_message_key_is_its_value_as_it_is_never_an_unwrapped_array(
        key_type: str, new_db: Callable[[], str], state_db: str) -> None:
    """The contract: the message key is the key's value as text. A one-column text key read
    a one-element JSON array as the value it held: the tombstone ``["a"]`` deleted key
    ``a`` (and kept ``["a"]``), an unreadable message keyed ``[1]`` superseded key ``1``."""
    labels = ["a", '["a"]', "1", "[1]", "b"]
    ddl = ("CREATE EXTENSION IF NOT EXISTS citext; CREATE TYPE mood AS ENUM ("
           + ", ".join(f"'{label}'" for label in labels) + ")")

    def row(key: str) -> bytes:
        return json.dumps({"k": key, "note": "x"}).encode()

    messages = [RawMessage(0, 0, '["a"]', row('["a"]')), RawMessage(0, 1, "a", row("a")),
                RawMessage(0, 2, "[1]", row("[1]")), RawMessage(0, 3, "1", row("1")),
                RawMessage(0, 4, "b", row("b")),
                RawMessage(0, 5, '["a"]', None),           # deletes ["a"], not a
                RawMessage(0, 6, "[1]", b"garbage"),       # supersedes [1], not 1
                RawMessage(0, 7, '["b"]', None)]           # no such key: deletes nothing
    found = _keyed_mirrors(new_db(), state_db, ddl, key_type, messages)
    expected = (["1", "a", "b"], [(6, "[1]", "not JSON")])  # char's padding trimmed
    assert found == {"fix3_fast": expected, "fix3_slow": expected}


def test_a_uuid_key_may_still_be_given_as_a_one_element_array(
        new_db: Callable[[], str], state_db: str) -> None:
    """No uuid starts with ``[``: its one-element array form stays accepted, alike in both
    paths."""
    ids = [str(uuid.UUID(int=i)) for i in range(3)]
    messages = [*(RawMessage(0, i, k, json.dumps({"k": k, "note": "x"}).encode())
                  for i, k in enumerate(ids)),
                RawMessage(0, 3, json.dumps([ids[0]]), None),
                RawMessage(0, 4, ids[1].upper(), None),
                RawMessage(0, 5, json.dumps([ids[2], ids[2]]), None)]
    found = _keyed_mirrors(new_db(), state_db, "SELECT 1", "uuid", messages)
    expected = ([ids[2]], [(5, json.dumps([ids[2], ids[2]]), "tombstone without a readable key")])
    assert found == {"fix3_fast": expected, "fix3_slow": expected}


def test_a_json_key_s_message_key_is_its_json_text_alike_in_both_paths(
        new_db: Callable[[], str], state_db: str) -> None:
    """A JSON key's value may be an array: ``[1]`` names the array, not 1. Python read a
    message key that is no one-element array as a JSON string (``{"a": 1}`` as the string),
    Postgres as the JSON it is."""
    def row(key: Any) -> bytes:
        return json.dumps({"k": key, "note": "x"}).encode()

    messages = [RawMessage(0, 0, "[1]", row([1])), RawMessage(0, 1, "1", row(1)),
                RawMessage(0, 2, '{"a": 1}', row({"a": 1})), RawMessage(0, 3, '"s"', row("s")),
                RawMessage(0, 4, "[1]", None),             # deletes [1], not 1
                RawMessage(0, 5, '{"a":1}', None),         # the object, however written
                RawMessage(0, 6, "null", None),            # no key
                RawMessage(0, 7, "not json", None)]        # no key
    found = _keyed_mirrors(new_db(), state_db, "SELECT 1", "jsonb", messages)
    expected = (['"s"', "1"], [(6, "null", "tombstone without a readable key"),
                               (7, "not json", "tombstone without a readable key")])
    assert found == {"fix3_fast": expected, "fix3_slow": expected}
