"""``trueup backfill`` by republishing to a Kafka topic, and ``trueup lineage`` of its keys."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg.rows import dict_row

from trueup.backfill import BackfillOptions, WorkerOptions, republish, start_backfill
from trueup.backfill.chunks import Chunk
from trueup.backfill.keyspace import repairs_text
from trueup.backfill.model import record_rows
from trueup.backfill.runner import backfill_of, load
from trueup.brokers.kafka import KafkaFailed
from trueup.cli import main
from trueup.config import Config, load_config
from trueup.diff import diff
from trueup.retry import RetryPolicy
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
def topic(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("orders")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1,
                                                config={"cleanup.policy": "compact"})]).values():
        future.result()
    yield name
    for future in admin.delete_topics([name]).values():
        future.result()


def _produce(bootstrap: str, topic: str, messages: list[tuple[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for key, value in messages:
        producer.produce(topic, key=key, value=None if value is None else json.dumps(value))
    assert producer.flush(30) == 0


def _high_watermarks(bootstrap: str, topic: str) -> int:
    return sum(_ends(bootstrap, topic).values())


def _setup(new_db: Callable[[], str], state_db: str, tmp_path: Path, bootstrap: str,
           topic: str, *, versioned: bool = True) -> Config:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, version bigint, status text, "
                     "amount numeric(12,2), placed_at timestamptz, updated_at timestamptz "
                     "DEFAULT '2026-01-01T00:00Z')")
        conn.execute("INSERT INTO orders (id, version, status, amount, placed_at) "
                     "SELECT g, 2, 'paid', g * 1.10, '2026-01-01T10:00Z'::timestamptz "
                     "+ g * interval '1 second' FROM generate_series(1, 200) g")
        rows = conn.execute("SELECT id, version, status, amount::text, "
                            "to_json(placed_at)#>>'{}' FROM orders ORDER BY id").fetchall()
    messages: list[tuple[str, Any]] = []
    for id_, version, status, amount, placed in rows:
        value = {"id": id_, "v": version, "state": status, "total": float(amount), "at": placed}
        if id_ in (3, 4):
            continue                                   # missing
        if id_ == 5:
            value["v"] = 1                             # stale
        if id_ == 6:
            value["v"], value["state"] = 3, "refunded"  # ahead
        if id_ == 7:
            value["total"] = -1                        # mismatch
        messages.append((str(id_), value))
    messages.append(("999", {"id": 999, "v": 1, "state": "ghost", "total": 0, "at": None}))
    _produce(bootstrap, topic, messages)
    raw = {"state": state_db,
           "connections": {"shop": {"postgres": source},
                           "bus": {"kafka": {"bootstrap.servers": bootstrap}}},
           "reconciliations": {"events": {
               "source": {"connection": "shop", "table": "orders", "key": ["id"],
                          "version": "version", "updated_at": "updated_at",
                          "columns": ["status", "amount", "placed_at"]},
               "target": {"connection": "bus", "topic": topic, "format": "json", "key": ["id"],
                          "version": "v",
                          "columns": {"status": "state", "amount": "total", "placed_at": "at"}},
               "repair": "republish"}}}
    if not versioned:  # the messages still carry "v"; the topic is compared without it
        del raw["reconciliations"]["events"]["target"]["version"]
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "trueup.yaml")


def test_republish_of_a_run_fixes_the_topic_and_lineage_shows_each_key_history(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    run = diff(config, "events")
    assert (run.missing, run.stale, run.ahead, run.mismatch, run.orphan) == (2, 1, 1, 1, 1), run

    dry = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                           run_id=run.run_id, dry_run=True))
    assert (dry.rows_repaired, dry.rows_skipped) == (5, 1)
    marks = _high_watermarks(kafka_bootstrap, topic)

    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id, chunk_size=2))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_planned, summary.rows_repaired, summary.rows_skipped) == (6, 5, 1)
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5
    after = diff(config, "events")
    assert (after.missing, after.stale, after.mismatch, after.orphan, after.ahead) == (
        0, 0, 0, 0, 1)

    assert main(["--config", config.path, "lineage", "events", "3", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert history["reconciliation"] == "events" and history["key"] == [3]
    assert [r["class"] for r in history["runs"]] == ["missing"]
    (repair,) = history["repairs"]
    assert set(repair) >= {"backfill_id", "chunk", "action", "at", "fingerprint_before",
                           "fingerprint_after"}
    assert repair["action"] == "publish" and repair["fingerprint_before"] is None
    assert repair["backfill_id"] == summary.backfill_id
    assert main(["--config", config.path, "lineage", "events", "999", "--json"]) == 0
    assert [r["action"] for r in json.loads(capsys.readouterr().out)["repairs"]] == [
        "tombstone"]

    # the key drifts again and a second backfill repairs it: lineage lists both, in order
    with psycopg.connect(config.connections["shop"].postgres or "", autocommit=True) as conn:
        conn.execute("UPDATE orders SET version = 3, status = 'shipped' WHERE id = 3")
    again = diff(config, "events")
    second = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                              run_id=again.run_id))
    assert second.status is BackfillStatus.SUCCEEDED and second.rows_repaired == 1
    assert main(["--config", config.path, "lineage", "events", "3", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(r["backfill_id"], r["action"]) for r in history["repairs"]] == [
        (summary.backfill_id, "publish"), (second.backfill_id, "publish")]
    assert [r["class"] for r in history["runs"]] == ["missing", "stale"]


def test_a_source_row_without_a_version_never_replaces_a_versioned_message(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    with psycopg.connect(config.connections["shop"].postgres or "", autocommit=True) as conn:
        conn.execute("UPDATE orders SET version = NULL, status = 'old' WHERE id = 8")
    run = diff(config, "events")
    assert run.ahead == 2, run  # 6, and 8: a version beats none, as the upsert's guard has it
    marks = _high_watermarks(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id))
    assert (summary.status, summary.rows_repaired, summary.rows_skipped) == (
        BackfillStatus.SUCCEEDED, 5, 2)
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5
    assert diff(config, "events").ahead == 2


def test_a_nan_version_is_ordered_as_postgres_orders_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    """A numeric NaN version failed the chunk ('[<class 'decimal.InvalidOperation'>]') when
    the mirror held the key: Python's Decimal refuses to order a NaN."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    with psycopg.connect(config.connections["shop"].postgres or "", autocommit=True) as conn:
        conn.execute("ALTER TABLE orders ALTER COLUMN version TYPE numeric")
        conn.execute("UPDATE orders SET version = 'NaN' WHERE id = 9")
    run = diff(config, "events")
    assert run.stale == 2, run  # 5, and 9: NaN is above every number
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=50))
    assert summary.status is BackfillStatus.SUCCEEDED, summary.error
    again = diff(config, "events")
    assert (again.stale, again.missing, again.mismatch) == (0, 0, 0), again


