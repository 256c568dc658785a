"""``trueup diff`` between a Postgres table and a Kafka topic, through the mirror."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partialmethod
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg.rows import dict_row

from tests.conftest import ProgressLog, terminate_diff, unused_port
from trueup import mirror, staging
from trueup.config import Config, load_config
from trueup.diff import DiffFailed, diff
from trueup.errors import TrueupError
from trueup.runs import differences_of

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

#: The source table of the tests that need one shape only (a bigint key).
ORDERS_DDL = ("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, status text, "
              "amount numeric, placed_at timestamptz, updated_at timestamptz)")

SHAPES: dict[str, dict[str, Any]] = {
    "bigint": {"ddl": "id bigint PRIMARY KEY", "key": ["id"],
               "keys": [(1,), (2,), (3,), (4,), (5,), (6,), (10**15,)], "orphan": (4242,)},
    "text": {"ddl": "id text PRIMARY KEY", "key": ["id"],
             "keys": [("a",), ("b",), ("c",), ("d",), ("e",), ("é",), ("z z",)],
             "orphan": ("nope",)},
    "uuid": {"ddl": "id uuid PRIMARY KEY", "key": ["id"],
             "keys": [(f"00000000-0000-0000-0000-00000000000{i}",) for i in range(1, 8)],
             "orphan": ("ffffffff-ffff-ffff-ffff-ffffffffffff",)},
    "composite": {"ddl": "region text, id bigint, PRIMARY KEY (region, id)",
                  "key": ["region", "id"],
                  "keys": [("eu", 1), ("eu", 2), ("us", 1), ("us", 2), ("ap", 1), ("ap", 2),
                           ("eu", 10**12)], "orphan": ("zz", 9)},
}


@pytest.fixture
def topic(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("orders")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = NewTopic(name, num_partitions=3, replication_factor=1,
                   config={"cleanup.policy": "compact"})
    for future in admin.create_topics([new]).values():
        future.result()
    yield name
    for future in admin.delete_topics([name]).values():
        future.result()


def _produce(bootstrap: str, topic: str, messages: list[tuple[str | None, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True})
    failures: list[Any] = []
    for key, value in messages:
        payload = value if isinstance(value, bytes | None) else json.dumps(value)
        producer.produce(topic, key=key, value=payload,
                         on_delivery=lambda err, msg: failures.append(err) if err else None)
    assert producer.flush(30) == 0 and not failures, failures


def _message_key(key: tuple[Any, ...]) -> str:
    return str(key[0]) if len(key) == 1 else json.dumps(list(key))


#: When the orders of the one-shape tests were placed and last updated.
OLD = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _orders(source: str, rows: int, *, version: int = 1, state: str = "new") -> None:
    """Table public.orders of ``source`` holding orders 1 to ``rows`` (amount = id)."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
        conn.execute("INSERT INTO public.orders SELECT g, %s, %s, g, %s, %s "
                     "FROM generate_series(1, %s) g", (version, state, OLD, OLD, rows))


def _event(i: int, state: str = "new", **fields: Any) -> dict[str, Any]:
    """The message of order ``i`` as the topic carries it, version 1 unless ``fields`` say."""
    return {"id": i, "v": 1, "state": state, "total": i, "at": OLD.isoformat(), **fields}


