"""The Java replica's c=1 latency under JVM flags, A/B against the JVM's defaults.

    python -m perf.java_jvm [--rounds 5] [--duration 3] [--variants default,serialgc,c1only,small]

One broker (cache off) and one Java replica (``io.ketch.examples.Serve --kind noop``) per
variant of JVM flags, each behind its own app; in alternating rounds each gets
``--duration`` s of one query at a time (``ketch.bench``'s closed loop): p50, p99, p99.9
and q/s, then the median over the rounds. Made to look for where the Java replica's c=1
p99 outliers come from (garbage collection, the JIT's C2 compiler, the JVM's threads on
two cores). Needs the shaded jar (``mvn -f sdk/java/pom.xml package``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import numpy as np
from ketch import Admin
from ketch.bench import closed_loop
from ketch.local import LocalBroker, wait_for

from perf._harness import machine, table
from perf.sdks import JAR, ROOT

VARIANTS = {
    "default": [],
    "serialgc": ["-XX:+UseSerialGC"],
    "c1only": ["-XX:TieredStopAtLevel=1"],
    "small": [
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:CICompilerCount=1",
        "-XX:ActiveProcessorCount=1",
    ],
}
COLUMNS = ["round", "variant", "p50_ms", "p99_ms", "p999_ms", "qps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per variant and round")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not JAR.exists():
        print(f"unknown variants {unknown}" if unknown else f"needs {JAR.relative_to(ROOT)}", file=sys.stderr)
        return 2
    print(machine())
    procs: list[subprocess.Popen] = []
    rows: list[dict] = []
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker:
        try:
            with Admin(broker.admin) as admin:
                for v in variants:
                    name = f"java-{v}"
                    admin.create_app(
                        name, input_type="float64", input_shape=[-1], slo_ms=5000, models=[name], cache=False
                    )
                    argv = [
                        "java", *VARIANTS[v], "-cp", str(JAR), "io.ketch.examples.Serve", "--broker",
                        broker.backend, "--name", name, "--version", "1", "--kind", "noop",
                        "--replica-id", f"jvm/{name}",
                    ]  # fmt: skip
                    procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                for v in variants:
                    wait_for(lambda v=v: admin.replicas(f"java-{v}"), 60, f"the {v} replica")
            rng = np.random.default_rng(0)
            inputs = [rng.normal(size=4) for _ in range(256)]

            def make_input(k: int) -> np.ndarray:
                return inputs[k % len(inputs)]

            for v in variants:
                closed_loop(broker.frontend, f"java-{v}", make_input, 8, 2.0)  # warm-up (JIT)
            for r in range(args.rounds):
                for v in variants:
                    one = closed_loop(broker.frontend, f"java-{v}", make_input, 1, args.duration)
                    row = {
                        "round": r + 1, "variant": v, "p50_ms": one.quantile(50), "p99_ms": one.quantile(99),
                        "p999_ms": one.quantile(99.9), "qps": one.throughput,
                    }  # fmt: skip
                    rows.append(row)
                    print(table([row], COLUMNS), flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    print()
    print(f"median (min-max) over {args.rounds} rounds of {args.duration:g} s")
    summary = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        out: dict = {"variant": v}
        for k in ("p50_ms", "p99_ms", "p999_ms", "qps"):
            xs = [r[k] for r in mine]
            out[k] = f"{statistics.median(xs):.4g} ({min(xs):.3g}-{max(xs):.3g})"
        summary.append(out)
    print(table(summary, ["variant", "p50_ms", "p99_ms", "p999_ms", "qps"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
