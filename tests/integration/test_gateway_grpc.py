"""KServe V2 over gRPC: the gateway as a real process, driven by tritonclient and a plain stub.

One broker process and one gateway process (gRPC on an OS-chosen port) serve the module;
models are ``ketch.Replica`` threads of this process: one echo model per numeric datatype,
so every datatype goes in and comes back. The clients are ``tritonclient.grpc`` (which sends
raw contents) and a plain channel with the stubs generated from schemas/grpc_predict_v2.proto
(raw and typed contents), so the test does not trust one client's reading of the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import grpc
import httpx
import ketch
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tg
from ketch.gateway._oip import grpc_predict_v2_pb2 as pb
from ketch.gateway._oip import grpc_predict_v2_pb2_grpc as pb_grpc
from ketch.gateway._oip import triton_repository_pb2 as repo_pb
from ketch.gateway._oip import triton_repository_pb2_grpc as repo_grpc
from ketch.gateway.local import LocalGateway
from ketch.gateway.tensors import DATATYPES
from ketch.local import LocalBroker, free_port, wait_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.timeout(90)

KETCH_DTYPE = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def echo(xs):
    return list(xs)


def fails(xs):
    raise ValueError("this model always fails")


@pytest.fixture(scope="module")
def broker(module_broker):
    return module_broker


@pytest.fixture(scope="module")
def apps(broker, module_replicas):
    def start(fn, name: str, **kw) -> None:
        module_replicas(fn, name, replica_id=f"grpc/{name}/{kw.get('version', '1')}", **kw)

    with broker.admin_client() as admin:
        for dtype in KETCH_DTYPE.values():
            admin.create_app(f"echo-{dtype}", input_type=dtype, input_shape=[2], slo_ms=5000, models=[dtype])
            start(echo, dtype, input_type=dtype, input_shape=[2])
        admin.create_app("text", input_type="string", slo_ms=5000, models=["upper"])
        admin.create_app("blob", input_type="bytes", slo_ms=5000, models=["rev"])
        admin.create_app("doc", input_type="json", slo_ms=5000, models=["jdoc"])
        admin.create_app("nodef", input_type="float64", input_shape=[2], slo_ms=50, models=["ghost"])
        admin.create_app(
            "withdef", input_type="float64", input_shape=[2], slo_ms=50, default=-1, models=["ghost"]
        )
        admin.create_app("broken", input_type="float64", input_shape=[-1], slo_ms=5000, models=["fails"])
        start(lambda xs: [x.upper() for x in xs], "upper", input_type="string")
        start(lambda xs: [bytes(reversed(x)) for x in xs], "rev", input_type="bytes")
        start(lambda xs: [{"echo": x} for x in xs], "jdoc", input_type="json")
        start(fails, "fails")
        admin.create_app("ver", input_type="string", slo_ms=5000, models=["vm"])
        for version in ("1", "2"):  # each version says which it is
            start(lambda xs, v=version: [f"v{v}:{x}" for x in xs], "vm", input_type="string", version=version)
        for model in [*KETCH_DTYPE.values(), "upper", "rev", "jdoc", "fails", "vm"]:
            wait_for(lambda m=model: admin.replicas(m), 20, f"a replica of {model}")


@pytest.fixture(scope="module")
def gateway(broker, apps):
    with LocalGateway(broker.frontend, broker.admin) as gw:
        assert gw.grpc.startswith("127.0.0.1:") and not gw.grpc.endswith(":0")
        yield gw


@pytest.fixture
def triton(gateway):
    client = tg.InferenceServerClient(gateway.grpc)
    yield client
    client.close()


@pytest.fixture
def stub(gateway):
    with grpc.insecure_channel(gateway.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def sample(datatype: str, rows: int = 3) -> np.ndarray:
    rng = np.random.default_rng(len(datatype))
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=(rows, 2)).astype(bool)
    if dtype.kind == "f":
        return (rng.normal(size=(rows, 2)) * 100).astype(dtype)
    info = np.iinfo(dtype)  # the extremes of the type travel too
    x = rng.integers(0, 100, size=(rows, 2)).astype(dtype)
    x[0] = [info.min, info.max]
    return x


# ---------------------------------------------------------------- tritonclient


def test_health_and_metadata_with_tritonclient(triton):
    # not ready, strictly as Triton: apps nodef and withdef link ghost, which has no replica
    assert triton.is_server_live() and not triton.is_server_ready()
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "ketch" and "version" in meta
    assert triton.is_model_ready("echo-float64")
    assert not triton.is_model_ready("nodef")  # its model has no replica
    assert not triton.is_model_ready("nope")
    model = triton.get_model_metadata("echo-int16", as_json=True)
    assert model["name"] == "echo-int16" and model["platform"] == "ketch" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "INT16", "shape": ["-1", "2"]}]
    assert {o["name"] for o in model["outputs"]} == {"output", "default"}
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "no app named 'nope'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:  # Triton's statistics are not served
        triton.get_inference_statistics()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_repository_index_and_no_model_control(triton):
    index = triton.get_model_repository_index(as_json=True)["models"]
    entries = {(e["name"], e.get("version", "")): e for e in index}
    assert entries[("echo-float64", "1")]["state"] == "READY"
    assert entries[("nodef", "")]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("text")
    assert info.value.status() == "StatusCode.PERMISSION_DENIED" and "model control" in info.value.message()


def test_repository_load_and_unload_with_model_control(broker, apps, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\nadmin adm1n\n")
    args = ["--token-file", str(tokens), "--model-control"]
    with LocalGateway(broker.frontend, broker.admin, extra_args=args) as gw:
        with tg.InferenceServerClient(gw.grpc) as client:
            user, admin = {"authorization": "Bearer s3cret"}, {"authorization": "Bearer adm1n"}
            assert client.get_model_repository_index(headers=user)
            with pytest.raises(InferenceServerException) as info:
                client.load_model("text", headers=user)
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            client.load_model("text", headers=admin)  # served already: loaded
            with pytest.raises(InferenceServerException) as info:
                client.load_model("nodef", headers=admin)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "ghost" in info.value.message()
            with pytest.raises(InferenceServerException) as info:  # withdef links ghost too
                client.unload_model("nodef", headers=admin)
            assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        with grpc.insecure_channel(gw.grpc) as channel:
            stub = repo_grpc.GRPCInferenceServiceStub(channel)
            req = repo_pb.RepositoryModelUnloadRequest(model_name="nodef")
            req.parameters["force"].bool_param = True
            stub.RepositoryModelUnload(req, metadata=tuple(admin.items()), timeout=20)
            index = stub.RepositoryIndex(
                repo_pb.RepositoryIndexRequest(ready=True), metadata=tuple(user.items()), timeout=20
            )
            assert index.models and all(m.state == "READY" for m in index.models)
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryIndex(repo_pb.RepositoryIndexRequest(repository_name="other"), timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("datatype", list(KETCH_DTYPE))
def test_every_datatype_with_tritonclient(triton, datatype):
    x = sample(datatype)
    inp = tg.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    res = triton.infer(f"echo-{KETCH_DTYPE[datatype]}", [inp], request_id="r-1")
    got = res.as_numpy("output")
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert res.as_numpy("default").tolist() == [False] * len(x)
    response = res.get_response()
    assert response.id == "r-1" and response.model_name == f"echo-{KETCH_DTYPE[datatype]}"
    assert response.model_version == "1"


def test_bytes_tensors_with_tritonclient(triton):
    words = np.array([w.encode() for w in ("alpha", "béta", "", "gamma")], dtype=np.object_)
    inp = tg.InferInput("input", [4], "BYTES")
    inp.set_data_from_numpy(words)
    res = triton.infer("text", [inp], outputs=[tg.InferRequestedOutput("output")])
    assert [w.decode() for w in res.as_numpy("output")] == ["ALPHA", "BÉTA", "", "GAMMA"]
    assert [o.name for o in res.get_response().outputs] == ["output"]  # only what was asked for
    raw = np.array([bytes([0, 255, 7])], dtype=np.object_).reshape(1, 1)
    inp = tg.InferInput("input", [1, 1], "BYTES")
    inp.set_data_from_numpy(raw)
    assert triton.infer("blob", [inp]).as_numpy("output").tolist() == [bytes([7, 255, 0])]
    inp = tg.InferInput("input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b'{"a": [1, 2]}'], dtype=np.object_))
    assert json.loads(triton.infer("doc", [inp]).as_numpy("output")[0]) == {"echo": {"a": [1, 2]}}


def test_errors_are_grpc_status_codes(triton):
    def infer(app: str, x: np.ndarray, datatype: str, **kw):
        inp = tg.InferInput("input", list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        return triton.infer(app, [inp], **kw)

    cases = [
        (("echo-float64", np.zeros((2, 3)), "FP64"), "INVALID_ARGUMENT", "shape"),
        (("echo-int64", np.full((1, 2), 1.5), "FP64"), "INVALID_ARGUMENT", "whole numbers"),
        (("echo-int8", np.array([[300, 1]], dtype=np.int32), "INT32"), "INVALID_ARGUMENT", "int8"),
        (("text", np.zeros((1, 2)), "FP64"), "INVALID_ARGUMENT", "BYTES"),
        (("nope", np.zeros((1, 2)), "FP64"), "NOT_FOUND", "no app"),
        (("nodef", np.zeros((1, 2)), "FP64"), "DEADLINE_EXCEEDED", "no default"),
        (("broken", np.zeros((1, 2)), "FP64"), "INTERNAL", "always fails"),
        (("echo-float64", np.zeros((1, 2)), "FP64", {"priority": 500}), "INVALID_ARGUMENT", "priority"),
        (("echo-float64", np.zeros((1, 2)), "FP64", {"model_version": "2"}), "NOT_FOUND", "version"),
    ]
    for args, code, needle in cases:
        try:
            infer(*args[:3], **(args[3] if len(args) > 3 else {}))
        except InferenceServerException as got:
            assert got.status() == f"StatusCode.{code}" and needle in got.message(), (args[0], got)
        else:
            raise AssertionError(f"{args[0]} {args[3:]}: answered, {code} expected")


def test_compressed_calls_and_their_metrics(triton, gateway):
    x = np.arange(64, dtype=np.float64).reshape(32, 2)
    inp = tg.InferInput("input", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        res = triton.infer("echo-float64", [inp], compression_algorithm=algorithm)
        np.testing.assert_array_equal(res.as_numpy("output"), x)
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'ketch_http_requests_total{app="echo-float64",code="200",route="grpc_ModelInfer"}' in text
    assert 'route="grpc_ModelInfer"' in text.split("ketch_http_queries_per_request_bucket", 1)[1]


def test_timeout_parameter_and_defaults(triton):
    inp = tg.InferInput("input", [1, 2], "FP64")
    inp.set_data_from_numpy(np.ones((1, 2)))
    res = triton.infer("withdef", [inp], timeout=5000, priority=3)  # 5 ms, Triton's microseconds
    assert res.as_numpy("default").tolist() == [True] and res.as_numpy("output").tolist() == [-1]
    params = res.get_response().parameters
    assert params["defaults"].int64_param == 1 and params["default_explanation"].string_param


# ---------------------------------------------------------------- a plain generated stub


def typed_request(app: str, x: np.ndarray, datatype: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=app, id="typed")
    t = req.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    if datatype == "BYTES":
        t.contents.bytes_contents.extend(x.ravel().tolist())
    else:
        getattr(t.contents, TYPED_FIELD[datatype]).extend(x.ravel().tolist())
    return req


def output_of(res: pb.ModelInferResponse, name: str) -> np.ndarray:
    """An output's values from raw contents (numeric) or typed contents, as the protocol says."""
    index = [o.name for o in res.outputs].index(name)
    out = res.outputs[index]
    if res.raw_output_contents:
        return np.frombuffer(res.raw_output_contents[index], DATATYPES[out.datatype]).reshape(out.shape)
    values = getattr(out.contents, TYPED_FIELD[out.datatype])
    return np.asarray(list(values), dtype=DATATYPES[out.datatype]).reshape(out.shape)


