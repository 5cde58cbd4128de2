#!/usr/bin/env python3
"""Queries and checks for scripts/e2e-containers.sh: every answer is compared with the model
computed here, directly, and every query must be answered (a default or an error counts
as lost).

    e2e_check.py verify --http URL --frontend ADDR [--queries N]
    e2e_check.py load   --http URL --frontend ADDR --stop-file F --out F [--max-s S]
    e2e_check.py first  --http URL --timeout S     # seconds until the first right prediction
    e2e_check.py images --workdir DIR [--prefix ketch/]   # each framework image and `ketch model build`

Models: ``iris`` (ketch.examples.iris, scikit-learn) and ``linear`` (the Java
io.ketch.examples.Linear with docker/models/linear.json, summed in the same order here).
Each query's input is new (seeded random), so the prediction cache never answers for a model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ketch
import numpy as np
from ketch.examples.iris import estimator

ROOT = Path(__file__).resolve().parent.parent
LINEAR = json.loads((ROOT / "docker" / "models" / "linear.json").read_text())


def linear(x: np.ndarray) -> float:
    y = float(LINEAR["intercept"])
    for c, v in zip(LINEAR["coef"], x.tolist(), strict=True):
        y += c * v
    return y


def expected(app: str, xs: np.ndarray) -> list:
    if app == "iris":
        return [int(v) for v in estimator().predict(xs)]
    return [linear(x) for x in xs]


class Inputs:
    """Fresh inputs for each app: iris rows jittered, linear random normals."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.rows = estimator()[0].mean_  # centre of the iris features (the scaler's mean)

    def take(self, app: str, n: int) -> np.ndarray:
        with self.lock:
            if app == "iris":
                return self.rows + self.rng.normal(0, 1.0, size=(n, 4)) * np.array([0.8, 0.4, 1.7, 0.7])
            return self.rng.normal(0, 3, size=(n, 4))


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.right = self.wrong = self.lost = 0
        self.by_path: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, path: str, sent: int, right: int, wrong: int, lost: int, example: str = "") -> None:
        with self.lock:
            self.sent += sent
            self.right += right
            self.wrong += wrong
            self.lost += lost
            self.by_path[path] = self.by_path.get(path, 0) + sent
            if example and len(self.examples) < 10:
                self.examples.append(example)

    def summary(self) -> dict:
        return {
            "sent": self.sent,
            "right": self.right,
            "wrong": self.wrong,
            "lost": self.lost,
            "by_path": self.by_path,
            "examples": self.examples,
        }


def _same(app: str, got, want) -> bool:
    if app == "iris":
        return int(np.asarray(got)) == want
    return float(np.asarray(got)) == want


def native_batch(client: ketch.Client, app: str, xs: np.ndarray, tally: Tally) -> None:
    want = expected(app, xs)
    got = client.predict_many(app, list(xs), timeout_ms=10_000, return_exceptions=True)
    right = wrong = lost = 0
    example = ""
    for g, w in zip(got, want, strict=True):
        if isinstance(g, Exception):
            lost += 1
            example = example or f"native {app}: {type(g).__name__}: {g}"
        elif g.default:
            lost += 1
            example = example or f"native {app}: default ({g.default_explanation})"
        elif _same(app, g.output, w):
            right += 1
        else:
            wrong += 1
            example = example or f"native {app}: got {g.output!r}, want {w!r}"
    tally.add("native", len(want), right, wrong, lost, example)


def http_one(http: httpx.Client, base: str, app: str, x: np.ndarray, tally: Tally) -> None:
    want = expected(app, x[None, :])[0]
    try:
        r = http.post(f"{base}/{app}/predict", json={"input": x.tolist()}, timeout=15)
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        tally.add("http", 1, 0, 0, 1, f"http {app}: {type(exc).__name__}: {exc}")
        return
    if r.status_code != 200 or body.get("default"):
        tally.add("http", 1, 0, 0, 1, f"http {app}: {r.status_code} {body}")
    elif _same(app, body["output"], want):
        tally.add("http", 1, 1, 0, 0)
    else:
        tally.add("http", 1, 0, 1, 0, f"http {app}: got {body['output']!r}, want {want!r}")


