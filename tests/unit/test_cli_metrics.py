"""TRUEUP_METRICS_PORT makes any command serve /metrics while it runs, and only then."""

from __future__ import annotations

import argparse
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import unused_port
from trueup import cli, tracing
from trueup.config import Config


def _config(tmp_path: Path) -> Path:
    """A config file with a state database and nothing else (the commands here are stubs)."""
    config = tmp_path / "trueup.yaml"
    config.write_text("state: postgresql://postgres@127.0.0.1:5432/trueup\nconnections: {}\n")
    return config


def test_a_command_serves_metrics_while_it_runs(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    port = unused_port()
    seen: list[str] = []

    def scrape_self(config: Config, args: argparse.Namespace) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            seen.append(reply.read().decode())
        return 0

    monkeypatch.setitem(cli.COMMANDS, "status", scrape_self)
    monkeypatch.setenv(cli.METRICS_PORT_ENV, str(port))
    assert cli.main(["--config", str(config), "status"]) == 0
    assert seen and "# TYPE trueup_rows_scanned_total counter" in seen[0]
    with pytest.raises(OSError):  # closed once the command returned
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_bad_metrics_port_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    monkeypatch.setenv(cli.METRICS_PORT_ENV, "nope")
    assert cli.main(["--config", str(config), "status"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "TRUEUP_METRICS_PORT: expected a port number (got 'nope')")


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(cli.METRICS_PORT_ENV, str(port))
        assert cli.main(["--config", str(config), "status"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"TRUEUP_METRICS_PORT: cannot serve metrics on port {port}: Address already in use")


def test_an_unforeseen_error_is_trouble_in_one_line_never_differences_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)

    def broken(config: Config, args: argparse.Namespace) -> int:
        raise OverflowError("date value out of range\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "status", broken)
    monkeypatch.setenv("TRUEUP_LOG_FORMAT", "json")
    assert cli.main(["--config", str(config), "status"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    said = [line for line in lines if not line.startswith('{"at": ')]
    assert said == ["trueup: unexpected error: OverflowError: date value out of range"]
    assert any('"event": "cli.unexpected_error"' in line and "Traceback" in line
               for line in lines), "the traceback is logged for whoever debugs it"


def test_a_command_exports_its_spans_when_the_environment_asks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)

    def traced(config: Config, args: argparse.Namespace) -> int:
        with tracing.span("work"):
            return 0

    monkeypatch.setitem(cli.COMMANDS, "status", traced)
    monkeypatch.setenv(tracing.EXPORTER_ENV, "console")
    try:
        assert cli.main(["--config", str(config), "status"]) == 0
    finally:
        tracing.shutdown()  # flushes the spans, and leaves tracing off for the next tests
    assert '"name": "work"' in capsys.readouterr().err


def test_a_bad_traces_exporter_is_one_line_and_trouble(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 (trouble), never 1 (differences found), and no traceback."""
    monkeypatch.setenv(tracing.EXPORTER_ENV, "otlp")
    assert cli.main(["--config", str(_config(tmp_path)), "status"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "TRUEUP_TRACES_EXPORTER: expected none or console (got 'otlp')"]


@pytest.mark.parametrize("flags", [["--dry-run"], ["--chunk-size", "10"], ["--rate", "5"],
                                   ["--alongside"]])
@pytest.mark.parametrize("action", ["--resume", "--cancel"])
def test_resume_and_cancel_refuse_options_of_planning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str,
        flags: list[str]) -> None:
    """They keep the options the backfill was planned with: a --dry-run given to --resume of a
    real backfill must not look like it holds."""
    assert cli.main(["--config", str(_config(tmp_path)), "backfill", action, "3", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"trueup backfill: {flags[0]} belongs to planning a backfill; --resume and --cancel "
        f"keep the options it was planned with"]


def test_options_of_planning_given_together_are_named_together(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(_config(tmp_path)), "backfill", "--resume", "3",
                     "--dry-run", "--rate", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "trueup backfill: --dry-run, --rate belong to planning a backfill; --resume and "
        "--cancel keep the options it was planned with"]
