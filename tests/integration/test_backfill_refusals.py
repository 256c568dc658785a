"""Backfills refused before anything is written: a resume (or a worker joining a running
backfill) under a config whose reconciliation may no longer be repaired, and a lease from the
environment that no state database can hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_backfill_support import (
    drift,
    make_tables,
    planned,
    source_rows,
    target_rows,
    write_config,
)
from trueup.backfill import (
    LEASE_ENV,
    MAX_LEASE_SECONDS,
    cancel_backfill,
    lease_seconds,
    resume_backfill,
)
from trueup.cli import main
from trueup.errors import UsageError

pytestmark = pytest.mark.postgres


def _state_of(state: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """(backfill_id, status) of every backfill and (chunk, status) of every chunk."""
    with psycopg.connect(state) as conn:
        backfills = [tuple(r) for r in conn.execute(
            "SELECT backfill_id, status FROM trueup.backfills ORDER BY backfill_id")]
        chunks = [tuple(r) for r in conn.execute(
            "SELECT chunk, status FROM trueup.chunks ORDER BY chunk")]
    return backfills, chunks


@pytest.mark.parametrize("cancelled", [True, False], ids=["reopened", "joined"])
def test_a_resume_under_repair_none_is_refused_as_planning_is_and_writes_nothing(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], cancelled: bool) -> None:
    source, target = new_db(), new_db()
    config, backfill_id = planned(tmp_path, state_db, source, target, 30, 5)
    if cancelled:  # reopened by a resume; else a resume joins the (unserved) running one
        cancel_backfill(config, backfill_id)
    before_target, before_state = target_rows(target), _state_of(state_db)
    assert before_target != source_rows(source), "the target was expected to be drifted"

    # the operator turns repairs off for the reconciliation
    config = write_config(tmp_path, state_db, source, target, repair="none")
    path = str(config.path)
    capsys.readouterr()  # the log lines of the setup
    assert main(["--config", path, "backfill", "orders", "--all"]) == 2
    planning = capsys.readouterr().err.splitlines()
    assert len(planning) == 1 and "reconciliations.orders.repair: is none" in planning[0], \
        f"expected planning to be refused in one line, got {planning}"

    assert main(["--config", path, "backfill", "--resume", str(backfill_id)]) == 2
    resumed = capsys.readouterr().err.splitlines()
    assert resumed == planning, f"expected the resume refused as planning is, got {resumed}"
    # the engine refuses it too (Dagster's retried runs resume through it)
    with pytest.raises(UsageError) as refused:
        resume_backfill(config, backfill_id)
    assert str(refused.value) == planning[0]

    assert target_rows(target) == before_target, "expected nothing written to the target"
    assert _state_of(state_db) == before_state, \
        "expected the backfill and its chunks left as they were (not reopened, none served)"


@pytest.mark.parametrize("value", ["1e300", "86401", "1e9"])
def test_a_lease_too_long_for_the_state_database_is_refused_before_anything_is_planned(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        value: str) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 30)
    drift(target)
    before = target_rows(target)
    config = write_config(tmp_path, state_db, source, target)
    monkeypatch.setenv(LEASE_ENV, value)
    capsys.readouterr()  # the log lines of the setup
    assert main(["--config", str(config.path), "backfill", "orders", "--all",
                 "--chunk-size", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    expected = (f"{LEASE_ENV}: expected a number of seconds from 1 to {MAX_LEASE_SECONDS:g} "
                f"(got {value!r})")
    assert err == [expected], f"expected one line naming the variable and its range, got {err}"
    assert _state_of(state_db) == ([], []), "expected no backfill planned"
    assert target_rows(target) == before, "expected nothing written to the target"
    # what Dagster's backfill job asks before it plans or resumes
    with pytest.raises(UsageError) as refused:
        lease_seconds()
    assert str(refused.value) == expected


def test_the_longest_lease_serves_a_backfill(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, 30)
    drift(target)
    config = write_config(tmp_path, state_db, source, target)
    monkeypatch.setenv(LEASE_ENV, f"{MAX_LEASE_SECONDS:g}")
    assert lease_seconds() == MAX_LEASE_SECONDS
    assert main(["--config", str(config.path), "backfill", "orders", "--all",
                 "--chunk-size", "5"]) == 1  # 1: the row newer in the target is skipped
    backfills, chunks = _state_of(state_db)
    assert [status for _, status in backfills] == ["succeeded"]
    assert {status for _, status in chunks} == {"done"}
