"""Clipper's own admin client, ``clipper_admin`` 0.4.1 from PyPI, drives a Ketch gateway.

A real broker process, a real gateway process and a real replica process (``ketch model
serve ketch.examples.basic:total``); ``clipper_admin.ClipperConnection`` with
``ketch.clipper_compat.KetchContainerManager`` registers an app, links the model the
replica serves, reads everything back in Clipper's shapes (ucbrise/clipper,
``src/management/src/management_frontend.hpp`` and ``src/libclipper/src/json_util.cpp``,
v0.4.1), and the app answers through Clipper's ``/{app}/predict``. The management routes
take admin tokens only.
"""

from __future__ import annotations

import warnings

import httpx
import pytest
import requests
from ketch.clipper_compat import KetchContainerManager
from ketch.gateway.local import LocalGateway
from ketch.local import wait_for

with warnings.catch_warnings():  # its kubernetes and docker imports warn of their own deprecations
    warnings.simplefilter("ignore")
    from clipper_admin import ClipperConnection, ClipperException

pytestmark = pytest.mark.timeout(120)

ADMIN_TOKEN = "admin-s3cret"
USER_TOKEN = "user-s3cret"


@pytest.fixture
def gateway(broker_process, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# a query token, then an admin token\n{USER_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    with LocalGateway(
        broker_process.frontend, broker_process.admin, extra_args=["--token-file", str(tokens)]
    ) as gw:
        yield gw


def connect(gw: LocalGateway, token: str | None = ADMIN_TOKEN) -> ClipperConnection:
    conn = ClipperConnection(KetchContainerManager(gw.url, admin_token=token))
    conn.connect()
    return conn


def test_clipper_admin_registers_an_app_and_links_a_model_a_ketch_replica_serves(
    broker_process, gateway, start_model
):
    with broker_process.admin_client() as admin:
        start_model("ketch.examples.basic:total", "total").wait_ready(admin, timeout_s=60)
    conn = connect(gateway)

    conn.register_application("sums", "doubles", "-1.0", 5_000_000)
    conn.register_model("total", "1", "doubles")  # the version the replica announced
    conn.link_model_to_app("sums", "total")

    assert conn.get_all_apps() == ["sums"]
    info = {
        "name": "sums",
        "input_type": "doubles",
        "default_output": "-1.0",
        "latency_slo_micros": 5_000_000,
        "linked_models": ["total"],
    }
    assert conn.get_all_apps(verbose=True) == [info]
    assert conn.get_app_info("sums") == info
    assert conn.get_app_info("nope") is None  # Clipper answers {} for an unknown app
    assert conn.get_linked_models("sums") == ["total"]
    assert conn.get_all_models() == ["total:1"]
    (model,) = conn.get_all_models(verbose=True)
    assert model["model_name"] == "total" and model["model_version"] == "1"
    assert model["input_type"] == "doubles" and model["is_current_version"] is True
    assert conn.get_model_info("total", "1")["container_name"] == "NO_CONTAINER"
    assert conn.get_model_info("total", "2") is None
    assert conn.get_current_model_version("total") == "1"
    assert conn.get_all_model_replicas() == ["total:1:0"]
    replica = conn.get_model_replica_info("total", "1", 0)
    assert replica["model_id"] == "total:1" and replica["model_replica_id"] == 0
    assert conn.get_model_replica_info("total", "1", 5) is None
    assert conn.get_num_replicas("total") == 1  # through KetchContainerManager
    conn.set_model_version("total", "1")

    # the app answers through Clipper's query route, with the replica's answer
    url = f"http://{conn.get_query_addr()}/sums/predict"
    wait_for(
        lambda: requests.post(url, json={"input": [1.0]}, timeout=10).json()["default"] is False,
        30,
        "the app's first answer from the replica",
    )
    doc = requests.post(url, json={"input": [1.0, 2.0, 3.5]}, timeout=10).json()
    assert doc["output"] == 6.5 and doc["default"] is False
    doc = requests.post(url, json={"input_batch": [[2.0, 2.0]]}, timeout=10).json()
    assert doc["output"] == 4.0  # a batch of one comes back bare, as in Clipper
    doc = requests.post(url, json={"input_batch": [[1.0], [2.0]]}, timeout=10).json()
    assert [p["output"] for p in doc["batch_predictions"]] == [1.0, 2.0]

    # what Clipper refuses, Ketch refuses, with the reason
    with pytest.raises(ClipperException, match=r"409.*exists"):
        conn.register_application("sums", "doubles", "-1.0", 5_000_000)
    with pytest.raises(ClipperException, match="no version '9'"):
        conn.register_model("total", "9", "doubles")
    with pytest.raises(ClipperException, match=r"400.*takes doubles \(float64\), not strings"):
        conn.register_model("total", "1", "strings")
    with pytest.raises(ClipperException, match="no version"):
        conn.set_model_version("total", "7")
    with pytest.raises(ClipperException, match="already links"):
        conn.link_model_to_app("sums", "total")

    admin_url = f"http://{conn.cm.get_admin_addr()}/admin"
    r = requests.post(f"{admin_url}/get_state", json={"app_name": "sums", "uid": 0}, timeout=10)
    assert r.status_code == 200 and r.json()["policy"] == "single", r.text
    body = {"model_name": "total", "model_version": "1"}
    r = requests.post(f"{admin_url}/delete_versioned_model", json=body, timeout=10)
    assert r.status_code == 409 and "active version" in r.json()["error"], r.text
    assert conn.get_num_replicas("total") == 1  # refused: nothing was drained

    conn.unlink_model_from_app("sums", "total")
    assert conn.get_linked_models("sums") == []
    conn.unregister_application("sums")
    assert conn.get_all_apps() == []


