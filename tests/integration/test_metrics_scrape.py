"""Known work, then a scrape of /metrics over HTTP: the figures match the work done."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_backfill_support import drift, make_tables, write_config
from trueup import metrics
from trueup.backfill import BackfillOptions, WorkerOptions, resume_backfill, start_backfill
from trueup.backfill.planner import plan
from trueup.cli import main
from trueup.state import open_state
from trueup.statuses import BackfillScope, BackfillStatus

pytestmark = pytest.mark.postgres

ROWS = 1000
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    running = metrics.serve_metrics(0)  # a free port on 127.0.0.1
    yield running
    running.close()


def scrape(server: metrics.MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        found = _SAMPLE.match(line)
        assert found, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(tuple(p.split("=", 1)) for p in
                           re.findall(r'[a-z_]+="[^"]*"', found["labels"] or ""))
        samples[(found["name"], frozenset((k, v.strip('"')) for k, v in labels))] = float(
            found["value"])
    return samples


def get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_diff_with_known_differences_shows_its_rows_and_classes_on_metrics(
        new_db: Callable[[], str], state_db: str, tmp_path: Path, server: metrics.MetricsServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    config = write_config(tmp_path, state_db, source, target)
    before = scrape(server)

    assert main(["--config", str(config.path), "diff", "orders", "--json"]) == 1
    out, err = capsys.readouterr()
    after = scrape(server)

    summary = json.loads(out)
    assert "progress phase=checksums" in err, "plain progress lines on a non-terminal stderr"

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("trueup_rows_scanned_total", reconciliation="orders", side="source") == ROWS
    assert delta("trueup_rows_scanned_total", reconciliation="orders",
                 side="target") == summary["target_rows"] == ROWS - 3 + 2
    for cls in ("missing", "stale", "ahead", "mismatch", "orphan"):
        assert delta("trueup_differences_total", reconciliation="orders",
                     **{"class": cls}) == len(made[cls]), f"{cls}: expected {len(made[cls])}"
    assert delta("trueup_differences_total", reconciliation="orders", **{"class": "in_flight"}) == 0
    assert delta("trueup_diff_runs_total", reconciliation="orders", outcome="differences") == 1
    assert delta("trueup_diff_duration_seconds_count", reconciliation="orders") == 1


def test_a_backfill_shows_chunks_rows_durations_and_a_taken_over_lease_on_metrics(
        new_db: Callable[[], str], state_db: str, tmp_path: Path,
        server: metrics.MetricsServer) -> None:
    source, target = new_db(), new_db()
    make_tables(source, target, ROWS)
    made = drift(target)
    config = write_config(tmp_path, state_db, source, target)
    before = scrape(server)

    summary = start_backfill(config, "orders", BackfillOptions(
        scope=BackfillScope.ALL, chunk_size=128, workers=2), WorkerOptions(workers=2))
    assert summary.status is BackfillStatus.SUCCEEDED, summary

    # A second backfill whose chunk 0 was held by a worker that died: its lease has expired.
    drift_again = drift(target)
    with open_state(state_db) as state:
        state.autocommit = True
        second = plan(config, "orders", BackfillOptions(scope=BackfillScope.ALL,
                                                        chunk_size=500), state)
    with psycopg.connect(state_db, autocommit=True) as conn:
        conn.execute("UPDATE trueup.chunks SET status = 'running', lease_owner = 'dead:1:0:x', "
                     "attempts = 1, lease_expires_at = now() - interval '1 second' "
                     "WHERE backfill_id = %s AND chunk = 0", (second,))
    assert resume_backfill(config, second).status is BackfillStatus.SUCCEEDED
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    fixed = sum(len(made[c]) for c in ("missing", "stale", "mismatch", "orphan"))
    assert fixed == sum(len(drift_again[c]) for c in ("missing", "stale", "mismatch", "orphan"))
    assert delta("trueup_backfill_chunks_total", outcome="done") == 8 + 2
    assert delta("trueup_backfill_rows_total", outcome="repaired") == 2 * fixed
    # the ahead row is skipped (the target is newer), once per backfill
    assert delta("trueup_backfill_rows_total", outcome="skipped") == 2
    assert delta("trueup_chunk_duration_seconds_count") == 10
    assert delta("trueup_chunk_duration_seconds_sum") > 0
    assert delta("trueup_leases_taken_over_total") == 1
