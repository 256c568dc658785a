"""``trueup validate`` reaches every connection and finds what does not exist or cannot work."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
import yaml
from confluent_kafka.admin import AdminClient, NewTopic

from tests.conftest import unused_port
from trueup import validate as validate_module
from trueup.brokers import kafka
from trueup.cli import main

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq]

TABLES = """
CREATE TABLE public.orders (id bigint PRIMARY KEY, status text, amount_cents bigint,
                            version bigint NOT NULL, updated_at timestamptz NOT NULL,
                            doc jsonb, note text);
CREATE TABLE public.no_key (id bigint, status text, amount_cents bigint, version bigint);
-- unique over an expression as well: (id) alone is not unique
CREATE UNIQUE INDEX no_key_expression ON public.no_key (id, lower(status));
-- unique, but over a column that may hold NULL (and does): NULL keys are not told apart
CREATE TABLE public.null_key (id bigint, status text, amount_cents bigint, version bigint);
CREATE UNIQUE INDEX null_key_id ON public.null_key (id);
INSERT INTO public.null_key VALUES (1, 'a', 1, 1), (NULL, 'b', 2, 1), (NULL, 'c', 3, 1);
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (order_id bigint, order_version bigint, status text,
                               total_cents bigint);
CREATE UNIQUE INDEX invoices_order_id ON billing.invoices (order_id);
"""


@pytest.fixture(autouse=True)
def _no_suites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's suites check the demo's tables, not these: none unless a test says."""
    monkeypatch.setenv("TRUEUP_CHECKS_DIR", str(tmp_path / "no-suites"))


