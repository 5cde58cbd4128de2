"""Tracing: W3C trace context through gateway, broker and replica; OpenTelemetry spans.

A query carries its caller's W3C ``traceparent`` (and ``tracestate``) from the HTTP (or
gRPC) request through the broker (``Query.traceparent``) to the replica
(``PredictRequest.traceparents``, one per item: a batch mixes queries of different
traces). Four spans describe one query (docs/tracing.md):

    gateway         the gateway's server span ("POST /v2/models/{name}/infer", ...), child
                    of the caller's context
    ketch.queue     broker: the query's arrival to its dispatch, child of the gateway span
    ketch.batch     broker: the RPC of one batch to a replica; child of the batch's first
                    traced query's queue span, linked to every traced query's
    ketch.compute   the replica (Python runtime): the user's predict of that batch, child of
                    the batch span, linked to the other traced queries of the batch

Spans are made with the OpenTelemetry SDK (the ``trace`` extra) and exported with OTLP,
only when this process is configured to (``setup``: the standard ``OTEL_*`` variables, or
``install`` from a test). Unconfigured, ``tracer()`` is None, callers keep the None and
OpenTelemetry is never imported: the cost is a ``None`` test where a span would start. A
traceparent that is not valid W3C, or longer than ``MAX_TRACEPARENT``, is ignored (the
gateway then starts a new trace); a tracestate longer than ``MAX_TRACESTATE`` is dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import structlog

log = structlog.get_logger("ketch.tracing")

MAX_TRACEPARENT = 256  # characters: version 00 has 55; a later version may append fields
MAX_TRACESTATE = 512  # characters: what W3C asks every vendor to pass on at least
MAX_LINKS = 128  # links of one batch span (OpenTelemetry's default span limit)

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?", re.ASCII)
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

# OpenTelemetry's standard switches (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/)
_EXPORTERS = ("otlp", "console")


def valid_traceparent(value: str) -> bool:
    """Whether ``value`` is a W3C traceparent this process passes on (trace-context level 1:
    version 00 exactly; a later version's first four fields, anything appended after them;
    version ff, an all-zero trace or span id, and anything longer than MAX_TRACEPARENT
    are not)."""
    if not value or len(value) > MAX_TRACEPARENT:
        return False
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return False
    version, trace_id, span_id, _, rest = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return False
    return not (version == "00" and rest)


def clean(traceparent: str | None, tracestate: str | None) -> tuple[str, str] | None:
    """The pair to carry on, or None when ``traceparent`` is absent or not valid; a
    ``tracestate`` over MAX_TRACESTATE or not printable ASCII is dropped (W3C lets a
    vendor drop it; the trace goes on)."""
    if not traceparent or not valid_traceparent(traceparent.strip()):
        return None
    state = (tracestate or "").strip()
    if len(state) > MAX_TRACESTATE or not (state.isascii() and state.isprintable()):
        state = ""
    return traceparent.strip(), state


# ---------------------------------------------------------------- configuration


def enabled_by_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OpenTelemetry variables ask this process to export spans: an exporter
    named (``OTEL_TRACES_EXPORTER=otlp`` or ``console``) or an OTLP endpoint set
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); never with
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracer:
    """One process's tracer (a component's name on an OpenTelemetry ``TracerProvider``),
    reading and writing W3C contexts; made only when tracing is configured."""

    def __init__(self, provider: Any, component: str) -> None:
        from opentelemetry import trace

        from ketch import __version__

        self._trace = trace
        self._empty = trace.set_span_in_context(trace.INVALID_SPAN)  # a new trace
        self.tracer = provider.get_tracer(f"ketch.{component}", __version__)
        self.SERVER = trace.SpanKind.SERVER
        self.CLIENT = trace.SpanKind.CLIENT
        self.INTERNAL = trace.SpanKind.INTERNAL
        self.Link = trace.Link

    def context(self, traceparent: str | None, tracestate: str | None = None) -> Any:
        """The OpenTelemetry context of a W3C pair (a new trace's when the pair is not valid):
        what the W3C propagator extracts, read directly (``clean`` has checked it)."""
        pair = clean(traceparent, tracestate)
        if pair is None:
            return self._empty
        tp, ts = pair
        trace = self._trace
        state = trace.TraceState.from_header([ts]) if ts else trace.TraceState()
        sc = trace.SpanContext(
            int(tp[3:35], 16),
            int(tp[36:52], 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(tp[53:55], 16) & 1),
            trace_state=state,
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(sc))

    def span_context(self, traceparent: str, tracestate: str = "") -> Any:
        """The remote span context of a valid pair (for a link); None when it is not valid."""
        sc = self._trace.get_current_span(self.context(traceparent, tracestate)).get_span_context()
        return sc if sc.is_valid else None

    def carrier(self, span: Any) -> tuple[str, str]:
        """(traceparent, tracestate) naming ``span`` as the parent of what follows, as the W3C
        propagator writes them; ("", "") for a span of no trace."""
        sc = span.get_span_context()
        if not sc.is_valid:
            return "", ""
        state = sc.trace_state.to_header() if sc.trace_state else ""
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}", state

    def start(
        self,
        name: str,
        *,
        parent: Any = None,
        kind: Any = None,
        links: Sequence[Any] = (),
        attributes: Mapping[str, Any] | None = None,
    ) -> Any:
        """A started span (end it with ``.end()``): ``parent`` a context (``context``) or a span."""
        if parent is not None and not isinstance(parent, dict):  # a span: its context
            parent = self._trace.set_span_in_context(parent)
        return self.tracer.start_span(
            name,
            context=parent,
            kind=self.INTERNAL if kind is None else kind,
            links=list(links)[:MAX_LINKS],
            attributes=dict(attributes or {}),
        )

    def fail(self, span: Any, message: str) -> None:
        """Mark ``span`` as failed (status ERROR with ``message``)."""
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message[:256]))

    @contextlib.contextmanager
    def server_span(
        self,
        name: str,
        traceparent: str | None,
        tracestate: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[Any, tuple[str, str]]]:
        """The gateway's span of one request, whatever its transport: child of the caller's
        context when ``traceparent`` is valid, else the root of a new trace. Yields (the
        span, the (traceparent, tracestate) to send the query with); an exception ends it
        as failed and goes on."""
        span = self.start(
            name, parent=self.context(traceparent, tracestate), kind=self.SERVER, attributes=attributes
        )
        try:
            yield span, self.carrier(span)
        except BaseException as exc:
            self.fail(span, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            span.end()


_provider: Any = None  # the TracerProvider this process exports with, once configured
_tracers: dict[str, Tracer] = {}


def install(provider: Any) -> None:
    """Trace with ``provider`` (an OpenTelemetry SDK ``TracerProvider``) in this process:
    what a test does with an in-memory exporter. ``install(None)`` turns tracing off again
    for components made afterwards."""
    global _provider
    _provider = provider
    _tracers.clear()


def setup(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Configure tracing for this process from the OpenTelemetry variables (``enabled_by_env``):
    a ``TracerProvider`` (its sampler from ``OTEL_TRACES_SAMPLER``, parent-based always-on by
    default) with ``service.name`` ``service`` unless ``OTEL_SERVICE_NAME`` says otherwise,
    exporting in batches with OTLP over gRPC (its endpoint from ``OTEL_EXPORTER_OTLP_*``;
    ``http://localhost:4317`` by default) or to the console. Returns whether tracing is on.
    Without the ``trace`` extra installed, it says so in the log and stays off."""
    env = os.environ if env is None else env
    if _provider is not None:
        return True
    if not enabled_by_env(env):
        return False
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter_name not in _EXPORTERS:
        log.warning("tracing_off", reason=f"OTEL_TRACES_EXPORTER={exporter_name!r} is not otlp or console")
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
    except ImportError as exc:
        log.warning(
            "tracing_off", reason=f"OpenTelemetry is not installed ({exc}): pip install 'ketch[trace]'"
        )
        return False
    attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing_on", service=service, exporter=exporter_name)
    return True


def tracer(component: str) -> Tracer | None:
    """This process's tracer for ``component``, or None when tracing is not configured."""
    if _provider is None:
        return None
    found = _tracers.get(component)
    if found is None:
        found = _tracers[component] = Tracer(_provider, component)
    return found


def shutdown() -> None:
    """Export what is pending and stop (at the end of a process that traced)."""
    if _provider is not None and hasattr(_provider, "shutdown"):
        with contextlib.suppress(Exception):
            _provider.shutdown()