@pytest.mark.parametrize("datatype", [d for d in KETCH_DTYPE if d != "FP16"])
def test_every_datatype_typed_with_a_plain_stub(stub, datatype):
    x = sample(datatype)
    res = stub.ModelInfer(typed_request(f"echo-{KETCH_DTYPE[datatype]}", x, datatype), timeout=20)
    assert not res.raw_output_contents  # typed in, typed out
    assert res.id == "typed" and [o.datatype for o in res.outputs] == [datatype, "BOOL"]
    np.testing.assert_array_equal(output_of(res, "output"), x)
    assert output_of(res, "default").tolist() == [False] * len(x)


@pytest.mark.parametrize("datatype", list(KETCH_DTYPE))
def test_every_datatype_raw_with_a_plain_stub(stub, datatype):
    x = sample(datatype, rows=1)[0]  # one query: the app's per-query shape, no batch dimension
    req = pb.ModelInferRequest(model_name=f"echo-{KETCH_DTYPE[datatype]}")
    req.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    req.outputs.add(name="output")
    res = stub.ModelInfer(req, timeout=20)
    assert [o.name for o in res.outputs] == ["output"] and len(res.raw_output_contents) == 1
    np.testing.assert_array_equal(output_of(res, "output"), x[None])


def test_fp16_and_bytes_typed_with_a_plain_stub(stub):
    # FP32 into a float16 app rounds, as on HTTP; an FP16 answer has no typed field: raw
    res = stub.ModelInfer(typed_request("echo-float16", np.array([[1.5, -2.0]]), "FP32"), timeout=20)
    assert len(res.raw_output_contents) == 2 and res.outputs[0].datatype == "FP16"
    assert output_of(res, "output").tolist() == [[1.5, -2.0]]
    with pytest.raises(grpc.RpcError) as info:  # past float16's range
        stub.ModelInfer(typed_request("echo-float16", np.array([[70000.0, 1]]), "FP32"), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.ModelInferRequest(model_name="echo-float16")
    req.inputs.add(name="input", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([1.5, -2])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=20)
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
    )
    words = np.array([b"ab", b"c"], dtype=np.object_)
    res = stub.ModelInfer(typed_request("text", words, "BYTES"), timeout=20)
    assert list(res.outputs[0].contents.bytes_contents) == [b"AB", b"C"]


