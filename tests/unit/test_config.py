"""The config file: the example parses, and every bad input gets its exact one-line message."""

from __future__ import annotations

import copy
import datetime as dt
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from trueup.config import ConnectionKind, RepairMode, load_config, parse_config
from trueup.diff import parse_partition
from trueup.errors import ConfigError, ConfigErrors, UsageError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "trueup.yaml"
BASE: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())


def _errors(mutate: Callable[[dict[str, Any]], None], env: dict[str, str] | None = None) -> str:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    with pytest.raises((ConfigError, ConfigErrors)) as caught:
        parse_config(yaml.safe_dump(raw), "trueup.yaml", env or {})
    return str(caught.value)


def _rec(raw: dict[str, Any], name: str = "orders_events") -> dict[str, Any]:
    return raw["reconciliations"][name]  # type: ignore[no-any-return]


def test_example_config_parses_into_typed_models() -> None:
    config = load_config(EXAMPLE, environ={})
    events = config.reconciliations["orders_events"]
    assert config.path == str(EXAMPLE), "the config should know the file it was read from"
    assert config.state == "postgresql://postgres@127.0.0.1:5432/trueup"
    assert config.connections["bus"].kind is ConnectionKind.KAFKA
    assert events.grace == dt.timedelta(seconds=60)
    assert events.repair is RepairMode.REPUBLISH
    assert events.partitions is not None and events.partitions.daily.start == dt.date(2026, 1, 1)
    assert events.target.topic == "orders.v1" and events.target.is_topic
    invoices = config.reconciliations["orders_invoices"]
    assert invoices.target.columns == {"status": "status", "amount_cents": "total_cents"}
    assert config.dead_letters["orders_dlq"].backoff.max == dt.timedelta(minutes=10)
    payments = config.dead_letters["payments_dlq"]
    assert payments.replay_to is not None and payments.replay_to.exchange == "payments"


def test_interpolation_uses_the_environment_then_the_default() -> None:
    text = EXAMPLE.read_text()
    with_env = parse_config(text, "x.yaml", {"TRUEUP_STATE_DSN": "postgresql://h/s"})
    assert with_env.state == "postgresql://h/s"
    assert parse_config(text, "x.yaml", {}).state.endswith("/trueup")


@pytest.mark.parametrize(("given", "seconds"), [
    ("${GRACE:-60}", 60), ("${GRACE:-1.5}", 1.5), ("${GRACE:-90s}", 90), ("45", 45)])
def test_a_duration_may_be_bare_seconds_also_as_text(given: str, seconds: float) -> None:
    """`grace: 60` is 60 s; so is the "60" a variable's default gives."""
    text = EXAMPLE.read_text().replace("grace: 60s", f'grace: "{given}"')
    events = parse_config(text, "x.yaml", {}).reconciliation("orders_events")
    assert events.grace == dt.timedelta(seconds=seconds)


def test_target_columns_may_be_a_list_of_same_names() -> None:
    raw = copy.deepcopy(BASE)
    _rec(raw)["target"]["columns"] = ["status", "amount_cents", "currency"]
    config = parse_config(yaml.safe_dump(raw), "t.yaml", {})
    assert config.reconciliations["orders_events"].target.columns["currency"] == "currency"