def _config(tmp_path: Path, state: str, source: str, bootstrap: str, topic: str,
            key: list[str], target_version: str | None = "v", **extra: Any) -> Config:
    raw = {
        "state": state,
        "connections": {"shop": {"postgres": source},
                        "bus": {"kafka": {"bootstrap.servers": bootstrap}}},
        "reconciliations": {"events": {
            "source": {"connection": "shop", "table": "public.orders", "key": key,
                       "version": "version", "updated_at": "updated_at",
                       "columns": ["status", "amount", "placed_at"]},
            "target": {"connection": "bus", "topic": topic, "format": "json", "key": key,
                       **({"version": target_version} if target_version else {}),
                       "columns": {"status": "state", "amount": "total", "placed_at": "at"}},
            **extra,
        }},
    }
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_every_class_is_found_against_a_topic_on_every_key_shape(
        shape_name: str, new_db: Callable[[], str], state_db: str, kafka_bootstrap: str,
        topic: str, tmp_path: Path) -> None:
    shape = SHAPES[shape_name]
    source = new_db()
    at = dt.datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=dt.UTC)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.orders ({shape['ddl']}, version bigint NOT NULL, "
                     "status text, amount numeric(12,2), placed_at timestamptz, "
                     "updated_at timestamptz NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO public.orders ({', '.join(shape['key'])}, version, status, "
                "amount, placed_at, updated_at) VALUES "
                f"({', '.join(['%s'] * len(shape['key']))}, %s, %s, %s, %s, %s)",
                [(*k, 3, None if i == 6 else "paid", 10.5 + i, at, OLD)
                 for i, k in enumerate(shape["keys"])])

    def message(i: int, key: tuple[Any, ...], **changes: Any) -> tuple[str, dict[str, Any]]:
        body = dict(zip(shape["key"], key, strict=True))
        body |= {"v": 3, "state": None if i == 6 else "paid",
                 # amounts as number, as string and with another scale all mean 10.5 + i
                 "total": [10.5 + i, f"{10.5 + i:.2f}", str(10.5 + i)][i % 3],
                 # the same instant, written in another time zone
                 "at": at.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
                 .isoformat()}
        return _message_key(key), body | changes

    keys = shape["keys"]
    messages: list[tuple[str | None, Any]] = [
        message(1, keys[1], v=2),                        # stale
        message(2, keys[2], v=4),                        # ahead
        message(3, keys[3], total="11.00"),              # mismatch (source 13.5)
        message(3, keys[3], total=13.5, state="void"),   # mismatch, the later message wins
        message(4, keys[4]),
        message(5, keys[5]),
        message(6, keys[6]),                             # NULL status on both sides: equal
        message(0, shape["orphan"]),                     # orphan
        message(0, keys[0]),
        (_message_key(keys[0]), None),                   # tombstone: keys[0] is missing
        ("garbage", b"\x00not json"),                    # unreadable
        ("no-key", {"state": "paid"}),                   # unreadable: no key field
    ]
    _produce(kafka_bootstrap, topic, messages)
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, shape["key"])

    summary = diff(config, "events")

    with psycopg.connect(state_db) as conn:
        conn.row_factory = psycopg.rows.dict_row
        found = {(tuple(d.key), d.cls.value) for d in differences_of(conn, summary.run_id)}
    expected = {(keys[0], "missing"), (keys[1], "stale"), (keys[2], "ahead"),
                (keys[3], "mismatch"), (shape["orphan"], "orphan"),
                (("garbage",), "unreadable"), (("no-key",), "unreadable")}
    assert found == expected
    assert (summary.source_rows, summary.target_rows) == (7, 7)  # 6 keys and the orphan


def test_messages_postgres_cannot_store_are_unreadable_and_never_stop_the_mirror(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 3)
    deep = b'{"id": 3, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    messages: list[tuple[str | None, Any]] = [
        ("1", _event(1)),
        ("2", _event(2, state="a\u0000b")),              # a NUL Postgres text cannot hold
        (str(2**70), _event(3, id=2**70)),                # a key past bigint
        ("3", deep),                                      # JSON nested past any parser
        ("nul\u0000key", None),                           # a tombstone keyed with a NUL
    ]
    _produce(kafka_bootstrap, topic, messages)
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])

    first = diff(config, "events")
    assert (first.unreadable, first.missing, first.target_rows) == (4, 2, 1)
    _produce(kafka_bootstrap, topic, [("2", _event(2)), ("3", _event(3))])
    second = diff(config, "events")  # the mirror moved past them: the fixes are read
    assert (second.unreadable, second.missing, second.target_rows) == (2, 0, 3)


