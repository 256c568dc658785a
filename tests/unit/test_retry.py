"""The retry policy value and trueup's failure headers."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trueup import headers
from trueup.config import BackoffConfig, DeadLetterConfig
from trueup.retry import DeadLetterReason, PermanentError, RetryPolicy, Verdict


def _policy(**kw: object) -> RetryPolicy:
    base: dict[str, object] = {"max_attempts": 5, "initial_seconds": 1.0, "multiplier": 2.0,
                               "max_seconds": 10.0, "jitter": 0.0}
    return RetryPolicy(**{**base, **kw})  # type: ignore[arg-type]


def test_delays_grow_exponentially_until_the_cap() -> None:
    policy = _policy(max_attempts=10)
    assert [policy.nominal_delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_decide_retries_until_max_attempts_then_dead_letters() -> None:
    policy = _policy()
    decisions = [policy.decide(n, RuntimeError("db down")) for n in range(1, 6)]
    assert [d.verdict for d in decisions] == [Verdict.RETRY] * 4 + [Verdict.DEAD_LETTER]
    assert [d.delay_seconds for d in decisions[:4]] == [1, 2, 4, 8]
    assert decisions[-1].reason is DeadLetterReason.EXHAUSTED


def test_permanent_errors_skip_the_retries() -> None:
    class BadPayload(ValueError):
        pass

    policy = _policy(permanent=(PermanentError, BadPayload))
    for error in (PermanentError("no such order"), BadPayload("not json")):
        decision = policy.decide(1, error)
        assert decision.verdict is Verdict.DEAD_LETTER, error
        assert decision.reason is DeadLetterReason.PERMANENT
    assert policy.decide(1, ValueError("other")).retry


def test_jitter_only_shortens_the_delay() -> None:
    low = RetryPolicy(initial_seconds=4, jitter=0.25, random=lambda: 0.999999)
    high = RetryPolicy(initial_seconds=4, jitter=0.25, random=lambda: 0.0)
    assert low.delay(1) == pytest.approx(3.0, abs=1e-4)
    assert high.delay(1) == 4.0


@given(attempt=st.integers(min_value=1, max_value=10_000),
       initial=st.floats(min_value=0, max_value=3600),
       multiplier=st.floats(min_value=1, max_value=100),
       cap=st.floats(min_value=0, max_value=86_400),
       jitter=st.floats(min_value=0, max_value=0.99))
def test_delay_stays_within_zero_and_the_cap(attempt: int, initial: float, multiplier: float,
                                             cap: float, jitter: float) -> None:
    policy = RetryPolicy(max_attempts=attempt + 1, initial_seconds=initial,
                         multiplier=multiplier, max_seconds=cap, jitter=jitter)
    delay = policy.delay(attempt)
    assert 0 <= delay <= cap
    assert delay >= policy.nominal_delay(attempt) * (1 - jitter) - 1e-9


def test_policy_is_built_from_the_config_blocks() -> None:
    dlq = DeadLetterConfig.model_validate({
        "connection": "bus", "topic": "orders.v1.dlq", "max_attempts": 3,
        "backoff": {"initial": "200ms", "multiplier": 3, "max": "1s"}})
    policy = RetryPolicy.from_config(dlq, jitter=0)
    assert (policy.max_attempts, policy.initial_seconds, policy.multiplier,
            policy.max_seconds) == (3, 0.2, 3.0, 1.0)
    assert policy == RetryPolicy.from_backoff(
        BackoffConfig.model_validate({"initial": "200ms", "multiplier": 3, "max": "1s"}), 3,
        jitter=0)
    assert [policy.nominal_delay(n) for n in (1, 2, 3)] == pytest.approx([0.2, 0.6, 1.0])


@pytest.mark.parametrize("bad", [{"max_attempts": 0}, {"multiplier": 0.5}, {"jitter": 1.0},
                                 {"initial_seconds": -1}])
def test_policy_rejects_values_that_make_no_sense(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _policy(**bad)


def test_failure_headers_round_trip_and_keep_the_first_failure() -> None:
    first = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    later = first + dt.timedelta(seconds=3)
    record = headers.Failure(message_id="orders.v1:0:42", origin="orders.v1",
                             origin_partition=0, origin_offset=42, group="billing")
    record = record.failed(ValueError("bad\namount"), attempt=1, at=first)
    record = record.failed(PermanentError("still bad"), attempt=2, at=later)
    text = record.write()
    assert text[headers.ERROR_CLASS] == "trueup.retry.PermanentError"
    assert text[headers.FIRST_FAILURE] == "2026-01-02T03:04:05.678Z"
    assert headers.Failure.read(text) == record
    wire = headers.kafka_copy([("content-type", b"json"), (headers.NOT_BEFORE, b"1")],
                              record.write())
    back = headers.from_kafka(wire)
    assert back["content-type"] == "json" and headers.NOT_BEFORE not in back
    assert headers.Failure.read(back).attempts == 2


def test_unreadable_header_values_read_as_missing() -> None:
    record = headers.Failure.read({headers.ATTEMPTS: "many", headers.LAST_FAILURE: "yesterday"})
    assert record.attempts == 0 and record.last_failure is None