def test_a_partition_republish_reads_the_mirror_of_the_day_s_keys_only(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day's chunk spans every day's keys in its range: it read the mirror's rows of the
    whole range into memory (on a big topic, most of the mirror), for a few rows of the day."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    raw = yaml.safe_load((tmp_path / "trueup.yaml").read_text())
    raw["reconciliations"]["events"]["partitions"] = {"daily": {"start": "2026-01-01"}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    day = [5, 50, 100, 150, 199]  # spread over the key range; 5 is stale in the topic
    with psycopg.connect(config.connections["shop"].postgres or "", autocommit=True) as conn:
        conn.execute("UPDATE orders SET updated_at = '2026-01-02T08:00Z', "
                     "version = 3 + (id = 5)::int, status = 'shipped' WHERE id = ANY(%s)",
                     (day,))
    assert diff(config, "events").target_rows == 199  # the mirror holds the topic
    read: list[int] = []
    mirror = republish.RepublishWriter._mirror

    def counted(self: Any, *args: Any) -> Any:
        found = mirror(self, *args)
        read.append(len(found or {}))
        return found

    monkeypatch.setattr(republish.RepublishWriter, "_mirror", counted)
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(
        scope=BackfillScope.PARTITION, partition="2026-01-02", chunk_size=2))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 5
    assert read == [2, 2, 1], read  # each chunk's day keys, not its key range's 40 to 100
    produced = _messages_after(kafka_bootstrap, topic, starts)
    assert sorted(v["id"] for _, v in produced) == day


def test_republish_all_produces_only_what_the_mirror_lacks(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    run = diff(config, "events")  # fills the mirror
    marks = _high_watermarks(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=64, workers=2))
    # 4 chunks of the source's 200 keys, and one of the mirror's key after them (999)
    assert summary.status is BackfillStatus.SUCCEEDED and summary.chunks == 5
    assert (summary.rows_repaired, summary.rows_skipped) == (5, 1)
    with psycopg.connect(state_db) as conn:
        runs = conn.execute("SELECT DISTINCT run_id FROM trueup.repairs").fetchall()
    assert runs == [(run.run_id,)]  # a backfill of the whole table: the run that found each
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5
    assert diff(config, "events").ahead == 1
    assert diff(config, "events").missing == 0


def _app_publishes(config: Config, bootstrap: str, topic: str, change: str, id_: int) -> None:
    """The application at work: ``change`` (SQL) to order ``id_`` committed, then its current
    row published (a tombstone when it is gone), as its outbox would."""
    source = config.connections["shop"].postgres
    assert source is not None
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(change, (id_,))
        row = conn.execute("SELECT id, version, status, amount::text, "
                           "to_json(placed_at)#>>'{}' FROM orders WHERE id = %s",
                           (id_,)).fetchone()
    value = None if row is None else {"id": row[0], "v": row[1], "state": row[2],
                                      "total": float(row[3]), "at": row[4]}
    _produce(bootstrap, topic, [(str(id_), value)])


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_rows_the_application_changes_while_a_chunk_produces_end_with_their_current_message(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch, versioned: bool) -> None:
    """A chunk produced the rows it had read a while before: a row the application changed
    (or deleted) meanwhile and published itself ended its key's messages with the chunk's
    older copy, and a key the application made again after the chunk found it an orphan
    with the chunk's tombstone. The topic then disagreed with the source until the next
    backfill. Here the application writes between the chunk's read and its produce."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic, versioned=versioned)
    diff(config, "events")  # the mirror: 3 and 4 missing, 5 stale, 7 mismatch, 999 an orphan
    starts = _ends(kafka_bootstrap, topic)
    classify, orphans = republish.RepublishWriter._classify, republish.RepublishWriter._orphans

    def read_then_app_writes(self: Any, batch: Any, *args: Any) -> Any:
        produced = classify(self, batch, *args)
        if any(row[1] == "3" or row[0] == "[3]" for row in batch):
            _app_publishes(config, kafka_bootstrap, topic, "UPDATE orders SET version = 3, "
                           "status = 'shipped' WHERE id = %s", 3)
            _app_publishes(config, kafka_bootstrap, topic, "DELETE FROM orders WHERE id = %s", 5)
        return produced

    def orphans_then_app_writes(self: Any, *args: Any) -> Any:
        found = orphans(self, *args)
        if any(text == "[999]" for *_, text in found):
            _app_publishes(config, kafka_bootstrap, topic, "INSERT INTO orders (id, version, "
                           "status, amount, placed_at) VALUES (%s, 1, 'new', 9.99, "
                           "'2026-01-02T00:00Z')", 999)
        return found

    monkeypatch.setattr(republish.RepublishWriter, "_classify", read_then_app_writes)
    monkeypatch.setattr(republish.RepublishWriter, "_orphans", orphans_then_app_writes)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED

    last = dict(_messages_after(kafka_bootstrap, topic, starts))
    assert last["3"]["state"] == "shipped" and last["3"].get("v", 3) == 3
    assert last["5"] is None and last["999"]["state"] == "new"
    after = diff(config, "events")
    assert (after.missing, after.stale, after.mismatch, after.orphan) == (0, 0, 0, 0)
    with psycopg.connect(state_db) as conn:
        actions = dict(conn.execute("SELECT key, action FROM trueup.repairs "
                                    "WHERE key IN ('[3]', '[5]', '[999]')").fetchall())
    # unversioned, 5 differed only in its version: the chunk never produced it
    assert actions == {"[3]": "publish", "[999]": "publish",
                       **({"[5]": "tombstone"} if versioned else {})}


def test_a_write_of_a_transaction_open_during_the_chunk_s_read_is_caught_up_with(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk asks first whether any row of its range was written by a transaction that had
    not ended when its read began (then it compares row by row). Here the application's
    transaction wrote the row, in a savepoint, before the read, which did not see it, and
    committed after: a subtransaction's id is not in a snapshot's list of running ones."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    diff(config, "events")
    starts = _ends(kafka_bootstrap, topic)
    source = config.connections["shop"].postgres
    assert source is not None
    app = psycopg.connect(source)
    try:
        app.execute("SELECT 1")  # the transaction begins
        with app.transaction():  # a savepoint
            app.execute("UPDATE orders SET version = 3, status = 'shipped' WHERE id = 3")
        classify = republish.RepublishWriter._classify

        def read_then_app_commits(self: Any, batch: Any, *args: Any) -> Any:
            produced = classify(self, batch, *args)
            if not app.closed and any(row[1] == "3" for row in batch):
                app.commit()
                app.close()
                _app_publishes(config, kafka_bootstrap, topic, "SELECT %s", 3)
            return produced

        monkeypatch.setattr(republish.RepublishWriter, "_classify", read_then_app_commits)
        summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    finally:
        app.close()
    assert summary.status is BackfillStatus.SUCCEEDED
    last = dict(_messages_after(kafka_bootstrap, topic, starts))
    assert (last["3"]["v"], last["3"]["state"]) == (3, "shipped")
    assert diff(config, "events").stale == 0


#: A postgres_fdw server reaching this very database.
_HERE = [
    "CREATE EXTENSION postgres_fdw",
    "DO $$ BEGIN EXECUTE format('CREATE SERVER here FOREIGN DATA WRAPPER postgres_fdw "
    "OPTIONS (host %L, port %L, dbname %L)', '127.0.0.1', "
    "current_setting('port'), current_database()); END $$",
    "CREATE USER MAPPING FOR CURRENT_USER SERVER here"]
_SOURCES_WITHOUT_XMIN = {
    "view": ["CREATE VIEW orders_elsewhere AS SELECT * FROM orders"],
    # postgres_fdw gives every row an xmin of 0, which age() takes for infinitely old: the
    # count by xmin found nothing newer, and the chunk never compared its rows
    "foreign table": [
        *_HERE,
        "CREATE FOREIGN TABLE orders_elsewhere (id bigint, version bigint, status text, "
        "amount numeric(12,2), placed_at timestamptz, updated_at timestamptz) SERVER here "
        "OPTIONS (table_name 'orders')"],
    # a partitioned table has xmin, its foreign partition's rows 0
    "foreign partition": [
        *_HERE,
        "CREATE TABLE orders_elsewhere (id bigint, version bigint, status text, "
        "amount numeric(12,2), placed_at timestamptz, updated_at timestamptz) "
        "PARTITION BY RANGE (id)",
        "CREATE FOREIGN TABLE orders_remote PARTITION OF orders_elsewhere "
        "FOR VALUES FROM (MINVALUE) TO (MAXVALUE) SERVER here OPTIONS (table_name 'orders')"],
}


@pytest.mark.parametrize("kind", list(_SOURCES_WITHOUT_XMIN))
def test_a_source_whose_rows_have_no_xmin_of_their_own_is_caught_up_with_row_by_row(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    source = config.connections["shop"].postgres
    assert source is not None
    with psycopg.connect(source, autocommit=True) as conn:
        for statement in _SOURCES_WITHOUT_XMIN[kind]:
            conn.execute(statement)
    path = Path(config.path)
    path.write_text(path.read_text().replace("table: orders", "table: orders_elsewhere"))
    assert "orders_elsewhere" in path.read_text()
    config = load_config(path)
    diff(config, "events")
    starts = _ends(kafka_bootstrap, topic)
    classify = republish.RepublishWriter._classify

    def read_then_app_writes(self: Any, batch: Any, *args: Any) -> Any:
        produced = classify(self, batch, *args)
        if any(row[1] == "3" for row in batch):
            _app_publishes(config, kafka_bootstrap, topic, "UPDATE orders SET version = 3, "
                           "status = 'shipped' WHERE id = %s", 3)
        return produced

    monkeypatch.setattr(republish.RepublishWriter, "_classify", read_then_app_writes)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED
    last = dict(_messages_after(kafka_bootstrap, topic, starts))
    assert (last["3"]["v"], last["3"]["state"]) == (3, "shipped")


def test_republish_to_a_topic_deleted_since_the_diff_fails_and_creates_none(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, unique: Callable[[str], str], topics: Any) -> None:
    """A broker that creates topics on use made the deleted topic again on the first message,
    with its own partition count: keys landed in other partitions than their history."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    diff(config, "events")  # fills the mirror
    gone = unique("orders_gone")
    topics.track(gone)  # deleted afterwards, should it be made after all
    raw = yaml.safe_load(Path(config.path).read_text())
    raw["reconciliations"]["events"]["target"]["topic"] = gone
    Path(config.path).write_text(yaml.safe_dump(raw))
    fast = WorkerOptions(retry=RetryPolicy(max_attempts=2, initial_seconds=0.01, jitter=0))
    summary = start_backfill(load_config(config.path), "events",
                             BackfillOptions(scope=BackfillScope.ALL), fast)
    assert summary.status is BackfillStatus.FAILED
    with psycopg.connect(state_db) as conn:
        error = conn.execute("SELECT error FROM trueup.backfills").fetchone()
    assert error is not None and error[0].endswith(
        f"reconciliations.events.target: topic {gone!r} does not exist (a backfill "
        f"republishes into it and creates no topic)"), error
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert gone not in topics


def test_republish_to_a_topic_without_versions_produces_only_differing_rows(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic, versioned=False)
    diff(config, "events")  # fills the mirror
    marks = _high_watermarks(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=64))
    assert summary.status is BackfillStatus.SUCCEEDED
    # missing 3 and 4, 6 and 7 hold other values, the orphan 999 gets its tombstone; 5 is
    # only older by a version nobody compares
    assert (summary.rows_repaired, summary.rows_skipped) == (5, 0)
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5
    after = diff(config, "events")
    assert (after.missing, after.mismatch, after.orphan) == (0, 0, 0)


