"""The gateway's pure mapping code: errors to HTTP, JSON to inputs, KServe tensors both ways."""

from __future__ import annotations

import base64
import json
import struct

import ketch
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ketch.gateway import tensors, values
from ketch.gateway.auth import bearer_token, load_admin_tokens, load_tokens, token_ok
from ketch.gateway.errors import HTTPError, http_error_for, status_for
from ketch.gateway.openapi import build_spec
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ketch.UnknownApp("x"), 404),
        (ketch.NotFound("x"), 404),
        (ketch.BadInput("x"), 400),
        (ketch.Invalid("x"), 400),
        (ketch.ProtocolError("x"), 400),
        (ketch.errors.TooLarge("x"), 413),
        (ketch.Overloaded("x", retry_after_ms=1500), 503),
        (ketch.ShuttingDown("x"), 503),
        (ketch.NoModel("x"), 503),
        (ketch.Unavailable("x"), 503),
        (ketch.DeadlineExceeded("x"), 504),
        (ketch.Timeout("x"), 504),
        (ketch.ModelError("x"), 502),
        (ketch.errors.InternalError("x"), 500),
        (RuntimeError("a bug"), 500),
    ],
)
def test_one_table_maps_every_error(exc, status):
    assert status_for(exc) == status
    err = http_error_for(exc)
    assert err.status == status and err.body()["error"]
    if status == 503:
        assert int(err.headers["Retry-After"]) >= 1 and err.body()["retry_after_ms"] > 0


def test_overloaded_retry_after_rounds_up_to_seconds():
    err = http_error_for(ketch.Overloaded("full", retry_after_ms=1500))
    assert err.headers["Retry-After"] == "2" and err.body() == {
        "error": "full",
        "code": "OVERLOADED",
        "retry_after_ms": 1500,
    }


def test_json_numbers_take_the_apps_dtype():
    assert values.clipper_input([1, 2, 3], "float64").dtype == np.float64
    assert values.clipper_input([1.0, 2.0], "int64").tolist() == [1, 2]
    assert values.clipper_input([True, False], "bool").tolist() == [True, False]
    assert values.clipper_input([[1, 2], [3, 4]], "float32").shape == (2, 2)
    for value, input_type, needle in [
        ([1.5], "int64", "whole numbers"),
        ([300], "uint8", "do not fit"),
        ([-1], "uint32", "do not fit"),
        (["a"], "float64", "text"),
        ([[1], [2, 3]], "float64", "rectangular"),
        ({"a": 1}, "float64", "number"),
        ([2], "bool", "true/false"),
        ([float("nan")], "int32", "whole numbers"),
        (7, "string", "string"),
        ("!!", "bytes", "base64"),
    ]:
        with pytest.raises(HTTPError, match=needle) as info:
            values.clipper_input(value, input_type)
        assert info.value.status == 400
    assert values.clipper_input(base64.b64encode(b"\x00\xff").decode(), "bytes") == b"\x00\xff"
    assert values.clipper_input({"any": ["json"]}, "json") == {"any": ["json"]}


def test_outputs_become_json():
    assert values.jsonable(np.arange(3)) == [0, 1, 2]
    assert values.jsonable(np.float32(1.5)) == 1.5
    assert values.jsonable(b"\x01\x02") == "AQI="
    assert json.loads(values.dumps({"x": [float("nan"), 1.0, float("inf")]})) == {"x": [None, 1.0, None]}
    assert json.loads(values.dumps({"a": np.array([np.nan, 2.0])})) == {"a": [None, 2.0]}


def infer_doc(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_json_tensors_nested_or_flat():
    for data in ([1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]]):
        req = tensors.parse_infer_request(
            infer_doc({"name": "x", "datatype": "FP32", "shape": [2, 3], "data": data})
        )
        t = req.inputs[0]
        assert t.data.dtype == np.float32 and t.data.shape == (2, 3) and t.data[1, 2] == 6