def test_health_metadata_and_errors_with_a_plain_stub(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    # strict, as Triton: apps nodef and withdef link ghost, which has no replica
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="text")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="echo-uint8"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "UINT8", [-1, 2])]
    server = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "ketch" and "binary_tensor_data" in server.extensions
    bad = [
        (pb.ModelInferRequest(model_name="echo-float64"), "one input tensor"),
        (typed_request("echo-float64", np.zeros((1, 3)), "FP64"), "shape"),
        (typed_request("echo-float64", np.zeros((1, 2)), "FP64"), None),  # made bad below
    ]
    bad[2][0].inputs[0].shape[:] = [1, 4]  # 4 values promised, 2 given
    bad[2] = (bad[2][0], "needs 4 values")
    raw_mismatch = pb.ModelInferRequest(model_name="echo-float64")
    raw_mismatch.inputs.add(name="input", datatype="FP64", shape=[2])
    raw_mismatch.raw_input_contents.append(b"\0" * 12)
    bad.append((raw_mismatch, "needs 16 bytes"))
    unknown_type = typed_request("echo-float64", np.zeros((1, 2)), "FP64")
    unknown_type.inputs[0].datatype = "BF16"
    bad.append((unknown_type, "not one of"))
    for req, needle in bad:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=20)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details(), (needle, err)
        assert ("ketch-code", "BAD_INPUT") in err.trailing_metadata()


