"""``trueup diff`` while rows are being copied, and when it is stopped mid-pass."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from trueup import diff as diff_module
from trueup import segments
from trueup.config import Config, load_config
from trueup.diff import diff
from trueup.runs import Difference, differences_of

pytestmark = pytest.mark.postgres

OLD = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # long before any run's grace


def _tables(new_db: Callable[[], str], key_type: str) -> tuple[str, str]:
    """``orders`` of a new source and ``copy`` of a new target, keyed by ``key_type``: key 1 and
    2 stale (source version 2, target 1), 3 ahead (source 1, target 5), all updated long ago."""
    source, target = new_db(), new_db()
    rows = [(1, 2, 1), (2, 2, 1), (3, 1, 5)]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.orders (id {key_type} PRIMARY KEY, version bigint, "
                     "status text, updated_at timestamptz)")
        for key, version, _ in rows:
            conn.execute("INSERT INTO public.orders VALUES (%s, %s, 'a', %s)",
                         (str(key) if key_type == "text" else key, version, OLD))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.copy (id {key_type} PRIMARY KEY, version bigint, "
                     "status text)")
        for key, _, version in rows:
            conn.execute("INSERT INTO public.copy VALUES (%s, %s, 'a')",
                         (str(key) if key_type == "text" else key, version))
    return source, target


def _config(tmp_path: Path, state: str, source: str, target: str) -> Config:
    path = tmp_path / "trueup.yaml"
    ends = {"key": ["id"], "version": "version", "columns": ["status"]}
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"orders": {
            "source": {"connection": "a", "table": "orders", "updated_at": "updated_at",
                       **ends},
            "target": {"connection": "b", "table": "copy", **ends},
            "grace": "60s"}}}))
    return load_config(path)


def _update_and_copy(source: str, target: str, key: Any) -> None:
    """What a replicator does to a row: the source updated (version 3, now), then its copy."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET version = 3, updated_at = now() WHERE id = %s",
                     (key,))
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE public.copy SET version = 3 WHERE id = %s", (key,))


def _stored(config: Config, run_id: int) -> dict[Any, tuple[str, Any, Any]]:
    with psycopg.connect(config.state) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return {d.key[0]: (d.cls.value, d.source_version, d.target_version)
                for d in differences_of(conn, run_id)}