BAD_CONFIGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown connection",
     lambda r: _rec(r)["source"].update(connection="nope"),
     "trueup.yaml: reconciliations.orders_events.source.connection: unknown connection 'nope' "
     "(defined: amqp, billing, bus, shop)"),
    ("unknown field",
     lambda r: _rec(r)["source"].update(colums=["status"]),
     "trueup.yaml: reconciliations.orders_events.source.colums: unknown field (expected one of: "
     "connection, table, key, version, updated_at, columns)"),
    ("unknown top-level field",
     lambda r: r.update(reconcilations={}),
     "trueup.yaml: reconcilations: unknown field (expected one of: state, connections, "
     "reconciliations, dead_letters)"),
    ("top-level path (the file's own path is not a field)",
     lambda r: r.update(path="/etc/other.yaml"),
     "trueup.yaml: path: unknown field (expected one of: state, connections, "
     "reconciliations, dead_letters)"),
    ("missing field",
     lambda r: _rec(r)["source"].pop("key"),
     "trueup.yaml: reconciliations.orders_events.source.key: missing required field"),
    ("wrong type",
     lambda r: _rec(r)["source"].update(key="id"),
     "trueup.yaml: reconciliations.orders_events.source.key: expected a list (got 'id')"),
    ("wrong scalar type",
     lambda r: r["dead_letters"]["orders_dlq"].update(max_attempts="five"),
     "trueup.yaml: dead_letters.orders_dlq.max_attempts: expected an integer (got 'five')"),
    ("missing environment variable",
     lambda r: r.update(state="${TRUEUP_TEST_NOT_SET}"),
     "trueup.yaml: state: environment variable TRUEUP_TEST_NOT_SET is not set "
     "(use ${TRUEUP_TEST_NOT_SET:-default})"),
    ("bad duration",
     lambda r: _rec(r).update(grace="soon"),
     "trueup.yaml: reconciliations.orders_events.grace: expected a duration such as 500ms, 30s, "
     "10m, 1h or 2d (got 'soon')"),
    ("endless duration",
     lambda r: _rec(r).update(grace=float("inf")),
     "trueup.yaml: reconciliations.orders_events.grace: expected a duration of at most 366 days "
     "(got inf)"),
    ("grace without updated_at",
     lambda r: _rec(r, "orders_invoices").update(grace="1m"),
     "trueup.yaml: reconciliations.orders_invoices: grace needs source.updated_at (the column "
     "that says a row was updated within it)"),
    ("a consumer without updated_at",
     lambda r: _rec(r, "orders_invoices")["target"].update(
         consumer={"connection": "bus", "topic": "orders.v1", "group": "billing"}),
     "trueup.yaml: reconciliations.orders_invoices: target.consumer needs source.updated_at "
     "(the column that says a row was updated after what the consumer has read)"),
    ("a consumer of a topic target",
     lambda r: _rec(r)["target"].update(
         consumer={"connection": "bus", "topic": "orders.v1", "group": "billing"}),
     "trueup.yaml: reconciliations.orders_events.target: consumer applies to a table target: "
     "a topic target is read to its end by each run itself"),
    ("a consumer on a postgres connection",
     lambda r: (_rec(r, "orders_invoices")["source"].update(updated_at="updated_at"),
                _rec(r, "orders_invoices")["target"].update(
                    consumer={"connection": "shop", "topic": "orders.v1", "group": "billing"})),
     "trueup.yaml: reconciliations.orders_invoices.target.consumer.connection: connection "
     "'shop' is postgres; a target's consumer needs kafka"),
    ("a consumer without a group",
     lambda r: (_rec(r, "orders_invoices")["source"].update(updated_at="updated_at"),
                _rec(r, "orders_invoices")["target"].update(
                    consumer={"connection": "bus", "topic": "orders.v1"})),
     "trueup.yaml: reconciliations.orders_invoices.target.consumer.group: missing required field"),
    ("bad cron",
     lambda r: _rec(r).update(schedule="every hour"),
     "trueup.yaml: reconciliations.orders_events.schedule: expected a 5-field cron expression "
     "such as '*/30 * * * *' (got 'every hour')"),
    ("cron on a day its months do not have",
     lambda r: _rec(r).update(schedule="0 0 31 2,4 *"),
     "trueup.yaml: reconciliations.orders_events.schedule: expected a cron expression that "
     "fires (got '0 0 31 2,4 *', which names a day its months do not have)"),
    ("bad table name",
     lambda r: _rec(r, "orders_invoices")["target"].update(table="a.b.c"),
     "trueup.yaml: reconciliations.orders_invoices.target.table: expected a table name such as "
     "public.orders or orders (got 'a.b.c')"),
    ("bad column identifier",
     lambda r: _rec(r)["source"].update(columns=["status", "amount cents"]),
     "trueup.yaml: reconciliations.orders_events.source.columns[1]: expected a SQL identifier "
     "(letters, digits, _ and $, not starting with a digit, at most 63 characters; "
     "got 'amount cents')"),
    ("bad repair mode",
     lambda r: _rec(r, "orders_invoices").update(repair="fix"),
     "trueup.yaml: reconciliations.orders_invoices.repair: expected one of republish, upsert or "
     "none (got 'fix')"),
    ("non-positive threshold",
     lambda r: _rec(r)["auto_repair"].update(max_differences=0),
     "trueup.yaml: reconciliations.orders_events.auto_repair.max_differences: expected a number "
     "greater than 0 (got 0)"),
    ("connection of the wrong kind",
     lambda r: _rec(r, "orders_invoices")["target"].update(connection="bus"),
     "trueup.yaml: reconciliations.orders_invoices.target.connection: connection 'bus' is "
     "kafka; a table target needs postgres"),
    ("bad reconciliation name",
     lambda r: r["reconciliations"].update({"bad-name": _rec(r, "orders_invoices")}),
     "trueup.yaml: reconciliations.bad-name: expected a name of letters, digits and "
     "underscores, not starting with a digit, at most 63 characters (got 'bad-name')"),
    # it named only the characters, which were all good
    ("a reconciliation name past 63 characters",
     lambda r: r["reconciliations"].update({"a" * 64: _rec(r, "orders_invoices")}),
     f"trueup.yaml: reconciliations.{'a' * 64}: expected a name of letters, digits and "
     f"underscores, not starting with a digit, at most 63 characters (got '{'a' * 64}', 64 "
     f"characters)"),
    # pydantic's lax mode read true as 1
    ("max_attempts: true",
     lambda r: r["dead_letters"]["orders_dlq"].update(max_attempts=True),
     "trueup.yaml: dead_letters.orders_dlq.max_attempts: expected an integer (got true)"),
    ("max_differences: true",
     lambda r: _rec(r)["auto_repair"].update(max_differences=True),
     "trueup.yaml: reconciliations.orders_events.auto_repair.max_differences: expected an "
     "integer (got true)"),
    ("a backoff multiplier of true",
     lambda r: r["dead_letters"]["orders_dlq"]["backoff"].update(multiplier=True),
     "trueup.yaml: dead_letters.orders_dlq.backoff.multiplier: expected a number (got true)"),
    # pika raised a bare ValueError when `trueup dlq` or `replay` connected: a traceback
    ("a rabbitmq URL whose port is no number",
     lambda r: r["connections"]["amqp"].update(rabbitmq="amqp://guest:guest@127.0.0.1:abc/%2F"),
     "trueup.yaml: connections.amqp.rabbitmq: expected a port from 1 to 65535 in the rabbitmq "
     "URL (got 'amqp://guest:***@127.0.0.1:abc/%2F')"),
    ("a rabbitmq URL whose port is past 65535",
     lambda r: r["connections"]["amqp"].update(rabbitmq="amqp://guest:guest@127.0.0.1:99999/"),
     "trueup.yaml: connections.amqp.rabbitmq: expected a port from 1 to 65535 in the rabbitmq "
     "URL (got 'amqp://guest:***@127.0.0.1:99999/')"),
    ("a rabbitmq URL that is no amqp:// URL",
     lambda r: r["connections"]["amqp"].update(rabbitmq="http://127.0.0.1:15672/"),
     "trueup.yaml: connections.amqp.rabbitmq: expected an amqp:// URL for rabbitmq "
     "(got 'http://127.0.0.1:15672/')"),
    ("bad date",
     lambda r: _rec(r)["partitions"]["daily"].update(start="yesterday"),
     "trueup.yaml: reconciliations.orders_events.partitions.daily.start: expected a date such "
     "as 2026-01-01 (got 'yesterday')"),
    ("a client property that is no scalar: one line, not one per kind",
     lambda r: r["connections"]["bus"]["kafka"].update(acks=None),
     "trueup.yaml: connections.bus.kafka.acks: expected a string, a number or true/false "
     "(got null)"),
    ("a routing key beside a queue name, which would be ignored",
     lambda r: r["dead_letters"]["payments_dlq"].update(
         replay_to={"name": "payments", "routing_key": "settle"}),
     "trueup.yaml: dead_letters.payments_dlq.replay_to: a routing_key goes with an exchange; "
     "a topic or queue name takes none"),
    ("a parking topic Kafka would refuse",
     lambda r: r["dead_letters"]["orders_dlq"].update(parking="bad name!"),
     "trueup.yaml: dead_letters.orders_dlq: parking: expected a Kafka topic name of letters, "
     "digits, '.', '_' and '-' (got 'bad name!')"),
    ("connection without a kind",
     lambda r: r["connections"].update(x={}),
     "trueup.yaml: connections.x: expected exactly one of postgres, kafka or rabbitmq"),
    ("dead letters with topic and queue",
     lambda r: r["dead_letters"]["orders_dlq"].update(queue="q"),
     "trueup.yaml: dead_letters.orders_dlq: expected exactly one of topic or queue"),
    # a DLQ replayed into itself made its Dagster asset depend on itself (a multi-line error)
    ("dead letters replayed into themselves",
     lambda r: r["dead_letters"]["orders_dlq"].update(replay_to="orders.v1.dlq"),
     "trueup.yaml: dead_letters.orders_dlq: expected replay_to to name where the letters go "
     "back to, not the dead-letter topic 'orders.v1.dlq' itself"),
    ("dead letters parked in their own queue",
     lambda r: r["dead_letters"]["payments_dlq"].update(parking="payments.settle.dlq"),
     "trueup.yaml: dead_letters.payments_dlq: expected parking to name another queue than the "
     "dead-letter queue 'payments.settle.dlq' itself"),
    # each would take the letters under its own lock and record: both replayed them
    ("two entries read one dead-letter queue",
     lambda r: r["dead_letters"].update(settle_dlq={"connection": "amqp",
                                                    "queue": "payments.settle.dlq"}),
     "trueup.yaml: dead_letters.settle_dlq.queue: expected a queue no other entry reads "
     "(dead_letters.payments_dlq reads queue 'payments.settle.dlq' of the same broker): both "
     "would replay its letters"),
    ("two entries read one dead-letter topic through two connections",
     lambda r: (r["connections"].update(bus2={"kafka": {"bootstrap.servers": "127.0.0.1:9092",
                                                        "client.id": "other"}}),
                r["dead_letters"].update(orders_dlq2={"connection": "bus2",
                                                      "topic": "orders.v1.dlq"})),
     "trueup.yaml: dead_letters.orders_dlq2.topic: expected a topic no other entry reads "
     "(dead_letters.orders_dlq reads topic 'orders.v1.dlq' of the same broker): both would "
     "replay its letters"),
    # the mirror's own columns stand beside the key columns, named as the source's
    ("a topic's key column named as a mirror column",
     lambda r: (_rec(r)["source"].update(key=["message_key"]),
                _rec(r)["target"].update(key=["message_key"])),
     "trueup.yaml: reconciliations.orders_events.source.key: expected key columns named "
     "otherwise than the columns the mirror of a topic keeps beside them (fields, fingerprint, "
     "kafka_offset, kafka_partition, message_key, native, native_hash, reason, row_hash, "
     "tombstone, version): got 'message_key'; a view over public.orders can rename them"),
    ("columns not mapped",
     lambda r: _rec(r, "orders_invoices")["target"].update(columns={"status": "status"}),
     "trueup.yaml: reconciliations.orders_invoices: expected target.columns to map every source "
     "column and only those (source: status, amount_cents; target maps: status)"),
    ("repair mode for the wrong target",
     lambda r: _rec(r, "orders_invoices").update(repair="republish"),
     "trueup.yaml: reconciliations.orders_invoices: repair: republish needs a topic target; use "
     "upsert for a table"),
    ("partitions without updated_at",
     lambda r: _rec(r)["source"].pop("updated_at"),
     "trueup.yaml: reconciliations.orders_events: partitions need source.updated_at (the column "
     "a day is cut on)"),
    ("bad topic name",
     lambda r: _rec(r)["target"].update(topic="orders v1"),
     "trueup.yaml: reconciliations.orders_events.target.topic: expected a Kafka topic name of "
     "letters, digits, '.', '_' and '-' (got 'orders v1')"),
]


