"""KServe V2 over gRPC, the pure parts: messages to tensors and back, errors to status codes."""

from __future__ import annotations

import click
import grpc
import ketch
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as triton_pb
from ketch.cli import _grpc_listen
from ketch.gateway import grpc_server, v2
from ketch.gateway._oip import grpc_predict_v2_pb2 as pb
from ketch.gateway.errors import HTTPError, http_error_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ketch.BadInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ketch.UnknownApp("x"), grpc.StatusCode.NOT_FOUND),
        (ketch.errors.TooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ketch.Overloaded("x", retry_after_ms=1500), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (HTTPError(429, "x", code="OVERLOADED"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (HTTPError(503, "x", code="OVERLOADED"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ketch.errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (ketch.ShuttingDown("x"), grpc.StatusCode.UNAVAILABLE),
        (ketch.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ketch.errors.Timeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ketch.ModelError("x"), grpc.StatusCode.INTERNAL),
        (HTTPError(401, "x"), grpc.StatusCode.UNAUTHENTICATED),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
        (ketch.NotFound("no version 3"), grpc.StatusCode.NOT_FOUND),
        (ketch.errors.Conflict("other apps link it"), grpc.StatusCode.FAILED_PRECONDITION),
        (ketch.errors.Unauthorized("model control is off"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_errors_map_to_grpc_codes(exc, code):
    assert grpc_server.grpc_code(http_error_for(exc)) == code


def test_parameters_of_kserve_and_triton_values():
    # Triton's InferParameter adds double_param and uint64_param: read from the same bytes
    sent = triton_pb.ModelInferRequest()
    sent.parameters["priority"].uint64_param = 7
    sent.parameters["scale"].double_param = 2.5
    sent.parameters["timeout"].int64_param = 1000
    sent.parameters["flag"].bool_param = True
    sent.parameters["tag"].string_param = "x"
    got = pb.ModelInferRequest.FromString(sent.SerializeToString())
    assert grpc_server.parameters_of(got.parameters) == {
        "priority": 7,
        "scale": 2.5,
        "timeout": 1000,
        "flag": True,
        "tag": "x",
    }
    empty = pb.ModelInferRequest()
    empty.parameters["nothing"].Clear()
    with pytest.raises(HTTPError, match="'nothing' has no"):
        grpc_server.parameters_of(empty.parameters)


def request(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return req


def test_typed_contents_become_exact_tensors():
    t = grpc_server.infer_request(request("INT8", [2], int_contents=[-128, 127])).inputs[0]
    assert t.data.dtype == np.int8 and t.data.tolist() == [-128, 127]
    t = grpc_server.infer_request(request("UINT64", [1], uint64_contents=[2**64 - 1])).inputs[0]
    assert t.data.dtype == np.uint64 and int(t.data[0]) == 2**64 - 1
    t = grpc_server.infer_request(request("BYTES", [2], bytes_contents=[b"a", b""])).inputs[0]
    assert t.data == [b"a", b""]
    for bad, needle in [
        (request("INT8", [1], int_contents=[300]), "int8"),  # never wrapped
        (request("UINT16", [1], uint_contents=[70000]), "uint16"),
        (request("FP64", [2, 2], fp64_contents=[1, 2, 3]), "needs 4 values"),
        (request("FP16", [1], fp32_contents=[1]), "raw_input_contents"),
        (request("FP64", [-1], fp64_contents=[1]), "shape"),
        (request("COMPLEX", [1], fp64_contents=[1]), "not one of"),
    ]:
        with pytest.raises(HTTPError) as info:
            grpc_server.infer_request(bad)
        assert info.value.status == 400 and needle in info.value.message, (needle, info.value.message)


def test_raw_contents_and_requested_outputs():
    req = request("FP32", [2])
    req.raw_input_contents.append(np.array([1.5, 2], dtype="<f4").tobytes())
    req.outputs.add(name="default")
    parsed = grpc_server.infer_request(req)
    assert parsed.inputs[0].data.tolist() == [1.5, 2] and parsed.binary_output
    assert parsed.outputs == {"default": None}
    both = request("FP32", [1], fp32_contents=[1])
    both.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(HTTPError, match="not both"):
        grpc_server.infer_request(both)
    short = request("FP32", [1])
    short.raw_input_contents.extend([b"\0" * 4, b"\0" * 4])
    with pytest.raises(HTTPError, match="2 entries for 1 inputs"):
        grpc_server.infer_request(short)
    unknown = request("FP32", [1], fp32_contents=[1])
    unknown.outputs.add(name="probabilities")
    with pytest.raises(HTTPError, match="no output named"):
        grpc_server.infer_request(unknown)


def test_answers_are_typed_or_raw():
    answer = v2.InferAnswer(
        model_name="m",
        model_version="1",
        outputs={
            "output": ("UINT64", [2], np.array([0, 2**64 - 1], dtype=np.uint64)),
            "default": ("BOOL", [2], np.array([False, True])),
        },
        parameters={"defaults": 1, "default_explanation": "late"},
    )
    typed = grpc_server.infer_request(request("FP64", [1], fp64_contents=[1]))
    res = grpc_server.infer_response(answer, typed)
    assert list(res.outputs[0].contents.uint64_contents) == [0, 2**64 - 1] and not res.raw_output_contents
    assert list(res.outputs[1].contents.bool_contents) == [False, True]
    assert res.parameters["defaults"].int64_param == 1 and res.parameters["default_explanation"].string_param
    typed.binary_output = True
    res = grpc_server.infer_response(answer, typed)
    assert np.frombuffer(res.raw_output_contents[0], "<u8").tolist() == [0, 2**64 - 1]
    assert res.raw_output_contents[1] == b"\x00\x01"
    answer.outputs["output"] = ("FP16", [1], np.array([1.5], dtype=np.float16))
    typed.binary_output = False
    res = grpc_server.infer_response(answer, typed)  # FP16 has no typed field: every output raw
    assert len(res.raw_output_contents) == 2 and not res.outputs[1].contents.bool_contents


def test_grpc_port_defaults_next_to_http():
    assert _grpc_listen(None, "127.0.0.1", 8080, "--grpc") == ("127.0.0.1", 8081)
    assert _grpc_listen(None, "127.0.0.1", 0, "--grpc") == ("127.0.0.1", 0)
    assert _grpc_listen("[::1]:9000", "127.0.0.1", 8080, "--grpc") == ("::1", 9000)
    with pytest.raises(click.BadParameter):
        _grpc_listen(None, "127.0.0.1", 65535, "--grpc")
    with pytest.raises(click.BadParameter):
        _grpc_listen("nope", "127.0.0.1", 8080, "--grpc")
