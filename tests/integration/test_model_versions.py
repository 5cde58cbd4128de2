"""Model versions end to end: queries pinned to a version, the V2 version routes, Clipper's
"version" key and Triton's model repository API, against a real broker, a real gateway and
model versions as real replica processes.

Model ``total`` has version 1 (the sum of the input; the first to connect, so active) and
version 2 (``noop``: 0 for every input; connected, not active, as a canary is). App ``sum``
links ``total``; app ``pair`` links ``total`` and ``spare`` (a model no replica serves);
app ``solo`` links ``other`` (version 7), which the repository tests unload; app ``empty``
links none.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import ketch
import numpy as np
import pytest
import tritonclient.http as triton
from ketch import errors
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, LocalModel, wait_for
from ketch.protocol.limits import MAX_NAME
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    broker = LocalBroker(
        state_path=str(tmp / "state.db"), extra_args=["--heartbeat-ms", "200", "--dead-after-ms", "10000"]
    )
    broker.start()
    models: list[LocalModel] = []

    def start(target: str, name: str, version: str) -> LocalModel:
        model = LocalModel(
            target,
            name,
            version=version,
            backend=broker.backend,
            input_shape="-1",
            supervised=False,  # a drained replica leaves for good (no supervisor starts it again)
            log_path=str(tmp / f"{name}-{version}.log"),
        ).start()
        models.append(model)
        return model

    admin = broker.admin_client()
    try:
        for app, linked in (
            ("sum", ["total"]),
            ("pair", ["total", "spare"]),
            ("solo", ["other"]),
            ("empty", []),
        ):
            admin.create_app(app, input_type="float64", input_shape=[-1], slo_ms=10_000, models=linked)
        start("ketch.examples.basic:total", "total", "1").wait_ready(admin, 90)  # first: active
        v2 = start("ketch.examples.basic:noop", "total", "2")
        v7 = start("ketch.examples.basic:total", "other", "7")
        v2.wait_ready(admin, 90)
        v7.wait_ready(admin, 90)
        assert admin.show_model("total")["active_version"] == "1"
        with LocalGateway(broker.frontend, broker.admin, extra_args=["--model-control"]) as gw:
            yield broker, admin, gw
    finally:
        for model in models:
            model.stop()
        admin.close()
        broker.stop()
        broker._tmp.cleanup()


@pytest.fixture
def client(stack):
    with ketch.Client(stack[0].frontend) as c:
        yield c


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack[2].url, timeout=20) as c:
        yield c


@pytest.fixture
def kserve(stack):
    c = triton.InferenceServerClient(url=stack[2].url.removeprefix("http://"))
    yield c
    c.close()


X = np.array([1.0, 2.0])


def test_pinned_queries_are_answered_by_their_version_active_or_not(stack, client):
    admin = stack[1]
    unpinned = client.predict("sum", X)
    assert (unpinned.version, unpinned.output) == ("1", 3.0)
    canary = client.predict("sum", X, version="2")
    assert (canary.version, canary.output) == ("2", 0)
    assert client.predict("sum", X, version="1").version == "1"
    many = client.predict_many("sum", [X, X * 2, X * 3], version="2")
    assert [(p.version, p.output) for p in many] == [("2", 0)] * 3
    admin.set_version("total", "2")
    try:
        assert client.predict("sum", X).version == "2"  # the selection follows the active version
        older = client.predict("sum", X, version="1")  # the older one, still connected, still serves
        assert (older.version, older.output) == ("1", 3.0)
    finally:
        admin.set_version("total", "1")
    assert client.predict("sum", X).version == "1"


def test_async_client_pins_too(stack):
    async def run():
        async with ketch.AsyncClient(stack[0].frontend) as c:
            pinned, plain = await asyncio.gather(
                c.predict("sum", X, version="2"), c.predict("sum", X)
            )  # one turn of the loop: two messages, one per version
            many = await c.predict_many("sum", [X, X], version="2")
            with pytest.raises(errors.NotFound):
                await c.predict("sum", X, version="9")
            return pinned, plain, many

    pinned, plain, many = asyncio.run(run())
    assert (pinned.version, plain.version) == ("2", "1")
    assert [p.version for p in many] == ["2", "2"]


def test_the_cli_pins_a_version(stack):
    broker = stack[0]
    argv = [sys.executable, "-m", "ketch.cli", "--frontend", broker.frontend, "--admin", broker.admin]
    argv += ["predict", "sum", "--input", "[1, 2]", "--version"]
    done = subprocess.run([*argv, "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["version"] == "2", done.stderr
    done = subprocess.run([*argv, "9"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no version '9'" in done.stderr


def test_pinned_and_unpinned_queries_share_the_replicas_under_load(stack):
    """Three queues (the model's own and the lanes of versions 1 and 2) draw on the same
    replicas' credit at once: every query is answered, each by the version it asked for."""
    xs = [np.array([float(i), 0.5]) for i in range(150)]  # inputs no other test sends: no cache hits

    async def run():
        async with ketch.AsyncClient(stack[0].frontend) as c:
            return await asyncio.gather(
                c.predict_many("sum", xs, timeout_ms=30_000),
                c.predict_many("sum", xs, timeout_ms=30_000, version="1"),
                c.predict_many("sum", xs, timeout_ms=30_000, version="2"),
            )

    unpinned, one, two = asyncio.run(run())
    sums = [float(x.sum()) for x in xs]
    assert [(p.version, p.output) for p in unpinned] == [("1", s) for s in sums]
    assert [(p.version, p.output) for p in one] == [("1", s) for s in sums]
    assert [(p.version, p.output) for p in two] == [("2", 0)] * len(xs)


def test_a_version_that_does_not_exist_is_not_found(client):
    with pytest.raises(errors.NotFound, match="no version '9'"):
        client.predict("sum", X, version="9")
    with pytest.raises(errors.NotFound):
        client.predict("sum", X, version="total:9")
    assert client.predict("sum", X).version == "1"  # the broker serves on


def test_the_longest_version_a_query_may_name_and_one_byte_more(client):
    # valid but extreme: a version of 2 * MAX_NAME bytes is read (and is not one the model
    # has); one byte more is the caller's mistake, BAD_INPUT; the broker serves on
    longest = "v" * (2 * MAX_NAME)
    with pytest.raises(errors.NotFound):
        client.predict("sum", X, version=longest)
    with pytest.raises(errors.BadInput, match="model_version of 257 bytes"):
        client.predict("sum", X, version=longest + "v")
    assert client.predict("sum", X).version == "1"


def test_the_cache_keeps_versions_apart(stack, client):
    admin = stack[1]
    x = np.array([5.0, 5.0, 5.0])  # an input no other test sends
    hits = admin.stats()["cache"]["hits"]
    assert client.predict("sum", x, version="2").output == 0
    assert client.predict("sum", x, version="1").output == 15.0  # not the cached answer of version 2
    assert client.predict("sum", x).output == 15.0
    assert client.predict("sum", x, version="2").output == 0  # nor version 2 the answer of version 1
    assert client.predict("sum", x, version="1").output == 15.0
    assert admin.stats()["cache"]["hits"] >= hits + 3  # the cache did answer: each from its own


def test_an_app_of_several_models_pins_model_and_version(client):
    answer = client.predict("pair", X, version="total:2")
    assert (answer.model, answer.version, answer.output) == ("total", "2", 0)
    with pytest.raises(errors.Invalid, match="MODEL:VERSION"):
        client.predict("pair", X, version="2")
    with pytest.raises(errors.NotFound, match="links no model 'nope'"):
        client.predict("pair", X, version="nope:1")
    with pytest.raises(errors.NotFound):
        client.predict("pair", X, version="spare:1")  # linked, but it has no version at all


def test_v2_version_routes_with_tritonclient(kserve):
    inp = triton.InferInput("input", [1, 2], "FP64")
    inp.set_data_from_numpy(X.reshape(1, 2))
    for version, want in (("1", 3.0), ("2", 0)):
        result = kserve.infer("sum", [inp], model_version=version)
        assert result.get_response()["model_version"] == version
        assert result.as_numpy("output").tolist() == [want]
    assert kserve.infer("sum", [inp]).get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as info:
        kserve.infer("sum", [inp], model_version="9")
    assert info.value.status() == "404"
    meta = kserve.get_model_metadata("sum", model_version="2")
    assert meta["name"] == "sum" and sorted(meta["versions"]) == ["1", "2"]
    with pytest.raises(InferenceServerException) as info:
        kserve.get_model_metadata("sum", model_version="9")
    assert info.value.status() == "404"
    assert kserve.is_model_ready("sum", "2") and kserve.is_model_ready("sum", "1")
    assert not kserve.is_model_ready("sum", "9")
    assert kserve.is_model_ready("pair", "total:2")
    assert sorted(kserve.get_model_metadata("pair")["versions"]) == ["total:1", "total:2"]


def test_v2_version_routes_answer_404_for_unknown_versions(http):
    body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]}]}
    for method, path in [
        ("GET", "/v2/models/sum/versions/9"),
        ("GET", "/v2/models/sum/versions/9/ready"),
        ("POST", "/v2/models/sum/versions/9/infer"),
        ("GET", "/v2/models/nope/versions/1"),
        ("GET", "/v2/models/empty/versions/1"),
        ("GET", "/v2/models/empty/versions/1/ready"),
        ("POST", "/v2/models/nope/versions/1/infer"),
    ]:
        r = http.request(method, path, json=body if method == "POST" else None)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]
    r = http.post("/v2/models/pair/versions/2/infer", json=body)
    assert r.status_code == 400 and "MODEL:VERSION" in r.json()["error"]


