"""The Helm chart: `helm lint`, every rendering validated offline against the Kubernetes
1.31 schemas in strict mode (kubernetes-validate), the committed plain manifests equal to a
fresh rendering, and the properties docs/deploy.md promises, read from the manifests.

helm comes from ``scripts/infra.sh tools`` (``scripts/setup.sh --test`` runs it); without it
these tests skip, unless KETCH_REQUIRE_DEPLOY_TOOLS=1 (set by scripts/test.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ketch"
MANIFESTS = ROOT / "deploy" / "manifests" / "ketch.yaml"
K8S = "1.31.0"


def _helm() -> str:
    path = subprocess.run(
        [str(ROOT / "scripts" / "infra.sh"), "tool-path", "helm"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.access(path, os.X_OK):
        if os.environ.get("KETCH_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(f"helm is missing ({path}): scripts/infra.sh tools")
        pytest.skip("helm is missing: scripts/infra.sh tools")
    return path


@pytest.fixture(scope="module")
def helm() -> str:
    return _helm()


def render(helm: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [helm, "template", "ketch", str(CHART), "--namespace", "default", "--kube-version", K8S, *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


FULL = ("-f", str(CHART / "ci" / "full-values.yaml"))
E2E = (
    "-f",
    str(CHART / "ci" / "e2e-values.yaml"),
    "--set-file",
    "models[1].files.linear\\.json=" + str(ROOT / "docker" / "models" / "linear.json"),
)


def test_helm_lint_is_clean(helm):
    for values in ([], list(FULL), list(E2E)):
        out = subprocess.run([helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("values", [(), FULL, E2E], ids=["default", "full", "e2e"])
def test_every_manifest_validates_strictly(helm, values):
    docs = render(helm, *values)
    assert len(docs) >= 9
    for doc in docs:
        # raises ValidationError naming the field for anything unknown or mistyped
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_a_misspelt_value_is_refused(helm):
    out = subprocess.run(
        [helm, "template", "k", str(CHART), "--kube-version", K8S, "--set", "gateway.replicaz=3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "replicaz" in out.stderr


def test_committed_manifests_are_the_default_rendering(helm):
    fresh = subprocess.run(
        [str(ROOT / "scripts" / "render_manifests.sh"), "--stdout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert MANIFESTS.read_text() == fresh, "deploy/manifests is stale: run scripts/render_manifests.sh"


def test_broker_keeps_state_on_a_claim_and_is_recreated(helm):
    docs = render(helm)
    broker = by_kind(docs, "Deployment")["ketch-broker"]
    assert broker["spec"]["replicas"] == 1
    assert broker["spec"]["strategy"] == {"type": "Recreate"}
    pod = broker["spec"]["template"]["spec"]
    claim = next(v for v in pod["volumes"] if v["name"] == "state")["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")
    c = pod["containers"][0]
    assert "--state=/var/lib/ketch/ketch.db" in c["args"]
    assert c["readinessProbe"]["exec"]["command"] == ["ketch", "broker", "status"]
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_model_deployments_drain_and_probe_registration(helm):
    docs = render(helm, *E2E)
    deps = by_kind(docs, "Deployment")
    assert {"ketch-iris-v1", "ketch-linear-v1"} <= set(deps)
    for name in ("ketch-iris-v1", "ketch-linear-v1"):
        spec = deps[name]["spec"]
        assert spec["replicas"] == 2
        assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 30
        assert pod["securityContext"]["runAsNonRoot"] is True
        c = pod["containers"][0]
        assert c["readinessProbe"]["exec"]["command"] == ["ketch-probe", "ready"]
        assert c["livenessProbe"]["exec"]["command"] == ["ketch-probe", "live"]
        assert c["startupProbe"]["exec"]["command"] == ["ketch-probe", "live"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["KETCH_BACKEND"] == "tcp://ketch-broker:7000"
        assert env["KETCH_STATUS_FILE"] == "/tmp/ketch-status"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    linear = deps["ketch-linear-v1"]["spec"]["template"]["spec"]
    files = by_kind(docs, "ConfigMap")["ketch-linear-v1-files"]["data"]
    assert "coef" in files["linear.json"]
    assert (
        next(v for v in linear["volumes"] if v["name"] == "models")["configMap"]["name"]
        == "ketch-linear-v1-files"
    )
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert pdbs["ketch-iris-v1"]["spec"]["maxUnavailable"] == 1
    assert "ketch-gateway" in pdbs


def test_gateway_service_and_graceful_stop(helm):
    docs = render(helm)
    gw = by_kind(docs, "Deployment")["ketch-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert gw["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert "--broker=tcp://ketch-broker:7001" in gw["args"]
    svc = by_kind(docs, "Service")["ketch-gateway"]
    assert svc["spec"]["ports"][0]["port"] == 8080


def test_full_values_wire_secrets_and_autoscaling(helm):
    docs = render(helm, *FULL)
    deps = by_kind(docs, "Deployment")
    broker = deps["ketch-broker"]["spec"]["template"]["spec"]
    assert "--curve-secret=/etc/ketch/curve/broker/broker.key_secret" in broker["containers"][0]["args"]
    secrets = {v["secret"]["secretName"] for v in broker["volumes"] if "secret" in v}
    assert {
        "ketch-curve-broker",
        "ketch-curve-clients",
        "ketch-curve-containers",
        "ketch-curve-admins",
    } <= secrets
    gw = deps["ketch-gateway"]["spec"]["template"]["spec"]
    assert "--token-file=/etc/ketch/tokens/tokens" in gw["containers"][0]["args"]
    assert any(v.get("secret", {}).get("secretName") == "ketch-gateway-tokens" for v in gw["volumes"])
    model_env = {e["name"] for e in deps["ketch-iris-v2"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"KETCH_CURVE_SERVER_KEY", "KETCH_CURVE_SECRET"} <= model_env
    assert "replicas" not in deps["ketch-iris-v2"]["spec"]  # the HPA owns it
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"ketch-iris-v2", "ketch-iris-onnx-v1", "ketch-textlen-v1"}  # not linear, mlp
    depth = hpas["ketch-iris-v2"]["spec"]["metrics"][0]["external"]
    assert depth["metric"]["name"] == "ketch_model_queue_depth"
    assert depth["metric"]["selector"]["matchLabels"] == {"model": "iris"}
    p99 = hpas["ketch-iris-onnx-v1"]["spec"]["metrics"][0]["external"]
    assert p99["metric"] == {
        "name": "ketch_model_queue_wait_p99_seconds",
        "selector": {"matchLabels": {"model": "iris-onnx"}},
    }
    assert p99["target"] == {"type": "Value", "value": "5m"}  # 5 ms (full-values.yaml) in seconds
    images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in deps.values()}
    assert "registry.example.com/ketch/python-onnx:0.1.0" in images
    assert "registry.example.com/team/mlp-model:2024-05" in images
    assert "ketch-iris-v2" not in by_kind(docs, "PersistentVolumeClaim")


def test_apps_job_applies_the_values(helm):
    docs = render(helm, *E2E)
    job = by_kind(docs, "Job")["ketch-apps-1"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--admin=tcp://ketch-broker:7002", "app", "apply", "/etc/ketch/apps/apps.json"]
    apps = yaml.safe_load(by_kind(docs, "ConfigMap")["ketch-apps"]["data"]["apps.json"])["apps"]
    assert [a["name"] for a in apps] == ["iris", "linear"]


def test_values_rendered_by_ketch_up_install_as_the_deployment_says(helm, tmp_path):
    """`ketch up FILE --render-values` gives values the chart accepts (its schema refuses
    anything else), with one Deployment per model version and the apps for the apps Job."""
    (tmp_path / "summer.py").write_text("def predict(xs):\n    return [float(x.sum()) for x in xs]\n")
    (tmp_path / "ketch.toml").write_text(
        "[defaults]\nreplicas = 2\n\n"
        '[helm]\nmodels_volume = {persistentVolumeClaim = {claimName = "models"}}\n\n'
        '[[models]]\nname = "iris"\nsource = "ketch.examples.iris:model"\ninput_shape = [4]\n\n'
        '[[models]]\nname = "summer"\nsource = "summer.py:predict"\nreplicas = 3\n\n'
        '[[apps]]\nname = "flowers"\nmodels = ["iris"]\nslo_ms = 20\ndefault = -1\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "ketch.cli", "--broker-wait", "0", "up", str(tmp_path / "ketch.toml"),
         "--render-values"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    (tmp_path / "values.yaml").write_text(out.stdout)
    docs = render(helm, "-f", str(tmp_path / "values.yaml"))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)
    deployments = by_kind(docs, "Deployment")
    assert deployments["ketch-iris-v1"]["spec"]["replicas"] == 2
    assert deployments["ketch-summer-v1"]["spec"]["replicas"] == 3
    summer = deployments["ketch-summer-v1"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in summer["containers"][0]["env"]}
    assert env["KETCH_MODEL"] == "/models/summer.py:predict"
    assert {"claimName": "models"} in [v.get("persistentVolumeClaim") for v in summer["volumes"]]
    apps = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap" and "apps.json" in d.get("data", {}))["data"][
            "apps.json"
        ]
    )
    flowers = next(a for a in apps["apps"] if a["name"] == "flowers")
    assert (
        flowers["input_type"] == "float64" and flowers["input_shape"] == [4] and flowers["models"] == ["iris"]
    )
