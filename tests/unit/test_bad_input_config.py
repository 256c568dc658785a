"""Bad input to the config and to GX suite files: one line naming the file, never a traceback
(a file not UTF-8, YAML nested past Python's stack, a name YAML reads as a boolean or null)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trueup.config import load_config, parse_config
from trueup.errors import ConfigError, ConfigErrors
from trueup.quality import load_suites, read_suite

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "trueup.yaml"
DEEP = 3000  # far past the few hundred levels PyYAML's recursive composer follows


def _suite(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "suites"
    folder.mkdir()
    path = folder / "a.yaml"
    path.write_bytes(b"connection: shop\ntable: orders\n" + content)
    return path


def test_a_suite_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """`trueup validate` printed "unexpected error: UnicodeDecodeError" with a traceback."""
    path = _suite(tmp_path, b"\xff\n")
    expected = f"{path}: the suite file is not UTF-8 text: invalid start byte at byte 31"
    with pytest.raises(ConfigError) as caught:
        read_suite(path)
    assert str(caught.value) == expected
    with pytest.raises(ConfigError) as caught:
        load_suites(path.parent)
    assert str(caught.value) == expected


@pytest.mark.parametrize(("content", "problem"), [
    (b"x: " + b"[" * DEEP + b"]" * DEEP + b"\n", "lists or mappings nested too deeply"),
    (b"x: !!int abc\n", "cannot read 'abc' as !!int"),
])
def test_a_suite_yaml_cannot_be_read_from_is_one_line(tmp_path: Path, content: bytes,
                                                      problem: str) -> None:
    """A RecursionError (from PyYAML's composer) and a ValueError (from its !!int
    constructor) reached the CLI as an unexpected error with a traceback."""
    path = _suite(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_suites(path.parent)
    assert str(caught.value) == f"{path}: expected a readable YAML suite ({problem})"


def test_a_config_nested_too_deeply_is_one_line_naming_the_line() -> None:
    """About 500 nested `[` made every command print "unexpected error: RecursionError"."""
    text = EXAMPLE.read_text()
    line = text.count("\n") + 1
    deep = text + f"x_deep: {'[' * DEEP}{']' * DEEP}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(deep, "trueup.yaml", {})
    assert str(caught.value) == (f"trueup.yaml: line {line}: expected valid YAML (lists or "
                                 f"mappings nested too deeply)")
    # nesting PyYAML can follow is YAML like any other: the field's own error
    with pytest.raises(ConfigErrors, match=r"^trueup.yaml: x_deep: unknown field"):
        parse_config(text + f"x_deep: {'[' * 200}{']' * 200}\n", "trueup.yaml", {})


def test_cli_prints_a_config_nested_too_deeply_as_one_line_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "trueup.yaml"
    config.write_text(f"state: {'[' * DEEP}{']' * DEEP}\n")
    done = subprocess.run([sys.executable, "-m", "trueup.cli", "--config", str(config),
                           "status"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"{config}: line 1: expected valid YAML (lists or mappings nested "
                           f"too deeply)\n")


@pytest.mark.parametrize(("section", "written", "expected"), [
    ("reconciliations", "no", "reconciliations.false: expected a name (got false: YAML reads "
                              "an unquoted no, off or false as false; quote it)"),
    ("dead_letters", "on", "dead_letters.true: expected a name (got true: YAML reads an "
                           "unquoted yes, on or true as true; quote it)"),
    ("connections", "null", "connections.null: expected a name (got null: YAML reads an "
                            "unquoted null or ~ as null; quote it)"),
    ("connections", "~", "connections.null: expected a name (got null: YAML reads an unquoted "
                         "null or ~ as null; quote it)"),
    ("connections", "5", "connections.5: expected a name (got 5: YAML reads it as a number; "
                         "quote it)"),
    ("connections", "2026-01-01", "connections.2026-01-01: expected a name (got 2026-01-01: "
                                  "YAML reads it as a date; quote it)"),
    # a quoted name is the text it looks like
    ("connections", '"None"', "connections.None: expected exactly one of postgres, kafka or "
                              "rabbitmq"),
])
def test_a_name_yaml_reads_as_no_text_is_shown_as_written_and_told_to_be_quoted(
        section: str, written: str, expected: str) -> None:
    """`reconciliations: {no: ...}` said `reconciliations[0]: expected a string (got False)`,
    `dead_letters: {on: ...}` `dead_letters[1]`, `connections: {null: ...}` `connections.None`:
    pydantic's location holds the key as it read it, and the message Python's repr."""
    text = EXAMPLE.read_text()
    bad = text.replace(f"\n{section}:\n", f"\n{section}:\n  {written}: {{}}\n", 1)
    assert bad != text
    with pytest.raises(ConfigErrors) as caught:
        parse_config(bad, "trueup.yaml", {})
    assert str(caught.value).splitlines() == [f"trueup.yaml: {expected}"]


def test_a_config_file_not_utf8_keeps_its_one_line(tmp_path: Path) -> None:
    """The wording the suite's message reuses."""
    path = tmp_path / "trueup.yaml"
    path.write_bytes(b"state: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: the config file is not UTF-8 text: invalid start "
                                 f"byte at byte 7")