def test_a_chunk_commits_its_repairs_rows_only_after_every_message_is_confirmed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repairs rows are written while the messages are produced: a chunk whose messages
    are not all confirmed must leave none behind, and its retry records each key once."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    diff(config, "events")  # fills the mirror
    marks = _high_watermarks(kafka_bootstrap, topic)
    committed_at_failure: list[int] = []

    def confirm_failing_once(*args: Any, **kwargs: Any) -> None:
        if not committed_at_failure:
            with psycopg.connect(state_db) as conn:
                row = conn.execute("SELECT count(*) FROM trueup.repairs").fetchone()
            committed_at_failure.append(row[0] if row else -1)
            raise KafkaFailed("topic: 4 messages not confirmed within 0s (test)")
        original_confirm(*args, **kwargs)

    original_confirm = republish.confirm
    monkeypatch.setattr(republish, "confirm", confirm_failing_once)
    summary = start_backfill(
        config, "events", BackfillOptions(scope=BackfillScope.ALL, chunk_size=64),
        WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.01, jitter=0)))

    assert committed_at_failure == [0]  # chunk 0 (keys 1 to 64) had its rows written by then
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (5, 1)
    with psycopg.connect(state_db) as conn:
        keys = conn.execute("SELECT key::jsonb AS key, count(*) FROM trueup.repairs "
                            "GROUP BY 1").fetchall()
        attempts = conn.execute("SELECT chunk, attempts FROM trueup.chunks ORDER BY chunk"
                                ).fetchall()
    assert sorted(k[0] for k, _ in keys) == [3, 4, 5, 6, 7, 999]
    assert all(n == 1 for _, n in keys)
    assert attempts[0] == (0, 2) and all(a == 1 for _, a in attempts[1:])
    # the refused chunk's four messages went out twice: republishing is at least once
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5 + 4