def test_clippers_version_key(http):
    r = http.post("/sum/predict", json={"input": [1.0, 2.0], "version": "2"})
    assert r.status_code == 200 and (r.json()["version"], r.json()["output"]) == ("2", 0), r.text
    r = http.post("/sum/predict", json={"input_batch": [[1.0, 2.0], [3.0]], "version": "1"})
    assert [(a["version"], a["output"]) for a in r.json()["batch_predictions"]] == [("1", 3.0), ("1", 3.0)]
    assert http.post("/sum/predict", json={"input": [1.0, 2.0]}).json()["version"] == "1"
    r = http.post("/sum/predict", json={"input": [1.0, 2.0], "version": "9"})
    assert r.status_code == 404 and "no version '9'" in r.json()["error"]
    r = http.post("/pair/predict", json={"input": [1.0, 2.0], "version": "1"})  # Clipper: 400 too
    assert r.status_code == 400
    assert http.post("/sum/predict", json={"input": [1.0], "version": ["1"]}).status_code == 400


def test_repository_index_with_tritonclient(kserve, http):
    index = kserve.get_model_repository_index()
    by = {(e["name"], e["version"]): e for e in index}
    assert by[("sum", "1")]["state"] == "READY" and by[("sum", "1")]["reason"] == ""
    assert by[("sum", "2")]["state"] == "READY" and "not the active version" in by[("sum", "2")]["reason"]
    assert by[("pair", "total:2")]["state"] == "READY"
    assert by[("pair", "")]["state"] == "UNAVAILABLE"  # model spare: no version yet
    assert by[("solo", "7")]["state"] == "READY"
    assert by[("empty", "")] == {
        "name": "empty",
        "version": "",
        "state": "UNAVAILABLE",
        "reason": "links no model",
    }
    ready = http.post("/v2/repository/index", json={"ready": True}).json()
    assert ready and all(e["state"] == "READY" for e in ready)
    assert ("pair", "") not in {(e["name"], e["version"]) for e in ready}
    assert http.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400


