"""The gateway's HTTP conventions and its conformance, against real processes.

One broker process and gateway processes on 127.0.0.1; models are ``ketch.Replica`` threads
of this process. Covered: the access log and request ids, uvicorn's lines as JSON, CORS,
Swagger UI at ``/docs``, strict ``/v2/health/ready``, schemathesis in positive mode on the
published ``/openapi.json`` (what the document calls valid, the gateway takes), and every
V2 response checked against the response schemas of the official Open Inference Protocol
REST specification (transcribed below, with their source).
"""

from __future__ import annotations

import json
import os
import re
import threading
from html.parser import HTMLParser

import httpx
import jsonschema
import ketch
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0ken"
ORIGIN = "https://ui.example"


def sums(xs):
    return [float(np.sum(x)) for x in xs]


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
    admin.create_app("num", input_type="float64", input_shape=[-1], slo_ms=2000, default=-1, models=["total"])
    admin.set_policy("num", "exp3")  # so feedback is taken (the single policy learns nothing)
    admin.create_app("blob", input_type="bytes", slo_ms=2000, models=["rev"])
    replicas(sums, "total")
    replicas(lambda xs: [bytes(reversed(x)) for x in xs], "rev", input_type="bytes")
    for model in ("total", "rev"):
        wait_for(lambda m=model: admin.replicas(m), 15, f"a replica of {model}")


@pytest.fixture(scope="module")
def gateway(broker, apps):
    with LocalGateway(broker.frontend, broker.admin) as gw:
        yield gw


def log_lines(gw: LocalGateway) -> list[dict]:
    out = []
    for line in gw.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    return out


# ---------------------------------------------------------------- logs


