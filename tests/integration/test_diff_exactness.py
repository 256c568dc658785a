"""``trueup diff`` exactness at the edges of the native hashes and of versions: values that hash
like NULL, NULL versions, and what a partition run counts."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from trueup.config import Config, load_config
from trueup.diff import diff
from trueup.runs import differences_of

pytestmark = pytest.mark.postgres

#: Source and target values of (f float8, r real, n numeric, m numeric) for ids 1..: each row
#: differs in one column only, by a value whose type's hash function returns its seed (as a
#: NULL's hash was) or the same hash as the other value.
ROWS: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = [
    ((0.0, 1, 1, 1), (None, 1, 1, 1)),
    ((-0.0, 1, 1, 1), (None, 1, 1, 1)),
    ((1.0, 0.0, 1, 1), (1.0, None, 1, 1)),
    ((1.0, 1, None, 1), (1.0, 1, "NaN", 1)),
    ((1.0, 1, "Infinity", 1), (1.0, 1, "NaN", 1)),
    ((1.0, 1, "-Infinity", 1), (1.0, 1, "Infinity", 1)),
    ((1.0, 1, 1, "Infinity"), (1.0, 1, 1, None)),
    ((1.0, 1, 1, 0), (1.0, 1, 1, None)),
]
#: Rows alike on both sides, special values included: no difference.
ALIKE: list[tuple[Any, ...]] = [
    (0.0, 0.0, "NaN", 0),
    (-0.0, -0.0, "Infinity", "-Infinity"),
    (None, None, None, None),
    (float("nan"), 1, 0, "NaN"),
]


DDL = (
    "CREATE TABLE public.t (id bigint PRIMARY KEY, version int, f float8, r real, "
    "n numeric, m numeric, updated_at timestamptz DEFAULT '2026-02-01T10:00Z')"
)


#: Each row of ROWS and ALIKE is one in SPREAD rows, among rows alike on both sides: in a
#: segment of its own, which only its own hash can make differ.
SPREAD = 1000
DIFFERING = [i * SPREAD for i in range(1, len(ROWS) + 1)]


def _rows(side: int) -> list[tuple[Any, ...]]:
    """(id, version, f, r, n, m) of the source (``side`` 0) or the target (1)."""
    special = {i * SPREAD: pair[side] for i, pair in enumerate(ROWS, 1)}
    special |= {(len(ROWS) + i) * SPREAD: row for i, row in enumerate(ALIKE, 1)}
    return [(i, 1, *special.get(i, (i, i, i, i)))
            for i in range(1, (len(ROWS) + len(ALIKE) + 1) * SPREAD)]


def _tables(source: str, target: str) -> None:
    for side, dsn in enumerate((source, target)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(DDL)
            with conn.cursor().copy("COPY public.t (id, version, f, r, n, m) FROM STDIN") as copy:
                for row in _rows(side):
                    copy.write_row(row)
            conn.execute("ANALYZE public.t")


def _config(
    tmp_path: Path,
    state: str,
    source: str,
    target: dict[str, Any],
    source_version: str | None = "version",
    **extra: Any,
) -> Config:
    raw = {
        "state": state,
        "connections": {"a": {"postgres": source}, **target.pop("connections")},
        "reconciliations": {
            "t": {
                "source": {
                    "connection": "a",
                    "table": "public.t",
                    "key": ["id"],
                    **({"version": source_version} if source_version else {}),
                    "updated_at": "updated_at",
                    "columns": ["f", "r", "n", "m"],
                },
                "target": target,
                **extra,
            }
        },
    }
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _table_target(target: str) -> dict[str, Any]:
    return {
        "connections": {"b": {"postgres": target}},
        "connection": "b",
        "table": "public.t",
        "key": ["id"],
        "version": "version",
        "columns": ["f", "r", "n", "m"],
    }


def _found(state: str, run_id: int) -> dict[int, str]:
    with psycopg.connect(state) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return {d.key[0]: d.cls.value for d in differences_of(conn, run_id)}


def test_values_hashing_like_null_or_like_each_other_are_found_between_tables(
    new_db: Callable[[], str], state_db: str, tmp_path: Path
) -> None:
    """A float's 0 and a numeric's NaN hash to the seed, as NULL did: the segment's checksum
    did not change, and the run found nothing."""
    source, target = new_db(), new_db()
    _tables(source, target)
    summary = diff(_config(tmp_path, state_db, source, _table_target(target)), "t")
    assert _found(state_db, summary.run_id) == {i: "mismatch" for i in DIFFERING}


@pytest.fixture
def topic(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("exact")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1)]).values():
        future.result()
    yield name
    for future in admin.delete_topics([name]).values():
        future.result()


def _produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _kafka_target(bootstrap: str, topic: str) -> dict[str, Any]:
    return {
        "connections": {"bus": {"kafka": {"bootstrap.servers": bootstrap}}},
        "connection": "bus",
        "topic": topic,
        "format": "json",
        "key": ["id"],
        "version": "version",
        "columns": ["f", "r", "n", "m"],
    }


def _json(value: Any) -> Any:
    """A value as JSON carries it: NaN as its text (a bare NaN is not JSON)."""
    if value is None or isinstance(value, str):
        return value
    return "NaN" if value != value else float(value)


@pytest.mark.kafka
def test_values_hashing_like_null_are_found_against_a_topic(
    new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str, topic: str
) -> None:
    source, target = new_db(), new_db()
    _tables(source, target)
    messages = []
    for i, _version, *row in _rows(1):
        fields = dict(zip("frnm", row, strict=True))
        # a missing field and a null are both NULL; NaN travels as its text
        document = {"id": i, "version": 1,
                    **{k: _json(v) for k, v in fields.items() if v is not None or i % 2}}
        messages.append((str(i), json.dumps(document).encode()))
    _produce(kafka_bootstrap, topic, messages)
    summary = diff(_config(tmp_path, state_db, source, _kafka_target(kafka_bootstrap, topic)), "t")
    assert _found(state_db, summary.run_id) == {i: "mismatch" for i in DIFFERING}


def test_a_null_version_on_one_side_is_stale_or_ahead_as_the_upsert_guard_takes_it(
    new_db: Callable[[], str], state_db: str, tmp_path: Path
) -> None:
    """Same columns; versions 1 against NULL: the target's row without one is overwritten by a
    backfill (stale), a source's row without one overwrites nothing (ahead)."""
    source, target = new_db(), new_db()
    for dsn, nulls in ((source, (2, 3)), (target, (1, 3))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(DDL)
            conn.execute(
                "INSERT INTO public.t (id, version, f, r, n, m) "
                "SELECT g, CASE WHEN g = ANY(%s) THEN NULL ELSE 1 END, g, g, g, g "
                "FROM generate_series(1, 4) g",
                (list(nulls),),
            )
    summary = diff(_config(tmp_path, state_db, source, _table_target(target)), "t")
    assert _found(state_db, summary.run_id) == {1: "stale", 2: "ahead"}


def test_a_target_without_versions_is_compared_by_its_columns_only(
    new_db: Callable[[], str], state_db: str, tmp_path: Path
) -> None:
    """No target version is no NULL version: nothing is stale for want of one."""
    source, target = new_db(), new_db()
    _tables(source, target)
    unversioned = {k: v for k, v in _table_target(target).items() if k != "version"}
    summary = diff(_config(tmp_path, state_db, source, unversioned), "t")
    assert _found(state_db, summary.run_id) == {i: "mismatch" for i in DIFFERING}


@pytest.mark.kafka
def test_every_run_whole_or_partition_lists_the_topic_s_unreadable_messages(
    new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str, topic: str
) -> None:
    """An unreadable message belongs to no day: a reconciliation run only by partitions (as
    Dagster's partitioned assets are) must still show it, so every run lists it."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute("INSERT INTO public.t VALUES (1, 1, 1, 1, 1, 1)")
    _produce(
        kafka_bootstrap,
        topic,
        [("1", b'{"id": 1, "version": 1, "f": 1, "r": 1, "n": 1, "m": 1}'), ("2", b"oops")],
    )
    config = _config(
        tmp_path,
        state_db,
        source,
        _kafka_target(kafka_bootstrap, topic),
        partitions={"daily": {"start": "2026-01-01"}},
    )

    day = diff(config, "t", partition="2026-02-01")
    assert (day.unreadable, day.source_rows, day.missing, day.mismatch) == (1, 1, 0, 0)
    assert diff(config, "t", partition="2099-01-01").unreadable == 1
    whole = diff(config, "t")
    assert (whole.unreadable, whole.consistent) == (1, False)


def test_whole_doubles_past_bigint_compare_exactly_with_numerics(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """2^70 as a double is 1180591620717411303424 exactly; its shortest text is not."""
    source, target = new_db(), new_db()
    values = {1: 2.0**70, 2: 1e20, 3: -(2.0**100), 4: 2.0**70, 5: 0.0, 6: 9.3e18}
    exact = {1: 2**70, 2: 10**20, 3: -(2**100), 4: 2**70 + 1, 5: 0, 6: 9300000000000000000}
    for dsn, column, rows in ((source, "float8", values), (target, "numeric", exact)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, "
                         f"f {column}, r real, n numeric, m numeric, updated_at timestamptz)")
            for i, value in rows.items():
                conn.execute("INSERT INTO public.t VALUES (%s, 1, %s, 1, 1, 1, '2026-01-01')",
                             (i, value))
    summary = diff(_config(tmp_path, state_db, source, _table_target(target)), "t")
    assert _found(state_db, summary.run_id) == {4: "mismatch"}


#: Key types that hold 'infinity': the first key, the n-th key after it (as differences show
#: it), and the step between keys.
INFINITE_KEYS = {
    "timestamptz": ("timestamptz '2026-01-01Z'", "interval '1 min'",
                    lambda n: (dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                               + dt.timedelta(minutes=n)).isoformat()),
    "timestamp": ("timestamp '2026-01-01'", "interval '1 min'",
                  lambda n: (dt.datetime(2026, 1, 1) + dt.timedelta(minutes=n)).isoformat()),
    "date": ("date '2026-01-01'", "1",
             lambda n: (dt.date(2026, 1, 1) + dt.timedelta(days=n)).isoformat()),
}


@pytest.mark.parametrize("key_type", INFINITE_KEYS)
def test_infinite_dates_and_timestamps_as_keys_versions_and_times_are_compared(
    key_type: str, new_db: Callable[[], str], state_db: str, tmp_path: Path
) -> None:
    """'infinity' is later than every time, '-infinity' earlier: one such version, key or
    updated_at failed the whole run ("timestamp too large"), and as a key range's bound (the
    statistics' histogram starts and ends with them) or among a batch's keys it could not be
    sent back."""
    first, step, shown = INFINITE_KEYS[key_type]
    source, target = new_db(), new_db()
    ddl = (f"CREATE TABLE public.t (at {key_type} PRIMARY KEY, version timestamptz, "
           "day date, updated_at timestamptz)")
    key = f"{first} + %s * {step}"
    for dsn in (source, target):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(ddl)
            conn.execute(f"INSERT INTO public.t SELECT {first} + g * {step}, "
                         "timestamptz '2026-01-01Z', date '2026-01-01', timestamptz "
                         "'2026-01-01Z' FROM generate_series(1, 5000) g")
            conn.execute("INSERT INTO public.t VALUES ('infinity', '2026-01-01Z', "
                         "'2026-01-01', '2026-01-01Z'), ('-infinity', '2026-01-01Z', "
                         "'2026-01-01', '2026-01-01Z')")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"UPDATE public.t SET version = 'infinity' WHERE at = {key}", (10,))
        conn.execute(f"UPDATE public.t SET day = '-infinity' WHERE at = {key}", (20,))
        conn.execute(f"UPDATE public.t SET updated_at = 'infinity' WHERE at = {key}", (40,))
        conn.execute(f"INSERT INTO public.t VALUES ({key}, 'infinity', 'infinity', "
                     "'2026-01-01Z')", (9000,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"UPDATE public.t SET version = 'infinity' WHERE at = {key}", (30,))
        conn.execute(f"UPDATE public.t SET day = 'infinity' WHERE at = {key}", (40,))
        conn.execute("UPDATE public.t SET day = 'infinity' WHERE at = 'infinity'")
        conn.execute("DELETE FROM public.t WHERE at = '-infinity'")
    for dsn in (source, target):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ANALYZE public.t")
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state_db,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"t": {
            "source": {"connection": "a", "table": "public.t", "key": ["at"],
                       "version": "version", "updated_at": "updated_at", "columns": ["day"]},
            "target": {"connection": "b", "table": "public.t", "key": ["at"],
                       "version": "version", "columns": ["day"]},
            "grace": "1h", "partitions": {"daily": {"start": "2026-01-01"}}}}}))
    config = load_config(path)
    found_in_day = {
        shown(10): ("stale", "infinity", "2026-01-01T00:00:00+00:00"),
        shown(20): ("mismatch", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
        shown(30): ("ahead", "2026-01-01T00:00:00+00:00", "infinity"),
        shown(9000): ("missing", "infinity", None),
        "infinity": ("mismatch", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
        "-infinity": ("missing", "2026-01-01T00:00:00+00:00", None),
    }
    # the whole table, and the day of every row but the one updated at 'infinity'
    for partition, expected in ((None, {
            **found_in_day,
            shown(40): ("in_flight", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")}),
            ("2026-01-01", found_in_day)):
        summary = diff(config, "t", partition=partition)
        with psycopg.connect(state_db) as conn:
            conn.row_factory = psycopg.rows.dict_row
            found = {d.key[0]: (d.cls.value, d.source_version, d.target_version)
                     for d in differences_of(conn, summary.run_id)}
        assert found == expected, (partition, found)


#: (source type, target type, {id: (source value, target value)}) of documents the json type
#: takes and jsonb's input refuses (a \u0000, a lone surrogate, a number past numeric's range),
#: on either side, each against another value.
JSON_REFUSED: dict[str, tuple[str, str, dict[int, tuple[Any, Any]]]] = {
    "jsonb against json": ("jsonb", "json", {1: ('{"a": "x"}', '{"a":"\\u0000"}')}),
    "json against json": ("json", "json", {1: ('{"a":"\\u0000"}', '{"a":"x"}'),
                                           2: ('{"a":"x"}', '["\\ud800"]'),
                                           3: ("1e1000000", "1")}),
    "text against json": ("text", "json", {1: ('{"a": "x"}', '{"a":"\\u0000"}')}),
    "json against text": ("json", "text", {1: ('{"a":"\\u0000"}', '{"a": "x"}')}),
    "integer against json": ("int4", "json", {1: (1, '"\\u0000"'), 2: (2, '["\\u0000"]')}),
    "json against integer": ("json", "int4", {1: ('"\\u0000"', 1)}),
}
def _c_config(tmp_path: Path, state: str, source: str, target: str) -> Config:
    """A reconciliation ``t`` of ``public.t``'s column ``c`` (key id, version) between two
    databases."""
    side = {"table": "public.t", "key": ["id"], "version": "version", "columns": ["c"]}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"t": {"source": {"connection": "a", **side},
                                  "target": {"connection": "b", **side}}}}))
    return load_config(path)


#: A value of each type, the same on both sides.
JSON_ALIKE = {"json": "7", "jsonb": "7", "text": "7", "int4": 7}


@pytest.mark.parametrize("case", JSON_REFUSED)
def test_a_json_document_jsonb_refuses_is_one_mismatch_not_a_failed_run(
        case: str, new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """json's input takes a \\u0000 that jsonb's refuses, and every reading of a document went
    through jsonb: one such value failed the whole run ("unsupported Unicode escape
    sequence"). It is read as a value its type refuses is, ``!`` and its text: a mismatch."""
    source_type, target_type, differing = JSON_REFUSED[case]
    source, target = new_db(), new_db()
    for side, (dsn, kind) in enumerate(((source, source_type), (target, target_type))):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, "
                         f"c {kind}, updated_at timestamptz DEFAULT '2026-02-01T10:00Z')")
            conn.execute("INSERT INTO public.t (id, version, c) SELECT g, 1, %s "
                         "FROM generate_series(1, 2000) g", (JSON_ALIKE[kind],))
            for i, pair in differing.items():
                conn.execute("UPDATE public.t SET c = %s WHERE id = %s", (pair[side], i * 500))
            conn.execute("ANALYZE public.t")
    summary = diff(_c_config(tmp_path, state_db, source, target), "t")
    assert _found(state_db, summary.run_id) == {i * 500: "mismatch" for i in differing}


#: Reals of the source, each with a neighbour that differs past its sixth digit.
REALS = {1: ("1234567", "1234568"), 2: ("1.2345678", "1.2345679"), 3: ("16777216", "16777218"),
         4: ("0.1", "0.10000001"), 5: ("-1.5e-7", "-1.5000002e-7")}


def _real_source(source: str) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id bigint PRIMARY KEY, version int, c real)")
        for i, (value, _) in REALS.items():
            conn.execute("INSERT INTO public.t VALUES (%s, 1, %s)", (i, value))