def test_the_token_can_stay_out_of_the_address_and_the_logs(gateway, tmp_path, monkeypatch, caplog):
    """clipper_admin logs its query address; with ``token_in_address=False`` requests takes
    the token from a netrc file instead."""
    host = gateway.url.removeprefix("http://").split(":")[0]
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host} login admin password {ADMIN_TOKEN}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    cm = KetchContainerManager(gateway.url, admin_token=ADMIN_TOKEN, token_in_address=False)
    assert ADMIN_TOKEN not in cm.get_admin_addr() + cm.get_query_addr()
    with caplog.at_level("DEBUG"):
        conn = ClipperConnection(cm)
        conn.connect()
        conn.register_application("quiet", "strings", "none", 100_000)
        assert conn.get_all_apps() == ["quiet"]
    assert "Successfully connected" in caplog.text and ADMIN_TOKEN not in caplog.text


def test_the_default_output_is_answered_as_clipper_answers_it(gateway):
    """Clipper keeps ``default_output`` as text and answers it as JSON when it parses."""
    conn = connect(gateway)
    conn.register_application("lonely", "doubles", "-1.0", 20_000)  # links no model
    conn.register_application("named", "strings", "not json", 20_000)
    headers = {"authorization": f"Bearer {USER_TOKEN}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as http:
        doc = http.post("/lonely/predict", json={"input": [1.0]}).json()
        assert doc["output"] == -1.0 and doc["default"] is True
        doc = http.post("/named/predict", json={"input": "x"}).json()
        assert doc["output"] == "not json" and doc["default"] is True


def test_the_management_routes_take_admin_tokens_only(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        body = {"verbose": False}
        r = http.post("/admin/get_all_applications", json=body)
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHENTICATED", r.text
        r = http.post(
            "/admin/get_all_applications", json=body, headers={"authorization": f"Bearer {USER_TOKEN}"}
        )
        assert r.status_code == 403 and "admin token" in r.json()["error"], r.text
        r = http.post(
            "/admin/get_all_applications", json=body, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert r.status_code == 200 and r.json() == [], r.text
        # the user token still queries; the admin token is a token too
        for token in (USER_TOKEN, ADMIN_TOKEN):
            r = http.get("/v2/health/ready", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200
    with pytest.raises(ConnectionError, match="403"):
        connect(gateway, USER_TOKEN)
    with pytest.raises(ConnectionError, match="401"):
        connect(gateway, "wrong")
    with pytest.raises(NotImplementedError, match="ketch model serve"):
        KetchContainerManager(gateway.url).deploy_model("m", "1", "doubles", "image")


def new_app(**changes) -> dict:
    return {"name": "a", "input_type": "doubles", "default_output": "", "latency_slo_micros": 1, **changes}


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/admin/add_app", new_app(input_type="tensors"), "input_type"),
        ("/admin/add_app", new_app(default_output=1), "default_output"),
        ("/admin/add_app", new_app(latency_slo_micros=0), "latency_slo_micros"),
        ("/admin/add_model_links", {"app_name": "a", "model_names": []}, "model_names"),
        ("/admin/get_linked_models", {"app_name": "nope"}, "no app"),
        ("/admin/get_all_models", {"verbose": "yes"}, "verbose"),
        ("/admin/get_container", {"model_name": "m", "model_version": "1", "replica_id": "0"}, "replica_id"),
        ("/admin/delete_app", [1], "JSON object"),
    ],
)
def test_malformed_management_requests_are_4xx_with_the_reason(gateway, path, body, needle):
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        r = http.post(path, json=body, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert 400 <= r.status_code < 500 and needle in r.json()["error"], r.text
    assert "gateway_bug" not in gateway.log_text()
