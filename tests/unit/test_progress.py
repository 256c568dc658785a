"""Progress output: a bar on a terminal, throttled log events elsewhere."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from trueup import log
from trueup import progress as progress_module
from trueup.progress import ProgressBar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def events(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """The log events written since the last call, logs configured as JSON (as on a
    non-terminal stderr)."""
    log.configure(level="info", as_json=True)
    capsys.readouterr()

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    return read


def _progress(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("at", "level", "logger")}


def test_progress_is_logged_as_events_when_not_a_terminal(
        events: Callable[[], list[dict[str, Any]]]) -> None:
    """Plain lines sat among the JSON ones: a log pipeline parsing JSON could not read them."""
    out = io.StringIO()
    bar = ProgressBar(out)
    assert bar.mode == "plain"
    bar("checksums", 0, 10)
    bar("checksums", 10, 10)
    assert out.getvalue() == ""
    logged = events()
    assert [_progress(e) for e in logged] == [
        {"event": "progress", "phase": "checksums", "done": 0, "total": 10},
        {"event": "progress", "phase": "checksums", "done": 10, "total": 10}]
    assert {(e["level"], e["logger"]) for e in logged} == {("info", "trueup.progress")}


def test_progress_events_are_throttled_but_first_and_last_always_show(
        monkeypatch: pytest.MonkeyPatch, events: Callable[[], list[dict[str, Any]]]) -> None:
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    bar = ProgressBar(io.StringIO(), interval_seconds=5.0)
    for done in range(0, 100):
        now[0] += 0.1  # 100 updates over 10 s
        bar("segments", done, 100)
    bar("segments", 100, 100)
    done = [e["done"] for e in events()]
    assert done[0] == 0 and done[-1] == 100
    assert 3 <= len(done) <= 4, done


def test_extra_fields_are_logged_as_fields(events: Callable[[], list[dict[str, Any]]]) -> None:
    ProgressBar(io.StringIO())("chunks", 1, 4, repaired=10, rows_per_s=12.345)
    (event,) = events()
    assert _progress(event) == {"event": "progress", "phase": "chunks", "done": 1, "total": 4,
                                "repaired": 10, "rows_per_s": 12.3}


def test_progress_reads_as_key_value_pairs_in_the_text_format(
        capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(level="info", as_json=False)
    try:
        capsys.readouterr()
        ProgressBar(io.StringIO(), mode="plain")("letters", 3, 3)
        assert capsys.readouterr().err.rstrip().endswith(
            "info  progress phase=letters done=3 total=3")
    finally:
        log.configure(level="info", as_json=True)


def test_a_bar_is_drawn_in_place_on_a_terminal_and_ends_with_a_newline() -> None:
    out = _Tty()
    bar = ProgressBar(out, interval_seconds=0.0)
    assert bar.mode == "bar"
    bar("checksums", 5, 10)
    bar("checksums", 10, 10)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "5/10" in text and "10/10" in text and "100%" in text
    assert "#" * progress_module.BAR_WIDTH in text


def test_a_bar_with_unknown_total_shows_a_count_and_rate() -> None:
    out = _Tty()
    bar = ProgressBar(out, interval_seconds=0.0)
    bar("rows", 5000, 0)
    bar.close()
    assert "rows" in out.getvalue() and "5000 done" in out.getvalue()
    assert out.getvalue().endswith("\n")


def test_a_new_phase_starts_on_a_new_line() -> None:
    out = _Tty()
    bar = ProgressBar(out, interval_seconds=0.0)
    bar("mirror", 3, 0)
    bar("checksums", 1, 2)
    assert out.getvalue().count("\n") == 1


def test_off_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUEUP_PROGRESS", "off")
    out = _Tty()
    bar = ProgressBar(out)
    bar("checksums", 1, 2)
    bar.close()
    assert out.getvalue() == ""


def test_the_environment_can_force_plain_lines_on_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUEUP_PROGRESS", "plain")
    assert ProgressBar(_Tty()).mode == "plain"


def test_every_update_is_progress_for_readiness_even_when_not_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A diff or backfill with TRUEUP_METRICS_PORT set answered 503 ("no progress") while
    it moved, for only a worker's loop, a chunk or a replay batch counted."""
    from trueup.health import HEALTH

    marks: list[str] = []
    monkeypatch.setattr(HEALTH, "progressed", lambda: marks.append("x"))
    bar = ProgressBar(mode="off")
    bar("checksums", 1, 10)
    bar("checksums", 2, 10)
    assert marks == ["x", "x"]
