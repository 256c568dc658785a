"""deploy/dagster.yaml is a valid Dagster instance that keeps its storage in Postgres."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.postgres, pytest.mark.dagster]


def test_the_example_dagster_yaml_opens_an_instance_on_postgres(
        empty_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.instance import DagsterInstance

    url = urlsplit(empty_db)
    for key, value in {"DAGSTER_PG_HOST": url.hostname or "127.0.0.1",
                       "DAGSTER_PG_PORT": str(url.port or 5432),
                       "DAGSTER_PG_USER": url.username or "postgres",
                       "DAGSTER_PG_PASSWORD": url.password or "",
                       "DAGSTER_PG_DB": url.path.lstrip("/")}.items():
        monkeypatch.setenv(key, value)
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")

    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert list(instance.get_runs()) == []
    finally:
        instance.dispose()


def test_the_demo_s_dagster_yaml_queues_runs_on_sqlite(tmp_path: Path) -> None:
    from dagster._core.instance import DagsterInstance

    shutil.copy(REPO / "examples" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    finally:
        instance.dispose()