def test_repairs_rows_recorded_again_for_a_chunk_correct_the_first_ones(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    """A chunk that recorded rows before (its intent, before a crash) finds them: the plain
    insert's unique violation falls back to correcting them, one row per key still."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    run = diff(config, "events")
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id))
    with psycopg.connect(state_db, row_factory=dict_row) as conn:
        backfill = backfill_of(load(conn, summary.backfill_id))
        row = conn.execute("SELECT chunk FROM trueup.repairs WHERE key = '[3]'").fetchone()
        assert row is not None
        chunk = Chunk(backfill_id=summary.backfill_id, chunk=row["chunk"], key_from=None,
                      key_to=None, keys=None, rows_planned=0, attempts=1)
        with conn.transaction():
            fresh = record_rows(conn, backfill, chunk, [
                ("[3]", "skipped", None, None), ("[12345]", "publish", None, 7)])
            assert record_rows(conn, backfill, chunk, [("[23456]", "publish", None, 8)])
            # new rows go in as COPY text made in Python: a key's backslashes are escaped
            nasty = ["a\tb\"c\\d", 1]
            assert record_rows(conn, backfill, chunk, [(json.dumps(nasty), "publish", None, 9)])
            assert conn.execute("SELECT key::jsonb AS key FROM trueup.repairs "
                                "WHERE fingerprint_after = 9").fetchall() == [{"key": nasty}]
        assert not fresh, "rows the chunk held: complete must count them"
        rows = conn.execute("SELECT key::jsonb AS key, action, fingerprint_after, run_id "
                            "FROM trueup.repairs "
                            "WHERE key IN ('[3]', '[4]', '[12345]') ORDER BY key").fetchall()
    assert [(r["key"], r["action"], r["fingerprint_after"]) for r in rows] == [
        ([3], "skipped", None), ([4], "publish", rows[1]["fingerprint_after"]),
        ([12345], "publish", 7)]
    assert rows[1]["fingerprint_after"] is not None
    assert {r["run_id"] for r in rows} == {run.run_id}


def test_chunks_read_in_many_batches_record_and_produce_the_same(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk is read a batch at a time (its repairs rows recorded while the next batch is
    read): with a first batch of 3 rows and then 7, the outcome is the one of a single batch."""
    monkeypatch.setattr(republish, "FIRST_BATCH", 3)
    monkeypatch.setattr(republish, "READ_BATCH", 7)
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    run = diff(config, "events")
    marks = _high_watermarks(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=64))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (5, 1)
    assert _high_watermarks(kafka_bootstrap, topic) == marks + 5
    with psycopg.connect(state_db) as conn:
        rows = conn.execute("SELECT key::jsonb AS key, action, run_id FROM trueup.repairs "
                            "ORDER BY key"
                            ).fetchall()
    assert [(k[0], a) for k, a, _ in rows] == [
        (3, "publish"), (4, "publish"), (5, "publish"), (6, "skipped"), (7, "publish"),
        (999, "tombstone")]
    assert {r for _, _, r in rows} == {run.run_id}
    assert diff(config, "events").missing == 0