def verify(args: argparse.Namespace) -> dict:
    """``--queries`` through the native client and as many through HTTP, half per app."""
    tally = Tally()
    inputs = Inputs(1)
    apps = args.apps.split(",")
    per_app = args.queries // len(apps)
    with ketch.Client(args.frontend) as client:
        for app in apps:
            for start in range(0, per_app, 100):
                native_batch(client, app, inputs.take(app, min(100, per_app - start)), tally)
    with httpx.Client() as http, ThreadPoolExecutor(8) as pool:
        jobs = [
            pool.submit(http_one, http, args.http, app, x, tally)
            for app in apps
            for x in inputs.take(app, per_app)
        ]
        for j in jobs:
            j.result()
    return tally.summary()


def load(args: argparse.Namespace) -> dict:
    """Native and HTTP load on every app until the stop file appears (or --max-s)."""
    tally = Tally()
    inputs = Inputs(2)
    apps = args.apps.split(",")
    stop = threading.Event()
    deadline = time.monotonic() + args.max_s

    def native_loop(app: str) -> None:
        with ketch.Client(args.frontend) as client:
            while not stop.is_set():
                native_batch(client, app, inputs.take(app, 20), tally)
                time.sleep(0.02)

    def http_loop(app: str) -> None:
        with httpx.Client() as http:
            while not stop.is_set():
                http_one(http, args.http, app, inputs.take(app, 1)[0], tally)
                time.sleep(0.01)

    threads = [threading.Thread(target=f, args=(app,)) for app in apps for f in (native_loop, http_loop)]
    for t in threads:
        t.start()
    started = time.monotonic()
    Path(args.started_file).write_text("started\n") if args.started_file else None
    while not Path(args.stop_file).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    out = tally.summary()
    out["seconds"] = round(time.monotonic() - started, 1)
    out["timed_out"] = not Path(args.stop_file).exists()
    return out


def first(args: argparse.Namespace) -> dict:
    """Poll the gateway until a prediction comes back right; how long that took."""
    t0 = time.monotonic()
    x = np.array([5.1, 3.5, 1.4, 0.2])
    want = expected("iris", x[None, :])[0]
    last = ""
    with httpx.Client() as http:
        while time.monotonic() - t0 < args.timeout:
            try:
                r = http.post(f"{args.http}/iris/predict", json={"input": x.tolist()}, timeout=5)
                body = r.json()
                if r.status_code == 200 and not body.get("default") and body["output"] == want:
                    return {"seconds": round(time.monotonic() - t0, 2), "output": body["output"]}
                last = f"{r.status_code} {body}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
    raise SystemExit(f"no right prediction in {args.timeout} s; last: {last}")


# ---------------------------------------------------------------- framework images and model builds