def test_versions_with_a_plain_stub(stub):
    assert stub.ModelReady(pb.ModelReadyRequest(name="text", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="text", version="7")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="text", version="1"))
    assert meta.name == "text" and list(meta.versions) == ["1"]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="text", version="7"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'7'" in info.value.details()
    req = typed_request("text", np.array([b"ab"], dtype=np.object_), "BYTES")
    req.model_version = "1"
    res = stub.ModelInfer(req, timeout=20)
    assert res.model_version == "1" and list(res.outputs[0].contents.bytes_contents) == [b"AB"]
    req.model_version = "7"
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
    # an app whose model has two versions: each pinned request is answered by its version
    wait_for(lambda: stub.ModelReady(pb.ModelReadyRequest(name="ver", version="2")).ready, 20, "v2")
    assert sorted(stub.ModelMetadata(pb.ModelMetadataRequest(name="ver")).versions) == ["1", "2"]
    for version in ("1", "2", "2", "1"):
        req = typed_request("ver", np.array([b"x"], dtype=np.object_), "BYTES")
        req.model_version = version
        res = stub.ModelInfer(req, timeout=20)
        assert res.model_version == version
        assert list(res.outputs[0].contents.bytes_contents) == [f"v{version}:x".encode()]


# ---------------------------------------------------------------- gateways of their own