def test_a_recorder_that_fails_mid_chunk_fails_the_chunk_and_its_retry_records_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(republish, "FIRST_BATCH", 5)
    monkeypatch.setattr(republish, "READ_BATCH", 5)
    # the query is cut off mid-stream (5-row results, where libpq can stream them)
    monkeypatch.setattr(republish, "STREAM_ROWS", 5 if republish.STREAM_ROWS > 1 else 1)
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    failed: list[int] = []

    def record_failing_once(conn: Any, backfill: Any, chunk: Any, rows: Any, **kw: Any) -> bool:
        if not failed:
            taken = [next(rows), next(rows)]  # mid-stream, with batches still coming
            failed.append(len(taken))
            raise psycopg.OperationalError("state database went away (test)")
        return original(conn, backfill, chunk, rows, **kw)

    original = republish.record_rows
    monkeypatch.setattr(republish, "record_rows", record_failing_once)
    summary = start_backfill(
        config, "events", BackfillOptions(scope=BackfillScope.ALL, chunk_size=100),
        WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.01, jitter=0)))
    assert failed == [2]
    assert summary.status is BackfillStatus.SUCCEEDED
    assert summary.rows_repaired == 200  # no mirror: every source row is produced
    with psycopg.connect(state_db) as conn:
        counts = conn.execute("SELECT count(*), count(DISTINCT key) FROM trueup.repairs"
                              ).fetchone()
        attempts = conn.execute("SELECT max(attempts) FROM trueup.chunks").fetchone()
    assert counts == (200, 200) and attempts == (2,)


@pytest.mark.parametrize("cancel_fails", [False, True], ids=["cancelled", "cancel-refused"])
def test_a_chunk_left_mid_stream_cancels_its_query_and_its_retry_reads_it_whole(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch, cancel_fails: bool) -> None:
    """A chunk of 4 MB of rows, streamed 50 at a time: the server is still sending when the
    worker fails after its second batch. The query is cancelled (or, when the cancel request
    fails, read to its end), and the retry reads the chunk whole on the same connection."""
    if cancel_fails:
        def refused(self: psycopg.Connection[Any], **kw: Any) -> None:
            raise psycopg.OperationalError("cancel refused (test)")
        monkeypatch.setattr(psycopg.Connection, "cancel_safe", refused)
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, version bigint, note text)")
        conn.execute("INSERT INTO orders SELECT g, 1, repeat(md5(g::text), 6) "
                     "FROM generate_series(1, 20000) g")
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="orders",
                        key=["id"], columns={"note": "note"})
    monkeypatch.setattr(republish, "FIRST_BATCH", 100)
    monkeypatch.setattr(republish, "READ_BATCH", 100)
    monkeypatch.setattr(republish, "STREAM_ROWS", 50 if republish.STREAM_ROWS > 1 else 1)
    calls: list[int] = []
    produce = republish.produce_all

    def failing_on_the_second_batch(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KafkaFailed("the broker went away (test)")
        produce(*args)

    monkeypatch.setattr(republish, "produce_all", failing_on_the_second_batch)
    summary = start_backfill(
        config, "events", BackfillOptions(scope=BackfillScope.ALL, chunk_size=50_000),
        WorkerOptions(retry=RetryPolicy(max_attempts=3, initial_seconds=0.01, jitter=0)))
    assert summary.status is BackfillStatus.SUCCEEDED, summary
    assert summary.rows_repaired == 20_000
    with psycopg.connect(state_db) as conn:
        row = conn.execute("SELECT count(DISTINCT key), max(c.attempts) FROM trueup.repairs "
                           "JOIN trueup.chunks AS c USING (backfill_id, chunk)").fetchone()
    assert row == (20_000, 2)


def test_a_chunk_whose_rows_meet_rows_it_held_counts_them_from_the_table(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Republish passes its own counts when every row it recorded was new; rows meeting rows
    the chunk held already (left by an attempt before: none do today) make it count them."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    repair = republish.RepublishWriter.repair

    def with_rows_left_before(self: Any, chunk: Any, ctx: Any) -> Any:
        with psycopg.connect(state_db, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO trueup.repairs (reconciliation, key, backfill_id, chunk, action) "
                "VALUES ('events', '[1]', %(b)s, %(c)s, 'publish'), "
                "('events', '[-5]', %(b)s, %(c)s, 'publish') ON CONFLICT DO NOTHING",
                {"b": chunk.backfill_id, "c": chunk.chunk})
        return repair(self, chunk, ctx)

    monkeypatch.setattr(republish.RepublishWriter, "repair", with_rows_left_before)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=1000))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.chunks == 1
    assert summary.rows_repaired == 201  # the 200 source rows, and [-5] counted from the table


