"""Tracing (docs/tracing.md): one query's trace has its four spans, across gateway, broker
and replica, sharing the caller's trace id.

Gateway, broker and replica run in this process (a uvicorn server thread on a free
loopback port, ``thread_broker``, a ``ketch.Replica`` thread), all exporting to one
OpenTelemetry SDK ``TracerProvider`` with an ``InMemorySpanExporter``; every hop between
them is a real socket (HTTP, ZeroMQ).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import ketch
import numpy as np
import pytest
import structlog.testing
from ketch import tracing
from ketch.local import free_port, wait_for

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

pytestmark = pytest.mark.timeout(60)

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def sums(xs):
    return [float(np.sum(x)) for x in xs]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.install(provider)
    yield exp
    tracing.install(None)
    provider.shutdown()


def serve_sums(tb, replica_threads, app: str = "sum", model: str = "m") -> ketch.Replica:
    """App ``app`` on model ``model`` (a replica thread of ``sums``), answering."""
    with ketch.Admin(tb.admin) as admin:
        admin.create_app(app, input_type="float64", input_shape=[-1], slo_ms=5000, models=[model])
    replica = replica_threads(sums, backend=tb.backend, name=model)
    with ketch.Client(tb.frontend) as c:
        wait_for(lambda: c.predict(app, np.ones(2)).output == 2.0, 20, "a replica to answer")
    return replica


@pytest.fixture
def traced_stack(exporter, thread_broker, replica_threads) -> Iterator[tuple[str, str]]:
    """(gateway URL, its gRPC address): a broker, a replica of model ``m`` for app ``sum``
    and a gateway serving HTTP and gRPC, made after tracing was installed, so all three trace."""
    import uvicorn
    from ketch.gateway import GatewayConfig, create_app

    tb = thread_broker
    serve_sums(tb, replica_threads)
    exporter.clear()
    grpc_address = f"127.0.0.1:{free_port()}"
    app = create_app(GatewayConfig(frontend=tb.frontend, admin=tb.admin, grpc=grpc_address))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "the gateway to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", grpc_address
    finally:
        server.should_exit = True
        thread.join(10)


def _spans(exporter, trace_id: int, want: int, timeout_s: float = 10.0):
    """The finished spans of ``trace_id``, once there are ``want`` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if len(spans) >= want or time.monotonic() > deadline:
            return spans
        time.sleep(0.02)