@pytest.fixture
def world(empty_db: str, state_db: str, kafka_bootstrap: str, amqp_url: str,
          unique: Callable[[str], str]) -> Iterator[dict[str, str]]:
    """A shop database, a topic, a DLQ topic and a RabbitMQ queue and exchange of their own."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(TABLES)
    topic, dlq = unique("orders"), unique("orders_dlq")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(t, 2, 1) for t in (topic, dlq)]).values():
        future.result()
    queue, exchange = unique("payments_dlq"), unique("payments")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.exchange_declare(exchange, exchange_type="direct", durable=True)
    yield {"shop": empty_db, "state": state_db, "topic": topic, "dlq": dlq, "queue": queue,
           "exchange": exchange, "kafka": kafka_bootstrap, "amqp": amqp_url}
    for future in admin.delete_topics([topic, dlq]).values():
        future.result()
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)


def _config(w: dict[str, str]) -> dict[str, Any]:
    return {
        "state": w["state"],
        "connections": {"shop": {"postgres": w["shop"]}, "billing": {"postgres": w["shop"]},
                        "bus": {"kafka": {"bootstrap.servers": w["kafka"]}},
                        "amqp": {"rabbitmq": w["amqp"]}},
        "reconciliations": {
            "events": {
                "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                           "version": "version", "updated_at": "updated_at",
                           "columns": ["status", "amount_cents"]},
                "target": {"connection": "bus", "topic": w["topic"], "format": "json",
                           "key": ["id"], "version": "version",
                           "columns": ["status", "amount_cents"]},
                "repair": "republish"},
            "invoices": {
                "source": {"connection": "shop", "table": "public.orders", "key": ["id"],
                           "version": "version", "columns": ["status", "amount_cents"]},
                "target": {"connection": "billing", "table": "billing.invoices",
                           "key": ["order_id"], "version": "order_version",
                           "columns": {"status": "status", "amount_cents": "total_cents"}},
                "repair": "upsert"},
        },
        "dead_letters": {
            "events_dlq": {"connection": "bus", "topic": w["dlq"], "replay_to": w["topic"]},
            "payments_dlq": {"connection": "amqp", "queue": w["queue"],
                             "replay_to": {"exchange": w["exchange"], "routing_key": "settle"}},
        },
    }


def _validate(tmp_path: Path, config: dict[str, Any],
              capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(config))
    status = main(["--config", str(path), "validate"])
    out, err = capsys.readouterr()
    return status, out, err


def test_valid_config_passes_and_lists_every_check(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _validate(tmp_path, _config(world), capsys)
    assert (status, err) == (0, ""), err
    assert "ok    reconciliations.events.target.topic" in out
    assert f"topic {world['topic']} (2 partitions)" in out
    assert "billing.invoices: key (order_id), 2 compared columns, version order_version" in out
    assert out.rstrip().endswith("valid (2 reconciliations, 2 dead-letter queues)")


BROKEN: list[tuple[str, Callable[[dict[str, Any], dict[str, str]], None], str]] = [
    ("source column that does not exist",
     lambda c, w: c["reconciliations"]["events"]["source"].update(key=["order_id"]),
     "reconciliations.events.source.key[0]: column 'order_id' does not exist in "
     "public.orders (columns: id, status, amount_cents, version, updated_at, doc, note)"),
    ("target column that does not exist",
     lambda c, w: c["reconciliations"]["invoices"]["target"]["columns"].update(
         amount_cents="total_cent"),
     "reconciliations.invoices.target.columns.amount_cents: column 'total_cent' does not "
     "exist in billing.invoices (columns: order_id, order_version, status, total_cents)"),
    ("table that does not exist",
     lambda c, w: c["reconciliations"]["invoices"]["target"].update(table="billing.nope"),
     "reconciliations.invoices.target.table: table billing.nope does not exist in connection "
     "'billing'"),
    ("key without a primary key or unique index",
     lambda c, w: c["reconciliations"]["invoices"]["source"].update(table="public.no_key"),
     "reconciliations.invoices.source.key: no primary key or unique index of public.no_key is "
     "exactly (id); a key must identify one row"),
    ("source key column that holds NULL",
     lambda c, w: c["reconciliations"]["invoices"]["source"].update(table="public.null_key"),
     "reconciliations.invoices.source.key[0]: column 'id' of public.null_key holds NULL: a key "
     "must identify one row (rows with a NULL key part can be neither compared nor repaired); "
     "declare it NOT NULL or key on other columns"),
    ("version column that cannot be ordered",
     lambda c, w: c["reconciliations"]["events"]["source"].update(version="doc"),
     "reconciliations.events.source.version: column 'doc' is JSONB, which cannot be ordered as "
     "a version (expected an integer, numeric, timestamp or date column)"),
    ("topic that does not exist",
     lambda c, w: c["reconciliations"]["events"]["target"].update(topic=w["topic"] + "_nope"),
     "reconciliations.events.target.topic: topic '{topic}_nope' does not exist in connection "
     "'bus'"),
    ("a target's consumer of a topic that does not exist",
     lambda c, w: (c["reconciliations"]["invoices"]["source"].update(updated_at="updated_at"),
                   c["reconciliations"]["invoices"]["target"].update(consumer={
                       "connection": "bus", "topic": w["topic"] + "_nope",
                       "group": "billing"})),
     "reconciliations.invoices.target.consumer.topic: topic '{topic}_nope' does not exist in "
     "connection 'bus'"),
    ("queue that does not exist",
     lambda c, w: c["dead_letters"]["payments_dlq"].update(queue=w["queue"] + "_nope"),
     "dead_letters.payments_dlq.queue: queue '{queue}_nope' does not exist"),
    ("exchange that does not exist",
     lambda c, w: c["dead_letters"]["payments_dlq"]["replay_to"].update(exchange="nope_x"),
     "dead_letters.payments_dlq.replay_to.exchange: exchange 'nope_x' does not exist"),
    ("unreachable postgres",
     lambda c, w: c["connections"].update(billing={"postgres":
                                                   "postgresql://postgres@127.0.0.1:1/x"}),
     "connections.billing: cannot connect: "),
    ("malformed postgres DSN",
     lambda c, w: c["connections"].update(billing={"postgres":
                                                   "postgresql://postgres@127.0.0.1:5432x/x"}),
     "connections.billing: cannot connect: "),
    ("kafka property librdkafka does not know",
     lambda c, w: c["connections"]["bus"]["kafka"].update({"bootstrap.server": w["kafka"]}),
     'connections.bus: No such configuration property: "bootstrap.server"'),
]


@pytest.mark.parametrize(("breaks", "expected"), [(b, e) for _, b, e in BROKEN],
                         ids=[name for name, _, _ in BROKEN])
def test_validate_reports_what_is_missing_as_one_line(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        breaks: Callable[[dict[str, Any], dict[str, str]], None], expected: str) -> None:
    config = _config(world)
    breaks(config, world)
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{tmp_path / 'trueup.yaml'}: "
                               + expected.format(**world)), lines[0]


def test_validate_reports_every_problem_of_a_table_at_once_and_types_it_cannot_compare(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It stopped at the first problem of a table (the version), so an updated_at of text
    showed only after that was fixed; an array or bytea column passed, and the diff failed on
    it naming neither the reconciliation nor the column."""
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute("CREATE TABLE public.odd (id bigint PRIMARY KEY, version text, at text, "
                     "tags int[], status text)")
    config = _config(world)
    config["reconciliations"]["invoices"]["source"] = {
        "connection": "shop", "table": "public.odd", "key": ["id"], "version": "version",
        "updated_at": "at", "columns": ["status", "tags"]}
    config["reconciliations"]["invoices"]["target"]["columns"] = {
        "status": "status", "tags": "total_cents"}
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    base = f"{tmp_path / 'trueup.yaml'}: reconciliations.invoices.source"
    assert err.splitlines() == [
        f"{base}.version: column 'version' is TEXT, which cannot be ordered as a version "
        f"(expected an integer, numeric, timestamp or date column)",
        f"{base}.updated_at: column 'at' is TEXT (expected a timestamp or date column)",
        f"{base}.columns[1]: column 'tags' of public.odd is integer[], which has no canonical "
        f"form to compare (see docs/fingerprint.md)"]