def test_one_json_access_line_per_request_with_its_request_id(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        given_id = c.post("/num/predict", json={"input": [1.0, 2.0]}, headers={"x-request-id": "req-42"})
        assert given_id.status_code == 200 and given_id.headers["x-request-id"] == "req-42"
        made = c.post("/v2/models/nope/infer", json={"inputs": []})
        assert made.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
        unusable = c.get("/v2", headers={"x-request-id": "x" * 200})  # too long for a log key: replaced
        assert unusable.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", unusable.headers["x-request-id"])
        no_route = c.get("/no/such/route", headers={"x-request-id": "lost-1"})
        assert no_route.status_code == 404 and no_route.headers["x-request-id"] == "lost-1"

    def access(rid: str) -> list[dict]:
        return [d for d in log_lines(gateway) if d.get("event") == "http request" and d["request_id"] == rid]

    wait_for(lambda: access("lost-1"), 10, "the access lines to be written")
    [line] = access("req-42")
    assert line["method"] == "POST" and line["route"] == "/{app}/predict" and line["path"] == "/num/predict"
    assert line["app"] == "num" and line["status"] == 200 and line["client"] == "127.0.0.1"
    assert 0 < line["latency_ms"] < 10_000 and line["level"] == "info" and "timestamp" in line
    [line] = access(made.headers["x-request-id"])
    assert line["route"] == "/v2/models/{name}/infer" and line["app"] is None and line["status"] == 404
    assert len(access(unusable.headers["x-request-id"])) == 1
    [line] = access("lost-1")
    assert line["route"] is None and line["status"] == 404


def test_no_access_log_keeps_the_request_id_and_uvicorn_lines_are_json(broker, apps):
    args = ["--no-access-log", "--log-level", "info"]
    with LocalGateway(broker.frontend, broker.admin, extra_args=args) as gw:
        r = httpx.get(gw.url + "/v2/models/num", headers={"x-request-id": "quiet-1"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-request-id"] == "quiet-1"
        assert gw.stop() == 0
        lines = log_lines(gw)  # every line JSON: stderr is a file here, not a terminal
        assert not [d for d in lines if d.get("event") == "http request"]
        uvicorn = [d for d in lines if d.get("logger") == "uvicorn.error"]
        events = [d["event"] for d in uvicorn]
        assert "Application startup complete." in events and "Shutting down" in events, lines
        assert all(d["level"] == "info" and "timestamp" in d for d in uvicorn)


# ---------------------------------------------------------------- CORS


def test_cors_is_off_by_default(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        pre = c.options("/num/predict", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
        r = c.post("/num/predict", json={"input": [1.0]}, headers={"origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origins_get_preflight_answers_and_tokens_are_still_required(broker, apps):
    env = {"KETCH_GATEWAY_TOKENS": TOKEN}
    with LocalGateway(broker.frontend, broker.admin, env=env, extra_args=["--cors-origin", ORIGIN]) as gw:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            asking = {
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            }
            pre = c.options("/v2/models/num/infer", headers=asking)  # no token: a browser sends none
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            other = c.options("/v2/models/num/infer", headers={**asking, "origin": "https://evil.example"})
            assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
            refused = c.get("/v2/models/num", headers={"origin": ORIGIN})
            assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
            ok = c.post(
                "/v2/models/num/infer",
                json={"inputs": [{"name": "x", "datatype": "FP64", "shape": [2], "data": [1.0, 2.0]}]},
                headers={"origin": ORIGIN, "authorization": f"Bearer {TOKEN}"},
            )
            assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [3.0]
            assert ok.headers["access-control-allow-origin"] == ORIGIN
            exposed = ok.headers["access-control-expose-headers"].lower()
            assert "x-request-id" in exposed and "inference-header-content-length" in exposed
        assert gw.stop() == 0


# ---------------------------------------------------------------- Swagger UI


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_swagger_ui_at_docs_is_served_by_the_gateway_itself(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = _Refs()
        refs.feed(page.text)
        assert refs.refs and all(ref.startswith("/docs/static/") for ref in refs.refs), refs.refs  # no CDN
        for ref in refs.refs:
            assert c.get(ref).status_code == 200, ref
        bundle = c.get("/docs/static/swagger-ui-bundle.js").text
        assert "SwaggerUIBundle" in bundle
        assert re.search(r'url: "/openapi\.json"', page.text) and c.get("/openapi.json").status_code == 200


# ---------------------------------------------------------------- strict readiness


def test_server_ready_is_strict_and_says_which_model_has_no_replica(tmp_path):
    with LocalBroker(state_path=str(tmp_path / "state.db")) as broker, broker.admin_client() as admin:
        ttl = ["--metadata-ttl", "0.2"]
        with (
            LocalGateway(broker.frontend, broker.admin, extra_args=ttl) as strict,
            LocalGateway(broker.frontend, broker.admin, extra_args=[*ttl, "--no-strict-readiness"]) as loose,
        ):

            def ready(gw: LocalGateway) -> httpx.Response:
                return httpx.get(gw.url + "/v2/health/ready", timeout=5)

            assert ready(strict).json() == {"ready": True}  # a broker with no apps yet stands ready
            admin.create_app("late", input_type="float64", input_shape=[-1], slo_ms=1000, models=["later"])
            wait_for(lambda: ready(strict).status_code == 503, 10, "not ready while 'later' has no replica")
            doc = ready(strict).json()
            assert doc["ready"] is False and doc["code"] == "NOT_READY"
            assert doc["reasons"] == ["app 'late': model 'later' has no live replica"], doc
            assert ready(loose).json() == {"ready": True}  # not strict: the broker answers
            r = ketch.Replica(sums, name="later", broker=broker.backend, replica_id="http/later/0")
            t = threading.Thread(target=r.run, daemon=True)
            t.start()
            try:
                wait_for(lambda: ready(strict).status_code == 200, 15, "ready once 'later' has a replica")
                r.stop()
                t.join(10)
                wait_for(lambda: ready(strict).status_code == 503, 15, "not ready once it is gone")
                assert "model 'later' has no live replica" in ready(strict).json()["error"]
            finally:
                r.stop()
                t.join(10)


# ---------------------------------------------------------------- conformance: schemathesis

FUZZ_EXAMPLES = int(os.environ.get("KETCH_FUZZ_EXAMPLES", "40"))  # per operation
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=not os.environ.get("KETCH_FUZZ_EXAMPLES"),  # the same cases each run unless asked
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Refusals of schema-valid requests that no schema of these routes can rule out: what fits
# depends on the app named in the path (its input type and shape), on two fields together
# (a tensor's element count and its shape), or on a size limit (docs/http.md).
BEYOND_A_SCHEMA = re.compile(
    r"for an? \w+ app\b|holds text, the app takes|; the app takes \w+$|takes \w+ inputs of shape"
    r"|does not fit the app|is not a rectangular list|needs \d+ (values|elements), got \d+$"
)


def test_schema_valid_requests_are_accepted(gateway):
    """schemathesis, positive mode only, on every operation of /openapi.json with the app of
    the path set to one that exists: a 4xx (but 403, 404, 409, 413 and 429, which depend on
    state, configuration or size) is allowed only for what a schema cannot say."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    refused: list[tuple[str, int, str, object]] = []
    seen: set[str] = set()

    def fuzz(op) -> None:
        @given(case=op.as_strategy(GenerationMode.POSITIVE))
        @FUZZ_SETTINGS
        def run(case):
            for key in case.path_parameters or {}:  # an app that exists, a version it has
                case.path_parameters[key] = "1" if key == "version" else "num"
            response = case.call_and_validate(base_url=gateway.url, checks=[not_a_server_error])
            seen.add(op.label)
            status = response.status_code
            if status < 400 or status in (403, 404, 409, 413, 429):  # state, configuration or size
                return
            message = response.json().get("error", "")
            if not BEYOND_A_SCHEMA.search(message):
                refused.append((op.label, status, message, case.body))

        run()

    operations = [result.ok() for result in schema.get_all_operations()]
    for op in operations:
        fuzz(op)
    assert seen == {op.label for op in operations}
    assert not refused, "\n".join(map(repr, refused[:10]))


def test_schema_violating_bodies_are_refused(gateway):
    """schemathesis, negative mode, bodies only (the app in the path exists): what the
    document calls invalid the gateway refuses with a 4xx, never a 5xx, and every answer
    matches the document's response schemas."""
    import schemathesis
    from hypothesis import assume
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.parameters import ParameterLocation
    from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    bodies = [op for op in (r.ok() for r in schema.get_all_operations()) if op.body]
    assert {op.label for op in bodies} >= {
        "POST /{app}/predict",
        "POST /{app}/update",
        "POST /v2/models/{name}/infer",
        "POST /v2/models/{name}/versions/{version}/infer",
    }
    checks = [not_a_server_error, negative_data_rejection, response_schema_conformance]
    for op in bodies:

        @given(case=op.as_strategy(GenerationMode.NEGATIVE))
        @FUZZ_SETTINGS
        def run(case):
            components = case.meta.components
            assume(
                ParameterLocation.BODY in components
                and components[ParameterLocation.BODY].mode == GenerationMode.NEGATIVE
                and all(
                    info.mode == GenerationMode.POSITIVE
                    for where, info in components.items()
                    if where != ParameterLocation.BODY
                )
            )
            for key in case.path_parameters or {}:  # an app that exists, a version it has
                case.path_parameters[key] = "1" if key == "version" else "num"
            response = case.call(base_url=gateway.url)
            if response.status_code == 413:  # refused too: the size limit is checked first
                return
            case.validate_response(response, checks=checks)

        run()


@pytest.mark.parametrize(
    "body",
    [
        {"label": 1, "query_id": 12.0},  # JSON Schema's integer: 12.0 is one (404: no such query)
        {"label": 1, "input": [1.0], "uid": 7.0},
    ],
)
def test_whole_numbers_written_with_a_fraction_are_integers(gateway, body):
    r = httpx.post(gateway.url + "/num/update", json=body, timeout=10)
    assert r.status_code in (200, 404), r.text
    doc = {
        "parameters": {"priority": 3.0},
        "inputs": [{"name": "x", "datatype": "FP64", "shape": [2.0], "data": [1.0, 2.0]}],
    }
    r = httpx.post(gateway.url + "/v2/models/num/infer", json=doc, timeout=10)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [3.0]


# ---------------------------------------------------------------- conformance: the OIP spec

# The response schemas of the Open Inference Protocol's REST specification, as written in
# kserve/open-inference-protocol, specification/protocol/open_inference_rest.yaml (commit
# d49cc23f89d709d87b210ef9449e273ae243984e, Apache-2.0), components/schemas, unchanged but
# for YAML to Python. Transcribed rather than fetched: the tests run without a network.
TENSOR_DATA = {
    "$id": "tensor_data",
    "type": "array",
    "items": {
        "anyOf": [{"$ref": "tensor_data"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}]
    },
}
PARAMETERS = {"type": "object"}
METADATA_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["name", "datatype", "shape"],
}
OIP = {
    "metadata_server_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "metadata_model_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": METADATA_TENSOR},
            "outputs": {"type": "array", "items": METADATA_TENSOR},
            "properties": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["name", "platform"],
    },
    "inference_response": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": PARAMETERS,
            "outputs": {
                "type": "array",
                "items": {  # response_output
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": PARAMETERS,
                        "data": {"$ref": "tensor_data"},
                    },
                    "required": ["name", "shape", "datatype", "data"],
                },
            },
        },
        "required": ["model_name", "outputs"],
    },
    # inference_error_response, metadata_model_error_response, metadata_server_error_response
    "error_response": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
}


def oip_valid(name: str, doc: object) -> None:
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("tensor_data", DRAFT202012.create_resource(TENSOR_DATA))
    jsonschema.Draft202012Validator(OIP[name], registry=registry).validate(doc)


def test_v2_responses_follow_the_official_oip_schemas(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        oip_valid("metadata_server_response", c.get("/v2").json())
        oip_valid("metadata_model_response", c.get("/v2/models/num").json())
        oip_valid("error_response", c.get("/v2/models/nope").json())
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/models/num/ready").status_code == 200

        def infer(app: str, doc: dict) -> dict:
            r = c.post(f"/v2/models/{app}/infer", json=doc)
            assert r.headers["content-type"] == "application/json", r.headers  # JSON asked, JSON sent
            return r.json()

        tensor = {"name": "x", "datatype": "FP64", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
        doc = infer("num", {"id": "a", "inputs": [tensor]})
        oip_valid("inference_response", doc)
        assert doc["id"] == "a" and doc["outputs"][0]["data"] == [3.0, 7.0]
        raw = {"name": "b", "datatype": "BYTES", "shape": [2], "data": ["abc", "é"]}
        for asked in ({}, {"parameters": {"binary_data_output": False}}, {"outputs": [{"name": "output"}]}):
            doc = infer("blob", {"inputs": [raw], **asked})  # reversed UTF-8 of "é" is not UTF-8
            oip_valid("inference_response", doc)
            out = next(o for o in doc["outputs"] if o["name"] == "output")
            assert out["datatype"] == "BYTES" and out["parameters"] == {"content_type": "base64"}
            assert out["data"] == ["Y2Jh", "qcM="]  # b"cba", b"\xa9\xc3"
        oip_valid("error_response", c.post("/v2/models/num/infer", json={"inputs": [{"name": "x"}]}).json())


def test_tritonclient_reads_json_bytes_outputs(gateway):
    client = triton.InferenceServerClient(url=gateway.url.removeprefix("http://"))
    try:
        inp = triton.InferInput("input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hi"], dtype=np.object_), binary_data=False)
        out = triton.InferRequestedOutput("output", binary_data=False)
        res = client.infer("blob", [inp], outputs=[out])
        assert res.get_output("output")["data"] == ["ih"]  # UTF-8: the text itself
    finally:
        client.close()
