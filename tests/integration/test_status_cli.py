"""``trueup status`` and the command line's output: dry runs marked, seconds rounded, and a
reader that closes stdout early (``| head -1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from trueup.cli import main
from trueup.runs import fail_run, start_run

pytestmark = pytest.mark.postgres


def _config(tmp_path: Path, state: str, source: str | None = None) -> Path:
    path = tmp_path / "trueup.yaml"
    dsn = source or state
    path.write_text(yaml.safe_dump({
        "state": state, "connections": {"a": {"postgres": dsn}},
        "reconciliations": {"orders": {
            "source": {"connection": "a", "table": "orders", "key": ["id"], "version": "v",
                       "columns": ["note"]},
            "target": {"connection": "a", "table": "orders_copy", "key": ["id"],
                       "version": "v", "columns": ["note"]}}}}))
    return path


def test_status_marks_a_dry_run_backfill_in_its_text(
        state_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run's backfill looked like a real repair (its rows_repaired counts what it would
    have written); --json had dry_run, the text did not."""
    with psycopg.connect(state_db, autocommit=True) as conn:
        for dry in (True, False):
            conn.execute("INSERT INTO trueup.backfills (reconciliation, scope, status, "
                         "chunk_size, dry_run, rows_repaired) "
                         "VALUES ('orders', 'all', 'succeeded', 10, %s, 7)", (dry,))
    path = _config(tmp_path, state_db)
    assert main(["--config", str(path), "status"]) == 0
    out = capsys.readouterr().out
    table = out.split("backfills:\n")[1].split("\n\n")[0].splitlines()
    header = table[0].split()
    assert "dry_run" in header, out
    rows = [dict(zip(header, line.split(), strict=True)) for line in table[1:]]
    assert [(r["backfill_id"], r["dry_run"]) for r in rows] == [("2", "False"), ("1", "True")]


def test_a_failed_run_s_seconds_are_rounded_like_a_finished_run_s(
        state_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(state_db, autocommit=True, row_factory=dict_row) as conn:
        run_id, _ = start_run(conn, "orders", None)
        fail_run(conn, run_id, "boom", 0.037412806996144354)
        assert conn.execute("SELECT seconds FROM trueup.runs WHERE run_id = %s",
                            (run_id,)).fetchone() == {"seconds": 0.037}
        # one recorded before fail_run rounded: status rounds it
        conn.execute("INSERT INTO trueup.runs (reconciliation, status, seconds, error) "
                     "VALUES ('orders', 'failed', 1.23456789, 'old')")
    assert main(["--config", str(_config(tmp_path, state_db)), "status", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["seconds"] for r in runs) == [0.037, 1.235]


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("command", [
    ["status"], ["status", "--json"], ["lineage", "orders", "7"],
    ["lineage", "orders", "7", "--json"], ["diff", "orders", "--show"],
    ["diff", "orders", "--json"], ["--help"]])
def test_a_reader_that_closes_stdout_ends_any_command_quietly_with_141(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, command: list[str],
        unbuffered: str) -> None:
    """`trueup lineage orders 7 | true`, `trueup status | head -1`: "trueup: unexpected
    error: BrokenPipeError", a traceback, exit 2; buffered, "Exception ignored ...
    BrokenPipeError" at exit. As SIGPIPE ends other programs: nothing said, 141."""
    source = new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, v int, note text)")
        conn.execute("CREATE TABLE orders_copy (LIKE orders INCLUDING ALL)")
        conn.execute("INSERT INTO orders SELECT g, 1, 'n' FROM generate_series(1, 3000) g")
    path = _config(tmp_path, state_db, source)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered, "TRUEUP_LOG_LEVEL": "warning"}
    try:
        done = subprocess.run([sys.executable, "-m", "trueup.cli", "--config", str(path),
                               *command], stdout=write, stderr=subprocess.PIPE, text=True,
                              env=env, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    for said in ("Traceback", "BrokenPipe", "unexpected error", "Exception ignored"):
        assert said not in done.stderr, done.stderr
    if command[0] != "diff":
        assert done.stderr == ""
    elif "--show" in command:  # cut short while it ran: recorded failed, as on a signal
        with psycopg.connect(state_db) as conn:
            assert conn.execute("SELECT status, error FROM trueup.runs").fetchall() == [
                ("failed", "interrupted (OutputClosed)")]
