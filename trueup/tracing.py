"""OpenTelemetry traces: spans for diff segments, backfill chunks and message handling, and
the W3C ``traceparent`` carried in Kafka and RabbitMQ headers.

Nothing is exported unless asked: without :func:`configure` the OpenTelemetry API's no-op
tracer is used, spans cost next to nothing, and a context that arrived in a message's headers
is still passed on to the messages it causes (so a traced producer's trace survives an untraced
worker). ``TRUEUP_TRACES_EXPORTER=console`` prints finished spans on stderr: every entry point
(the CLI, the Dagster code location, a worker's run) calls :func:`configure_from_env` as it
starts. An exporter object (an OTLP exporter, or the SDK's in-memory exporter in tests) can be
given to :func:`configure`.

Headers: Kafka's are a list of ``(key, bytes)`` tuples, RabbitMQ's a dict; :func:`inject`
and :func:`extract` take either shape.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from trueup import __version__

if TYPE_CHECKING:  # the SDK is imported when tracing is configured, not by every command
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

#: Header names of the W3C trace context, as they travel in messages.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
#: ``none`` (default) or ``console``; see :func:`configure`.
EXPORTER_ENV = "TRUEUP_TRACES_EXPORTER"

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_env_lock = threading.Lock()  # one configure_from_env at a time: two would both configure
_provider: TracerProvider | None = None

KafkaHeaders = list[tuple[str, bytes]]


def configure(exporter: SpanExporter | None = None, *, service: str = "trueup",
              batch: bool | None = None) -> TracerProvider | None:
    """Start exporting spans of this process to ``exporter`` (or as ``$TRUEUP_TRACES_EXPORTER``
    says); returns the provider, or None when tracing stays off.

    Calling it again replaces the exporter (tests give each test its own in-memory exporter).
    Batching is the default for real exporters; ``batch=False`` exports each span as it ends.
    """
    global _provider
    if exporter is None:
        wanted = _wanted_exporter()
        if wanted is None:
            return None  # before importing the SDK: tracing off costs no start-up time
        if wanted != "console":
            from trueup.errors import UsageError

            raise UsageError(f"{EXPORTER_ENV}: expected none or console (got {wanted!r})")
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout carries the commands' output (--json). One line per span: the SDK's
        # default prints indented JSON over many lines, between the one-line JSON log lines.
        exporter = ConsoleSpanExporter(service_name=service, out=sys.stderr,
                                       formatter=_one_line)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                        "service.version": __version__}))
    use_batch = batch if batch is not None else not _is_in_memory(exporter)
    provider.add_span_processor(BatchSpanProcessor(exporter) if use_batch
                                else SimpleSpanProcessor(exporter))
    with _lock:
        old, _provider = _provider, provider
    if old is not None:
        old.shutdown()
    return provider


def _one_line(span: ReadableSpan) -> str:
    """A finished span as one line of JSON (what the console exporter prints)."""
    return str(span.to_json(indent=None)) + "\n"


def configure_from_env(*, service: str = "trueup") -> TracerProvider | None:
    """Export spans as ``$TRUEUP_TRACES_EXPORTER`` says; what a process calls as it starts.

    Idempotent: tracing already on (an earlier call, or a test's own exporter) stays as it is.
    With the variable unset it returns None at once, without importing the SDK. Spans still
    waiting in a batch are exported at exit (the SDK's provider shuts down at exit).
    """
    if _provider is not None or _wanted_exporter() is None:
        return _provider
    with _env_lock:
        if _provider is not None:
            return _provider
        return configure(service=service)


def _wanted_exporter() -> str | None:
    wanted = os.environ.get(EXPORTER_ENV, "none").strip().lower()
    return None if wanted in ("", "none") else wanted


def shutdown() -> None:
    """Flush and stop the exporter (at process exit); tracing is off afterwards."""
    global _provider
    with _lock:
        old, _provider = _provider, None
    if old is not None:
        old.shutdown()


def _is_in_memory(exporter: SpanExporter) -> bool:
    return type(exporter).__name__ == "InMemorySpanExporter"


def enabled() -> bool:
    """True when spans are exported (:func:`configure` was called with an exporter)."""
    return _provider is not None


def tracer() -> trace.Tracer:
    provider = _provider
    if provider is not None:
        return provider.get_tracer("trueup", __version__)
    return trace.get_tracer("trueup", __version__)


@contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, parent: Context | None = None,
         **attributes: Any) -> Iterator[Span]:
    """A span around a block, child of the current span (or of ``parent``, a context taken
    from message headers). Attributes whose value is None are left out."""
    attrs = {k.replace("__", "."): _attribute(v) for k, v in attributes.items() if v is not None}
    with tracer().start_as_current_span(name, context=parent, kind=kind,
                                        attributes=attrs) as current:
        yield current


@contextmanager
def message_span(name: str, headers: Any, *, kind: SpanKind = SpanKind.CONSUMER,
                 **attributes: Any) -> Iterator[Span]:
    """A span for handling one message: child of the trace context its headers carry.

    With tracing off there is nothing to record, so no span is made (a no-op span still cost
    14 us a message, as much as a plain replay loop spends on a letter): the message's own
    context is made current when it has one, so log lines and new headers still carry its
    trace id.
    """
    if _provider is None:
        carried = traceparent(headers)
        if carried is None:
            yield trace.INVALID_SPAN
            return
        token = otel_context.attach(extract(headers))  # with its tracestate
        try:
            yield trace.get_current_span()
        finally:
            otel_context.detach(token)
        return
    with span(name, kind=kind, parent=extract(headers), **attributes) as current:
        yield current


def annotate(error: BaseException | None = None, **attributes: Any) -> None:
    """Add attributes (and a failure, recorded as an exception event with an error status) to
    the current span; nothing happens outside a span or with tracing off."""
    current = trace.get_current_span()
    if not current.is_recording():
        return
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key.replace("__", "."), _attribute(value))
    if error is not None:
        try:
            current.record_exception(error)
        except Exception:  # it reads str(error), which a handler's exception may fail
            current.add_event("exception", {"exception.type": type(error).__qualname__})
        current.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}"))


def _attribute(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits (for logs), or None outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# ---------------------------------------------------------------------------------------------
# Headers


@overload
def inject(headers: dict[str, Any], ctx: Context | None = None) -> dict[str, Any]: ...


@overload
def inject(headers: Sequence[tuple[str, Any]] | None,
           ctx: Context | None = None) -> KafkaHeaders: ...


def inject(headers: Any, ctx: Context | None = None) -> Any:
    """``headers`` with the current trace context (or ``ctx``'s) as ``traceparent``.

    A dict (RabbitMQ) gets string values; a list of tuples or None (Kafka) gets bytes. Trace
    headers already there are replaced, all others kept in order. Without an active trace the
    headers come back without trace headers.
    """
    # An empty context (nothing ever made current) is the cheap test of the common case.
    if _provider is None and ctx is None and (
            not otel_context.get_current()
            or not trace.get_current_span().get_span_context().is_valid
            or traceparent(headers) is not None):
        # tracing off, and no message's trace is current or the headers already carry theirs:
        # they travel on as they are
        return dict(headers) if isinstance(headers, Mapping) else list(headers or [])
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    if not carrier:  # no active trace: whatever context the headers carry travels on
        if isinstance(headers, Mapping):
            return dict(headers)
        return list(headers or [])
    if isinstance(headers, Mapping):
        kept = {k: v for k, v in headers.items() if k not in TRACE_HEADERS}
        return {**kept, **carrier}
    pairs = [(k, v) for k, v in (headers or []) if k not in TRACE_HEADERS]
    return pairs + [(k, v.encode()) for k, v in carrier.items()]


def extract(headers: Any) -> Context:
    """The trace context carried by Kafka (list of tuples) or RabbitMQ (dict) headers.

    Headers without (or with a malformed) ``traceparent`` give an empty context: the span
    started from it begins a new trace.
    """
    carrier: dict[str, str] = {}
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    for key, value in items:
        if key in TRACE_HEADERS and value is not None:
            carrier[key] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return _PROPAGATOR.extract(carrier)


def traceparent(headers: Any) -> str | None:
    """The ``traceparent`` header's text, if any."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    for key, value in items:
        if key == TRACEPARENT and value is not None:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


@contextmanager
def attached(ctx: Context) -> Iterator[None]:
    """Make ``ctx`` current for a block (e.g. to publish a retry inside a handled message's
    trace without opening a span)."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