def _config_of(tmp_path: Path, state_db: str, source: str, bootstrap: str, topic: str, *,
               table: str, key: list[str], columns: dict[str, str]) -> Config:
    """Reconciliation ``events`` of ``table`` to ``topic`` by republish (its target field
    names: the key's and version's own, ``columns`` for the rest)."""
    raw = {"state": state_db,
           "connections": {"shop": {"postgres": source},
                           "bus": {"kafka": {"bootstrap.servers": bootstrap}}},
           "reconciliations": {"events": {
               "source": {"connection": "shop", "table": table, "key": key,
                          "version": "version", "columns": list(columns)},
               "target": {"connection": "bus", "topic": topic, "format": "json", "key": key,
                          "version": "version", "columns": columns},
               "repair": "republish"}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "trueup.yaml")


def _ends(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "trueup-test-peek"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(3)}
    finally:
        consumer.close()


def _messages_after(bootstrap: str, topic: str, starts: dict[int, int]
                    ) -> list[tuple[str, Any]]:
    """(key, value) of each partition's messages from its offset in ``starts`` on."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "trueup-test-read",
                         "enable.auto.commit": False})
    found: list[tuple[str, Any]] = []
    try:
        ends = _ends(bootstrap, topic)
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in range(3)])
        wanted = sum(ends[p] - starts[p] for p in range(3))
        while len(found) < wanted:
            message = consumer.poll(10)
            assert message is not None, f"read {len(found)} of {wanted} messages"
            assert message.error() is None, message.error()
            value = message.value()
            found.append((message.key().decode(), value and json.loads(value)))
    finally:
        consumer.close()
    return found


@pytest.mark.parametrize(("key_ddl", "key", "rows", "message_key"), [
    ("region int, id bigint", ["region", "id"], "(g % 3) - 1, g", "[{}, {}]"),
    ("code text", ["code"], "'o-' || g || E'\\t\"\\\\'", "{}"),  # a tab, a quote, a backslash
    ("region text, id int", ["region", "id"], "'r\"' || (g % 2), g", "[{}, {}]"),
], ids=["integers", "text", "text-and-integer"])
def test_republish_keys_of_every_shape_as_the_contract_says(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, key_ddl: str, key: list[str], rows: str, message_key: str) -> None:
    """Message keys (a single key's text, else a JSON array) and repairs keys of composite and
    text keys, produced into a topic holding every row but three."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE things ({key_ddl}, version bigint, status text, "
                     f"PRIMARY KEY ({', '.join(key)}))")
        conn.execute(f"INSERT INTO things SELECT {rows}, 1, 'new' FROM generate_series(1, 40) g")
        keys = [list(r) for r in conn.execute(
            f"SELECT {', '.join(key)} FROM things ORDER BY {', '.join(key)}")]

    def kafka_key(k: list[Any]) -> str:
        return message_key.format(*(json.dumps(v) for v in k)) if len(k) > 1 else str(k[0])
    present = keys[3:]
    _produce(kafka_bootstrap, topic, [
        (kafka_key(k), {**dict(zip(key, k, strict=True)), "version": 1, "status": "new"})
        for k in present])
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="things",
                        key=key, columns={"status": "status"})
    assert diff(config, "events").missing == 3
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=16))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 3
    produced = _messages_after(kafka_bootstrap, topic, starts)
    assert sorted(k for k, _ in produced) == sorted(kafka_key(k) for k in keys[:3])
    for k, value in produced:
        assert value == {**dict(zip(key, json.loads(k) if len(key) > 1 else [k],
                                    strict=True)), "version": 1, "status": "new"}
    with psycopg.connect(state_db) as conn:
        recorded = [r[0] for r in conn.execute(
            "SELECT key::jsonb FROM trueup.repairs WHERE action = 'publish'")]
    assert sorted(recorded, key=json.dumps) == sorted(keys[:3], key=json.dumps)
    assert diff(config, "events").consistent


#: Each row of a table ``things`` as its message, as Postgres writes it (1.10 stays 1.10),
#: keyed by the key's text.
_MESSAGE = ("SELECT at::text, json_build_object('at', at, 'version', 1, "
            "'status', 'new')::text FROM {} ORDER BY 1")


