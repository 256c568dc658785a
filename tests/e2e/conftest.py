"""A real ``dagster dev`` (webserver and daemon) for end-to-end tests, and a GraphQL client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import unused_port

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).parent / "dagster")
STARTUP_SECONDS = 180
SHUTDOWN_GRACE_SECONDS = 10


def dagster_env(tmp_path: Path, config: Path, instance: Path | None = None) -> dict[str, str]:
    """The environment of a Dagster process on ``config``, its instance a fresh folder (with
    ``instance`` as its dagster.yaml when given)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    # No usage statistics: nothing outside answers here, and no test should wait on it.
    (home / "dagster.yaml").write_text(instance.read_text() if instance is not None
                                       else "telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home), "TRUEUP_CONFIG": str(config),
            "GX_ANALYTICS_ENABLED": "false"}


@contextlib.contextmanager
def dagster_dev(tmp_path: Path, config: Path, instance: Path | None = None) -> Iterator[str]:
    """Run ``dagster dev`` on ``config`` on a free local port (``instance``: its
    dagster.yaml); yield its base URL."""
    port = unused_port()
    log_path = tmp_path / "dagster-dev.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [DAGSTER, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=dagster_env(tmp_path, config, instance), stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(
                        f"{url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    f"dagster dev did not answer in {STARTUP_SECONDS} s; its log ends:\n"
                    + log_path.read_text()[-3000:])
                time.sleep(1)
            yield url
        finally:
            # The whole session we started: dagster dev, its webserver, daemon and code
            # server. Its webserver can take a minute to honour SIGTERM; this instance is
            # throwaway, so after a short grace the group is killed outright.
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=SHUTDOWN_GRACE_SECONDS)
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        result: dict[str, Any] = json.loads(response.read())
    assert not result.get("errors"), result["errors"]
    return result["data"]  # type: ignore[no-any-return]


def wait_for(what: str, probe: Any, seconds: float = STARTUP_SECONDS) -> Any:
    """Call ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN = """
query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }
"""
REPOSITORIES = """
{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }
"""


def launch_job(url: str, job: str, run_config: dict[str, Any] | None = None,
               partition: str | None = None) -> str:
    """Launch ``job`` of the only code location with ``run_config``; its run id."""
    (repo,) = graphql(url, REPOSITORIES)["repositoriesOrError"]["nodes"]
    params: dict[str, Any] = {
        "selector": {"repositoryLocationName": repo["location"]["name"],
                     "repositoryName": repo["name"], "jobName": job},
        "runConfigData": run_config or {}}
    if partition is not None:
        params["executionMetadata"] = {"tags": [{"key": "dagster/partition",
                                                 "value": partition}]}
    launched = graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return str(launched["run"]["runId"])