# Each case makes a model and its expected answers with the framework inside the framework's
# image (so no version of the framework on this machine matters), then serves the model from
# an image (`ketch model build`, or the framework image with the model mounted at run time)
# as a replica of a broker on 127.0.0.1, and compares every answer.
CASES = {
    "sklearn-build": {
        "image": "python-sklearn",
        "make": (
            "import joblib, numpy as np\n"
            "from sklearn.datasets import load_iris\n"
            "from sklearn.ensemble import RandomForestClassifier\n"
            "d = load_iris()\n"
            "clf = RandomForestClassifier(n_estimators=20, random_state=0).fit(d.data, d.target)\n"
            "joblib.dump(clf, '/data/forest.joblib')\n"
            "x = np.random.default_rng(5).normal(d.data.mean(0), d.data.std(0), size=(200, 4))\n"
            "np.save('/data/x.npy', x); np.save('/data/y.npy', clf.predict(x))\n"
        ),
        "build": ["forest.joblib", "--name", "forest"],
        "app": ("float64", [4]),
    },
    "onnx-build": {
        "image": "python-onnx",
        "make": None,  # written here with the onnx package; expected answers from ONNX Runtime in the image
        "expect": (
            "import numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession('/data/affine.onnx', providers=['CPUExecutionProvider'])\n"
            "x = np.random.default_rng(6).normal(size=(200, 4)).astype(np.float32)\n"
            "np.save('/data/x.npy', x); np.save('/data/y.npy', s.run(None, {'x': x})[0])\n"
        ),
        "build": ["affine.onnx", "--name", "affine"],
        "app": ("float32", [4]),
    },
    "python-build": {
        "image": "python",
        "make": None,  # a function file that needs a requirement (toolz)
        "build": ["squares.py:predict", "--name", "squares", "--pip", "toolz==1.0.0"],
        "app": ("float64", [-1]),
    },
    "torch-mounted": {
        "image": "python-torch",
        "make": (
            "import numpy as np, torch\n"
            "torch.manual_seed(0)\n"
            "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))\n"
            "m = torch.jit.script(net.eval())\n"
            "m.save('/data/mlp.pt')\n"
            "x = np.random.default_rng(7).normal(size=(200, 4)).astype(np.float32)\n"
            "with torch.no_grad(): y = m(torch.from_numpy(x)).numpy()\n"
            "np.save('/data/x.npy', x); np.save('/data/y.npy', y)\n"
        ),
        "mount": "mlp.pt",
        "app": ("float32", [4]),
    },
    "r-build": {
        "image": "r",
        "build": ["model.R", "--name", "iris-lm"],
        "app": ("float64", [3]),
    },
}

R_MODEL = """# the iris sepal length from the other three measures: a linear model fitted at load
fit <- lm(Sepal.Length ~ Sepal.Width + Petal.Length + Petal.Width, data = iris)
beta <- coef(fit)
predict_fn <- function(inputs) {
  lapply(inputs, function(x) sum(beta * c(1, x)))
}
"""
R_EXPECT = """source('/data/model.R')
set.seed(8)
x <- matrix(rnorm(600, mean = 3, sd = 1), ncol = 3)
y <- vapply(seq_len(nrow(x)), function(i) predict_fn(list(x[i, ]))[[1]], numeric(1))
writeLines(c(paste(sprintf('%.17g', t(x)), collapse = ' '), paste(sprintf('%.17g', y), collapse = ' ')),
           '/data/xy.txt')
"""


def _docker(*argv: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *argv], check=check, text=True, capture_output=capture)


def _make_case(name: str, case: dict, work: Path, prefix: str, tag: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o777)  # the images run as uid 10001
    image = f"{prefix}{case['image']}:{tag}"
    if name == "onnx-build":
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(3)
        w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
        b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
            "affine",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
            initializer=[w, b],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, work / "affine.onnx")
        script = case["expect"]
    elif name == "python-build":
        (work / "squares.py").write_text(
            "from toolz import reduce\n\n\n"
            "def predict(inputs):\n"
            "    return [float(reduce(lambda a, v: a + v * v, x.tolist(), 0.0)) for x in inputs]\n"
        )
        x = np.random.default_rng(9).normal(size=(200, 5))
        np.save(work / "x.npy", x)
        np.save(work / "y.npy", np.array([sum(v * v for v in row.tolist()) for row in x]))
        return
    elif name == "r-build":
        (work / "model.R").write_text(R_MODEL)
        (work / "expect.R").write_text(R_EXPECT)
        _docker(
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{work}:/data",
            "--entrypoint",
            "Rscript",
            image,
            "/data/expect.R",
        )
        xs, ys = (work / "xy.txt").read_text().splitlines()
        np.save(work / "x.npy", np.array([float(v) for v in xs.split()]).reshape(-1, 3))
        np.save(work / "y.npy", np.array([float(v) for v in ys.split()]))
        return
    else:
        script = case["make"]
    (work / "make.py").write_text(script)
    _docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{work}:/data",
        "--entrypoint",
        "python",
        image,
        "/data/make.py",
    )