def _things(dsn: str, key_ddl: str, rows: str, count: int) -> list[tuple[str, str]]:
    """Table ``things`` keyed by ``key_ddl`` (the column ``at``), holding ``count`` rows of
    key ``rows`` (of ``g``), version 1, status new; each row's message."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE things ({key_ddl} PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute(f"INSERT INTO things SELECT {rows}, 1, 'new' "
                     "FROM generate_series(1, %s) g", (count,))
        return [(k, v) for k, v in conn.execute(_MESSAGE.format("things")).fetchall()]


@pytest.mark.parametrize(("key_ddl", "rows"), [
    ("at timestamptz", "timestamptz '2026-01-01 02:00+00' + g * interval '1 hour 30 seconds'"),
    ("at numeric(6,2)", "g + 0.10"),
    ("at char(6)", "'c' || g"),
], ids=["timestamptz", "numeric", "char"])
def test_republish_keys_a_single_key_by_its_value_as_postgres_writes_it(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, key_ddl: str, rows: str) -> None:
    """The key value as text is Postgres's text of it (2026-01-01 02:00:00+00, 1.10, c1), as
    a single integer key's always was: JSON's (2026-01-01T02:00:00+00:00, 1.1, "c1    ")
    put repairs and tombstones under other keys, in other partitions than the key's history."""
    source = new_db()
    messages = _things(source, key_ddl, rows, 40)
    with psycopg.connect(source, autocommit=True) as conn:
        (orphan,) = conn.execute(_MESSAGE.format(
            f"(SELECT ({rows.replace('g', '100')})::{key_ddl.split(' ', 1)[1]} AS at) AS o"
        )).fetchall()
    missing = {r[0] for r in messages[:3]}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for key, value in [*(m for m in messages if m[0] not in missing), orphan]:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="things",
                        key=["at"], columns={"status": "status"})
    found = diff(config, "events")
    assert (found.missing, found.orphan) == (3, 1)
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=16))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 4
    produced = _messages_after(kafka_bootstrap, topic, starts)
    assert sorted(k for k, v in produced if v is not None) == sorted(missing)
    assert [k for k, v in produced if v is None] == [orphan[0]]
    assert diff(config, "events").consistent
    # repairs rows hold the key as every writer renders it: numbers trimmed (1.10 is [1.1])
    with psycopg.connect(state_db) as conn:
        recorded = [r[0] for r in conn.execute("SELECT key FROM trueup.repairs")]
    assert len(recorded) == 4
    assert recorded == [repairs_text(json.loads(k, parse_float=Decimal)) for k in recorded]

    # without a mirror (dropped), a --run backfill's tombstone is keyed from the difference
    with psycopg.connect(source) as conn:
        (again,) = conn.execute(_MESSAGE.format(
            f"(SELECT ({rows.replace('g', '200')})::{key_ddl.split(' ', 1)[1]} AS at) AS o"
        )).fetchall()
    producer.produce(topic, key=again[0], value=again[1])
    assert producer.flush(30) == 0
    run = diff(config, "events")
    assert run.orphan == 1
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("DROP TABLE trueup_mirror.events")
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert _messages_after(kafka_bootstrap, topic, starts) == [(again[0], None)]


@pytest.mark.parametrize("names", [
    {"status": "v", "amount": "trueup_fields", "placed_at": "Placed At"},
    {"status": "trueup_row", "amount": "trueup_f0", "placed_at": "trueup_key"},
    {"status": "s" * 70, "amount": "total", "placed_at": "at"},
], ids=["names-like-the-query's", "names-like-its-columns", "a-name-longer-than-postgres-names"])
def test_message_values_carry_the_target_field_names_whatever_they_are(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, names: dict[str, str]) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, version bigint, status text, "
                     "amount numeric(12,2), placed_at timestamptz)")
        conn.execute("INSERT INTO orders VALUES (1, 2, 'paid', 1.10, '2026-01-01T10:00Z')")
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="orders",
                        key=["id"], columns=names)
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 1
    [(key, value)] = _messages_after(kafka_bootstrap, topic, starts)
    assert key == "1"
    assert value == {"id": 1, "version": 2, names["status"]: "paid", names["amount"]: 1.10,
                     names["placed_at"]: "2026-01-01T10:00:00+00:00"}
    assert diff(config, "events").consistent


def test_source_columns_named_like_the_query_s_own_are_read_as_themselves(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (trueup_f1 bigint PRIMARY KEY, version bigint, "
                     "trueup_key text, trueup_fp text)")
        conn.execute("INSERT INTO orders SELECT g, 2, 'k' || g, 'f' || g "
                     "FROM generate_series(1, 30) g")
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="orders",
                        key=["trueup_f1"], columns={"trueup_key": "a", "trueup_fp": "b"})
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL,
                                                               chunk_size=7))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 30
    produced = _messages_after(kafka_bootstrap, topic, starts)
    assert sorted(produced, key=lambda m: int(m[0])) == [
        (str(g), {"trueup_f1": g, "version": 2, "a": f"k{g}", "b": f"f{g}"})
        for g in range(1, 31)]
    assert diff(config, "events").consistent


def test_a_key_with_a_null_part_is_not_republished(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:  # a unique key may be NULL
        conn.execute("CREATE TABLE orders (id bigint UNIQUE, version bigint, status text)")
        conn.execute("INSERT INTO orders VALUES (1, 1, 'new'), (NULL, 1, 'lost'), (2, 1, 'new')")
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="orders",
                        key=["id"], columns={"status": "status"})
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 2, summary
    assert sorted(k for k, _ in _messages_after(kafka_bootstrap, topic, starts)) == ["1", "2"]