def test_the_next_run_reads_only_new_messages_and_a_fix_clears_the_difference(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 300)
    _produce(kafka_bootstrap, topic, [
        (str(i), _event(i, "new" if i != 7 else "old")) for i in range(1, 301)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    first = diff(config, "events")
    assert (first.mismatch, first.target_rows) == (1, 300)

    _produce(kafka_bootstrap, topic, [
        ("7", _event(7)),
        ("300", None)])
    second = diff(config, "events")
    assert (second.mismatch, second.missing, second.target_rows) == (0, 1, 299)
    with psycopg.connect(state_db) as conn:
        offsets = conn.execute("SELECT sum(next_offset) FROM trueup.mirror_offsets "
                               "WHERE reconciliation = 'events'").fetchone()
    assert offsets is not None and offsets[0] == 302  # every message read exactly once

    progress = ProgressLog()
    third = diff(config, "events", progress=progress)
    assert (third.missing, third.target_rows) == (1, 299)
    assert progress.segments_read == {1}  # only the missing key's segment


def test_a_sync_that_fails_says_why_and_leaves_the_mirror_unlocked(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's release ran in the failed transaction: its error ("current transaction is
    aborted") took the place of the real one, which nobody saw."""
    source = new_db()
    _orders(source, 10)
    _produce(kafka_bootstrap, topic, [(str(i), _event(i)) for i in range(1, 11)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])

    def failing(self: mirror.MirrorReader) -> int:  # a statement of the sync fails
        self.conn.execute("SELECT 1 / 0")
        return 0

    monkeypatch.setattr(mirror.MirrorReader, "run", failing)
    with pytest.raises(DiffFailed, match="division by zero"):
        diff(config, "events")
    with psycopg.connect(state_db, autocommit=True) as conn:
        # this state database's: tests running beside this one hold locks in theirs
        locks = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    assert locks == (0,)
    monkeypatch.undo()
    assert diff(config, "events").consistent  # the next run reads on


def test_a_topic_written_in_transactions_is_mirrored_to_its_end_without_aborted_ones(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        unique: Callable[[str], str], tmp_path: Path) -> None:
    # Every transaction leaves a commit or abort marker, an offset no consumer sees; an aborted
    # transaction's messages are never delivered.
    source = new_db()
    _orders(source, 60)
    producer = Producer({"bootstrap.servers": kafka_bootstrap,
                         "transactional.id": unique("orders-tx")})
    producer.init_transactions(30)
    for first, last, commit in ((1, 30, True), (1, 60, False), (31, 60, True)):
        producer.begin_transaction()
        for i in range(first, last + 1):
            producer.produce(topic, key=str(i),
                             value=json.dumps(_event(i, "new" if commit else "aborted")))
        if commit:
            producer.commit_transaction(30)
        else:
            # abort purges what is still in flight; with Kafka 4's transactions (partitions
            # added by the produce itself) an abort racing its own produce requests was refused
            # once (INVALID_TXN_STATE): let them land first
            producer.flush(30)
            producer.abort_transaction(30)
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    result = diff(config, "events")  # a sync waiting past a marker fails after STALL_SECONDS
    assert result.consistent and result.target_rows == 60


def test_an_unreadable_message_is_superseded_by_a_later_one_of_the_same_key(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 1, state="a")
    _produce(kafka_bootstrap, topic, [("1", b"{broken")])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    first = diff(config, "events")
    assert (first.unreadable, first.missing) == (1, 1)
    _produce(kafka_bootstrap, topic, [
        ("1", _event(1, "a", total="1.0"))])
    assert diff(config, "events").consistent


@pytest.mark.parametrize("parse_in_postgres", [True, False])
def test_an_unreadable_message_supersedes_an_earlier_one_of_the_same_key(
        parse_in_postgres: bool, new_db: Callable[[], str], state_db: str,
        kafka_bootstrap: str, topic: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The latest message of a key is the target's state: when it cannot be read, the key's
    earlier row is no longer what the topic says. It was kept, and the key compared equal
    (or stale...) to the source while its readers met the unreadable message."""
    if not parse_in_postgres:
        monkeypatch.setattr(mirror.MirrorReader, "__init__", partialmethod(
            mirror.MirrorReader.__init__, parse_in_postgres=False))
    source = new_db()
    _orders(source, 6, state="a")
    _produce(kafka_bootstrap, topic, [(str(i), _event(i, "a")) for i in range(1, 7)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    assert diff(config, "events").consistent

    _produce(kafka_bootstrap, topic, [
        ("1", b"{broken"),                        # not JSON, in a later batch than its row
        ("2", {"state": "a"}),                    # no key field: the message key says which
        ("3", ["not", "an", "object"]),
        ("4", _event(4, "a", id="four")),         # a key field of the wrong type
        ("5", {"state": "a"}), ("5", _event(5, "a")),  # superseded in turn: 5 is equal
        ("x", {"state": "a"}),                    # a message key that is no key: no row
    ])
    summary = diff(config, "events")
    with psycopg.connect(state_db) as conn:
        conn.row_factory = dict_row
        found = {(json.dumps(d.key), d.cls.value)
                 for d in differences_of(conn, summary.run_id)}
    assert found == {('["1"]', "unreadable"), ('["2"]', "unreadable"), ('["3"]', "unreadable"),
                     ('["4"]', "unreadable"), ('["x"]', "unreadable"), ("[1]", "missing"),
                     ("[2]", "missing"), ("[3]", "missing"), ("[4]", "missing")}

    # one batch: a row, then an unreadable message of its key, then the row again
    _produce(kafka_bootstrap, topic, [("1", _event(1, "a")), ("6", {"state": "a"}),
                                      ("2", _event(2, "a")), ("3", _event(3, "a")),
                                      ("4", _event(4, "a")), ("6", _event(6, "a"))])
    last = diff(config, "events")  # message "x" names no key: nothing supersedes it
    assert (last.missing, last.mismatch, last.unreadable, last.target_rows) == (0, 0, 1, 6)


def test_a_topic_deleted_and_created_again_rebuilds_the_mirror(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 3, state="a")

    def event(i: int) -> tuple[str, dict[str, Any]]:
        return str(i), _event(i, "a")

    _produce(kafka_bootstrap, topic, [event(i) for i in range(1, 6)])  # 4 and 5 are orphans
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    assert diff(config, "events").orphan == 2

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_topics([topic]).values():
        future.result()
    for _ in range(100):  # the broker finishes deleting in the background
        try:
            for future in admin.create_topics([NewTopic(topic, 3, 1)]).values():
                future.result()
            break
        except Exception:  # TOPIC_ALREADY_EXISTS until the deletion completes
            time.sleep(0.2)
    # the new topic outgrows the old offsets, so only its id tells it apart
    _produce(kafka_bootstrap, topic, [event(1 + i % 3) for i in range(30)])
    summary = diff(config, "events")
    assert (summary.orphan, summary.target_rows) == (0, 3)
    assert summary.consistent


def test_a_renamed_source_key_column_rebuilds_the_mirror(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    """The mirror's key columns are named as the source's: after a rename (same type, same
    field) the old mirror was kept and every run failed on the column it lacked."""
    source = new_db()
    _orders(source, 3, state="a")
    _produce(kafka_bootstrap, topic, [(str(i), _event(i, "a")) for i in range(1, 4)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    assert diff(config, "events").consistent
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders RENAME COLUMN id TO order_id")
    raw = yaml.safe_load(Path(config.path).read_text())
    raw["reconciliations"]["events"]["source"]["key"] = ["order_id"]
    Path(config.path).write_text(yaml.safe_dump(raw))
    renamed = load_config(Path(config.path))
    summary = diff(renamed, "events")
    assert summary.consistent and summary.target_rows == 3


def test_messages_retention_removed_before_they_were_read_are_logged_as_lost(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str,
        unique: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The next read began at the low watermark without a word: messages removed before the
    mirror read them were skipped silently."""
    topic = unique("plain")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result()
    source = new_db()
    _orders(source, 3, state="a")
    _produce(kafka_bootstrap, topic, [(str(i), _event(i, "a")) for i in range(1, 4)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    assert diff(config, "events").consistent
    _produce(kafka_bootstrap, topic, [(str(i), _event(i, "a")) for i in range(1, 3)])
    for future in admin.delete_records([TopicPartition(topic, 0, 5)]).values():
        future.result()
    logging.getLogger("trueup").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="trueup"):
            assert diff(config, "events").consistent
            # one record (seen twice when the trueup logger also propagates to caplog's root
            # handler)
            (lost,) = {r for r in caplog.records if r.getMessage() == "mirror.messages_lost"}
            assert lost.fields == {"reconciliation": "events", "topic": topic, "partition": 0,
                                   "from_offset": 3, "to_offset": 5, "messages": 2}
            # a mirror built anew (here: another reconciliation of the topic) starts at the
            # low watermark too, and says so
            caplog.clear()
            _produce(kafka_bootstrap, topic, [("1", _event(1, "a"))])
            with psycopg.connect(source, autocommit=True) as conn:
                conn.execute("CREATE TABLE public.orders_copy AS TABLE public.orders")
                conn.execute("ALTER TABLE public.orders_copy ADD PRIMARY KEY (id)")
            raw = yaml.safe_load(Path(config.path).read_text())
            raw["reconciliations"]["copy"] = raw["reconciliations"]["events"]
            raw["reconciliations"]["copy"]["source"]["table"] = "public.orders_copy"
            Path(config.path).write_text(yaml.safe_dump(raw))
            rebuilt = diff(load_config(Path(config.path)), "copy")
    finally:
        logging.getLogger("trueup").removeHandler(caplog.handler)
        for future in admin.delete_topics([topic]).values():
            future.result()
    assert (rebuilt.missing, rebuilt.target_rows) == (2, 1)  # 2 and 3 were only before 5
    (lost,) = {r for r in caplog.records if r.getMessage() == "mirror.messages_lost"}
    assert lost.fields == {"reconciliation": "copy", "topic": topic, "partition": 0,
                           "from_offset": 0, "to_offset": 5, "messages": 5}


def test_messages_lost_are_logged_once_and_the_mirror_goes_on_from_the_low_watermark(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str,
        unique: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored offset only moved when a message was staged: a partition whose removed
    messages were its last ones logged ``mirror.messages_lost`` again on every run. The new
    offset is stored with the run's first mirror change (or alone, when there is none), so a
    run that fails before it commits one reports the loss again, and only it."""
    topic = unique("fix3_lost")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result()
    source = new_db()
    _orders(source, 4, state="a")

    def produce(partition: int, ids: list[int]) -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
        for i in ids:
            producer.produce(topic, key=str(i), value=json.dumps(_event(i, "a")),
                             partition=partition)
        assert producer.flush(30) == 0

    def delete_before(partition: int, offset: int) -> None:
        for future in admin.delete_records([TopicPartition(topic, partition, offset)]).values():
            future.result()

    def stored() -> dict[int, tuple[int, Any]]:
        with psycopg.connect(state_db) as conn:
            return {p: (o, at) for p, o, at in conn.execute(
                "SELECT partition, next_offset, updated_at FROM trueup.mirror_offsets "
                "WHERE reconciliation = 'events'")}

    def lost() -> list[dict[str, Any]]:
        found = sorted({r for r in caplog.records if r.getMessage() == "mirror.messages_lost"},
                       key=lambda r: r.created)
        caplog.clear()
        return [{k: r.fields[k] for k in ("partition", "from_offset", "to_offset")}
                for r in found]

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("fix3: the run fails")

    produce(0, [1, 2, 3])  # offsets 0-2
    produce(1, [4])        # offset 0
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    logging.getLogger("trueup").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="trueup"):
            assert diff(config, "events").consistent
            assert lost() == []
            # partition 0: its last messages removed unread; partition 1: one new message
            produce(0, [1, 2])  # offsets 3-4
            delete_before(0, 5)
            produce(1, [4])     # offset 1
            with monkeypatch.context() as patch:  # the batch fails: nothing is recorded
                patch.setattr(staging.Merger, "_finish", boom)
                with pytest.raises((RuntimeError, TrueupError), match="fix3"):
                    diff(config, "events")
            assert {p: o for p, (o, _) in stored().items()} == {0: 3, 1: 1}
            assert lost() == [{"partition": 0, "from_offset": 3, "to_offset": 5}]
            assert diff(config, "events").consistent  # stored with partition 1's batch
            assert lost() == [{"partition": 0, "from_offset": 3, "to_offset": 5}]
            assert {p: o for p, (o, _) in stored().items()} == {0: 5, 1: 2}
            assert diff(config, "events").consistent
            assert lost() == []

            # nothing to read past the gap: the new offset is the run's only change
            produce(0, [3])  # offset 5
            delete_before(0, 6)
            with monkeypatch.context() as patch:
                patch.setattr(mirror, "store_offsets", boom)
                with pytest.raises((RuntimeError, TrueupError), match="fix3"):
                    diff(config, "events")
            assert lost() == [{"partition": 0, "from_offset": 5, "to_offset": 6}]
            assert diff(config, "events").consistent
            assert lost() == [{"partition": 0, "from_offset": 5, "to_offset": 6}]
            before = stored()
            assert {p: o for p, (o, _) in before.items()} == {0: 6, 1: 2}
            # nothing new and nothing lost: nothing is written
            assert diff(config, "events").consistent
            assert lost() == []
            assert stored() == before
    finally:
        logging.getLogger("trueup").removeHandler(caplog.handler)
        for future in admin.delete_topics([topic]).values():
            future.result()


def test_a_topic_that_cannot_be_read_fails_the_run_with_its_reason(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
        # the source's checksum pass runs during the mirror's sync, which fails first
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'a', g, now(), now() "
                     "FROM generate_series(1, 100000) g")
    config = _config(tmp_path, state_db, source, kafka_bootstrap, f"{topic}-gone", ["id"])
    with pytest.raises(TrueupError, match="-gone"):
        diff(config, "events")
    with psycopg.connect(state_db) as conn:
        run = conn.execute("SELECT status, error FROM trueup.runs ORDER BY run_id DESC LIMIT 1"
                           ).fetchone()
    assert run is not None and run[0] == "failed" and f"{topic}-gone" in run[1]
    _produce(kafka_bootstrap, topic, [])
    assert diff(_config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"]),
                "events").missing == 100000  # and the next run works


def test_sigterm_while_kafka_does_not_answer_stops_the_run_at_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The metadata request waited its 10 s in librdkafka's C code, where Python runs no
    signal handler: a supervisor's SIGTERM took effect only when the wait ended."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
    config = _config(tmp_path, state_db, source, f"127.0.0.1:{unused_port()}", "orders", ["id"])
    # 1 s into the metadata request, which no broker answers
    status, err, took = terminate_diff(config.path, "events", state_db, settle=1.0)
    assert status == 143, err
    # a slice of the wait (0.5 s) and the run's bookkeeping, not what is left of 10 s
    assert took < 5, f"{took:.1f} s after SIGTERM"
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT status, error FROM trueup.runs").fetchone() == (
            "failed", "interrupted (Terminated)")


def test_a_partition_run_reads_new_messages_then_compares_that_day_only(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    day1 = dt.datetime(2026, 2, 1, 12, tzinfo=dt.UTC)
    day2 = day1 + dt.timedelta(days=1)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'new', g, %s, "
                     "CASE WHEN g <= 50 THEN %s ELSE %s END FROM generate_series(1, 100) g",
                     (day1, day1, day2))

    def event(i: int, state: str = "new") -> tuple[str, dict[str, Any]]:
        return str(i), _event(i, state, at=day1.isoformat())

    # 7 (day 1) and 70 (day 2) differ; 99 (day 2) was never published; 500 is an orphan
    _produce(kafka_bootstrap, topic, [event(i, "old" if i in (7, 70) else "new")
                                      for i in [*range(1, 99), 100, 500]])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"],
                     partitions={"daily": {"start": "2026-01-01"}})
    first = diff(config, "events", partition="2026-02-01")
    assert (first.mismatch, first.missing, first.orphan, first.source_rows) == (1, 0, 0, 50)
    _produce(kafka_bootstrap, topic, [event(70)])  # fixed since: the next run reads it
    second = diff(config, "events", partition="2026-02-02")
    assert (second.mismatch, second.missing, second.orphan, second.source_rows) == (0, 1, 0, 50)


def test_a_partition_run_of_an_enum_key_looks_it_up_in_the_mirror(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    # The mirror lives in the state database, which has none of the source's enum types.
    source = new_db()
    day = dt.datetime(2026, 2, 1, 12, tzinfo=dt.UTC)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TYPE plan AS ENUM ('free', 'team', 'corp')")
        conn.execute(ORDERS_DDL.replace("id bigint PRIMARY KEY", "id plan PRIMARY KEY"))
        conn.execute("INSERT INTO public.orders VALUES ('free', 1, 'new', 1, %s, %s), "
                     "('team', 1, 'new', 2, %s, %s)", (day, day, day, day))
    _produce(kafka_bootstrap, topic, [
        ("free", _event(1, at=day.isoformat()) | {"id": "free"}),
        ("team", _event(2, "old", at=day.isoformat()) | {"id": "team"})])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"],
                     partitions={"daily": {"start": "2026-01-01"}})
    summary = diff(config, "events", partition="2026-02-01")
    assert (summary.mismatch, summary.missing, summary.source_rows) == (1, 0, 2)


def test_a_topic_without_versions_agrees_segment_by_segment_with_a_versioned_source(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 1000, version=3)
    unversioned = [{k: v for k, v in _event(i, "new" if i != 700 else "old").items()
                    if k != "v"} for i in range(1, 1001)]
    _produce(kafka_bootstrap, topic, [(str(e["id"]), e) for e in unversioned])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"],
                     target_version=None)
    progress = ProgressLog()
    summary = diff(config, "events", progress=progress)
    assert (summary.mismatch, summary.stale, summary.missing) == (1, 0, 0)
    assert progress.segments_read == {1}  # only key 700's segment


def test_an_empty_source_still_cuts_a_full_topic_into_segments(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 0)
    _produce(kafka_bootstrap, topic, [(str(i), _event(i, "a")) for i in range(1, 5001)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    progress = ProgressLog()
    summary = diff(config, "events", progress=progress)
    assert (summary.orphan, summary.target_rows) == (5000, 5000)
    # cut by the mirror's keys once the source's plan proved far too coarse (one segment)
    assert progress.plans[0] == 1 and progress.plans[-1] >= 5000 // 64 // 2


def test_a_topic_of_another_format_reports_every_message_unreadable(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    # e.g. an Avro topic configured as JSON: more unreadable messages than one read holds
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
    _produce(kafka_bootstrap, topic, [(str(i), b"\x00\x00\x00\x00\x01avro" + bytes([i % 256]))
                                      for i in range(12000)])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    summary = diff(config, "events")
    assert (summary.unreadable, summary.target_rows, summary.missing) == (12000, 0, 0)
    with psycopg.connect(state_db) as conn:
        conn.row_factory = psycopg.rows.dict_row
        found = differences_of(conn, summary.run_id)
    assert len(found) == 12000 and {d.cls.value for d in found} == {"unreadable"}
    assert len({((d.detail or {})["partition"], (d.detail or {})["offset"])
                for d in found}) == 12000


def _named(tmp_path: Path, state: str, source: str, bootstrap: str, topic: str,
           names: list[str]) -> Config:
    """``_config``'s reconciliation once under each of ``names``."""
    config = _config(tmp_path, state, source, bootstrap, topic, ["id"])
    raw = yaml.safe_load(Path(config.path).read_text())
    one = raw["reconciliations"].pop("events")
    raw["reconciliations"] = {name: one for name in names}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "trueup.yaml")


def test_reconciliations_of_any_valid_name_keep_their_mirrors_apart(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    """A 63-character name, and a name that ends as another's unreadable table used to: each
    mirror and each table of unreadable messages is its own."""
    source = new_db()
    _orders(source, 2)
    _produce(kafka_bootstrap, topic, [("1", _event(1)), ("2", b"{broken")])
    longest = "r" * 63
    names = [longest, "events", "events__unreadable"]
    config = _named(tmp_path, state_db, source, kafka_bootstrap, topic, names)
    for _ in range(2):
        for name in names:
            run = diff(config, name)
            assert (run.unreadable, run.missing, run.target_rows) == (1, 1, 1), (name, run)


#: A row of unreadable messages that no topic holds: it survives a move, not a rebuild.
MARKER = ("INSERT INTO {} (kafka_partition, kafka_offset, message_key, reason) "
          "VALUES (0, 999999, 'marker', 'not a JSON object')")


def _keep_as_before_migration_6(conn: psycopg.Connection[Any]) -> None:
    """Put the unreadable messages of ``events`` back where trueup kept them before
    migration 0006, with a marker row no topic holds."""
    conn.execute("ALTER TABLE trueup_mirror_unreadable.events RENAME TO events__unreadable")
    conn.execute("ALTER INDEX trueup_mirror_unreadable.events_pkey "
                 "RENAME TO events__unreadable_pkey")
    conn.execute("ALTER TABLE trueup_mirror_unreadable.events__unreadable "
                 "SET SCHEMA trueup_mirror")
    conn.execute(MARKER.format("trueup_mirror.events__unreadable"))


def test_unreadable_messages_kept_as_before_migration_6_are_moved_not_read_again(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    source = new_db()
    _orders(source, 2)
    _produce(kafka_bootstrap, topic, [("1", _event(1)), ("2", b"{broken")])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    assert diff(config, "events").unreadable == 1
    with psycopg.connect(state_db, autocommit=True) as conn:
        _keep_as_before_migration_6(conn)
        offsets = conn.execute("SELECT sum(next_offset) FROM trueup.mirror_offsets").fetchone()
    again = diff(config, "events")
    # the marker came along: the table was moved, not rebuilt from the topic
    assert (again.unreadable, again.missing, again.target_rows) == (2, 1, 1)
    with psycopg.connect(state_db) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema LIKE 'trueup_mirror%' ORDER BY 1, 2").fetchall()
        assert conn.execute("SELECT sum(next_offset) FROM trueup.mirror_offsets"
                            ).fetchone() == offsets  # nothing read again
    assert tables == [("trueup_mirror", "events"), ("trueup_mirror_unreadable", "events")]


def test_a_new_mirror_where_another_kept_its_unreadable_messages_moves_them_first(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    """``events`` kept its unreadable messages in trueup_mirror.events__unreadable before
    migration 0006: a new reconciliation of that name diffed first must not drop them."""
    source = new_db()
    _orders(source, 2)
    _produce(kafka_bootstrap, topic, [("1", _event(1)), ("2", b"{broken")])
    config = _named(tmp_path, state_db, source, kafka_bootstrap, topic,
                    ["events", "events__unreadable"])
    assert diff(config, "events").unreadable == 1
    with psycopg.connect(state_db, autocommit=True) as conn:
        _keep_as_before_migration_6(conn)
        offsets = conn.execute("SELECT sum(next_offset) FROM trueup.mirror_offsets "
                               "WHERE reconciliation = 'events'").fetchone()
    assert diff(config, "events__unreadable").unreadable == 1
    assert diff(config, "events").unreadable == 2  # with the marker: moved, not rebuilt
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT sum(next_offset) FROM trueup.mirror_offsets "
                            "WHERE reconciliation = 'events'").fetchone() == offsets
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema LIKE 'trueup_mirror%' ORDER BY 1, 2").fetchall()
    assert tables == [("trueup_mirror", "events"), ("trueup_mirror", "events__unreadable"),
                      ("trueup_mirror_unreadable", "events"),
                      ("trueup_mirror_unreadable", "events__unreadable")]


@pytest.mark.parametrize("all_long", [False, True], ids=["one-long-name", "every-name-long"])
def test_fields_named_longer_than_a_postgres_column_are_read(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path, all_long: bool) -> None:
    """Postgres cuts names past 63 bytes: json_to_record would find no such field."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.things (id bigint PRIMARY KEY, version bigint, "
                     "status text, attrs jsonb)")
        conn.execute("INSERT INTO public.things VALUES (1, 1, 'new', '{\"a\": [1]}'), "
                     "(2, 1, 'paid', '\"plain\"'), (3, 1, 'new', NULL), (4, 1, 'new', NULL)")
    long = "é" * 40  # 80 bytes
    names = {"id": long + "_id" if all_long else "id", "version": long + "_v" if all_long
             else "v", "status": long + "_status", "attrs": long + "_attrs"}

    def message(i: int, status: str, attrs: Any) -> tuple[str, dict[str, Any]]:
        return str(i), {names["id"]: i, names["version"]: 1, names["status"]: status,
                        names["attrs"]: attrs}

    _produce(kafka_bootstrap, topic, [message(1, "new", {"a": [1]}), message(2, "paid", "plain"),
                                      message(3, "shipped", None), message(4, "new", None)])
    raw = {"state": state_db,
           "connections": {"shop": {"postgres": source},
                           "bus": {"kafka": {"bootstrap.servers": kafka_bootstrap}}},
           "reconciliations": {"things": {
               "source": {"connection": "shop", "table": "public.things", "key": ["id"],
                          "version": "version", "columns": ["status", "attrs"]},
               "target": {"connection": "bus", "topic": topic, "format": "json",
                          "key": [names["id"]], "version": names["version"],
                          "columns": {"status": names["status"], "attrs": names["attrs"]}}}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    config = load_config(tmp_path / "trueup.yaml")
    run = diff(config, "things")
    assert (run.mismatch, run.missing, run.unreadable, run.target_rows) == (1, 0, 0, 4), run
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        [found] = differences_of(conn, run.run_id)
    assert (found.key, found.cls.value) == ([3], "mismatch")


def test_values_read_the_same_whether_or_not_a_message_of_the_batch_is_unreadable(
        new_db: Callable[[], str], state_db: str, kafka_bootstrap: str, topic: str,
        tmp_path: Path) -> None:
    """Postgres reads a batch unless it refuses one of its messages (then Python reads it):
    an unreadable message must not turn the rows beside it into mismatches."""
    source = new_db()
    _orders(source, 6)
    statuses = {1: "1e3", 2: "-0", 3: '{"b":1,  "a":2}', 4: "2.50E+2", 5: "x", 6: "y"}
    with psycopg.connect(source, autocommit=True) as conn:
        for i, status in statuses.items():
            conn.execute("UPDATE public.orders SET status = %s WHERE id = %s", (status, i))
    at = '"2026-01-01T00:00:00+00:00"'
    written = {1: ('1e3', at), 2: ('-0', at), 3: ('{"b":1,  "a":2}', at),
               4: ('2.50E+2', at), 5: ('"x"', '"2026-01-01 00:00:00 UTC"'),
               6: ('"y"', '"2026-01-01 01:00:00 Europe/Paris"')}
    messages: list[tuple[str | None, Any]] = [
        (str(i), f'{{"id": {i}, "v": 1, "state": {state}, "total": {i}, "at": {when}}}'.encode())
        for i, (state, when) in written.items()]
    _produce(kafka_bootstrap, topic, [(k, v) for k, v in messages])
    config = _config(tmp_path, state_db, source, kafka_bootstrap, topic, ["id"])
    alone = diff(config, "events")
    assert (alone.mismatch, alone.unreadable, alone.target_rows) == (0, 0, 6)

    other = new_db()  # the same rows against a topic where one message is no JSON
    _orders(other, 6)
    with psycopg.connect(other, autocommit=True) as conn:
        for i, status in statuses.items():
            conn.execute("UPDATE public.orders SET status = %s WHERE id = %s", (status, i))
    _produce(kafka_bootstrap, topic, [("7", b"oops")])
    config = _config(tmp_path, state_db, other, kafka_bootstrap, topic, ["id"])
    with psycopg.connect(state_db, autocommit=True) as conn:  # read the topic again, at once
        conn.execute("DELETE FROM trueup.mirror_offsets WHERE reconciliation = 'events'")
        conn.execute("TRUNCATE trueup_mirror.events")
    together = diff(config, "events")
    assert (together.mismatch, together.unreadable, together.target_rows) == (0, 1, 6)