def _by_name(spans) -> dict:
    out: dict = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def test_one_query_has_its_four_spans_in_the_callers_trace(exporter, traced_stack) -> None:
    url, _ = traced_stack
    with structlog.testing.capture_logs() as lines:
        r = httpx.post(
            f"{url}/v2/models/sum/infer",
            json={"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]},
            headers={"traceparent": TRACEPARENT, "tracestate": "rojo=00f067aa0ba902b7"},
            timeout=10,
        )
        wait_for(lambda: any(e["event"] == "http request" for e in lines), 10, "the access line")
    assert r.status_code == 200, r.text
    # the access line names the request's trace (the gateway span's, in the caller's trace)
    access = [e for e in lines if e["event"] == "http request"]
    assert [e["trace_id"] for e in access] == [CALLER_TRACE], access
    spans = _spans(exporter, int(CALLER_TRACE, 16), 4)
    named = _by_name(spans)
    gateway = named["POST /v2/models/{name}/infer"]
    assert len(gateway) == 1 and set(named) == {
        "POST /v2/models/{name}/infer",
        "ketch.queue",
        "ketch.batch",
        "ketch.compute",
    }, sorted(named)
    gw, queue, batch, compute = (
        named["POST /v2/models/{name}/infer"][0],
        named["ketch.queue"][0],
        named["ketch.batch"][0],
        named["ketch.compute"][0],
    )
    assert gw.kind == SpanKind.SERVER and batch.kind == SpanKind.CLIENT
    assert gw.parent is not None and gw.parent.span_id == int(CALLER_SPAN, 16) and gw.parent.is_remote
    assert queue.parent.span_id == gw.context.span_id
    assert batch.parent.span_id == queue.context.span_id
    assert compute.parent.span_id == batch.context.span_id
    assert gw.attributes["http.response.status_code"] == 200
    assert queue.attributes["ketch.app"] == "sum" and queue.attributes["ketch.outcome"] == "dispatched"
    assert batch.attributes["ketch.model"] == "m" and batch.attributes["ketch.batch_size"] >= 1
    assert compute.attributes["ketch.model"] == "m"
    # the caller's tracestate goes along
    assert str(compute.context.trace_state.to_header()) == "rojo=00f067aa0ba902b7"
    # in time order: the query waits, then its batch is sent, then computed
    assert gw.start_time <= queue.start_time <= queue.end_time <= batch.start_time
    assert batch.start_time <= compute.start_time <= compute.end_time <= batch.end_time <= gw.end_time


def test_a_grpc_query_has_its_four_spans_in_the_callers_trace(exporter, traced_stack) -> None:
    grpc = pytest.importorskip("grpc")
    from ketch.gateway._oip import grpc_predict_v2_pb2 as pb
    from ketch.gateway._oip import grpc_predict_v2_pb2_grpc as pb_grpc

    _, grpc_address = traced_stack
    request = pb.ModelInferRequest(model_name="sum")
    tensor = request.inputs.add(name="x", datatype="FP64", shape=[1, 3])
    tensor.contents.fp64_contents.extend([1.0, 2.0, 3.0])
    metadata = (("traceparent", TRACEPARENT), ("tracestate", "rojo=00f067aa0ba902b7"))
    with grpc.insecure_channel(grpc_address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=20)
    out = reply.outputs[0]
    raw = np.frombuffer(reply.raw_output_contents[0], "<f8") if reply.raw_output_contents else None
    assert (list(raw) if raw is not None else list(out.contents.fp64_contents)) == [6.0], reply
    spans = _spans(exporter, int(CALLER_TRACE, 16), 4)
    named = _by_name(spans)
    gateway_name = "inference.GRPCInferenceService/ModelInfer"
    assert set(named) == {gateway_name, "ketch.queue", "ketch.batch", "ketch.compute"}, sorted(named)
    gw, queue, batch, compute = (
        named[n][0] for n in (gateway_name, "ketch.queue", "ketch.batch", "ketch.compute")
    )
    assert gw.kind == SpanKind.SERVER and gw.attributes["rpc.system"] == "grpc"
    assert gw.parent is not None and gw.parent.span_id == int(CALLER_SPAN, 16) and gw.parent.is_remote
    assert queue.parent.span_id == gw.context.span_id
    assert batch.parent.span_id == queue.context.span_id
    assert compute.parent.span_id == batch.context.span_id
    assert str(compute.context.trace_state.to_header()) == "rojo=00f067aa0ba902b7"


def test_a_clipper_query_without_traceparent_starts_a_trace(exporter, traced_stack) -> None:
    url, _ = traced_stack
    r = httpx.post(f"{url}/sum/predict", json={"input": [1.0, 2.0]}, timeout=10)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: any(s.name == "ketch.compute" for s in exporter.get_finished_spans()), 10, "the compute span"
    )
    server = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(server) == 1 and server[0].parent is None and server[0].name == "POST /{app}/predict"
    trace_id = server[0].context.trace_id
    assert {s.name for s in _spans(exporter, trace_id, 4)} == {
        "POST /{app}/predict",
        "ketch.queue",
        "ketch.batch",
        "ketch.compute",
    }