@pytest.mark.parametrize(("mutate", "expected"), [(m, e) for _, m, e in BAD_CONFIGS],
                         ids=[name for name, _, _ in BAD_CONFIGS])
def test_bad_config_gets_one_exact_line(mutate: Callable[[dict[str, Any]], None],
                                        expected: str) -> None:
    assert _errors(mutate) == expected


def test_a_key_named_version_is_a_mirror_column_only_for_a_target_with_a_version() -> None:
    raw = copy.deepcopy(BASE)
    rec = _rec(raw)
    rec["source"].update(key=["version"], version=None)
    rec["target"].update(key=["version"])
    rec["target"].pop("version")
    config = parse_config(yaml.safe_dump(raw), "trueup.yaml", {})
    assert config.reconciliations["orders_events"].source.key == ["version"]
    rec["target"]["version"] = "v"
    rec["source"]["version"] = "updated_at"
    with pytest.raises(ConfigErrors, match=re.escape("got 'version'; a view over public.orders")):
        parse_config(yaml.safe_dump(raw), "trueup.yaml", {})


def test_one_dead_letter_queue_name_on_two_brokers_or_vhosts_is_two_queues() -> None:
    raw = copy.deepcopy(BASE)
    raw["connections"].update(
        other={"rabbitmq": "amqp://guest:guest@127.0.0.1:5672/other"},
        other_admin={"rabbitmq": "amqp://admin:secret@127.0.0.1:5672/other"})
    raw["dead_letters"].update(
        other={"connection": "other", "queue": "payments.settle.dlq"})
    config = parse_config(yaml.safe_dump(raw), "trueup.yaml", {})
    assert set(config.dead_letters) == {"orders_dlq", "payments_dlq", "other"}
    # another user on the same virtual host reads the same queue
    raw["dead_letters"].update(other_admin={"connection": "other_admin",
                                            "queue": "payments.settle.dlq"})
    with pytest.raises(ConfigErrors, match=re.escape(
            "dead_letters.other_admin.queue: expected a queue no other entry reads "
            "(dead_letters.other reads")):
        parse_config(yaml.safe_dump(raw), "trueup.yaml", {})


