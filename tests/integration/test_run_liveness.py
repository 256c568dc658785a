"""A diff whose process dies (kill -9, an OOM kill) leaves no run ``running``: the next diff of
the reconciliation, and ``trueup status``, mark it failed; a run going on alongside is left
alone (its process holds the run's advisory lock, see trueup.runs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from trueup.backfill import BackfillOptions, start_backfill
from trueup.config import Config, load_config
from trueup.diff import diff
from trueup.errors import UsageError
from trueup.runs import start_run
from trueup.state import open_state
from trueup.status import status
from trueup.statuses import BackfillScope

pytestmark = pytest.mark.postgres

TRUEUP = Path(sys.executable).parent / "trueup"
PROCESS_DIED = "process died (no longer running)"


def _setup(new_db: Callable[[], str], state: str, tmp_path: Path) -> Config:
    source, target = new_db(), new_db()
    for dsn, table in ((source, "orders"), (target, "copy")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.{table} (id bigint PRIMARY KEY, "
                         "version bigint NOT NULL, status text)")
            conn.execute(f"INSERT INTO public.{table} SELECT g, 1, 'a' "
                         "FROM generate_series(1, 50) g")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders VALUES (51, 1, 'a')")  # one missing
    ends = {"key": ["id"], "version": "version", "columns": ["status"]}
    path = tmp_path / "trueup.yaml"
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"orders": {"source": {"connection": "a", "table": "orders", **ends},
                                       "target": {"connection": "b", "table": "copy", **ends},
                                       "repair": "upsert"}}}))
    return load_config(path)


@contextmanager
def _target_locked(config: Config) -> Iterator[None]:
    """Diffs started meanwhile wait on their first query of the target, their run running."""
    target = config.connections["b"].postgres
    assert target is not None
    with psycopg.connect(target) as conn:
        conn.execute("LOCK TABLE public.copy IN ACCESS EXCLUSIVE MODE")
        yield


def _start_diff(config: Config, state: str, runs_before: int) -> subprocess.Popen[str]:
    """``trueup diff orders`` in a process of its own, once its run is recorded."""
    process = subprocess.Popen([str(TRUEUP), "--config", str(config.path), "diff", "orders"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with psycopg.connect(state) as conn:
        deadline = time.monotonic() + 60
        while _one(conn, "SELECT count(*) FROM trueup.runs") <= runs_before:
            assert time.monotonic() < deadline and process.poll() is None, \
                process.communicate()
            time.sleep(0.05)
    return process


def _kill(process: subprocess.Popen[str], state: str, *, leaving: int = 0) -> None:
    """SIGKILL: nothing of trueup's runs after it. Returns once its state session is gone
    (``leaving``: the sessions of other diffs, which stay)."""
    process.kill()
    process.communicate(timeout=30)
    with psycopg.connect(state, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while _one(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                         "AND datname = current_database()") > leaving:
            assert time.monotonic() < deadline, "the killed diff's state session stayed"
            time.sleep(0.05)


def _one(conn: psycopg.Connection[Any], statement: str) -> Any:
    row = conn.execute(statement.encode()).fetchone()
    assert row is not None
    return row[0]


def _runs(state: str) -> dict[int, tuple[str, str | None, bool]]:
    with psycopg.connect(state) as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
            "SELECT run_id, status, error, finished_at IS NOT NULL FROM trueup.runs")}


def _status(config: Config) -> tuple[dict[str, Any], str]:
    base = [str(TRUEUP), "--config", str(config.path), "status"]
    document = subprocess.run([*base, "--json"], capture_output=True, text=True, check=True)
    text = subprocess.run(base, capture_output=True, text=True, check=True)
    return json.loads(document.stdout), text.stdout


def test_the_next_diff_marks_a_killed_diff_s_run_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config = _setup(new_db, state_db, tmp_path)
    with _target_locked(config):
        killed = _start_diff(config, state_db, 0)
        _kill(killed, state_db)
    assert _runs(state_db) == {1: ("running", None, False)}, "the kill left it running"
    summary = diff(config, "orders")
    assert summary.run_id == 2 and summary.missing == 1
    assert _runs(state_db) == {1: ("failed", PROCESS_DIED, True), 2: ("succeeded", None, True)}
    # a backfill of it is refused as one of any failed run
    with pytest.raises(UsageError, match="run 1 is failed"):
        start_backfill(config, "orders", BackfillOptions(scope=BackfillScope.RUN, run_id=1))


def test_status_marks_a_killed_diff_s_run_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config = _setup(new_db, state_db, tmp_path)
    with _target_locked(config):
        _kill(_start_diff(config, state_db, 0), state_db)
    document, text = _status(config)
    [run] = document["runs"]
    assert (run["run_id"], run["status"], run["error"]) == (1, "failed", PROCESS_DIED)
    assert run["finished_at"] is not None
    [row] = [line.split() for line in text.splitlines() if line.split()[:2] == ["1", "orders"]]
    assert row[3] == "failed" and f"run 1: {PROCESS_DIED}" in text
    assert _runs(state_db) == {1: ("failed", PROCESS_DIED, True)}, "recorded, not only shown"


def test_a_live_run_alongside_is_never_marked_failed(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config = _setup(new_db, state_db, tmp_path)
    with _target_locked(config):
        live = _start_diff(config, state_db, 0)  # run 1, waiting on the target: alive
        try:
            _kill(_start_diff(config, state_db, 1), state_db, leaving=1)  # run 2
            document, _ = _status(config)
            assert {r["run_id"]: r["status"] for r in document["runs"]} == {
                1: "running", 2: "failed"}
            # a diff of the same reconciliation starting meanwhile (the engine's start)
            with psycopg.connect(state_db, row_factory=psycopg.rows.dict_row) as conn:
                run_id, _ = start_run(conn, "orders", None)
                assert run_id == 3
                assert _runs(state_db) == {1: ("running", None, False),
                                           2: ("failed", PROCESS_DIED, True),
                                           3: ("running", None, False)}
                assert live.poll() is None
        except BaseException:
            live.kill()
            raise
    _, err = live.communicate(timeout=60)
    assert live.returncode == 1, err  # differences found: its run finished as its own
    assert _runs(state_db)[1] == ("succeeded", None, True)
    # run 3's session closed with the test's connection: the next diff marks it failed
    diff(config, "orders")
    assert _runs(state_db)[3] == ("failed", PROCESS_DIED, True)


def test_status_shows_a_killed_diff_s_run_failed_to_a_session_that_may_not_write(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    config = _setup(new_db, state_db, tmp_path)
    with _target_locked(config):
        _kill(_start_diff(config, state_db, 0), state_db)
    read_only = state_db + "?options=-c%20default_transaction_read_only%3Don"
    with open_state(read_only) as conn:
        [run] = status(conn)["runs"]
    assert (run["run_id"], run["status"], run["error"]) == (1, "failed", PROCESS_DIED)
    assert _runs(state_db) == {1: ("running", None, False)}, "shown only: it may not write"
    _status(config)
    assert _runs(state_db) == {1: ("failed", PROCESS_DIED, True)}