def test_tokens_size_limit_and_several_workers(broker, apps, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    args = ["--token-file", str(tokens), "--max-body-mb", "1"]
    with LocalGateway(broker.frontend, broker.admin, workers=2, extra_args=args) as gw:
        client = tg.InferenceServerClient(gw.grpc)
        # health needs no token (not ready: ghost, linked by nodef, has no replica)
        assert client.is_server_live() and not client.is_server_ready()
        inp = tg.InferInput("input", [1, 2], "FP64")
        inp.set_data_from_numpy(np.ones((1, 2)))
        for headers, code in (
            (None, "UNAUTHENTICATED"),
            ({"authorization": "Bearer nope"}, "UNAUTHENTICATED"),
        ):
            with pytest.raises(InferenceServerException) as info:
                client.infer("echo-float64", [inp], headers=headers)
            assert info.value.status() == f"StatusCode.{code}"
        auth = {"authorization": "Bearer s3cret"}
        big = tg.InferInput("input", [1 << 18, 2], "FP64")  # 4 MiB, over the 1 MiB body limit
        big.set_data_from_numpy(np.zeros((1 << 18, 2)))
        with pytest.raises(InferenceServerException) as info:
            client.infer("echo-float64", [big], headers=auth)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        client.close()
        # each fresh channel is a new connection, which the kernel gives to either worker
        for i in range(6):
            with tg.InferenceServerClient(gw.grpc) as c:
                inp.set_data_from_numpy(np.full((1, 2), float(i)))
                assert c.infer("echo-float64", [inp], headers=auth).as_numpy("output").tolist() == [[i, i]]


def test_connections_per_worker_are_bounded(broker, apps):
    with LocalGateway(broker.frontend, broker.admin, extra_args=["--max-connections", "16"]) as gw:
        channels, answered, refused = [], 0, 0
        try:
            for _ in range(20):  # each channel its own connection
                channel = grpc.insecure_channel(gw.grpc, options=[("grpc.use_local_subchannel_pool", 1)])
                channels.append(channel)
                try:
                    pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
                    answered += 1
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    refused += 1
        finally:
            for channel in channels:
                channel.close()
        assert (answered, refused) == (16, 4)


def test_no_broker_is_not_ready_and_unavailable(tmp_path):
    frontend, admin = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    with LocalGateway(frontend, admin) as gw, tg.InferenceServerClient(gw.grpc) as client:
        assert client.is_server_live() and not client.is_server_ready()
        inp = tg.InferInput("input", [1, 2], "FP64")
        inp.set_data_from_numpy(np.ones((1, 2)))
        with pytest.raises(InferenceServerException) as info:
            client.infer("any", [inp])
        assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_server_ready_is_strict_as_http_unless_told_otherwise(tmp_path):
    # an app linking a model with no replica: not ready on gRPC as on HTTP; with
    # --no-strict-readiness, ready while the broker answers
    with LocalBroker() as b:
        with ketch.Admin(b.admin) as admin:
            admin.create_app("lonely", input_type="float64", input_shape=[2], slo_ms=1000, models=["ghost"])
        with (
            LocalGateway(b.frontend, b.admin) as strict,
            LocalGateway(b.frontend, b.admin, extra_args=["--no-strict-readiness"]) as lax,
        ):
            for gw, ready in ((strict, False), (lax, True)):
                with grpc.insecure_channel(gw.grpc) as channel:
                    answer = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                        pb.ServerReadyRequest(), timeout=20
                    )
                assert answer.ready is ready, gw.grpc
                assert (httpx.get(f"{gw.url}/v2/health/ready", timeout=20).status_code == 200) is ready