def test_counts_and_multipliers_from_variables_may_still_be_digit_strings() -> None:
    """Refusing true must not refuse the text "5" that ``${VAR:-5}`` gives."""
    raw = copy.deepcopy(BASE)
    raw["dead_letters"]["orders_dlq"].update(max_attempts="${ATTEMPTS:-7}")
    raw["dead_letters"]["orders_dlq"]["backoff"].update(multiplier="${FACTOR:-1.5}")
    _rec(raw)["auto_repair"].update(max_differences="${MAX_DIFFERENCES:-20}")
    config = parse_config(yaml.safe_dump(raw), "trueup.yaml", {"FACTOR": "3"})
    orders_dlq = config.dead_letters["orders_dlq"]
    assert (orders_dlq.max_attempts, orders_dlq.backoff.multiplier) == (7, 3.0)
    auto_repair = config.reconciliations["orders_events"].auto_repair
    assert auto_repair is not None and auto_repair.max_differences == 20


@pytest.mark.parametrize(("written", "shown"), [
    ("0", "0"), ("1767225600", "1767225600"), ('"86400"', "'86400'"),
    ('"${START:-0}"', "'0'"), ('"${START:-0.0}"', "'0.0'"),
    ('"2026-01-31T00:00:00"', "'2026-01-31T00:00:00'")])
