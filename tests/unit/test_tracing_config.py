"""ketch.tracing without a stack: what is a valid trace context, which variables turn
tracing on, and that nothing of OpenTelemetry is loaded when it is off."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ketch import tracing

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value, ok",
    [
        (TP, True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),  # not sampled: still a context
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later-fields", True),  # a later version
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more", False),  # 00 takes nothing more
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01", False),  # upper case
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),  # short trace id
        ("", False),
        ("garbage", False),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + "x" * 300, False),  # over the bound
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n", False),
    ],
)
def test_valid_traceparent(value: str, ok: bool) -> None:
    assert tracing.valid_traceparent(value) is ok


def test_clean_keeps_a_valid_pair_and_drops_what_is_not() -> None:
    assert tracing.clean(TP, "rojo=1") == (TP, "rojo=1")
    assert tracing.clean(f"  {TP} ", None) == (TP, "")
    assert tracing.clean("nonsense", "rojo=1") is None
    assert tracing.clean(None, "rojo=1") is None
    assert tracing.clean(TP, "x" * (tracing.MAX_TRACESTATE + 1)) == (TP, "")
    assert tracing.clean(TP, "rojo=\x00") == (TP, "")  # not printable: dropped, the trace goes on


@pytest.mark.parametrize(
    "env, on",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_enabled_by_env(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by_env(env) is on


def test_setup_installs_a_provider_only_when_asked() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    assert tracing.tracer("x") is None
    assert not tracing.setup("test", env={})
    assert tracing.tracer("x") is None
    assert not tracing.setup("test", env={"OTEL_TRACES_EXPORTER": "zipkin"})  # not one we ship
    try:
        assert tracing.setup("test", env={"OTEL_TRACES_EXPORTER": "console"})
        t = tracing.tracer("x")
        assert t is not None and tracing.tracer("x") is t
    finally:
        tracing.shutdown()
        tracing.install(None)
    assert tracing.tracer("x") is None


def test_unconfigured_processes_load_no_opentelemetry() -> None:
    """A broker, a replica, a client and a gateway app made without configuration import
    nothing of OpenTelemetry, even when given a traced query to carry."""
    code = """
import sys
import numpy as np
from ketch import Replica, protocol as proto, tracing
from ketchd import Broker, BrokerConfig
assert not tracing.setup("x")
Broker(BrokerConfig(state_path=":memory:"))
Replica(lambda xs: xs, name="m")
from ketch.gateway import create_app
create_app()
proto.query_header("a", proto.FLOAT64, (2,), [1], trace=(sys.argv[1], ""))
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    done = subprocess.run(
        [sys.executable, "-c", code, TP], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_server_span_is_the_transport_free_start_of_a_gateway_span() -> None:
    """What a gRPC server calls with its metadata: the span is the caller's child (or a new
    trace's root), the pair it yields names the span, and an exception marks it failed."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = tracing.Tracer(provider, "gateway")
    with t.server_span("ModelInfer", TP, "rojo=1", {"rpc.system": "grpc"}) as (span, (tp, ts)):
        assert tp == f"00-{TP[3:35]}-{span.get_span_context().span_id:016x}-01" and ts == "rojo=1"
    with pytest.raises(ValueError), t.server_span("ModelInfer", "garbage") as (span, (tp, _)):
        assert tracing.valid_traceparent(tp) and tp[3:35] != TP[3:35]  # a new trace
        raise ValueError("bad tensor")
    ok, failed = exporter.get_finished_spans()
    assert ok.kind == SpanKind.SERVER and ok.parent.span_id == int(TP[36:52], 16)
    assert ok.attributes["rpc.system"] == "grpc" and ok.status.status_code == StatusCode.UNSET
    assert failed.parent is None and failed.status.status_code == StatusCode.ERROR
    assert "ValueError: bad tensor" in failed.status.description
    provider.shutdown()