def test_the_callers_grpc_deadline_is_the_querys():
    # an app of SLO 60 s whose model has no replica: a call with a 1 s deadline gives up at
    # 1 s, and the broker lets go of its query then too (its default), not 60 s later
    with LocalBroker() as b, ketch.Admin(b.admin) as admin:
        admin.create_app(
            "patient", input_type="float64", input_shape=[2], slo_ms=60_000, default=-1.0, models=["absent"]
        )
        with LocalGateway(b.frontend, b.admin) as gw, grpc.insecure_channel(gw.grpc) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(typed_request("patient", np.ones((1, 2)), "FP64"), timeout=1.0)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: admin.stats()["apps"]["patient"]["defaults"] == 1, 30, "the query let go")
            assert admin.status()["pending"] == 0


def test_a_taken_default_grpc_port_costs_grpc_only(broker, apps):
    # a listening socket on some port P + 1 where P is free: the gateway on P defaults gRPC to P + 1
    for _ in range(50):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] - 1
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                taken.close()
    else:
        pytest.skip("no free port just below a free one")
    with taken:
        with LocalGateway(broker.frontend, broker.admin, listen=f"127.0.0.1:{port}") as gw:
            assert gw.grpc == "" and "no gRPC: its default port is not free" in gw.log_text()
        asked = LocalGateway(broker.frontend, broker.admin, extra_args=["--grpc", f"127.0.0.1:{port + 1}"])
        with pytest.raises(RuntimeError, match=r"cannot serve gRPC on 127\.0\.0\.1"), asked:
            pass  # asked for with --grpc: refused


def test_an_exposed_grpc_address_needs_tokens():
    from click.testing import CliRunner
    from ketch.cli import main

    env = {"KETCH_GATEWAY_TOKENS": ""}
    for argv in (
        ["gateway", "--listen", "127.0.0.1:0", "--grpc", "0.0.0.0:0"],
        ["broker", "start", "--http", "127.0.0.1:0", "--grpc", "0.0.0.0:0"],
    ):
        result = CliRunner().invoke(main, argv, env=env)  # refused before anything binds
        assert result.exit_code == 2 and "--grpc 0.0.0.0" in result.output, result.output


def test_no_grpc_writes_no_grpc_address(broker, apps):
    with LocalGateway(broker.frontend, broker.admin, extra_args=["--no-grpc"]) as gw:
        assert gw.grpc == ""


