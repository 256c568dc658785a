"""Progress output: a bar on a terminal, throttled plain lines elsewhere."""

from __future__ import annotations

import io

import pytest

from trueup import progress as progress_module
from trueup.progress import ProgressBar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    assert bar.mode == "plain"
    bar("checksums", 0, 10)
    bar("checksums", 10, 10)
    assert out.getvalue().splitlines() == ["progress phase=checksums done=0 total=10",
                                           "progress phase=checksums done=10 total=10"]


def test_plain_lines_are_throttled_but_first_and_last_always_show(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = ProgressBar(out, interval_seconds=5.0)
    for done in range(0, 100):
        now[0] += 0.1  # 100 updates over 10 s
        bar("segments", done, 100)
    bar("segments", 100, 100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress phase=segments done=0 total=100"
    assert lines[-1] == "progress phase=segments done=100 total=100"
    assert 3 <= len(lines) <= 4, lines


def test_extra_fields_are_printed_as_key_value() -> None:
    out = io.StringIO()
    ProgressBar(out)("chunks", 1, 4, repaired=10, rows_per_s=12.345)
    assert out.getvalue() == "progress phase=chunks done=1 total=4 repaired=10 rows_per_s=12.3\n"


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