def test_a_number_is_no_day(written: str, shown: str) -> None:
    """pydantic reads a number, or a text of digits (a variable's default), as seconds since
    1970: 0 started the partitions in 1970."""
    text = EXAMPLE.read_text()
    bad = text.replace('start: "2026-01-01"', f"start: {written}")
    with pytest.raises(ConfigErrors) as caught:
        parse_config(bad, "trueup.yaml", {})
    assert str(caught.value) == ("trueup.yaml: reconciliations.orders_events.partitions.daily."
                                 f"start: expected a date such as 2026-01-01 (got {shown})")


@pytest.mark.parametrize("day", ["2026-02-30", "2026-13-01"])
def test_an_unquoted_day_no_calendar_has_is_the_fields_error_not_a_crash(day: str) -> None:
    """PyYAML reads an unquoted day as a date itself and raised a bare ValueError ("day is out
    of range for month"): the CLI printed a traceback naming neither file nor field."""
    text = EXAMPLE.read_text()
    bad = text.replace('start: "2026-01-01"', f"start: {day}")
    assert bad != text
    with pytest.raises(ConfigErrors) as caught:
        parse_config(bad, "trueup.yaml", {})
    assert str(caught.value) == ("trueup.yaml: reconciliations.orders_events.partitions.daily."
                                 f"start: expected a date such as 2026-01-01 (got '{day}')")
    # a good day unquoted is still a day
    good = text.replace('start: "2026-01-01"', "start: 2026-01-31")
    partitions = parse_config(good, "trueup.yaml", {}).reconciliations["orders_events"].partitions
    assert partitions is not None and partitions.daily.start == dt.date(2026, 1, 31)


