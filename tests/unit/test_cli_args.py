"""The command line: where ``--config`` goes (before the command or after it), values
refused before anything runs."""

from __future__ import annotations

import argparse
import gc
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest

from trueup import cli
from trueup.backfill import LEASE_ENV, lease_seconds
from trueup.backfill.chunks import LEASE_SECONDS
from trueup.config import Config
from trueup.errors import UsageError


def _config(tmp_path: Path, name: str) -> Path:
    config = tmp_path / name
    config.write_text("state: postgresql://postgres@127.0.0.1:5432/trueup\nconnections: {}\n")
    return config


@pytest.mark.parametrize("argv, expected", [
    (["status"], None),
    (["--config", "a.yaml", "status"], "a.yaml"),
    (["status", "--config", "b.yaml"], "b.yaml"),
    (["--config", "a.yaml", "status", "--config", "b.yaml"], "b.yaml"),
    (["diff", "orders", "--config", "b.yaml", "--json"], "b.yaml"),
    (["backfill", "--resume", "3", "--config", "b.yaml"], "b.yaml"),
])
def test_config_is_read_before_or_after_the_command_and_the_commands_own_wins(
        argv: list[str], expected: str | None) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.config == expected, f"{argv}: expected --config {expected!r}, got {args.config!r}"


def test_status_with_config_after_the_command_loads_that_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before, after = _config(tmp_path, "before.yaml"), _config(tmp_path, "after.yaml")
    loaded: list[Path] = []

    def record(config: Config, args: argparse.Namespace) -> int:
        loaded.append(Path(config.path))
        return cli.EXIT_OK

    monkeypatch.setitem(cli.COMMANDS, "status", record)
    monkeypatch.delenv(cli.METRICS_PORT_ENV, raising=False)
    assert cli.main(["status", "--config", str(after)]) == cli.EXIT_OK
    assert cli.main(["--config", str(before), "status", "--config", str(after)]) == cli.EXIT_OK
    assert cli.main(["--config", str(before), "status"]) == cli.EXIT_OK
    assert loaded == [after, after, before], f"loaded {loaded}"


@pytest.mark.parametrize("command", [["backfill", "orders", "--all"], ["replay", "orders_dlq"]])
@pytest.mark.parametrize("rate", ["0", "-1", "nan", "inf", "-inf", "fast"])
def test_a_rate_that_paces_nothing_is_refused_in_one_line(
        command: list[str], rate: str, capsys: pytest.CaptureFixture[str]) -> None:
    """nan passed (nan <= 0 is false) and paced nothing; inf failed with a traceback."""
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*command, f"--rate={rate}"])
    assert exit_.value.code == cli.EXIT_TROUBLE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trueup {command[0]}: argument --rate: expected a positive number "
                   f"(got {rate!r}) (see trueup {command[0]} --help)"]


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "0.5"])
def test_a_lease_from_the_environment_is_a_number_of_seconds_or_a_usage_error(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEASE_ENV, value)
    with pytest.raises(UsageError, match=f"{LEASE_ENV}: expected a number of seconds, at "
                                         f"least 1 \\(got '{value}'\\)"):
        lease_seconds()
    monkeypatch.setenv(LEASE_ENV, "2.5")
    assert lease_seconds() == 2.5
    monkeypatch.delenv(LEASE_ENV)
    assert lease_seconds() == LEASE_SECONDS


@pytest.mark.parametrize("argv, most", [
    (["status", "--limit", "99999999999999999999"], 2**63 - 1),
    (["replay", "dlq", "--max", "9223372036854775808"], 2**63 - 1),
    (["backfill", "orders", "--all", "--chunk-size", "2147483648"], 2**31 - 1),
])
def test_a_number_past_what_the_state_holds_is_refused_in_one_line(
        argv: list[str], most: int, capsys: pytest.CaptureFixture[str]) -> None:
    """It reached Postgres ("bigint out of range"): a traceback and 'unexpected error'."""
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == cli.EXIT_TROUBLE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"trueup {argv[0]}: argument {argv[-2]}: expected a positive integer up to "
                   f"{most} (got {argv[-1]!r}) (see trueup {argv[0]} --help)"]


def test_a_command_line_argparse_refuses_is_one_line_naming_the_help(
        capsys: pytest.CaptureFixture[str]) -> None:
    """argparse printed its usage block before the line: one problem, several lines."""
    for argv, line in (
            ([], "trueup: the following arguments are required: command (see trueup --help)"),
            (["diff"], "trueup diff: the following arguments are required: name "
                       "(see trueup diff --help)"),
            (["backfill", "orders"], "trueup backfill: one of the arguments --run --partition "
                                     "--all --resume --cancel is required "
                                     "(see trueup backfill --help)")):
        with pytest.raises(SystemExit) as exit_:
            cli.build_parser().parse_args(argv)
        assert exit_.value.code == cli.EXIT_TROUBLE
        assert capsys.readouterr().err.splitlines() == [line]