def test_a_text_target_version_is_valid_as_the_diff_reads_it_as_its_source_s_numbers(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate refused it (TEXT cannot be ordered) while diff and backfill compare it as the
    source's bigint; a source's own text version stays refused (see above)."""
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute("ALTER TABLE billing.invoices ALTER COLUMN order_version TYPE text")
    status, out, err = _validate(tmp_path, _config(world), capsys)
    assert (status, err) == (0, ""), err
    assert "billing.invoices: key (order_id), 2 compared columns, version order_version" in out


def test_the_null_key_check_gives_up_on_a_table_it_cannot_read_in_time(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan for NULL keys has a time limit (a big table, or one locked by a migration):
    past it the check is skipped with a warning rather than holding validate up."""
    monkeypatch.setattr(validate_module, "NULL_KEY_SECONDS", 0.5)
    config = _config(world)
    config["reconciliations"]["invoices"]["source"].update(table="public.null_key")
    with psycopg.connect(world["shop"]) as lock:
        lock.execute("LOCK TABLE public.null_key IN ACCESS EXCLUSIVE MODE")
        status, out, err = _validate(tmp_path, config, capsys)
    assert status == 0, err
    assert "ok    reconciliations.invoices.source" in out
    assert '"event": "validate.null_keys_unchecked"' in err, err


def test_a_parking_lot_not_created_yet_is_valid(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first replay that parks a letter creates it; validate refused the config."""
    config = _config(world)
    config["dead_letters"]["events_dlq"]["parking"] = world["topic"] + "_parked"
    config["dead_letters"]["payments_dlq"]["parking"] = world["queue"] + "_parked"
    status, out, err = _validate(tmp_path, config, capsys)
    assert (status, err) == (0, ""), err
    line = next(x for x in out.splitlines() if "dead_letters.events_dlq.parking" in x)
    assert line.startswith("ok ") and line.endswith(
        f"topic {world['topic']}_parked does not exist yet (the first replay that parks a "
        f"letter creates it)"), line
    assert f"queue {world['queue']}_parked does not exist yet" in out, out
    topics = AdminClient({"bootstrap.servers": world["kafka"]}).list_topics(timeout=10).topics
    assert world["topic"] + "_parked" not in topics


def test_validate_never_creates_a_topic(world: dict[str, str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(world)
    absent = world["topic"] + "_absent"
    config["reconciliations"]["events"]["target"]["topic"] = absent
    _validate(tmp_path, config, capsys)
    topics = AdminClient({"bootstrap.servers": world["kafka"]}).list_topics(timeout=10).topics
    assert absent not in topics


def test_status_json_lists_runs_and_backfills_newest_first(
        world: dict[str, str], tmp_path: Path) -> None:
    with psycopg.connect(world["state"], autocommit=True) as conn:
        for name in ("first", "second"):
            conn.execute("INSERT INTO trueup.runs (reconciliation, status, missing) "
                         "VALUES (%s, 'succeeded', 3)", (name,))
        backfill = conn.execute(
            "INSERT INTO trueup.backfills (reconciliation, scope, status, chunk_size) "
            "VALUES ('second', 'all', 'running', 10) RETURNING backfill_id").fetchone()
        assert backfill is not None
        conn.execute("INSERT INTO trueup.chunks (backfill_id, chunk, status) VALUES "
                     "(%s, 1, 'done'), (%s, 2, 'pending')", (backfill[0], backfill[0]))
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(_config(world)))
    done = subprocess.run([sys.executable, "-m", "trueup.cli", "--config", str(path), "status",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {"runs", "backfills", "replays"}
    assert [r["reconciliation"] for r in document["runs"]] == ["second", "first"]
    assert document["backfills"][0] | {"backfill_id": 0} == document["backfills"][0] | {
        "backfill_id": 0, "reconciliation": "second", "status": "running", "chunks": 2,
        "chunks_done": 1, "rows_repaired": 0}
    assert document["replays"] == []


def test_diff_against_an_unreachable_or_misconfigured_kafka_is_one_line(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not "run N failed: TimeoutError", nor a raw KafkaError: what failed, and where."""
    monkeypatch.setattr(kafka, "METADATA_TIMEOUT_SECONDS", 2.0)  # refused: no need to wait 10s
    servers = f"127.0.0.1:{unused_port()}"
    config = _config(world)
    config["connections"]["bus"]["kafka"]["bootstrap.servers"] = servers
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["--config", str(path), "diff", "events"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"topic {world['topic']}: cannot reach Kafka at {servers}: " in last, last
    assert main(["--config", str(path), "validate"]) == 2
    assert f"connections.bus: cannot reach Kafka at {servers}: " in capsys.readouterr().err

    config["connections"]["bus"]["kafka"].update({"bootstrap.servers": world["kafka"],
                                                  "no.such.property": "1"})
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "diff", "events"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert (f'topic {world["topic"]}: No such configuration property: "no.such.property"'
            in last), last


def test_validate_reports_a_suite_the_dagster_code_location_would_refuse(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """validate said valid; Dagster then refused to load the code location."""
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "orders.yaml").write_text("connection: shop\ntable: public.orders\n"
                                        "expectations: []\n")
    monkeypatch.setenv("TRUEUP_CHECKS_DIR", str(suites))
    status, _, err = _validate(tmp_path, _config(world), capsys)
    assert status == 2
    assert err.splitlines() == [f"{tmp_path / 'trueup.yaml'}: {suites / 'orders.yaml'}: "
                                f"expectations: List should have at least 1 item after "
                                f"validation, not 0"], err

    (suites / "orders.yaml").unlink()
    status, out, err = _validate(tmp_path, _config(world), capsys)
    assert (status, err) == (0, ""), err
    assert "ok    dagster" in out and "asset keys distinct, 0 GX suites of its tables" in out


def test_validate_reports_a_suite_reading_a_column_or_table_that_does_not_exist(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Such a suite loads, and then fails every one of its runs."""
    suites = tmp_path / "suites"
    suites.mkdir()
    monkeypatch.setenv("TRUEUP_CHECKS_DIR", str(suites))
    (suites / "orders.yaml").write_text(yaml.safe_dump({
        "connection": "shop", "table": "public.orders", "expectations": [
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "status"}},
            {"type": "expect_column_values_to_be_between",
             "kwargs": {"column": "amount", "min_value": 0}},
            {"type": "expect_compound_columns_to_be_unique",
             "kwargs": {"column_list": ["id", "sku"]}},
            # the columns the table should have are these expectations' to check, not ours
            {"type": "expect_table_columns_to_match_set",
             "kwargs": {"column_set": ["id", "gone"]}},
            {"type": "expect_table_columns_to_match_ordered_list",
             "kwargs": {"column_list": ["id", "gone"]}},
            {"type": "expect_column_to_exist", "kwargs": {"column": "coming"}}]}))
    config = _config(world)
    status, out, err = _validate(tmp_path, config, capsys)
    at = f"{tmp_path / 'trueup.yaml'}: {suites / 'orders.yaml'}"
    assert status == 2
    assert err.splitlines() == [
        f"{at}: expectations[1].kwargs.column: column 'amount' does not exist in "
        f"public.orders (connection shop)",
        f"{at}: expectations[2].kwargs.column_list[1]: column 'sku' does not exist in "
        f"public.orders (connection shop)"], err
    assert "asset keys distinct, 1 GX suite of its tables" in out

    # a suite of a table the config names as a target, which does not exist
    config["reconciliations"]["invoices"]["target"]["table"] = "billing.gone"
    (suites / "orders.yaml").write_text(yaml.safe_dump({
        "connection": "billing", "table": "billing.gone", "expectations": [
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "status"}}]}))
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    assert f"{at}: table: table billing.gone does not exist (connection billing)" in err, err


def _days(world: dict[str, str], target: str) -> dict[str, Any]:
    """Invoices reconciled by day: a date key in the source, a timestamptz one in the target
    table billing.days, the config's target being ``target``."""
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute("CREATE TABLE public.days (day date PRIMARY KEY, version bigint, "
                     "status text, amount_cents bigint)")
        conn.execute("CREATE TABLE billing.days (day timestamptz PRIMARY KEY, "
                     "order_version bigint, status text, total_cents bigint)")
    config = _config(world)
    invoices = config["reconciliations"]["invoices"]
    invoices["source"].update(table="public.days", key=["day"])
    invoices["target"].update(table=target, key=["day"])
    return config


def test_validate_refuses_a_key_pair_the_diff_cannot_compare_exactly(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A timestamptz target key against a date source key: validate said ok, then every diff
    and backfill failed at its start."""
    config = _days(world, "billing.days")
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    assert err.splitlines() == [
        f"{tmp_path / 'trueup.yaml'}: reconciliations.invoices.target.key[0]: key day "
        f"(TIMESTAMP) cannot be compared exactly with the source's day (DATE): read as DATE, "
        f"distinct keys would be one. Give the target's key the source's type, or reconcile "
        f"against a view of the target whose key is DATE"]


def test_a_view_renaming_a_source_key_the_mirror_of_a_topic_keeps_as_advised_is_valid(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The config refuses a source key named as a column the mirror keeps (`fields`) and
    advises a view renaming it; validate then refused that view (no unique index of it is
    exactly (kid)), while diff and backfill read it as they read a table. A view holds no
    index: the rest is checked, and its ok line says that the key's uniqueness is not."""
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute("CREATE TABLE public.kv (fields bigint PRIMARY KEY, "
                     "version bigint NOT NULL, status text)")
        conn.execute("CREATE VIEW public.kv_v AS SELECT fields AS kid, version, status "
                     "FROM public.kv")
    config = _config(world)
    events = config["reconciliations"]["events"]
    events["source"] = {"connection": "shop", "table": "kv", "key": ["fields"],
                        "version": "version", "columns": ["status"]}
    events["target"].update(key=["kid"], columns=["status"])
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    assert "got 'fields'; a view over public.kv can rename them" in err, err

    events["source"].update(table="kv_v", key=["kid"])
    status, out, err = _validate(tmp_path, config, capsys)
    assert (status, err) == (0, ""), err
    line = next(x for x in out.splitlines() if "reconciliations.events.source " in x)
    assert line.startswith("ok ") and line.endswith(
        "public.kv_v: key (kid), 1 compared column, version version; a view holds no index: "
        "that (kid) identifies one row is not checked"), line


def test_a_view_of_the_target_as_advised_for_a_key_the_diff_cannot_compare_is_valid(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate advises a view of the target whose key is the source's type (see the key pair
    test above); the same unique-index check refused that view on the target side. A view
    takes no upsert (INSERT ... ON CONFLICT): under repair upsert it is refused as such."""
    config = _days(world, "billing.days_v")
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute("CREATE VIEW billing.days_v AS SELECT day::date AS day, order_version, "
                     "status, total_cents FROM billing.days")
    assert config["reconciliations"]["invoices"]["repair"] == "upsert"
    status, _, err = _validate(tmp_path, config, capsys)
    assert status == 2
    assert err.splitlines() == [
        f"{tmp_path / 'trueup.yaml'}: reconciliations.invoices.target.table: billing.days_v is "
        f"a view: repair upsert writes it with INSERT ... ON CONFLICT on its key, which needs a "
        f"table with a unique index of the key; upsert into the table itself, or set repair: "
        f"none"], err
    config["reconciliations"]["invoices"]["repair"] = "none"
    config["reconciliations"]["invoices"].pop("auto_repair", None)
    status, out, err = _validate(tmp_path, config, capsys)
    assert (status, err) == (0, ""), err
    assert ("billing.days_v: key (day), 2 compared columns, version order_version; a view "
            "holds no index: that (day) identifies one row is not checked") in out, out


RELATIONS: list[tuple[str, str, int, str]] = [
    ("a materialized view without a unique index is refused",
     "CREATE MATERIALIZED VIEW public.rel AS SELECT * FROM public.orders",
     2, "reconciliations.invoices.source.key: no primary key or unique index of public.rel "
     "is exactly (id); a key must identify one row"),
    ("a materialized view's unique index is its key",
     "CREATE MATERIALIZED VIEW public.rel AS SELECT * FROM public.orders; "
     "CREATE UNIQUE INDEX ON public.rel (id)",
     0, "public.rel: key (id), 2 compared columns, version version\n"),
    ("a foreign table holds no index",
     "CREATE EXTENSION postgres_fdw; CREATE SERVER here FOREIGN DATA WRAPPER postgres_fdw; "
     "CREATE FOREIGN TABLE public.rel (id bigint NOT NULL, status text, amount_cents bigint, "
     "version bigint) SERVER here OPTIONS (table_name 'orders')",
     0, "public.rel: key (id), 2 compared columns, version version; a foreign table holds "
     "no index: that (id) identifies one row is not checked\n"),
    ("a view's key is read for NULL as a table's",
     "CREATE VIEW public.rel AS SELECT * FROM public.null_key",
     2, "reconciliations.invoices.source.key[0]: column 'id' of public.rel holds NULL: a "
     "key must identify one row"),
]


@pytest.mark.parametrize(("create", "expected_status", "expected"),
                         [(c, s, e) for _, c, s, e in RELATIONS],
                         ids=[name for name, _, _, _ in RELATIONS])
def test_a_key_s_unique_index_is_required_of_every_relation_that_can_hold_one(
        world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        create: str, expected_status: int, expected: str) -> None:
    """A view or a foreign table holds no index, so validate cannot require one of them (see
    above); a materialized view can, and must have one. Every relation's key is read for
    NULL."""
    with psycopg.connect(world["shop"], autocommit=True) as conn:
        conn.execute(create)
    config = _config(world)
    config["reconciliations"]["invoices"]["source"].update(table="public.rel")
    status, out, err = _validate(tmp_path, config, capsys)
    if expected_status:
        assert status == expected_status
        assert f"{tmp_path / 'trueup.yaml'}: {expected}" in err, err
    else:
        assert (status, err) == (0, ""), err
        assert expected in out, out