def test_repository_load_and_unload_with_tritonclient(stack, kserve, http, client):
    kserve.load_model("sum")  # loaded: its replicas are connected, nothing to do
    with pytest.raises(InferenceServerException) as info:
        kserve.unload_model("sum")  # model total is linked by app pair too
    assert info.value.status() == "409"
    assert client.predict("sum", X, version="2").version == "2"  # nothing was drained
    kserve.unload_model("solo")

    def state(name, version):
        entries = kserve.get_model_repository_index()
        return next(e["state"] for e in entries if (e["name"], e["version"]) == (name, version))

    wait_for(lambda: state("solo", "7") == "UNAVAILABLE", 30, "solo's replica to leave")
    assert not kserve.is_model_ready("solo", "7")
    with pytest.raises(InferenceServerException) as info:
        kserve.load_model("solo")
    assert info.value.status() == "400" and "does not start model processes" in info.value.message()
    # one version, named by the Ketch parameters: version 2 of total goes, version 1 stays
    r = http.post("/v2/repository/models/sum/unload", json={"parameters": {"version": "2", "force": True}})
    assert r.status_code == 200 and r.json()["draining"]["total"], r.text
    wait_for(lambda: state("sum", "2") == "UNAVAILABLE", 30, "version 2 to leave")
    assert state("sum", "1") == "READY"
    assert client.predict("sum", X).version == "1"
    with pytest.raises(errors.DeadlineExceeded, match="version '2' has no live replica"):
        client.predict("sum", X, version="2", timeout_ms=300)  # it exists, but none serves it
    r = http.post("/v2/repository/models/sum/unload", json={"parameters": {"version": "9"}})
    assert r.status_code == 404


def test_without_model_control_load_and_unload_are_refused(stack, client):
    broker = stack[0]
    with LocalGateway(broker.frontend, broker.admin) as gw:
        kserve = triton.InferenceServerClient(url=gw.url.removeprefix("http://"))
        try:
            for call in (kserve.load_model, kserve.unload_model):
                with pytest.raises(InferenceServerException) as info:
                    call("sum")
                assert info.value.status() == "403" and "--model-control" in info.value.message()
            assert any(e["name"] == "sum" for e in kserve.get_model_repository_index())  # reading is allowed
        finally:
            kserve.close()
    assert client.predict("sum", X).version == "1"


def test_with_tokens_load_and_unload_take_an_admin_token(stack, tmp_path):
    broker = stack[0]
    tokens = tmp_path / "tokens"
    tokens.write_text("query-token\nadmin admin-token\n")
    args = ["--model-control", "--token-file", str(tokens)]
    with LocalGateway(broker.frontend, broker.admin, extra_args=args) as gw:
        kserve = triton.InferenceServerClient(url=gw.url.removeprefix("http://"))
        query, admin = ({"Authorization": f"Bearer {t}"} for t in ("query-token", "admin-token"))
        try:
            with pytest.raises(InferenceServerException) as info:
                kserve.load_model("sum", headers=query)
            assert info.value.status() == "403" and "admin token" in info.value.message()
            kserve.load_model("sum", headers=admin)  # loaded already: 200
            assert any(e["name"] == "sum" for e in kserve.get_model_repository_index(headers=query))
            assert kserve.is_model_ready("sum", "1", headers=query)
        finally:
            kserve.close()
