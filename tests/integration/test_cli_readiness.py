"""A ``trueup`` command serving metrics (TRUEUP_METRICS_PORT): its /readyz checks what the
command depends on (the state database; for ``replay`` and ``dlq`` the dead-letter queue's
broker), not its progress alone."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dsn_for, unused_port
from tests.integration.test_workers_support import write_config
from trueup import cli
from trueup.config import Config
from trueup.health import HEALTH

pytestmark = pytest.mark.postgres


@pytest.fixture
def fresh_health() -> Iterator[None]:
    """Readiness checks of this test only (the process keeps one set)."""
    HEALTH.clear()
    yield
    HEALTH.clear()


def _readiness_during(command: str, config: str, name: str,
                      monkeypatch: pytest.MonkeyPatch) -> tuple[int, Any]:
    """Run ``trueup COMMAND NAME`` with a stub command that asks the process's own /readyz;
    (status, body) of that answer."""
    port = unused_port()
    seen: list[tuple[int, Any]] = []

    def ask_readiness(config: Config, args: argparse.Namespace) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=15) as reply:
                seen.append((reply.status, json.loads(reply.read())))
        except urllib.error.HTTPError as exc:
            seen.append((exc.code, json.loads(exc.read())))
        return 0

    monkeypatch.setitem(cli.COMMANDS, command, ask_readiness)
    monkeypatch.setenv(cli.METRICS_PORT_ENV, str(port))
    assert cli.main(["--config", config, command, name]) == 0
    assert len(seen) == 1
    return seen[0]


@pytest.mark.rabbitmq
def test_a_replay_serving_metrics_is_ready_when_its_database_and_broker_answer(
        state_db: str, kafka_bootstrap: str, amqp_url: str, tmp_path: Path,
        fresh_health: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz of a command checked its progress only: a replay whose state database or broker
    was away answered ready."""
    config = write_config(tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"payments_dlq": {"connection": "amqp",
                                                         "queue": "payments.dlq"}})
    status, body = _readiness_during("replay", config, "payments_dlq", monkeypatch)
    assert (status, body["checks"]) == (200, {"database": "ok", "rabbitmq": "ok",
                                              "progress": "ok"}), body
    assert HEALTH.readiness().checks == {"progress": "ok"}, (
        "the command's checks outlived it")


@pytest.mark.kafka
def test_a_dlq_command_serving_metrics_is_not_ready_when_its_database_is_away(
        kafka_bootstrap: str, amqp_url: str, tmp_path: Path, fresh_health: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, state=dsn_for("trueup_no_such_database"),
                          bootstrap=kafka_bootstrap, amqp=amqp_url,
                          dead_letters={"orders_dlq": {"connection": "bus",
                                                       "topic": "orders.dlq"}})
    status, body = _readiness_during("dlq", config, "orders_dlq", monkeypatch)
    assert status == 503, body
    assert body["checks"]["database"].startswith("database unreachable"), body
    assert body["checks"]["kafka"] == "ok" and body["checks"]["progress"] == "ok", body
