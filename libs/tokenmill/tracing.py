"""OpenTelemetry setup. Trace context crosses services in stream entry headers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_tracer = trace.get_tracer("tokenmill")


def setup(service: str) -> None:
    """Install a tracer provider named after the service.

    Spans are exported to stdout when TOKENMILL_TRACE_CONSOLE=1; otherwise they are created
    (so context still propagates) and dropped, until an exporter is configured.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenmill-{service}"}))
    if os.environ.get("TOKENMILL_TRACE_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def inject() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def consumer_span(name: str, headers: Mapping[str, object] | None) -> Iterator[None]:
    carrier = {k: str(v) for k, v in (headers or {}).items()}
    with _tracer.start_as_current_span(
        name, context=propagate.extract(carrier), kind=trace.SpanKind.CONSUMER
    ):
        yield