@pytest.mark.parametrize(
    "bad",
    [
        "00-" + "0" * 32 + "-" + CALLER_SPAN + "-01",  # an all-zero trace id
        "garbage",
        "00-" + CALLER_TRACE + "-" + CALLER_SPAN + "-01-extra",  # version 00 takes nothing more
        "00-" + CALLER_TRACE + "-" + CALLER_SPAN + "-01" + "x" * 100_000,  # huge
        "ff-" + CALLER_TRACE + "-" + CALLER_SPAN + "-01",
    ],
)
def test_a_malformed_or_huge_traceparent_is_ignored(exporter, traced_stack, bad: str) -> None:
    url, _ = traced_stack
    r = httpx.post(
        f"{url}/sum/predict",
        json={"input": [1.0, 2.0]},
        headers={"traceparent": bad, "tracestate": "x" * 10_000},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["output"] == 3.0, r.text
    wait_for(
        lambda: any(s.name == "ketch.compute" for s in exporter.get_finished_spans()), 10, "the compute span"
    )
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.parent is None  # a new trace
    assert server.context.trace_id != int(CALLER_TRACE, 16)
    assert not server.context.trace_state  # the oversized tracestate was dropped


def test_a_batch_of_several_traces_links_them(exporter, thread_broker, replica_threads) -> None:
    """Queries of different traces in one batch: one batch span, child of the first traced
    query's queue span, linked to every traced query's; the compute span, child of the batch
    span, linked to the others'. The replica (one credit) is held on a first query while the
    four traced ones queue, so they go in one batch."""
    import asyncio

    tb = thread_broker
    held, release = threading.Event(), threading.Event()

    def gated(xs):
        if any(float(np.sum(x)) < 0 for x in xs):  # the blocker: hold the replica
            held.set()
            release.wait(20)
        return sums(xs)

    with ketch.Admin(tb.admin) as admin:
        admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=10000, models=["m"])
    replica_threads(gated, backend=tb.backend, name="m", credits=1)
    with ketch.Client(tb.frontend) as c:
        wait_for(lambda: c.predict("sum", np.ones(2)).output == 2.0, 20, "a replica to answer")
    exporter.clear()
    parents = [f"00-{i:032x}-{i:016x}-01" for i in range(1, 5)]

    async def send_all() -> list:
        async with ketch.AsyncClient(tb.frontend) as c:
            blocker = asyncio.ensure_future(c.predict("sum", np.full(2, -1.0)))
            while not held.is_set():
                await asyncio.sleep(0.01)
            traced = [
                asyncio.ensure_future(c.predict("sum", np.full(2, 100.0 + i), traceparent=tp))
                for i, tp in enumerate(parents)
            ]
            untraced = asyncio.ensure_future(c.predict("sum", np.full(2, 10.0)))  # rides along
            queue = tb.broker.models["m"].queue
            for _ in range(1000):  # until all five wait in the model's queue (10 s at most)
                if len(queue) == 5:
                    break
                await asyncio.sleep(0.01)
            release.set()
            return await asyncio.gather(blocker, *traced, untraced)

    answers = asyncio.run(send_all())
    assert [a.output for a in answers] == [-2.0, 200.0, 202.0, 204.0, 206.0, 20.0]
    queues = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name == "ketch.queue"}

    def batch_spans() -> list:
        return [s for s in exporter.get_finished_spans() if s.name == "ketch.batch"]

    def covered_by(batches: list) -> list:
        return [link.context.span_id for b in batches for link in b.links]

    # a batch span ends at its reply, after its queries' queue spans
    wait_for(lambda: len(covered_by(batch_spans())) == 4, 10, "batch spans covering the 4 queries")
    assert {s.parent.trace_id for s in queues.values()} == set(range(1, 5))
    batches = batch_spans()
    # every traced query is linked from exactly one batch span, whose parent is one of them
    assert sorted(covered_by(batches)) == sorted(queues)
    for b in batches:
        assert b.parent.span_id in {link.context.span_id for link in b.links}
        assert b.context.trace_id == queues[b.parent.span_id].context.trace_id
    wait_for(
        lambda: sum(s.name == "ketch.compute" for s in exporter.get_finished_spans()) == len(batches),
        10,
        "a compute span per batch",
    )
    computes = [s for s in exporter.get_finished_spans() if s.name == "ketch.compute"]
    batch_ids = {b.context.span_id for b in batches}
    assert {c.parent.span_id for c in computes} == batch_ids
    for c in computes:
        (b,) = [b for b in batches if b.context.span_id == c.parent.span_id]
        # the compute span: child of the batch span, linked to the batch's other traced queries
        others = {link.context.span_id for link in b.links} - {b.parent.span_id}
        assert {link.context.span_id for link in c.links} == others
    assert max(len(b.links) for b in batches) >= 2, "no batch held two traced queries"


def test_untraced_queries_make_no_spans(exporter, thread_broker, replica_threads) -> None:
    tb = thread_broker
    serve_sums(tb, replica_threads, "plain", "p")
    with ketch.Client(tb.frontend) as c:
        assert [p.output for p in c.predict_many("plain", [np.ones(3)] * 20)] == [3.0] * 20
        # a malformed traceparent is not sent: still untraced
        assert c.predict("plain", np.ones(2), traceparent="00-nonsense").output == 2.0
    assert exporter.get_finished_spans() == ()


def test_nothing_traces_without_configuration(thread_broker, replica_threads) -> None:
    """No provider installed: no tracer anywhere, and a traced query is carried and served."""
    assert tracing.tracer("broker") is None
    tb = thread_broker
    assert tb.broker.traces.tracer is None
    r = serve_sums(tb, replica_threads, "plain", "p")
    assert r._tracer is None
    with ketch.Client(tb.frontend) as c:
        assert c.predict("plain", np.ones(4), traceparent=TRACEPARENT).output == 4.0


def test_traced_queries_read_from_templates_keep_their_traces(
    exporter, thread_broker, replica_threads
) -> None:
    """After the first, traced queries (a version-00 traceparent, no tracestate) are read from
    learnt templates by the broker and the replica; each still gets its own spans."""
    tb = thread_broker
    r = serve_sums(tb, replica_threads)
    exporter.clear()
    with ketch.Client(tb.frontend) as c:
        for i in range(1, 6):
            assert c.predict("sum", np.full(3, i), traceparent=f"00-{i:032x}-{i:016x}-01").output == 3.0 * i
    assert tb.broker.admission.traced_queries and r._traced_requests  # learnt, and used below
    for i in range(1, 6):
        named = _by_name(_spans(exporter, i, 3))
        assert set(named) == {"ketch.queue", "ketch.batch", "ketch.compute"}, (i, sorted(named))
        (queue,), (batch,), (compute,) = named["ketch.queue"], named["ketch.batch"], named["ketch.compute"]
        assert queue.parent.span_id == i and queue.attributes["ketch.request_id"] > 0
        assert batch.parent.span_id == queue.context.span_id
        assert compute.parent.span_id == batch.context.span_id