@pytest.mark.parametrize(("key_type", "key_of", "orphan"), [
    ("numeric(6,2)", "g + 0.10", "99.10"),
    ("jsonb", "jsonb_build_object('a', g + 0.50)", '{"a": 99.5}'),
], ids=["numeric", "jsonb"])
def test_a_run_without_a_mirror_publishes_the_missing_keys_and_no_tombstone(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str, key_type: str, key_of: str, orphan: str) -> None:
    """Without a mirror, the source rows a --run chunk read must be known as the keys of the
    run's differences, or they are taken for orphans and get a tombstone right after their
    message: a numeric key with a fraction is a string there ("1.1000000000" is the source's
    1.10), and a jsonb key's numbers lose their scale ({"a": 1.5} is the source's
    {"a": 1.50}: the source is asked by value)."""
    source = new_db()
    messages = _things(source, f"at {key_type}", key_of, 20)
    missing = {r[0] for r in messages[:3]}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for key, value in messages:
        if key not in missing:
            producer.produce(topic, key=key, value=value)
    producer.produce(topic, key=orphan,
                     value=f'{{"at": {orphan}, "version": 1, "status": "new"}}')
    assert producer.flush(30) == 0
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="things",
                        key=["at"], columns={"status": "status"})
    run = diff(config, "events")
    assert (run.missing, run.orphan) == (3, 1)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("DROP TABLE trueup_mirror.events")
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 4
    produced = _messages_after(kafka_bootstrap, topic, starts)
    assert sorted(k for k, v in produced if v is not None) == sorted(missing)
    assert [k for k, v in produced if v is None] == [orphan]
    assert diff(config, "events").consistent


def test_a_topic_key_a_double_cannot_hold_is_an_orphan_of_its_own(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    """The mirror's keys are told apart exactly: read as doubles, 0.30000000000000001 and the
    source's 0.3 were one key, so the orphan got no tombstone."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE things (at numeric PRIMARY KEY, version bigint, status text)")
        conn.execute("INSERT INTO things VALUES (0.3, 1, 'new'), (1, 1, 'new')")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for at in ("0.3", "1", "0.30000000000000001"):
        producer.produce(topic, key=at, value=f'{{"at": {at}, "version": 1, "status": "new"}}')
    assert producer.flush(30) == 0
    config = _config_of(tmp_path, state_db, source, kafka_bootstrap, topic, table="things",
                        key=["at"], columns={"status": "status"})
    run = diff(config, "events")
    assert (run.missing, run.orphan, run.mismatch) == (0, 1, 0)
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.ALL))
    assert summary.status is BackfillStatus.SUCCEEDED and summary.rows_repaired == 1
    assert _messages_after(kafka_bootstrap, topic, starts) == [("0.30000000000000001", None)]
    assert diff(config, "events").consistent


def test_a_day_s_keys_a_double_cannot_hold_find_their_newer_versions_in_the_topic(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    """A --partition republish reads the mirror's rows of the day's keys: read as doubles,
    0.30000000000000001 asked for 0.3's row, missed its own newer version and republished
    the source's older one over it."""
    source = new_db()
    keys = ["0.3", "0.30000000000000001"]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE things (at numeric PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        conn.execute("INSERT INTO things SELECT k::numeric, 1, 'old', '2026-01-02T08:00Z' "
                     "FROM unnest(%s::text[]) k", (keys,))
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for key in keys:  # the topic holds a newer version of both
        producer.produce(topic, key=key, value=f'{{"at": {key}, "version": 2, "status": "new"}}')
    assert producer.flush(30) == 0
    raw = {"state": state_db,
           "connections": {"shop": {"postgres": source},
                           "bus": {"kafka": {"bootstrap.servers": kafka_bootstrap}}},
           "reconciliations": {"events": {
               "source": {"connection": "shop", "table": "things", "key": ["at"],
                          "version": "version", "columns": ["status"],
                          "updated_at": "updated_at"},
               "target": {"connection": "bus", "topic": topic, "format": "json", "key": ["at"],
                          "version": "version", "columns": {"status": "status"}},
               "repair": "republish", "partitions": {"daily": {"start": "2026-01-01"}}}}}
    (tmp_path / "trueup.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "trueup.yaml")
    assert diff(config, "events").ahead == 2
    starts = _ends(kafka_bootstrap, topic)
    summary = start_backfill(config, "events", BackfillOptions(
        scope=BackfillScope.PARTITION, partition="2026-01-02"))
    assert summary.status is BackfillStatus.SUCCEEDED
    assert (summary.rows_repaired, summary.rows_skipped) == (0, 2)
    assert _messages_after(kafka_bootstrap, topic, starts) == []


def test_a_run_s_republish_replaces_a_key_s_unreadable_latest_message(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, kafka_bootstrap: str,
        topic: str) -> None:
    """A key whose latest message cannot be read is missing from the topic's state: the run
    lists it, and republishing it leaves the topic readable."""
    config = _setup(new_db, state_db, tmp_path, kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    producer.produce(topic, key="10", value=b"{broken")
    assert producer.flush(30) == 0
    run = diff(config, "events")
    assert (run.missing, run.unreadable) == (3, 1), run  # 3, 4 and 10

    summary = start_backfill(config, "events", BackfillOptions(scope=BackfillScope.RUN,
                                                               run_id=run.run_id))
    assert summary.status is BackfillStatus.SUCCEEDED
    after = diff(config, "events")
    assert (after.missing, after.unreadable, after.stale, after.mismatch, after.orphan) == (
        0, 0, 0, 0, 0), after
