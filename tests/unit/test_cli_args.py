"""Where ``--config`` goes on the command line: before the command or after it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trueup import cli
from trueup.config import Config


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