def images(args: argparse.Namespace) -> dict:
    from ketch.local import LocalBroker, wait_for

    results: dict = {}
    workdir = Path(args.workdir)
    with LocalBroker() as broker:
        backend = broker.backend
        for name, case in CASES.items():
            if args.only and name not in args.only.split(","):
                continue
            work = workdir / name
            t0 = time.monotonic()
            _make_case(name, case, work, args.prefix, args.tag)
            if "build" in case:
                tag = f"ketch-e2e/{name}:1"
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "ketch.cli",
                        "model",
                        "build",
                        *case["build"],
                        "--tag",
                        tag,
                        "--image-prefix",
                        args.prefix,
                        "--base-version",
                        args.tag,
                    ],
                    cwd=work,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                run = ["run", "-d", "--network", "host", "-e", f"KETCH_BACKEND={backend}", tag]
                model_name = case["build"][case["build"].index("--name") + 1]
            else:
                model_name = name
                run = [
                    "run",
                    "-d",
                    "--network",
                    "host",
                    "-v",
                    f"{work}:/models:ro",
                    "-e",
                    f"KETCH_BACKEND={backend}",
                    "-e",
                    f"KETCH_MODEL=/models/{case['mount']}",
                    "-e",
                    f"KETCH_MODEL_NAME={model_name}",
                    f"{args.prefix}{case['image']}:{args.tag}",
                ]
            built_s = round(time.monotonic() - t0, 1)
            cid = _docker(*run, capture=True).stdout.strip()
            try:
                dtype, shape = case["app"]
                with broker.admin_client() as admin:
                    admin.create_app(
                        name, input_type=dtype, input_shape=shape, slo_ms=10_000, models=[model_name]
                    )

                    def registered(admin=admin, model_name=model_name) -> bool:
                        return admin.show_model(model_name)["figures"]["replicas"] > 0

                    wait_for(registered, 180, f"{name}'s container to register")
                health = ""
                for _ in range(40):  # Docker's HEALTHCHECK: ketch-probe ready
                    health = _docker(
                        "inspect", "-f", "{{.State.Health.Status}}", cid, capture=True
                    ).stdout.strip()
                    if health == "healthy":
                        break
                    time.sleep(0.5)
                x = np.load(work / "x.npy").astype(np.float32 if dtype == "float32" else np.float64)
                y = np.load(work / "y.npy")
                with ketch.Client(broker.frontend) as client:
                    got = client.predict_many(name, list(x), timeout_ms=10_000, return_exceptions=True)
                right = sum(
                    1
                    for g, w in zip(got, y, strict=True)
                    if not isinstance(g, Exception)
                    and not g.default
                    and np.array_equal(np.asarray(g.output), np.asarray(w))
                )
                results[name] = {"queries": len(x), "right": right, "health": health, "build_s": built_s}
            finally:
                logs = _docker("logs", "--tail", "20", cid, check=False, capture=True)
                _docker("rm", "-f", cid, check=False, capture=True)
                if results.get(name, {}).get("right") != len(np.load(work / "x.npy")):
                    results.setdefault(name, {})["log"] = (logs.stdout + logs.stderr)[-2000:]
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("images")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prefix", default="ketch/")
    p.add_argument("--tag", default=ketch.__version__)
    p.add_argument("--only", default="")
    p.add_argument("--out", default=None)
    for name in ("verify", "load", "first"):
        p = sub.add_parser(name)
        p.add_argument("--http", required=True, help="the gateway's base URL")
        p.add_argument("--frontend", default="tcp://127.0.0.1:7001")
        p.add_argument("--apps", default="iris,linear")
        p.add_argument("--out", default=None, help="write the JSON result here too")
        if name == "verify":
            p.add_argument("--queries", type=int, default=2000)
        if name == "load":
            p.add_argument("--stop-file", required=True)
            p.add_argument("--started-file", default=None)
            p.add_argument("--max-s", type=float, default=300)
        if name == "first":
            p.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    result = {"verify": verify, "load": load, "first": first, "images": images}[args.cmd](args)
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.cmd in ("verify", "load") and (result["wrong"] or result["lost"] or result["sent"] == 0):
        return 1
    if args.cmd == "images" and any(
        r.get("right") != r.get("queries") or r.get("health") != "healthy" for r in result.values()
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