@pytest.mark.parametrize(("written", "problem"), [
    ("!!int abc", "cannot read 'abc' as !!int"), ("!!float abc", "cannot read 'abc' as !!float"),
    ("!!bool maybe", "cannot read 'maybe' as !!bool"), ("0x_", "cannot read '0x_' as !!int")])
def test_a_value_its_yaml_tag_cannot_read_is_one_line_naming_the_line(
        written: str, problem: str) -> None:
    """PyYAML's constructors raise a bare ValueError (or KeyError) for these, which the CLI
    printed as an unexpected error with a traceback."""
    text = EXAMPLE.read_text()
    bad = text.replace("max_attempts: 5,", f"max_attempts: {written},", 1)
    assert bad != text
    line = text[:text.index("max_attempts: 5,")].count("\n") + 1
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, "trueup.yaml", {})
    assert str(caught.value) == f"trueup.yaml: line {line}: expected valid YAML ({problem})"


def test_every_bad_field_is_reported_once() -> None:
    def two_problems(raw: dict[str, Any]) -> None:
        _rec(raw).update(grace="soon", schedule="often")

    lines = _errors(two_problems).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("trueup.yaml: reconciliations.orders_events.grace:")
    assert lines[1].startswith("trueup.yaml: reconciliations.orders_events.schedule:")


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("state: x\nconnections: [\n", "bad.yaml", {})
    assert str(caught.value).startswith("bad.yaml: line 3: expected valid YAML")


def test_a_key_given_twice_is_refused_not_silently_replaced() -> None:
    text = EXAMPLE.read_text()
    # a second reconciliation under the first one's name: YAML would keep only the last
    twice = text.replace("  orders_invoices:", "  orders_events:")
    assert twice != text
    with pytest.raises(ConfigError) as caught:
        parse_config(twice, "trueup.yaml", {})
    line = text[:text.index("  orders_invoices:")].count("\n") + 1
    assert str(caught.value) == (f"trueup.yaml: line {line}: expected valid YAML "
                                 f"(found the key 'orders_events' twice)")


def test_yaml_merge_keys_may_still_override_what_they_merge() -> None:
    raw = ("state: postgresql://x@127.0.0.1/s\n"
           "connections:\n"
           "  a: &pg {postgres: 'postgresql://x@127.0.0.1/a'}\n"
           "  b: {<<: *pg, postgres: 'postgresql://x@127.0.0.1/b'}\n")
    config = parse_config(raw, "trueup.yaml", {})
    assert config.connections["b"].postgres == "postgresql://x@127.0.0.1/b"


def test_missing_file_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("/nonexistent/trueup.yaml")
    assert str(caught.value) == ("/nonexistent/trueup.yaml: cannot read the config file: "
                                 "No such file or directory")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "trueup.yaml"
    path.write_bytes(b"state: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: the config file is not UTF-8 text: invalid "
                                 f"continuation byte at byte 10")


def test_cli_prints_one_line_and_exits_2_without_traceback(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE)
    _rec(raw)["grace"] = "soon"
    config = tmp_path / "trueup.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "trueup.cli", "--config", str(config),
                           "validate"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"{config}: reconciliations.orders_events.grace: expected a "
                           f"duration such as 500ms, 30s, 10m, 1h or 2d (got 'soon')\n")