def test_only_the_console_script_freezes_what_is_loaded_for_the_collector(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freezing spares the collector the imports (a faster start and exit); a caller running
    commands in its own process (tests, a notebook) must keep its garbage collectable."""
    config = _config(tmp_path, "trueup.yaml")
    frozen: list[int] = []

    def record(config: Config, args: argparse.Namespace) -> int:
        frozen.append(gc.get_freeze_count())
        return cli.EXIT_OK

    monkeypatch.setitem(cli.COMMANDS, "status", record)
    monkeypatch.delenv(cli.METRICS_PORT_ENV, raising=False)
    before = gc.get_freeze_count()
    try:
        assert cli.main(["--config", str(config), "status"]) == cli.EXIT_OK
        assert cli.main(["--config", str(config), "status"], whole_process=True) == cli.EXIT_OK
    finally:
        gc.unfreeze()
    assert frozen[0] == before, "main() froze its caller's objects"
    assert frozen[1] > before, "the console script's command ran with nothing frozen"


def test_json_output_writes_a_decimal_a_double_cannot_hold_with_every_digit() -> None:
    """Decimals a double holds are written as before (2.50 as 2.5); others keep every digit,
    and a string that looks like the marker they pass through stays a string."""
    text = cli.to_json({"key": [Decimal("0.30000000000000001"), Decimal("2.50"), Decimal(7),
                                "\0x:0\0", Decimal("-1234567890.1234567890123")]})
    assert text == ('{"key": [0.30000000000000001, 2.5, 7, "\\u0000x:0\\u0000", '
                    '-1234567890.1234567890123]}')
    assert json.loads(text, parse_float=Decimal)["key"][0] == Decimal("0.30000000000000001")


def test_a_rabbitmq_url_pika_cannot_read_is_one_line_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """pika.URLParameters raised a bare ValueError: `trueup dlq` and `replay` printed
    'unexpected error' and a traceback. A bad port is the config's to refuse; the query's
    options are pika's, read as the connection opens (before anything is reached)."""
    config = tmp_path / "trueup.yaml"
    monkeypatch.delenv(cli.METRICS_PORT_ENV, raising=False)
    for url, line in (
            ("amqp://guest:guest@127.0.0.1:abc/%2F",
             f"{config}: connections.amqp.rabbitmq: expected a port from 1 to 65535 in the "
             f"rabbitmq URL (got 'amqp://guest:***@127.0.0.1:abc/%2F')"),
            ("amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=soon",
             "dead_letters.payments_dlq: cannot read the RabbitMQ URL "
             "'amqp://guest:***@127.0.0.1:5672/%2F?heartbeat=soon': Invalid heartbeat value "
             "'soon': ValueError(\"invalid literal for int() with base 10: 'soon'\")")):
        config.write_text(f"state: postgresql://postgres@127.0.0.1:5432/trueup\n"
                          f"connections: {{amqp: {{rabbitmq: '{url}'}}}}\n"
                          f"dead_letters: {{payments_dlq: {{connection: amqp, "
                          f"queue: payments.settle.dlq}}}}\n")
        assert cli.main(["--config", str(config), "dlq", "payments_dlq"]) == cli.EXIT_TROUBLE
        assert capsys.readouterr().err.splitlines() == [line], url


class _ClosedPipe(io.RawIOBase):
    """A stdout whose reader went away: every write a BrokenPipeError."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("write_through", [True, False], ids=["unbuffered", "buffered"])
def test_a_reader_closing_stdout_ends_the_command_quietly_with_sigpipe_s_status(
        write_through: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`trueup status | head -1` printed "trueup: unexpected error: BrokenPipeError" and a
    traceback, exit 2; buffered, the write failed at exit ("Exception ignored")."""
    def printing(config: Config, args: argparse.Namespace) -> int:
        print("runs:")
        print("  run 1")
        return cli.EXIT_DIFFERENCES

    monkeypatch.setitem(cli.COMMANDS, "status", printing)
    monkeypatch.delenv(cli.METRICS_PORT_ENV, raising=False)
    closed = io.TextIOWrapper(io.BufferedWriter(_ClosedPipe()), write_through=write_through)
    monkeypatch.setattr("sys.stdout", closed)
    assert cli.main(["--config", str(_config(tmp_path, "c.yaml")), "status"]) == 141
    assert cli.EXIT_OUTPUT_CLOSED == 141
    import sys
    assert sys.stdout is closed  # put back
    assert capsys.readouterr().err == ""


def test_backfill_help_states_the_defaults_and_limits_the_code_has(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The help text spells them out (the parser does not import the backfill package)."""
    from trueup.backfill.model import DEFAULT_CHUNK_ROWS, MAX_WORKERS

    with pytest.raises(SystemExit):
        cli.main(["backfill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"rows per chunk (default {DEFAULT_CHUNK_ROWS:,})" in text
    assert f"(default 1, at most {MAX_WORKERS})" in text
