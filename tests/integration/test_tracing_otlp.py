"""Tracing configured the way a user does it: a ``ketchd`` process with the standard
OpenTelemetry variables exports its spans over OTLP/gRPC to a collector, here a tiny OTLP
receiver this test runs on 127.0.0.1 (OpenTelemetry's own protobuf service)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ketch
import numpy as np
import pytest
from ketch.local import LocalBroker, wait_for

grpc = pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(90)

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                names = [a.value.string_value for a in rs.resource.attributes if a.key == "service.name"]
                for ss in rs.scope_spans:
                    self.spans.extend((names[0] if names else "", s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    r = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield r, port
    server.stop(0)


def test_a_broker_process_exports_its_spans_over_otlp(receiver) -> None:
    r, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with LocalBroker(env=env) as broker, broker.admin_client() as admin:
        admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=5000, models=["m"])
        replica = ketch.Replica(lambda xs: [float(np.sum(x)) for x in xs], name="m", broker=broker.backend)
        thread = threading.Thread(target=replica.run, daemon=True)
        thread.start()
        try:
            with ketch.Client(broker.frontend) as c:
                wait_for(lambda: c.predict("sum", np.ones(2)).output == 2.0, 30, "a replica to answer")
                pred = c.predict("sum", np.arange(4.0), traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
                assert pred.output == 6.0
        finally:  # drained while its broker is there
            replica.stop()
            thread.join(10)
        trace_id = bytes.fromhex(CALLER_TRACE)
        wait_for(lambda: len(r.of_trace(trace_id)) >= 2, 30, "the broker's spans at the receiver")
    spans = {s.name: (svc, s) for svc, s in r.of_trace(trace_id)}
    assert set(spans) == {"ketch.queue", "ketch.batch"}, sorted(spans)  # this replica thread does not trace
    (svc_q, queue), (svc_b, batch) = spans["ketch.queue"], spans["ketch.batch"]
    assert svc_q == svc_b == "ketchd"
    assert queue.parent_span_id == bytes.fromhex(CALLER_SPAN)
    assert batch.parent_span_id == queue.span_id
    # untraced queries (the warm-up) made no spans
    assert all(s.trace_id == trace_id for _, s in r.spans)
