"""The auto-repair sensor's decision on one differences run: launch, nothing to do, or the
circuit breaker."""

from __future__ import annotations

import dagster as dg

from assets.repairs import auto_repair_decision


def _decide(max_differences: int = 20, **counts: int) -> dg.RunRequest | dg.SkipReason:
    return auto_repair_decision("orders", {"run_id": 7, **counts}, max_differences, None)


def test_a_run_with_repairable_differences_within_the_limit_launches_its_backfill() -> None:
    decision = _decide(missing=2, orphan=3, stale=5, mismatch=10, in_flight=500)
    assert isinstance(decision, dg.RunRequest)
    assert decision.run_key == "auto-repair-orders-run-7"


def test_drift_a_backfill_leaves_counts_against_the_limit() -> None:
    # 2 repairable, 30 ahead: 32 differences, above 20; large drift needs a person
    decision = _decide(missing=2, ahead=30)
    assert isinstance(decision, dg.SkipReason)
    assert "circuit breaker" in (decision.skip_message or "")
    assert "found 32 differences" in (decision.skip_message or "")
    decision = _decide(mismatch=1, unreadable=25)
    assert isinstance(decision, dg.SkipReason) and "circuit breaker" in (
        decision.skip_message or "")


def test_the_limit_itself_still_launches_and_in_flight_never_counts() -> None:
    assert isinstance(_decide(missing=10, ahead=10, in_flight=10**6), dg.RunRequest)
    assert isinstance(_decide(missing=10, ahead=11), dg.SkipReason)


def test_a_run_with_nothing_a_backfill_repairs_launches_nothing() -> None:
    decision = _decide(ahead=3, in_flight=4)
    assert isinstance(decision, dg.SkipReason)
    assert "found nothing to repair" in (decision.skip_message or "")
