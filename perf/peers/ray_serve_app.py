"""The logistic regression on 20 features as a Ray Serve deployment with ``@serve.batch``.

Runs inside perf/peers/.venv-ray (it does not import ketch); ``perf.peers.compare`` starts it:

    .venv-ray/bin/python ray_serve_app.py --port 8000 --max-batch-size 32 --batch-wait-timeout-s 0.002

POST / with ``{"input": [20 floats]}`` answers ``{"output": label}``. It starts a local Ray
cluster (dashboard off, HTTP proxy on 127.0.0.1 only), prints ``READY {json}`` once the
deployment answers, and shuts Serve and Ray down on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import urllib.request


def estimator():
    """The same model as ketch.examples.linear:model20 (copied: no ketch here)."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)
    return LogisticRegression(max_iter=1000).fit(x, y)


def build(max_batch_size: int, batch_wait_timeout_s: float, replicas: int):
    import numpy as np
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class LR20:
        def __init__(self) -> None:
            self.model = estimator()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def predict(self, rows: list[list[float]]) -> list[int]:
            return [int(v) for v in self.model.predict(np.asarray(rows, dtype=np.float64))]

        async def __call__(self, request: Request) -> dict:
            doc = await request.json()
            return {"output": await self.predict(doc["input"])}

    return LR20.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build(args.max_batch_size, args.batch_wait_timeout_s, args.replicas), route_prefix="/")
    req = urllib.request.Request(
        f"http://127.0.0.1:{args.port}/",
        data=json.dumps({"input": [0.0] * 20}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        json.loads(r.read())
    settings = {
        "ray": ray.__version__,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "replicas": args.replicas,
        "num_cpus": args.num_cpus,
    }
    print("READY " + json.dumps(settings), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