def test_broker_start_runs_grpc_beside_http_and_no_grpc_turns_it_off(tmp_path):
    for grpc_args in (["--grpc", f"127.0.0.1:{free_port()}"], ["--no-grpc"]):
        ready = tmp_path / "ready.json"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "ketch.cli", "broker", "start", "--state", str(tmp_path / "s.db")]
        argv += [f"--{role}=tcp://127.0.0.1:*" for role in ("frontend", "backend", "admin")]
        argv += ["--ready-file", str(ready), "--http", f"127.0.0.1:{free_port()}", *grpc_args]
        argv += ["--metrics", "127.0.0.1:0"]  # not the broker's default metrics port
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(ready.exists, 20, "the broker to listen")
            gateway = wait_for(lambda p=proc: psutil.Process(p.pid).children(), 20, "the gateway child")[0]
            assert grpc_args[0] in gateway.cmdline()
            if grpc_args[0] == "--grpc":
                client = tg.InferenceServerClient(grpc_args[1])

                def live(c=client) -> bool:
                    try:
                        return c.is_server_live()
                    except InferenceServerException:
                        return False

                wait_for(live, 20, "gRPC beside the broker's gateway")
                client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


KSERVE_CLIENT = """
import asyncio, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

X = np.array([[1.5, -2.0], [3.0, 4.25]])

def requests():
    for binary in (True, False):
        inp = InferInput(name="input", shape=[2, 2], datatype="FP64")
        inp.set_data_from_numpy(X, binary_data=binary)
        yield InferRequest(model_name="echo-float64", infer_inputs=[inp], request_id="k")

def check(res, version="1"):
    # (kserve's REST client does not read model_version from the answer: None there)
    outputs = {o.name: o.as_numpy() for o in res.outputs}
    assert res.id == "k" and res.model_version == version, res
    assert outputs["output"].tolist() == X.tolist() and outputs["default"].tolist() == [False, False]

def text_request():
    inp = InferInput(name="input", shape=[2], datatype="BYTES")
    inp.set_data_from_numpy(np.array([b"ab", b"cd"], dtype=np.object_), binary_data=False)
    return InferRequest(model_name="text", infer_inputs=[inp])

async def over_grpc(address):
    async with InferenceGRPCClient(url=address, timeout=20) as client:
        # not ready, strictly as Triton: apps nodef and withdef link ghost, which has no replica
        assert await client.is_server_live() and not await client.is_server_ready()
        assert await client.is_model_ready("echo-float64")
        for request in requests():
            check(await client.infer(request))
        res = await client.infer(text_request())
        assert res.outputs[0].as_numpy().tolist() == [b"AB", b"CD"]

async def over_rest(url):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=20, retries=0))
    try:
        assert await client.is_server_live(url)
        assert await client.is_model_ready(url, "echo-float64")
        for request in requests():
            check(await client.infer(url, request, model_name="echo-float64"), version=None)
        res = await client.infer(url, text_request(), model_name="text")
        words = [v.encode() if isinstance(v, str) else bytes(v) for v in res.outputs[0].as_numpy().ravel()]
        assert words == [b"AB", b"CD"], res.outputs[0]
    finally:
        await client.close()

asyncio.run(over_grpc(sys.argv[1]))
asyncio.run(over_rest(sys.argv[2]))
print("kserve ok")
"""


@pytest.mark.skipif(
    not os.environ.get("KETCH_KSERVE_PYTHON") and not os.environ.get("KETCH_REQUIRE_KSERVE"),
    reason="KETCH_KSERVE_PYTHON names no Python with the kserve SDK (scripts/setup.sh --test makes one)",
)
def test_the_kserve_sdks_grpc_and_rest_clients(gateway):
    # the kserve SDK pins psutil<6, so it lives in a venv of its own (.tools/kserve, made by
    # scripts/setup.sh --test), run as a process against this gateway
    python = os.environ.get("KETCH_KSERVE_PYTHON", "")
    assert python and os.path.exists(python), f"KETCH_REQUIRE_KSERVE is set but {python!r} is no Python"
    done = subprocess.run(
        [python, "-c", KSERVE_CLIENT, gateway.grpc, gateway.url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "kserve ok" in done.stdout, done.stderr[-3000:]
