"""Trace context in Kafka and RabbitMQ headers, and spans exported in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from trueup import tracing
from trueup.errors import UsageError
from trueup.headers import Failure
from trueup.log import configure as configure_logs
from trueup.log import get_logger
from trueup.retry import RetryPolicy
from trueup.workers.runtime import Action, Delivery, settle

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory)
    yield memory
    tracing.shutdown()


def test_kafka_headers_get_a_traceparent_and_keep_the_others(
        exporter: InMemorySpanExporter) -> None:
    with tracing.span("produce") as span:
        headers = tracing.inject([("attempt", b"2"), ("traceparent", b"00-stale")])
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert headers[0] == ("attempt", b"2")
    assert [k for k, _ in headers].count("traceparent") == 1
    value = dict(headers)["traceparent"]
    assert isinstance(value, bytes) and value.decode().split("-")[1] == trace_id


def test_rabbitmq_headers_get_a_traceparent_string(exporter: InMemorySpanExporter) -> None:
    with tracing.span("publish"):
        headers = tracing.inject({"x-trueup-attempt": 1})
    assert headers["x-trueup-attempt"] == 1
    assert isinstance(headers["traceparent"], str) and headers["traceparent"].startswith("00-")


def test_none_headers_become_a_kafka_list() -> None:
    assert tracing.inject(None) == []  # no active trace: nothing to carry


def test_extract_reads_both_shapes_and_a_child_span_joins_the_trace(
        exporter: InMemorySpanExporter) -> None:
    for headers in ([("traceparent", TRACEPARENT.encode())], {"traceparent": TRACEPARENT}):
        with tracing.message_span("handle", headers, topic="t") as span:
            context = span.get_span_context()
        assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    spans = exporter.get_finished_spans()
    assert [s.parent.span_id if s.parent else None for s in spans] == [0xb7ad6b7169203331] * 2
    assert all(s.kind is SpanKind.CONSUMER for s in spans)
    assert spans[0].attributes == {"topic": "t"}


def test_a_malformed_traceparent_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    with tracing.message_span("handle", [("traceparent", b"garbage")]) as span:
        pass
    assert span.get_span_context().is_valid
    assert exporter.get_finished_spans()[0].parent is None


def test_without_an_exporter_incoming_context_is_still_passed_on() -> None:
    tracing.shutdown()
    with tracing.message_span("handle", {"traceparent": TRACEPARENT}):
        forwarded = tracing.inject([])
    assert tracing.traceparent(forwarded) is not None
    assert tracing.traceparent(forwarded).split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


def test_current_trace_id_is_known_inside_a_span_only(exporter: InMemorySpanExporter) -> None:
    assert tracing.current_trace_id() is None
    with tracing.span("work") as span:
        assert tracing.current_trace_id() == format(span.get_span_context().trace_id, "032x")


def test_an_unknown_exporter_name_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.EXPORTER_ENV, "zipkin")
    with pytest.raises(UsageError, match="expected none or console"):
        tracing.configure()


def test_no_exporter_configured_means_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.EXPORTER_ENV, raising=False)
    assert tracing.configure() is None


def test_annotate_adds_attributes_and_an_error_to_the_current_span(
        exporter: InMemorySpanExporter) -> None:
    with tracing.span("handle"):
        tracing.annotate(ValueError("bad order"), attempt=2, outcome="retry", skipped=None)
    (span,) = exporter.get_finished_spans()
    assert span.attributes == {"attempt": 2, "outcome": "retry"}
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_annotate_outside_a_span_does_nothing() -> None:
    tracing.annotate(ValueError("nowhere"), attempt=1)  # no span, no error


def test_with_tracing_off_a_message_span_makes_its_trace_current_without_a_span() -> None:
    tracing.shutdown()  # tracing off
    carried = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [("x", b"1"), ("traceparent", carried.encode())]
    with tracing.message_span("handle", headers) as current:
        assert not current.is_recording()
        # log lines see the message's trace id, and its headers travel on unchanged
        assert tracing.current_trace_id() == "0af7651916cd43dd8448eb211c80319c"
        assert tracing.inject(headers) == headers
    assert tracing.current_trace_id() is None
    with tracing.message_span("handle", [("x", b"1")]) as current:
        assert tracing.current_trace_id() is None


def test_with_tracing_off_a_message_s_tracestate_travels_on_with_its_traceparent() -> None:
    """Messages a handler published carried the traceparent alone: a vendor's tracestate
    was lost at the first hop with tracing off (kept with it on)."""
    tracing.shutdown()  # tracing off
    carried = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.message_span("handle", {"traceparent": carried, "tracestate": "vendor=abc"}):
        published = tracing.inject({"x-trueup-attempt": 1})
    assert published == {"x-trueup-attempt": 1, "traceparent": carried,
                         "tracestate": "vendor=abc"}


def test_the_exporter_named_in_the_environment_prints_spans_on_stderr(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(tracing.EXPORTER_ENV, "console")
    tracing.shutdown()
    try:
        provider = tracing.configure_from_env()
        assert provider is not None, "TRUEUP_TRACES_EXPORTER=console left tracing off"
        assert tracing.configure_from_env() is provider, "a second call replaced the exporter"
        with tracing.span("diff", reconciliation="orders"):
            pass
        provider.force_flush()
    finally:
        tracing.shutdown()
    printed = capsys.readouterr()
    assert '"name": "diff"' in printed.err and '"reconciliation": "orders"' in printed.err
    assert printed.out == "", "spans on stdout would corrupt the commands' --json output"


def test_console_spans_are_one_json_object_a_line_among_the_json_logs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The console exporter printed each span as indented JSON over a dozen lines: stderr,
    otherwise one JSON log object per line, could no longer be read line by line."""
    monkeypatch.setenv(tracing.EXPORTER_ENV, "console")
    configure_logs(as_json=True)
    tracing.shutdown()
    try:
        provider = tracing.configure_from_env()
        assert provider is not None
        with tracing.span("worker.handle", queue="payments"):
            get_logger("trueup.tests").info("worker.failed", queue="payments")
        with tracing.span("replay.publish"):
            pass
        provider.force_flush()
    finally:
        tracing.shutdown()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    documents = []
    for line in lines:
        try:
            documents.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a stderr line that is not JSON: {line!r}") from None
    assert [d.get("name") or d.get("event") for d in documents] == [
        "worker.failed", "worker.handle", "replay.publish"], documents


