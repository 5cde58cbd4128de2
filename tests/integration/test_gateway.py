"""The HTTP gateway as a real process, driven by clients no one here wrote.

One broker process and one gateway process serve the module; models are ``ketch.Replica``
threads of this process, so a test can hold a batch (overload) or fail one at will. The
clients are ``tritonclient[http]`` (KServe V2, JSON and binary tensors), plain ``httpx``
(Clipper's routes), ``prometheus_client.parser`` (/metrics) and ``schemathesis`` (fuzzing
from /openapi.json).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

pytestmark = pytest.mark.timeout(60)


def sums(xs):
    return [float(np.sum(x)) for x in xs]


def int_sums(xs):
    return [np.int64(x.sum()) for x in xs]


def fails(xs):
    raise ValueError("this model always fails")


@pytest.fixture(scope="module")
def broker(module_broker):
    return module_broker


@pytest.fixture(scope="module")
def admin(broker):
    with broker.admin_client() as a:
        yield a


@pytest.fixture(scope="module")
def replicas(module_replicas):
    return module_replicas


@pytest.fixture(scope="module")
def apps(admin, replicas):
    admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=2000, default=-1, models=["total"])
    admin.create_app("vec4", input_type="float64", input_shape=[4], slo_ms=2000, models=["total4"])
    admin.create_app("ints", input_type="int64", input_shape=[2], slo_ms=2000, models=["isum"])
    admin.create_app("text", input_type="string", slo_ms=2000, models=["upper"])
    admin.create_app("blob", input_type="bytes", slo_ms=2000, models=["rev"])
    admin.create_app("doc", input_type="json", slo_ms=2000, models=["jdoc"])
    admin.create_app(
        "withdef",
        input_type="float64",
        input_shape=[2],
        slo_ms=50,
        default={"label": "unknown"},
        models=["ghost"],
    )
    admin.create_app("nodef", input_type="float64", input_shape=[2], slo_ms=50, models=["ghost"])
    admin.create_app("broken", input_type="float64", input_shape=[-1], slo_ms=2000, models=["fails"])
    admin.create_app("fz", input_type="float64", input_shape=[-1], slo_ms=1000, default=-1, models=["total"])
    replicas(sums, "total")
    replicas(sums, "total4", input_shape=[4])
    replicas(int_sums, "isum", input_type="int64", input_shape=[2])
    replicas(lambda xs: [x.upper() for x in xs], "upper", input_type="string")
    replicas(lambda xs: [bytes(reversed(x)) for x in xs], "rev", input_type="bytes")
    replicas(lambda xs: [{"echo": x} for x in xs], "jdoc", input_type="json")
    replicas(fails, "fails")
    for model in ("total", "total4", "isum", "upper", "rev", "jdoc", "fails"):
        wait_for(lambda m=model: admin.replicas(m), 15, f"a replica of {model}")


@pytest.fixture(scope="module")
def gateway(broker, apps):
    with LocalGateway(broker.frontend, broker.admin) as gw:
        yield gw


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        yield client


@pytest.fixture
def kserve(gateway):
    client = triton.InferenceServerClient(url=gateway.url.removeprefix("http://"))
    yield client
    client.close()


def post(http: httpx.Client, path: str, doc) -> httpx.Response:
    return http.post(path, json=doc)


# ---------------------------------------------------------------- Clipper routes (httpx)


def test_clipper_predict_one_and_a_batch(http):
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=int(rng.integers(1, 9))) for _ in range(20)]
    for x in xs[:5]:
        r = post(http, "/sum/predict", {"input": x.tolist()})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["output"] == pytest.approx(x.sum())
        assert (
            doc["default"] is False and doc["default_explanation"] == "" and isinstance(doc["query_id"], int)
        )
    r = post(http, "/sum/predict", {"input_batch": [x.tolist() for x in xs]})
    assert r.status_code == 200, r.text
    batch = r.json()["batch_predictions"]
    assert [p["output"] for p in batch] == pytest.approx([x.sum() for x in xs])
    assert len({p["query_id"] for p in batch}) == len(xs)
    # JSON integers for a float64 app, whole floats for an int64 app
    assert post(http, "/vec4/predict", {"input": [1, 2, 3, 4]}).json()["output"] == 10.0
    assert post(http, "/ints/predict", {"input": [2.0, 5]}).json()["output"] == 7


def test_clipper_default_or_504_at_the_deadline(http):
    r = post(http, "/withdef/predict", {"input": [1.0, 2.0]})
    assert r.status_code == 200
    doc = r.json()
    assert doc["default"] is True and doc["output"] == {"label": "unknown"}
    assert "no replica" in doc["default_explanation"]
    r = post(http, "/nodef/predict", {"input": [1.0, 2.0]})
    assert r.status_code == 504 and r.json()["code"] == "DEADLINE" and "no default" in r.json()["error"]


def test_clipper_text_bytes_and_json_apps(http):
    assert post(http, "/text/predict", {"input": "héllo"}).json()["output"] == "HÉLLO"
    raw = bytes(range(256))
    r = post(http, "/blob/predict", {"input": base64.b64encode(raw).decode()})
    assert base64.b64decode(r.json()["output"]) == raw[::-1]
    r = post(http, "/doc/predict", {"input_batch": [{"a": 1}, [1, "x"], None]})
    assert [p["output"] for p in r.json()["batch_predictions"]] == [
        {"echo": {"a": 1}},
        {"echo": [1, "x"]},
        {"echo": None},
    ]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/sum/predict", b"{not json", "not JSON"),
        ("/sum/predict", b"[1, 2]", '"input"'),
        ("/sum/predict", b'{"input": [1], "input_batch": [[1]]}', '"input"'),
        ("/sum/predict", b'{"input": "seven"}', "number"),
        ("/sum/predict", b'{"input": [[1, 2], [3]]}', "rectangular"),
        ("/sum/predict", b'{"input_batch": []}', "non-empty"),
        ("/vec4/predict", b'{"input": [1, 2, 3]}', "shape"),
        ("/ints/predict", b'{"input": [1.5, 2]}', "whole numbers"),
        ("/text/predict", b'{"input": 7}', "string"),
        ("/blob/predict", b'{"input": "***"}', "base64"),
        ("/sum/update", b'{"input": [1]}', "label"),
        ("/sum/update", b'{"label": 1}', "one of them"),
    ],
)
def test_clipper_bad_requests_are_400_with_a_message(http, path, body, needle):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_a_bad_item_in_a_batch_fails_alone(http):
    r = post(http, "/vec4/predict", {"input_batch": [[1, 2, 3, 4], [1, 2, 3], [0, 0, 0, 1]]})
    assert r.status_code == 200
    ok, bad, ok2 = r.json()["batch_predictions"]
    assert (ok["output"], ok2["output"]) == (10.0, 1.0)
    assert bad["code"] == "BAD_INPUT" and "shape" in bad["error"]


def test_clipper_input_batch_of_one_is_answered_as_one_input(http):
    """Clipper's query frontend (ucbrise/clipper, src/frontends/src/query_frontend.hpp,
    ``get_batch_prediction_response_content``) returns a batch's only answer bare: the body
    for ``{"input_batch": [x]}`` is the body for ``{"input": x}``; only two or more answers
    are wrapped in ``{"batch_predictions": [...]}``."""
    one = post(http, "/sum/predict", {"input": [1.0, 2.0]})
    batch_of_one = post(http, "/sum/predict", {"input_batch": [[1.0, 2.0]]})
    assert one.status_code == batch_of_one.status_code == 200, batch_of_one.text
    doc = batch_of_one.json()
    assert "batch_predictions" not in doc
    assert set(doc) == set(one.json()) and doc["output"] == 3.0 and doc["default"] is False
    assert isinstance(doc["query_id"], int) and doc["query_id"] != one.json()["query_id"]
    two = post(http, "/sum/predict", {"input_batch": [[1.0, 2.0], [3.0]]}).json()
    assert [p["output"] for p in two["batch_predictions"]] == [3.0, 3.0]
    # a batch of one that fails is that input's error, as for "input"
    r = post(http, "/vec4/predict", {"input_batch": [[1, 2, 3]]})
    assert r.status_code == 400 and r.json()["code"] == "BAD_INPUT", r.text


def test_clipper_update_on_a_single_model_app_is_acknowledged(http):
    """Clipper's query frontend (ucbrise/clipper, src/frontends/src/query_frontend.hpp,
    ``update_fn``) answers feedback to an app of its default (single-model) policy with 200
    ("Feedback received? 1": src/libclipper/src/query_processor.cpp, ``update``, acks true
    after ``DefaultOutputSelectionPolicy`` schedules no task); its client takes any 200.
    Ketch acknowledges it as well and says that nothing was learned; a malformed input is
    still a 400, as in Clipper."""
    r = post(http, "/sum/update", {"input": [1.0, 2.0], "label": 3.0, "uid": 7})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["app"] == "sum" and doc["accepted"] is True and doc["learned"] is False
    assert "single policy" in doc["reason"]
    qid = post(http, "/sum/predict", {"input": [1.0]}).json()["query_id"]
    assert post(http, "/sum/update", {"query_id": qid, "label": 1.0}).status_code == 200
    r = post(http, "/sum/update", {"input": "seven", "label": 3.0})
    assert r.status_code == 400 and r.json()["code"] == "BAD_INPUT", r.text


def test_clipper_update_is_answered(http, admin, replicas):
    assert post(http, "/nope/update", {"input": [1.0], "label": 1}).status_code == 404
    admin.create_app("bandit", input_type="float64", input_shape=[-1], slo_ms=2000, models=["total"])
    admin.link("bandit", "total_b")
    admin.set_policy("bandit", "exp3")
    replicas(sums, "total_b")
    wait_for(lambda: http.get("/v2/models/bandit/ready").status_code == 200, 10, "the bandit app")
    answer = post(http, "/bandit/predict", {"input": [1.0, 2.0]}).json()
    assert answer["output"] == 3.0 and answer["model"] in ("total", "total_b")
    for body in ({"query_id": answer["query_id"], "label": 1.0}, {"input": [1.0, 2.0], "label": 0.0}):
        r = post(http, "/bandit/update", body)
        assert r.status_code == 200, r.text
        assert r.json() == {"app": "bandit", "accepted": True, "learned": True}
    assert post(http, "/bandit/update", {"query_id": 1, "label": 1.0}).status_code == 404  # no such query
    versions = http.get("/v2/models/bandit").json()["versions"]
    assert sorted(versions) == ["total:1", "total_b:1"]


def test_unknown_apps_and_routes_are_404(http):
    assert post(http, "/nope/predict", {"input": [1.0]}).json()["code"] == "UNKNOWN_APP"
    for method, path in [
        ("POST", "/nope/predict"),
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/models/nope/infer"),
        ("GET", "/no/such/route"),
    ]:
        r = http.request(
            method, path, json={"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}]}
        )
        assert r.status_code == 404 and "error" in r.json(), (method, path, r.text)
    r = http.get("/sum/predict")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]


def test_a_failing_model_is_502(http):
    r = post(http, "/broken/predict", {"input": [1.0]})
    assert r.status_code == 502 and r.json()["code"] == "MODEL_ERROR"
    assert "ValueError: this model always fails" in r.json()["error"]


def test_overload_is_503_with_retry_after(admin, replicas, gateway):
    admin.create_app("slow", input_type="float64", input_shape=[1], slo_ms=8000, models=["gated"])
    entered, release = threading.Event(), threading.Event()

    def gated(xs):
        entered.set()
        assert release.wait(20)
        return sums(xs)

    replicas(gated, "gated", credits=1, max_batch=1)
    wait_for(lambda: admin.replicas("gated"), 10, "the gated replica")
    admin.configure_model("gated", max_queue=1)
    answers: list[httpx.Response] = []

    def ask(value: float) -> None:
        with httpx.Client(base_url=gateway.url, timeout=20) as c:
            answers.append(c.post("/slow/predict", json={"input": [value]}))

    threads = [threading.Thread(target=ask, args=(1.0,))]
    threads[0].start()
    try:
        assert entered.wait(10), "the replica never got the first query"
        threads.append(threading.Thread(target=ask, args=(2.0,)))
        threads[1].start()
        wait_for(lambda: admin.stats()["models"]["gated"]["queue_depth"] == 1, 10, "a queued query")
        with httpx.Client(base_url=gateway.url, timeout=10) as c:
            r = c.post("/slow/predict", json={"input": [3.0]})
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "OVERLOADED" and int(r.headers["retry-after"]) >= 1
        assert r.json()["retry_after_ms"] > 0
    finally:
        release.set()
        for t in threads:
            t.join(20)
    assert sorted(a.json()["output"] for a in answers) == [1.0, 2.0]


# ---------------------------------------------------------------- KServe V2 (tritonclient)


def test_kserve_health_and_metadata(kserve):
    # strict, as Triton: not ready while 'withdef' and 'nodef' link 'ghost', which has no replica
    assert kserve.is_server_live() and not kserve.is_server_ready()
    meta = kserve.get_server_metadata()
    assert meta["name"] == "ketch" and "binary_tensor_data" in meta["extensions"]
    assert kserve.is_model_ready("vec4")
    assert not kserve.is_model_ready("nodef")  # its model has no replica
    assert not kserve.is_model_ready("nope")
    model = kserve.get_model_metadata("vec4")
    assert model["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert model["versions"] == ["1"] and model["platform"] == "ketch"
    with pytest.raises(InferenceServerException) as info:
        kserve.get_model_metadata("nope")
    assert info.value.status() == "404" and "no app named 'nope'" in info.value.message()


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", ["FP64", "FP32", "INT64"])
def test_kserve_infer_a_batch(kserve, binary, datatype):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(16, 4)) * 10).astype(triton_np(datatype))
    inp = triton.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [triton.InferRequestedOutput("output", binary_data=binary), triton.InferRequestedOutput("default")]
    res = kserve.infer("vec4", [inp], outputs=outs, request_id="r-1")
    got = res.as_numpy("output")
    assert got.shape == (16,) and got.dtype == np.float64
    np.testing.assert_allclose(got, x.astype(np.float64).sum(axis=1))
    assert not res.as_numpy("default").any()
    response = res.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "vec4" and response["model_version"] == "1"


def triton_np(datatype: str):
    return {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64}[datatype]


def test_kserve_one_query_and_all_outputs_binary_by_default(kserve):
    inp = triton.InferInput("x", [4], "FP64")
    inp.set_data_from_numpy(np.array([1.0, 2.0, 3.0, 4.5]))
    res = kserve.infer("vec4", [inp])  # no outputs named: tritonclient asks for binary data
    assert res.as_numpy("output").tolist() == [10.5]
    assert res.as_numpy("default").tolist() == [False]


@pytest.mark.parametrize("binary", [True, False])
def test_kserve_bytes_tensors(kserve, binary):
    words = np.array([w.encode() for w in ("alpha", "béta", "", "gamma")], dtype=np.object_)
    inp = triton.InferInput("input", [4], "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    res = kserve.infer("text", [inp], outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
    got = [w.decode() if isinstance(w, bytes) else w for w in res.as_numpy("output")]  # JSON: str
    assert got == ["ALPHA", "BÉTA", "", "GAMMA"]
    raw = np.array([bytes([0, 255, 7])], dtype=np.object_)
    inp = triton.InferInput("input", [1, 1], "BYTES")
    inp.set_data_from_numpy(raw.reshape(1, 1), binary_data=True)
    res = kserve.infer("blob", [inp], outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
    if binary:
        assert res.as_numpy("output").tolist() == [bytes([7, 255, 0])]
    else:  # asked as JSON: not UTF-8, so base64 text, said so in the output's parameters
        out = res.get_output("output")
        assert out["parameters"] == {"content_type": "base64"} and out["data"] == ["B/8A"]
        assert base64.b64decode(res.as_numpy("output")[0]) == bytes([7, 255, 0])


def test_kserve_errors_are_explicit(kserve):
    def infer(app: str, x: np.ndarray, datatype: str, **kw):
        inp = triton.InferInput("input", list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        return kserve.infer(app, [inp], **kw)

    cases = [
        (("vec4", np.zeros((2, 3)), "FP64"), "400", "shape"),
        (("vec4", np.zeros((2, 2, 4)), "FP64"), "400", "does not fit"),
        (("ints", np.full((1, 2), 1.5), "FP64"), "400", "whole numbers"),
        (("text", np.zeros((1, 2)), "FP64"), "400", "BYTES"),
        (("nope", np.zeros((1, 4)), "FP64"), "404", "no app"),
        (("nodef", np.zeros((1, 2)), "FP64"), "504", "no default"),
        (("broken", np.zeros((1, 2)), "FP64"), "502", "always fails"),
        (("vec4", np.zeros((1, 4)), "FP64", {"priority": 500}), "400", "priority"),
    ]
    for args, status, needle in cases:
        with pytest.raises(InferenceServerException) as info:
            infer(*args[:3], **(args[3] if len(args) > 3 else {}))
        assert info.value.status() == status and needle in info.value.message(), (args[0], info.value)


def test_kserve_timeout_and_priority_parameters(kserve, http):
    inp = triton.InferInput("input", [1, 2], "FP64")
    inp.set_data_from_numpy(np.ones((1, 2)))
    res = kserve.infer("withdef", [inp], timeout=5000, priority=3)  # 5 ms, Triton's microseconds
    assert res.as_numpy("default").tolist() == [True]
    assert json.loads(res.as_numpy("output")[0]) == {"label": "unknown"}
    params = res.get_response()["parameters"]
    assert params["defaults"] == 1 and "no replica" in params["default_explanation"]
    doc = {
        "parameters": {"timeout": 20_000},
        "inputs": [{"name": "i", "datatype": "FP64", "shape": [1, 2], "data": [1, 2]}],
    }
    r = http.post("/v2/models/nodef/infer", json=doc)
    assert r.status_code == 504 and r.json()["code"] == "DEADLINE"
    doc["parameters"]["timeout"] = -1
    assert http.post("/v2/models/nodef/infer", json=doc).status_code == 400


def test_kserve_binary_bodies_by_hand(http):
    x = np.arange(8, dtype="<f8").reshape(2, 4)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP64",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()

    def send(body: bytes, header_length: int | str, **headers) -> httpx.Response:
        return http.post(
            "/v2/models/vec4/infer",
            content=body,
            headers={"inference-header-content-length": str(header_length), **headers},
        )

    r = send(head + x.tobytes(), len(head))
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(r.content[n:], "<f8").tolist() == [6.0, 22.0]
    assert (
        send(gzip.compress(head + x.tobytes()), len(head), **{"content-encoding": "gzip"}).status_code == 200
    )
    for body, length, needle in [
        (head + x.tobytes()[:-8], len(head), "runs past"),
        (head + x.tobytes() + b"extra", len(head), "belong to no input"),
        (head + x.tobytes(), len(head) + 10_000, "outside"),
        (head + x.tobytes(), "ten", "number of bytes"),
        (head[:-3] + x.tobytes(), len(head) - 3, "not JSON"),
    ]:
        r = send(body, length)
        assert r.status_code == 400 and needle in r.json()["error"], (needle, r.text)
    assert send(b"\x00" * 10, 10, **{"content-encoding": "br"}).status_code == 415
    bytes_doc = json.dumps(
        {"inputs": [{"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 13}}]}
    ).encode()
    words = serialize_byte_tensor(np.array([b"ab", b"cde"], dtype=np.object_)).item()
    assert len(words) == 13
    r = http.post(
        "/v2/models/text/infer",
        content=bytes_doc + words,
        headers={"inference-header-content-length": str(len(bytes_doc))},
    )
    assert r.json()["outputs"][0]["data"] == ["AB", "CDE"]


# ---------------------------------------------------------------- readiness


def test_not_ready_without_a_broker_and_ready_again_after_restart(tmp_path):
    broker = LocalBroker(state_path=str(tmp_path / "state.db"))
    broker.start()
    try:
        with LocalGateway(broker.frontend, broker.admin, extra_args=["--metadata-ttl", "0.2"]) as gw:
            ready = lambda: httpx.get(gw.url + "/v2/health/ready", timeout=5)  # noqa: E731
            assert ready().json() == {"ready": True}
            broker.stop()
            wait_for(lambda: ready().status_code == 503, 15, "not ready once the broker is gone")
            doc = ready().json()
            assert "error" in doc and doc["ready"] is False
            assert httpx.get(gw.url + "/v2/health/live", timeout=5).json() == {"live": True}
            r = httpx.post(gw.url + "/x/predict", json={"input": [1.0]}, timeout=10)
            assert r.status_code == 503 and "retry-after" in r.headers
            broker.restart()
            wait_for(lambda: ready().status_code == 200, 15, "ready again after a restart")
    finally:
        broker.stop()
        broker._tmp.cleanup()


def test_model_ready_follows_its_replicas(admin, replicas, http):
    admin.create_app("later", input_type="float64", input_shape=[1], slo_ms=1000, models=["latecomer"])
    r = http.get("/v2/models/later/ready")
    assert r.status_code == 503 and "no live replica" in r.json()["error"]
    replicas(sums, "latecomer")
    wait_for(lambda: http.get("/v2/models/later/ready").status_code == 200, 10, "the app to be ready")


# ---------------------------------------------------------------- metrics


def scrape(http: httpx.Client) -> dict[str, dict]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_are_prometheus_text_with_broker_and_gateway_figures(http):
    for i in range(5):
        assert post(http, "/sum/predict", {"input": [float(i)]}).status_code == 200
    assert post(http, "/sum/predict", {"input": [0.0]}).status_code == 200  # asked before: a cache hit
    m = scrape(http)
    assert m["ketch_broker_up"][()] == 1
    assert m["ketch_app_queries_total"][(("app", "sum"),)] >= 5
    assert m["ketch_app_defaults_total"][(("app", "withdef"),)] >= 1
    assert m["ketch_app_errors_total"][(("app", "nodef"),)] >= 1
    e2e = m["ketch_app_query_duration_seconds_count"]  # by the model and version that answered
    assert sum(n for k, n in e2e.items() if dict(k)["app"] == "sum" and dict(k)["model"] == "total") >= 5
    assert m["ketch_model_replicas"][(("model", "total"),)] == 1
    assert m["ketch_model_queue_depth"][(("model", "total"),)] == 0
    assert m["ketch_model_batches_total"][(("model", "total"),)] >= 1
    assert m["ketch_app_cache_hits_total"][(("app", "sum"),)] >= 1 and m["ketch_cache_hits_total"][()] >= 1
    batches = m["ketch_model_batch_size_bucket"]
    assert (
        batches[(("le", "+Inf"), ("model", "total"))] == m["ketch_model_batches_total"][(("model", "total"),)]
    )
    states = m["ketch_replica_state"]
    assert any(dict(k)["model"] == "total" and dict(k)["state"] in ("ready", "busy") for k in states)
    key = (("app", "sum"), ("code", "200"), ("route", "predict"))
    assert m["ketch_http_requests_total"][key] >= 5
    count = m["ketch_http_request_duration_seconds_count"][(("app", "sum"), ("route", "predict"))]
    inf = m["ketch_http_request_duration_seconds_bucket"][
        (("app", "sum"), ("le", "+Inf"), ("route", "predict"))
    ]
    assert count == inf >= 5
    assert "ketch_http_queries_per_request_bucket" in m
    # unknown app names never become labels
    assert not any(dict(k).get("app") == "nope" for k in m["ketch_http_requests_total"])


def test_several_workers_share_the_port_and_their_metrics(broker, apps):
    with LocalGateway(broker.frontend, broker.admin, workers=2) as gw:
        for i in range(12):  # a fresh connection each time, so both workers take some
            r = httpx.post(gw.url + "/sum/predict", json={"input": [float(i), 1.0]}, timeout=10)
            assert r.status_code == 200 and r.json()["output"] == i + 1.0
        workers = [p for p in psutil.Process(gw.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            m = scrape(c)
        assert m["ketch_http_requests_total"][(("app", "sum"), ("code", "200"), ("route", "predict"))] == 12
        assert gw.stop() == 0  # SIGTERM: a graceful, clean exit
        wait_for(lambda: not any(w.is_running() for w in workers), 10, "the workers to exit")


# ---------------------------------------------------------------- auth and OpenAPI


def test_bearer_tokens_guard_every_route_but_health(broker, apps):
    with LocalGateway(broker.frontend, broker.admin, env={"KETCH_GATEWAY_TOKENS": "s3cret,other"}) as gw:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            # open without a token; strict, and the apps linking 'ghost' have no replica of it: 503,
            # which names no app or model to a caller without a token, and names them with one
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and "no live replica" in r.json()["error"] and "ghost" not in r.text
            r = c.get("/v2/health/ready", headers={"authorization": "Bearer s3cret"})
            assert r.status_code == 503 and "model 'ghost' has no live replica" in r.json()["error"]
            for path in ("/v2", "/metrics", "/openapi.json", "/v2/models/sum"):
                r = c.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
            assert c.get("/v2", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v2", headers={"authorization": "Basic s3cret"}).status_code == 401
            ok = {"authorization": "Bearer other"}
            assert c.post("/sum/predict", json={"input": [2.0]}, headers=ok).json()["output"] == 2.0
            spec = c.get("/openapi.json", headers=ok).json()
            assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        client = triton.InferenceServerClient(url=gw.url.removeprefix("http://"))
        try:
            assert client.is_server_live()
            with pytest.raises(InferenceServerException):
                client.get_server_metadata()
            assert client.get_server_metadata(headers={"Authorization": "Bearer s3cret"})["name"] == "ketch"
        finally:
            client.close()
        assert gw.stop() == 0


def test_openapi_describes_every_route(http):
    spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {
        "/{app}/predict",
        "/{app}/update",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/repository/index",
        "/v2/repository/models/{name}/load",
        "/v2/repository/models/{name}/unload",
        "/metrics",
        "/openapi.json",
    }


FUZZ_EXAMPLES = int(os.environ.get("KETCH_FUZZ_EXAMPLES", "25"))  # per operation; more explore wider

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@given(value=JSON, app=st.sampled_from(["sum", "vec4", "ints", "text", "blob", "doc"]), batch=st.booleans())
@settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_any_json_input_is_answered_without_a_5xx(gateway, value, app, batch):
    body = {"input_batch": [value, value]} if batch else {"input": value}
    r = httpx.post(f"{gateway.url}/{app}/predict", json=body, timeout=10)
    assert r.status_code in (200, 400), r.text
    if app == "doc" and not batch:
        assert r.json()["output"] == {"echo": value}


@st.composite
def tensors(draw):
    datatype = draw(
        st.sampled_from(
            ["BOOL", "INT8", "UINT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES"]
        )
    )
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    n = int(np.prod(shape))
    if datatype == "BYTES":
        element = st.text(max_size=6)
    elif datatype == "BOOL":
        element = st.booleans()
    elif datatype.startswith("FP"):
        element = st.floats(-1e4, 1e4)
    else:
        info = np.iinfo(np.dtype(datatype.lower()))
        element = st.integers(int(info.min), int(info.max))
    return {
        "name": "input",
        "datatype": datatype,
        "shape": shape,
        "data": draw(st.lists(element, min_size=n, max_size=n)),
    }


@given(t=tensors(), app=st.sampled_from(["sum", "vec4", "ints", "text", "doc"]), binary=st.booleans())
@settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_any_tensor_is_answered_without_a_5xx(gateway, t, app, binary):
    doc = {"inputs": [t], "parameters": {"binary_data_output": binary}}
    r = httpx.post(f"{gateway.url}/v2/models/{app}/infer", json=doc, timeout=10)
    assert r.status_code in (200, 400), r.text


def test_fuzzing_from_the_openapi_description_finds_no_5xx(gateway):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    seen: dict[str, set[int]] = {}

    def fuzz(op) -> None:
        strategy = st.one_of(op.as_strategy(), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=strategy, real_app=st.booleans())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=not os.environ.get("KETCH_FUZZ_EXAMPLES"),  # the same cases each run unless asked
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case, real_app):
            if real_app:  # half the cases name an app that exists, so requests get past the 404
                for key in case.path_parameters or {}:
                    case.path_parameters[key] = "fz"
            response = case.call(base_url=gateway.url)
            if op.label == "GET /v2/health/ready" and response.json().get("code") == "NOT_READY":
                return  # strict readiness: 'ghost' has no replica (documented, not a server error)
            case.validate_response(response, checks=[not_a_server_error])
            seen.setdefault(op.label, set()).add(response.status_code)

        run()

    operations = [result.ok() for result in schema.get_all_operations()]  # all but /openapi.json itself
    assert len(operations) == 15  # load and unload are refused (403): this gateway has no --model-control
    for op in operations:
        fuzz(op)
    assert set(seen) == {op.label for op in operations} - {"GET /v2/health/ready"}
    assert all(code < 500 for codes in seen.values() for code in codes), seen


# ---------------------------------------------------------------- the CLI


def test_broker_start_runs_the_gateway_and_stops_it(tmp_path):
    port = free_port()
    ready = tmp_path / "ready.json"
    argv = [sys.executable, "-m", "ketch.cli", "broker", "start", "--state", str(tmp_path / "s.db")]
    argv += [f"--{role}=tcp://127.0.0.1:*" for role in ("frontend", "backend", "admin")]
    argv += ["--ready-file", str(ready), "--http", f"127.0.0.1:{port}"]
    log = open(tmp_path / "broker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        wait_for(lambda: ready.exists(), 20, "the broker to listen")

        def gateway_ready() -> bool:
            assert proc.poll() is None, (tmp_path / "broker.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(gateway_ready, 20, "the gateway started by the broker to be ready")
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1 and "gateway" in children[0].cmdline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not psutil.pid_exists(children[0].pid) or children[0].status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_broker_start_no_http_runs_no_gateway(tmp_path):
    ready = tmp_path / "ready.json"
    argv = [
        sys.executable,
        "-m",
        "ketch.cli",
        "broker",
        "start",
        "--no-http",
        "--state",
        str(tmp_path / "s.db"),
    ]
    argv += [f"--{role}=tcp://127.0.0.1:*" for role in ("frontend", "backend", "admin")]
    argv += ["--ready-file", str(ready)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ready.exists(), 20, "the broker to listen")
        assert psutil.Process(proc.pid).children() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gateway_cli_has_help():
    from click.testing import CliRunner
    from ketch.cli import main

    for args in (["gateway", "--help"], ["broker", "start", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and ("--listen" in result.output or "--no-http" in result.output)


def test_gateway_cli_refuses_a_bad_listen_address():
    r = subprocess.run(
        [sys.executable, "-m", "ketch.cli", "gateway", "--listen", "8080"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
