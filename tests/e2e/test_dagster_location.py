"""The Dagster code location: it validates, and a real ``dagster dev`` lists its assets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).parent / "dagster")
EXAMPLE = str(REPO / "examples" / "trueup.yaml")
STARTUP_SECONDS = 120

pytestmark = pytest.mark.dagster

EXPECTED_ASSETS = {
    ("postgres", "shop", "public", "orders"),          # shared by both reconciliations
    ("postgres", "billing", "billing", "invoices"),
    ("kafka", "bus", "orders_v1"),
    ("kafka", "bus", "orders_v1_dlq"),
    ("rabbitmq", "amqp", "payments_settle_dlq"),
}


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "DAGSTER_HOME": str(home), "TRUEUP_CONFIG": EXAMPLE}


def test_definitions_validate_passes(tmp_path: Path) -> None:
    done = subprocess.run([DAGSTER, "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All code locations passed validation" in done.stderr + done.stdout


def test_definitions_share_one_node_per_physical_table() -> None:
    os.environ.setdefault("TRUEUP_CONFIG", EXAMPLE)
    from pipelines.definitions import defs

    keys = {tuple(k.path) for k in defs.resolve_all_asset_keys()}
    assert keys >= EXPECTED_ASSETS, EXPECTED_ASSETS - keys
    orders = [k for k in keys if k[-1] == "orders"]
    assert orders == [("postgres", "shop", "public", "orders")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[str]:
    """A ``dagster dev`` of the example config on a free local port; its base URL."""
    port = _free_port()
    log = (tmp_path / "dagster-dev.log").open("w")
    process = subprocess.Popen(
        [DAGSTER, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not answer in time"
            time.sleep(1)
        yield url
    finally:
        # dagster dev stops its webserver and daemon on SIGTERM; they share its session.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _graphql(url: str, query: str) -> dict[str, object]:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_dagster_dev_serves_the_example_assets(dagster_dev: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        result = _graphql(dagster_dev, "{ assetNodes { assetKey { path } } }")
        nodes = (result.get("data") or {}).get("assetNodes") or []  # type: ignore[union-attr]
        keys = {tuple(n["assetKey"]["path"]) for n in nodes}
        if keys >= EXPECTED_ASSETS or time.monotonic() > deadline:
            break
        time.sleep(1)  # the code location may still be loading
    assert keys >= EXPECTED_ASSETS, f"missing {EXPECTED_ASSETS - keys}; got {result}"