def test_binary_tensors_after_the_json_header():
    x = np.arange(6, dtype="<i4").reshape(3, 2)
    words = serialize_byte_tensor(np.array([b"a", b"", b"xyz"], dtype=np.object_)).item()
    head = infer_doc(
        {"name": "x", "datatype": "INT32", "shape": [3, 2], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "w", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(words)}},
        outputs=[{"name": "output", "parameters": {"binary_data": True}}],
        parameters={"binary_data_output": False, "timeout": 2500, "priority": -3},
        id="q",
    )
    req = tensors.parse_infer_request(head + x.tobytes() + words, str(len(head)))
    assert req.id == "q" and req.outputs == {"output": True} and not req.binary_output
    assert (req.inputs[0].data == x).all() and req.inputs[1].data == [b"a", b"", b"xyz"]
    assert tensors.query_options(req.parameters) == (2.5, -3)


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        (b"nope", None, "not JSON"),
        (b"[]", None, "object"),
        (b"{}", None, "'inputs'"),
        (infer_doc({"name": "x", "datatype": "FP128", "shape": [1], "data": [1]}), None, "datatype"),
        (infer_doc({"name": "x", "datatype": {}, "shape": [1], "data": [1]}), None, "datatype"),
        (infer_doc({"name": "x", "datatype": ["FP64"], "shape": [1], "data": [1]}), None, "datatype"),
        (infer_doc({"name": "x", "datatype": "FP64", "shape": [1.5], "data": [1]}), None, "shape"),
        (infer_doc({"name": "x", "datatype": "FP64", "shape": [-1], "data": [1]}), None, "shape"),
        (infer_doc({"name": "x", "datatype": "FP64", "shape": [2], "data": [1]}), None, "needs 2 values"),
        (infer_doc({"name": "x", "datatype": "FP64", "shape": [1], "data": ["a"]}), None, "numbers"),
        (infer_doc({"name": "x", "datatype": "INT8", "shape": [1], "data": [1000]}), None, "do not fit"),
        (infer_doc({"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}), None, "strings"),
        (infer_doc({"name": "x", "datatype": "FP64", "shape": [1]}), None, "give 'data'"),
        (
            infer_doc({"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}, outputs=[{"name": "z"}]),
            None,
            "no output",
        ),
        (b"{}", "x", "number of bytes"),
        (b"{}", "99", "outside"),
    ],
)
def test_malformed_infer_requests_are_400(body, header, needle):
    with pytest.raises(HTTPError, match=needle) as info:
        tensors.parse_infer_request(body, header)
    assert info.value.status == 400


def test_an_empty_tensor_of_huge_sizes_is_413_not_500():
    body = infer_doc({"name": "x", "datatype": "INT64", "shape": [1 << 40, 0, 1 << 30], "data": []})
    with pytest.raises(HTTPError, match="besides its 0 sizes") as info:
        tensors.parse_infer_request(body)
    assert info.value.status == 413
    empty = infer_doc({"name": "x", "datatype": "INT64", "shape": [0, 4], "data": []})
    assert tensors.parse_infer_request(empty).inputs[0].shape == (0, 4)


def test_too_many_elements_is_413_before_any_allocation():
    body = infer_doc({"name": "x", "datatype": "FP64", "shape": [1 << 20, 1 << 20], "data": []})
    with pytest.raises(HTTPError) as info:
        tensors.parse_infer_request(body)
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("params", "expected"),
    [({}, (None, 0)), ({"timeout": 0}, (None, 0)), ({"timeout": 1500, "priority": 127}, (1.5, 127))],
)
def test_query_options(params, expected):
    assert tensors.query_options(params) == expected


@pytest.mark.parametrize("params", [{"timeout": -1}, {"timeout": "1"}, {"priority": 128}, {"priority": 1.5}])
def test_bad_query_options(params):
    with pytest.raises(HTTPError):
        tensors.query_options(params)


def tensor(datatype: str, data) -> tensors.Tensor:
    if datatype == "BYTES":
        return tensors.Tensor("x", "BYTES", (len(data),), list(data))
    arr = np.asarray(data, dtype=tensors.DATATYPES[datatype])
    return tensors.Tensor("x", datatype, arr.shape, arr)


def test_the_first_dimension_is_a_batch_when_the_tensor_has_one_more():
    xs, batched = tensors.split_queries(tensor("FP64", np.zeros((5, 4))), "float64", (4,))
    assert batched and len(xs) == 5 and xs[0].shape == (4,)
    xs, batched = tensors.split_queries(tensor("FP64", np.zeros(4)), "float64", (4,))
    assert not batched and len(xs) == 1 and xs[0].shape == (4,)
    xs, _ = tensors.split_queries(tensor("FP64", np.zeros((2, 3, 5))), "float64", (-1, 5))
    assert len(xs) == 2 and xs[1].shape == (3, 5)
    xs, _ = tensors.split_queries(tensor("INT32", [[1, 2]]), "float64", (2,))
    assert xs[0].dtype == np.float64
    xs, batched = tensors.split_queries(tensor("BYTES", [b"a", b"b"]), "string", ())
    assert batched and xs == ["a", "b"]
    bytes_2d = tensors.Tensor("x", "BYTES", (2, 1), [b"\x00", b"\x01"])
    assert tensors.split_queries(bytes_2d, "bytes", ())[0] == [b"\x00", b"\x01"]
    assert tensors.split_queries(tensor("BYTES", [b'{"a": 1}']), "json", ())[0] == [{"a": 1}]
    assert tensors.split_queries(tensor("FP64", [[1, 2], [3, 4]]), "json", ())[0] == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("t", "input_type", "shape", "needle"),
    [
        (tensor("FP64", np.zeros((2, 2, 4))), "float64", (4,), "does not fit"),
        (tensor("FP64", np.zeros((0, 4))), "float64", (4,), "no query"),
        (tensor("BYTES", [b"a"]), "float64", (1,), "BYTES"),
        (tensor("FP64", [1.0]), "string", (), "BYTES"),
        (tensor("BYTES", [b"\xff"]), "string", (), "UTF-8"),
        (tensor("BYTES", [b"{"]), "json", (), "JSON"),
        (tensor("FP64", [[0.5, 1]]), "int64", (2,), "whole numbers"),
    ],
)
def test_queries_that_do_not_fit_are_400(t, input_type, shape, needle):
    with pytest.raises(HTTPError, match=needle) as info:
        tensors.split_queries(t, input_type, shape)
    assert info.value.status == 400


def test_outputs_stack_into_one_tensor_or_fall_back_to_bytes():
    datatype, shape, data = tensors.output_tensor([np.float64(1), np.float64(2)])
    assert (datatype, shape, data.tolist()) == ("FP64", [2], [1.0, 2.0])
    datatype, shape, _ = tensors.output_tensor([np.zeros(3, np.float32)] * 4)
    assert (datatype, shape) == ("FP32", [4, 3])
    assert tensors.output_tensor([np.int64(1), -1])[0] == "INT64"  # an answer and a JSON default
    datatype, shape, data = tensors.output_tensor(["a", b"\x00", {"k": 1}, np.zeros(2)])
    assert (datatype, shape) == ("BYTES", [4]) and data[:3] == [b"a", b"\x00", b'{"k":1}']
    assert tensors.output_tensor([np.zeros(2), np.zeros(3)])[0] == "BYTES"  # ragged


def test_responses_read_back_with_tritonclient_helpers():
    req = tensors.parse_infer_request(
        infer_doc({"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}), None
    )
    req.binary_output = True
    out = tensors.output_tensor(["héllo", "", "x" * 300])
    body, headers = tensors.encode_infer_response(
        model_name="m", model_version="1", request=req, outputs={"output": out}
    )
    n = int(headers["inference-header-content-length"])
    meta = json.loads(body[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(body) - n
    assert deserialize_bytes_tensor(body[n:]).tolist() == ["héllo".encode(), b"", b"x" * 300]
    req.binary_output = False
    body, headers = tensors.encode_infer_response(
        model_name="m", model_version="1", request=req, outputs={"output": out}
    )
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["outputs"][0]["data"] == ["héllo", "", "x" * 300]


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_elements_round_trip_and_match_tritonclient(elements):
    ours = tensors.encode_bytes_elements(elements)
    if elements:
        assert ours == serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()
    assert tensors.parse_bytes_elements(ours, "x") == elements


def test_truncated_bytes_elements_are_400():
    with pytest.raises(HTTPError, match="length prefix"):
        tensors.parse_bytes_elements(b"\x01\x00", "x")
    with pytest.raises(HTTPError, match="runs past"):
        tensors.parse_bytes_elements(struct.pack("<I", 5) + b"abc", "x")


def test_bearer_tokens(tmp_path):
    assert bearer_token(b"Bearer abc") == b"abc" and bearer_token(b"bearer  abc ") == b"abc"
    assert (
        bearer_token(b"Basic abc") is None and bearer_token(b"Bearer") is None and bearer_token(None) is None
    )
    assert token_ok(b"abc", [b"x", b"abc"]) and not token_ok(b"abd", [b"abc"]) and not token_ok(None, [b"a"])
    f = tmp_path / "tokens"
    f.write_text("# ops\none\n\n two \n")
    assert load_tokens(str(f), env="three, ,four") == ["one", "two", "three", "four"]


def test_a_token_may_come_as_the_password_of_http_basic():
    """What ``requests`` sends for ``http://admin:TOKEN@host/``: how clipper_admin carries one."""
    assert bearer_token(b"Basic " + base64.b64encode(b"admin:s3cret")) == b"s3cret"
    assert bearer_token(b"basic " + base64.b64encode(b":a:b")) == b"a:b"  # the user is any, or none
    for bad in (b"admin", b"admin:", b""):
        assert bearer_token(b"Basic " + base64.b64encode(bad)) is None
    assert bearer_token(b"Basic not*base64") is None


def test_token_files_name_admin_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\nplain\nadmin boss\n\n")
    assert load_tokens(str(path), env="", admin_env="") == ["plain", "boss"]
    assert load_admin_tokens(str(path), admin_env="root") == ["boss", "root"]
    assert load_tokens(None, env="a,b", admin_env="root") == ["a", "b", "root"]
    path.write_text("two words\n")
    with pytest.raises(ValueError, match="admin <token>"):
        load_tokens(str(path), env="", admin_env="")


def test_openapi_declares_bearer_only_with_tokens():
    plain, guarded = build_spec(), build_spec(auth=True)
    assert "security" not in plain and "securitySchemes" not in plain["components"]
    assert guarded["security"] == [{"bearer": []}]
    assert guarded["paths"]["/v2/health/live"]["get"]["security"] == []
    assert "401" in guarded["paths"]["/v2"]["get"]["responses"]
    assert "401" not in plain["paths"]["/v2"]["get"]["responses"]


def test_broker_figures_become_prometheus_families():
    from ketch.gateway.metrics import GatewayMetrics
    from prometheus_client.parser import text_string_to_metric_families

    replica = {
        "replica_id": "h/m/0",
        "model": "m",
        "version": "2",
        "state": "busy",
        "credits": 2,
        "inflight": 1,
        "batches": 7,
        "items": 20,
        "errors": 0,
        "batch_size": 8,
        "batch_sizes": {"1": 2, "2": 1, "3-4": 4},
        "compute_ms": {"p50_ms": 1.5, "p99_ms": 3.0},
    }
    figures = {
        "status": {"uptime_s": 12.5, "pending": 3},
        "stats": {
            "apps": {
                "a": {"queries": 9, "answered": 8, "defaults": 1, "errors": 0, "cache_hits": 2, "p50_ms": 1.0}
            },
            "models": {"m": {"queue_depth": 3, "replicas": 1, "mean_batch": 2.9, "batches": 7, "refused": 4}},
            "replicas": [replica],
            "cache": {"hits": 2, "misses": 7, "entries": 5},
            "counters": {"refused_overloaded": 4},
            "histograms": {
                "buckets_s": [0.001, 0.01],
                "query_duration": [
                    {"app": "a", "model": "m", "version": "2", "counts": [3, 4, 1], "sum_s": 0.05},
                    {"app": "a", "model": "", "version": "", "counts": [0, 0, 1], "sum_s": 0.2},
                ],
                "queue_wait": [{"model": "m", "version": "2", "counts": [8, 0, 0], "sum_s": 0.001}],
                "rpc": [{"model": "m", "version": "2", "counts": [1, 0], "sum_s": 0.0}],  # not 3: left out
                "compute": [],
            },
        },
    }
    text = GatewayMetrics().render(figures).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("ketch_broker_up", ())] == 1
    assert samples[("ketch_app_cache_hits_total", (("app", "a"),))] == 2
    e2e = (("app", "a"), ("model", "m"), ("version", "2"))
    assert samples[("ketch_app_query_duration_seconds_bucket", (e2e[0], ("le", "0.001"), *e2e[1:]))] == 3
    assert samples[("ketch_app_query_duration_seconds_bucket", (e2e[0], ("le", "0.01"), *e2e[1:]))] == 7
    assert samples[("ketch_app_query_duration_seconds_bucket", (e2e[0], ("le", "+Inf"), *e2e[1:]))] == 8
    assert samples[("ketch_app_query_duration_seconds_count", e2e)] == 8
    assert samples[("ketch_app_query_duration_seconds_sum", e2e)] == 0.05
    assert (
        samples[("ketch_app_query_duration_seconds_count", (("app", "a"), ("model", ""), ("version", "")))]
        == 1
    )
    assert samples[("ketch_model_queue_wait_seconds_count", (("model", "m"), ("version", "2")))] == 8
    assert not any(name.startswith("ketch_model_rpc_duration_seconds") for name, _ in samples)
    assert samples[("ketch_model_refused_total", (("model", "m"),))] == 4
    labels = (("model", "m"), ("replica", "h/m/0"), ("version", "2"))
    assert samples[("ketch_replica_batch_size_bucket", (("le", "2.0"), *labels))] == 3
    assert samples[("ketch_replica_batch_size_bucket", (("le", "+Inf"), *labels))] == 7
    assert samples[("ketch_replica_batch_size_sum", labels)] == 20
    assert samples[("ketch_model_batch_size_bucket", (("le", "4.0"), ("model", "m")))] == 7
    assert samples[("ketch_replica_state", tuple(sorted((*labels, ("state", "busy")))))] == 1
    assert samples[("ketch_cache_misses_total", ())] == 7
    assert samples[("ketch_broker_events_total", (("event", "refused_overloaded"),))] == 4
    down = GatewayMetrics().render(None).decode()
    assert "ketch_broker_up 0.0" in down and "ketch_app_" not in down


def test_what_changes_what_serves_takes_an_admin_token():
    from ketch.gateway.auth import admin_only

    for path in ("/admin/add_app", "/v2/repository/models/sum/load", "/v2/repository/models/sum/unload"):
        assert admin_only(path), path
    for path in ("/v2/repository/index", "/v2/models/sum/versions/1/infer", "/sum/predict", "/v2/models/x"):
        assert not admin_only(path), path


def test_bool_tensors_take_0_and_1_written_as_numbers_and_may_be_empty():
    json_to_array = values.json_to_array
    assert json_to_array([1.0, 0.0, 1], np.dtype(bool)).tolist() == [True, False, True]
    assert json_to_array([], np.dtype(bool)).shape == (0,)
    with pytest.raises(HTTPError, match="not fractions"):
        json_to_array([0.5], np.dtype(bool))
    with pytest.raises(HTTPError, match="0/1"):
        json_to_array([2], np.dtype(bool))
