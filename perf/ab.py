"""A/B: one benchmark module run in two checkouts, alternately, with medians and ratios.

    python -m perf.ab --base ../other-checkout [--rounds 5] [--module perf.roundtrip]
                      [--metric NAME=REGEX ...] [-- ARGS for the module]

Each round runs ``python -m MODULE ARGS`` once in this checkout (A) and once in the base
(B), in alternating order (A first in even rounds, B first in odd ones), each with its own
``.venv/bin/python`` (falling back to this interpreter) and its own working directory, so
each imports its own ``ketch`` and ``perf``. A noisy moment on a shared machine then falls
on both alike. Every ``--metric`` is a regular expression whose first group is a number in
the module's output; without any, the figures of ``perf.roundtrip`` are read. Prints, per
metric, both medians, their ratio A/B, the median of each round's own A/B ratio (its two
runs are neighbours in time) and each side's range over the rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_KETCH_ROW = r"^\| ketch \(broker \+ replica\)\s*\|" + r"\s*([\d.]+)\s*\|" * 4
ROUNDTRIP = {
    # ketch row of the table: p50, p99, q/s one query per message, q/s refills in one message
    "ketch p50 ms": (_KETCH_ROW, 1),
    "ketch p99 ms": (_KETCH_ROW, 2),
    "100 in flight q/s, one per message": (_KETCH_ROW, 3),
    "100 in flight q/s, refills in one": (_KETCH_ROW, 4),
    "relay p50 ms (control)": (r"^\| raw pyzmq relay\s*\|\s*([\d.]+)", 1),
}


def python_of(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_once(checkout: Path, module: str, args: list[str], timeout_s: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [python_of(checkout), "-m", module, *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise SystemExit(f"{module} failed in {checkout} ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def read_metrics(text: str, metrics: dict[str, tuple[str, int]]) -> dict[str, float]:
    out = {}
    for name, (pattern, group) in metrics.items():
        m = re.search(pattern, text, re.M)
        if m is None:
            raise SystemExit(f"metric {name!r} ({pattern}) not found in:\n{text}")
        out[name] = float(m.group(group))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="the other checkout (B)")
    parser.add_argument("--module", default="perf.roundtrip")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metric", action="append", default=[], help="NAME=REGEX (first group: a number)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for one run")
    parser.add_argument("args", nargs="*", help="arguments for the module (after --)")
    opts = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    base = opts.base.resolve()
    metrics = {n: (p, 1) for n, _, p in (m.partition("=") for m in opts.metric)} or ROUNDTRIP
    got: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    print(f"A: {here}\nB: {base}\n{opts.module} {' '.join(opts.args)}, {opts.rounds} rounds, alternating")
    for r in range(opts.rounds):
        order = [("A", here), ("B", base)] if r % 2 == 0 else [("B", base), ("A", here)]
        for side, checkout in order:
            t0 = time.monotonic()
            values = read_metrics(run_once(checkout, opts.module, opts.args, opts.timeout), metrics)
            for name, v in values.items():
                got[side].setdefault(name, []).append(v)
            shown = ", ".join(f"{n} {v:g}" for n, v in values.items())
            took, load = time.monotonic() - t0, os.getloadavg()[0]
            print(f"round {r + 1} {side} ({took:.0f} s, load {load:.2f}): {shown}")
            sys.stdout.flush()
    print(
        "\n| metric | A median | B median | A/B | A/B paired (range) | A range | B range |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name in metrics:
        a, b = got["A"][name], got["B"][name]
        ma, mb = statistics.median(a), statistics.median(b)
        # a round's two runs are neighbours in time: their ratio sees the same machine
        paired = [x / y for x, y in zip(a, b, strict=True) if y]
        pr = f"{statistics.median(paired):.3f} ({min(paired):.2f}-{max(paired):.2f})" if paired else ""
        span = f"{min(a):g}-{max(a):g} | {min(b):g}-{max(b):g}"
        print(f"| {name} | {ma:g} | {mb:g} | {ma / mb:.3f} | {pr} | {span} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