def test_cli_prints_a_day_no_calendar_has_as_one_line_without_traceback(
        tmp_path: Path) -> None:
    config = tmp_path / "trueup.yaml"
    config.write_text(EXAMPLE.read_text().replace('start: "2026-01-01"', "start: 2026-02-30"))
    done = subprocess.run([sys.executable, "-m", "trueup.cli", "--config", str(config),
                           "validate"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"{config}: reconciliations.orders_events.partitions.daily.start: "
                           f"expected a date such as 2026-01-01 (got '2026-02-30')\n")


def test_config_from_environment_variable(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trueup.cli", "status"],
                          env={"TRUEUP_CONFIG": str(tmp_path / "absent.yaml"), "PATH": "/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"{tmp_path / 'absent.yaml'}: cannot read the config file: "
                           f"No such file or directory\n")


@pytest.mark.parametrize("given", ["20260131", "2026-W05-6", "2026-01-31T00:00", " 2026-01-31"])
def test_a_partition_is_a_day_written_yyyy_mm_dd_only(given: str) -> None:
    """Runs store the partition as given: other spellings of the day (which fromisoformat
    takes) would show in status and lineage unlike the run's own output."""
    config = parse_config(EXAMPLE.read_text(), "trueup.yaml", {})
    rec = config.reconciliation("orders_events")
    assert parse_partition(rec, "orders_events", "2026-01-31") == dt.date(2026, 1, 31)
    with pytest.raises(UsageError) as caught:
        parse_partition(rec, "orders_events", given)
    assert str(caught.value) == f"--partition: expected a day like 2026-01-31 (got {given!r})"


def test_the_last_day_python_has_is_refused_as_a_partition() -> None:
    """Its end (the next day) overflowed: a backfill printed a traceback, a diff recorded a
    failed run ("date value out of range")."""
    rec = parse_config(EXAMPLE.read_text(), "trueup.yaml", {}).reconciliation("orders_events")
    assert parse_partition(rec, "orders_events", "9999-12-30") == dt.date(9999, 12, 30)
    with pytest.raises(UsageError, match=r"^--partition: 9999-12-31 is past the last day "
                                         r"trueup can cut \(9999-12-30\)$"):
        parse_partition(rec, "orders_events", "9999-12-31")


@pytest.mark.parametrize("where", ["state", "connection"])
def test_a_dsn_refused_as_no_url_is_quoted_without_its_password(where: str) -> None:
    dsn = "host=127.0.0.1 user=postgres password=Hunter2 dbname=trueup"

    def key_value_form(raw: dict[str, Any]) -> None:
        if where == "state":
            raw["state"] = dsn
        else:
            raw["connections"]["shop"] = {"postgres": dsn}

    message = _errors(key_value_form)
    assert "password=***" in message and "Hunter2" not in message, message


def test_a_huge_value_echoed_in_a_config_error_is_cut_short() -> None:
    """A value echoed back whole (a YAML alias expanded a thousandfold) made one error line
    megabytes long."""
    message = _errors(lambda r: _rec(r).update(repair="x" * 5000))
    prefix = "trueup.yaml: reconciliations.orders_events.repair: expected one of republish, "
    assert message.startswith(prefix + "upsert or none (got 'xxxx"), message[:200]
    assert message.endswith("... (5,050 characters in all)"), message[-80:]
    assert len(message) < 400


def test_yaml_aliases_nested_into_a_billion_values_are_refused_at_once() -> None:
    """The 'billion laughs': nine lines held 9^9 values once expanded, and validate walked
    them for minutes."""
    laughs = ['x1: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"x{i}: &{b} [{', '.join([f'*{a}'] * 9)}]"
               for i, (a, b) in enumerate(zip("abcdefgh", "bcdefghi", strict=True), start=2)]
    with pytest.raises(ConfigError) as caught:
        parse_config(EXAMPLE.read_text() + "\n".join(laughs) + "\n", "trueup.yaml", {})
    assert str(caught.value) == ("trueup.yaml: expected at most 100,000 values once YAML "
                                 "aliases are expanded (aliases nested within aliases?)")
    # aliases in moderation are YAML like any other
    shared = EXAMPLE.read_text().replace("grace: 60s", "grace: &g 60s\n    x_note: *g")
    with pytest.raises(ConfigErrors, match="x_note: unknown field"):
        parse_config(shared, "trueup.yaml", {})