@pytest.mark.parametrize(("target_type", "neighbours"), [
    ("real", False), ("real", True), ("numeric", False), ("numeric", True)])
def test_reals_differing_past_their_sixth_digit_are_mismatches_against_any_number(
        target_type: str, neighbours: bool, new_db: Callable[[], str], state_db: str,
        tmp_path: Path) -> None:
    """A real rendered through numeric's cast, 6 digits: 1234567 and 1234568 were equal
    reals, while against a numeric the same real was compared with all its digits."""
    source, target = new_db(), new_db()
    _real_source(source)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.t (id bigint PRIMARY KEY, version int, "
                     f"c {target_type})")
        for i, pair in REALS.items():
            conn.execute("INSERT INTO public.t VALUES (%s, 1, %s)", (i, pair[neighbours]))
    summary = diff(_c_config(tmp_path, state_db, source, target), "t")
    expected = {i: "mismatch" for i in REALS} if neighbours else {}
    assert _found(state_db, summary.run_id) == expected


@pytest.mark.kafka
@pytest.mark.parametrize("neighbours", [False, True])
def test_reals_of_messages_read_in_either_path_keep_all_their_digits(
        neighbours: bool, new_db: Callable[[], str], state_db: str, tmp_path: Path,
        kafka_bootstrap: str, topic: str) -> None:
    """A message of a real column compares the same whichever path reads it: the key written
    2.0 sends it to Python (bigint's input refuses it), whose reals had 6 digits."""
    source = new_db()
    _real_source(source)
    _produce(kafka_bootstrap, topic, [
        (str(i), f'{{"id": {i}{".0" if i % 2 else ""}, "version": 1, "c": {pair[neighbours]}}}'
         .encode()) for i, pair in REALS.items()])
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state_db,
        "connections": {"a": {"postgres": source},
                        "bus": {"kafka": {"bootstrap.servers": kafka_bootstrap}}},
        "reconciliations": {"t": {
            "source": {"connection": "a", "table": "public.t", "key": ["id"],
                       "version": "version", "columns": ["c"]},
            "target": {"connection": "bus", "topic": topic, "format": "json", "key": ["id"],
                       "version": "version", "columns": ["c"]}}}}))
    summary = diff(load_config(path), "t")
    expected = {i: "mismatch" for i in REALS} if neighbours else {}
    assert _found(state_db, summary.run_id) == expected