def test_configure_from_env_keeps_an_exporter_already_configured(
        exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.EXPORTER_ENV, "console")
    tracing.configure_from_env()
    with tracing.span("work"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["work"]


def test_configure_from_env_without_the_variable_stays_off_and_skips_the_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if k != tracing.EXPORTER_ENV}
    code = ("import sys; from trueup import tracing; "
            "print(tracing.configure_from_env(), 'opentelemetry.sdk' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["None", "False"], (
        f"expected tracing off without importing the SDK, got {done.stdout!r}")


class _Unprintable(Exception):
    """An application's exception whose ``__str__`` itself fails."""

    def __str__(self) -> str:
        return self.detail  # type: ignore[attr-defined, no-any-return]  # never set


def test_a_handler_error_whose_str_fails_is_still_retried_and_traced(
        exporter: InMemorySpanExporter) -> None:
    """settle() raised the second error: the worker stopped, and stopped again on the same
    message after every restart, with no retry or dead-letter copy made."""
    def handler(delivery: Delivery) -> None:
        raise _Unprintable

    delivery = Delivery(body=b"{}", key=None, headers={}, source="orders", attempt=1,
                        message_id="m-1")
    with tracing.span("handle"):
        settled = settle(handler, delivery, RetryPolicy(max_attempts=3), Failure())
    assert settled.action is Action.RETRY
    assert settled.failure.error_message == "_Unprintable"
    assert settled.failure.error_class == f"{__name__}._Unprintable"
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [dict(e.attributes or {}) for e in span.events] == [
        {"exception.type": "_Unprintable"}]