@pytest.mark.parametrize("key_type", ["bigint", "text"])
def test_a_whole_table_run_sees_a_row_copied_between_its_reads_of_both_sides_as_it_is_now(
        key_type: str, new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides' rows are read at once, each on its connection: row 1, updated in the source
    and copied after the source was read but before the target was, paired its old source row
    (version 2, updated long ago: not in flight) with its new copy (version 3), ``ahead``.
    The source's read here ends before the target's begins, every time (a bigint key's
    segments are read by key range, a text key's streamed from one scan)."""
    source, target = _tables(new_db, key_type)
    config = _config(tmp_path, state_db, source, target)
    key = "1" if key_type == "text" else 1
    source_read = threading.Event()

    def copied_after_the_source_is_read(side: Any) -> None:
        if side.label == "source" and not source_read.is_set():
            _update_and_copy(source, target, key)
            source_read.set()
        elif side.label == "target":
            assert source_read.wait(30), "the source's rows were never read"

    rows_in_segments, segment_rows = segments.rows_in_segments, segments.segment_rows

    def rows_then_copy(conn: Any, side: Any, *args: Any, **kwargs: Any) -> Any:
        if side.label == "target":
            copied_after_the_source_is_read(side)
        rows = rows_in_segments(conn, side, *args, **kwargs)
        if side.label == "source":
            copied_after_the_source_is_read(side)
        return rows

    def streamed_then_copy(conn: Any, side: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if side.label == "target":
            copied_after_the_source_is_read(side)
        stream = segment_rows(conn, side, *args, **kwargs)
        first = next(stream, None)  # the whole scan is done by the first row
        if side.label == "source":
            copied_after_the_source_is_read(side)
        if first is not None:
            yield first
            yield from stream

    monkeypatch.setattr(segments, "rows_in_segments", rows_then_copy)
    monkeypatch.setattr(segments, "segment_rows", streamed_then_copy)
    summary = diff(config, "orders")
    assert source_read.is_set(), "the run read no rows of differing segments"
    stored = _stored(config, summary.run_id)
    # row 1 is equal now (both at version 3); 2 and 3 differ however they are read
    assert stored == {"2" if key_type == "text" else 2: ("stale", 2, 1),
                      "3" if key_type == "text" else 3: ("ahead", 1, 5)}, stored
    assert (summary.ahead, summary.stale, summary.in_flight) == (1, 1, 0)


def test_a_row_copied_between_the_second_reads_of_both_sides_is_in_flight_not_ahead(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A difference is read again from both sides before it is reported. Read the source
    first, a row updated and copied between the two reads paired its old source row (version
    2, updated long ago) with its new copy (version 3): ``ahead``. Read the target first,
    the source is at least as new as its copy: here newer, updated within ``grace``."""
    source, target = _tables(new_db, "bigint")
    config = _config(tmp_path, state_db, source, target)
    rows_by_key = diff_module._rows_by_key
    reads: list[str] = []

    def copy_after_the_first_read(conn: Any, side: Any, *args: Any, **kwargs: Any) -> Any:
        rows = rows_by_key(conn, side, *args, **kwargs)
        reads.append(side.label)
        if len(reads) == 1:
            _update_and_copy(source, target, 1)
        return rows

    monkeypatch.setattr(diff_module, "_rows_by_key", copy_after_the_first_read)
    summary = diff(config, "orders")
    assert reads, "no difference was read again"
    stored = _stored(config, summary.run_id)
    assert stored == {1: ("in_flight", 3, 1), 2: ("stale", 2, 1), 3: ("ahead", 1, 5)}, stored


def _slow_target(new_db: Callable[[], str], tmp_path: Path, state: str) -> Path:
    """``orders`` of 2,000 rows, copied to a target whose every row takes 10 ms to read (a
    view calling pg_sleep on a compared column): its checksum pass lasts 20 s."""
    source, target = new_db(), new_db()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.orders SELECT g, 1, 'a' FROM generate_series(1, 2000) g")
        conn.execute("ANALYZE public.orders")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.copy_data (id bigint PRIMARY KEY, version bigint, "
                     "status text)")
        conn.execute("INSERT INTO public.copy_data SELECT g, 1, 'a' "
                     "FROM generate_series(1, 2000) g")
        # stable: a count of the view's rows calls it for none
        conn.execute("CREATE FUNCTION slow(x text) RETURNS text LANGUAGE plpgsql STABLE AS "
                     "$$ BEGIN PERFORM pg_sleep(0.01); RETURN x; END $$")
        conn.execute("CREATE VIEW public.copy AS SELECT id, version, slow(status) AS status "
                     "FROM public.copy_data")
    path = tmp_path / "trueup.yaml"
    ends = {"key": ["id"], "version": "version", "columns": ["status"]}
    path.write_text(yaml.safe_dump({
        "state": state,
        "connections": {"a": {"postgres": source}, "b": {"postgres": target}},
        "reconciliations": {"orders": {"source": {"connection": "a", "table": "orders", **ends},
                                       "target": {"connection": "b", "table": "copy",
                                                  **ends}}}}))
    return path


def _stopped(config: Path, signals: list[signal.Signals]) -> tuple[int, str, float]:
    """Run ``trueup diff orders`` and send it ``signals`` (0.2 s apart, while it runs) once
    its target's checksum pass is under way; its exit status, stderr and seconds after the
    first signal."""
    target = yaml.safe_load(config.read_text())["connections"]["b"]["postgres"]
    trueup = Path(sys.executable).parent / "trueup"
    process = subprocess.Popen([str(trueup), "--config", str(config), "diff", "orders"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(target, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'trueup diff orders' AND state = 'active' "
                    "AND query LIKE '%bit_xor%'").fetchone():
                assert time.monotonic() < deadline and process.poll() is None, \
                    "the target's checksum pass never began"
                time.sleep(0.05)
        time.sleep(0.5)
        signalled = time.monotonic()
        for i, signum in enumerate(signals):
            if i:
                time.sleep(0.2)
            if process.poll() is None:
                process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        return process.returncode, err, time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_during_the_checksum_pass_ends_the_diff_at_once(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """The pass's queries are cancelled: the run ends in a second, not when the server has
    read the whole table (20 s here; minutes on a big one, and a supervisor kills it)."""
    config = _slow_target(new_db, tmp_path, state_db)
    status, err, took = _stopped(config, [signal.SIGTERM])
    assert status == 128 + signal.SIGTERM, err
    assert took < 5, f"the diff took {took:.1f} s to end after SIGTERM: {err}"
    assert "error ignored" not in err, err
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT status, error FROM trueup.runs").fetchall() == [
            ("failed", "interrupted (Terminated)")]


def test_ctrl_c_twice_during_the_checksum_pass_ends_the_diff_at_once_and_cleanly(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Ctrl-C (twice, as an impatient user does) while the target's checksum pass runs: the
    diff ends within seconds, and no connection is closed under a transaction of another
    thread (``error ignored in rollback``)."""
    config = _slow_target(new_db, tmp_path, state_db)
    status, err, took = _stopped(config, [signal.SIGINT, signal.SIGINT])
    assert status == 128 + signal.SIGINT, err
    assert took < 5, f"the diff took {took:.1f} s to end after Ctrl-C: {err}"
    assert "error ignored" not in err, err


def test_found_differences_are_unchanged_by_settling(
        new_db: Callable[[], str], state_db: str, tmp_path: Path) -> None:
    """Without writes meanwhile, reading the differences again changes none of them (an
    orphan keeps its key)."""
    source, target = _tables(new_db, "bigint")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO public.copy VALUES (9, 1, 'a')")
    config = _config(tmp_path, state_db, source, target)
    found: list[Difference] = []
    summary = diff(config, "orders", on_difference=found.append)
    assert sorted((d.key, d.cls.value) for d in found) == [
        ([1], "stale"), ([2], "stale"), ([3], "ahead"), ([9], "orphan")]
    assert summary.orphan == 1
