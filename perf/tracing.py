"""Tracing benchmark: what tracing costs a query, traced or not, against no tracing, in one run.

    python -m perf.tracing [--rounds 5] [--queries 300] [--burst 400]

Two stacks run side by side in this process, each a broker thread and a replica thread of
a sum model on free loopback ports, cache off: ``off`` was made with no tracing configured
(no tracer anywhere: the shipped default), ``on`` after an OpenTelemetry SDK
``TracerProvider`` was installed (a ``BatchSpanProcessor`` whose exporter drops the spans:
what spans cost to make and end, not to ship). Each is driven with untraced queries and
with queries that each carry a traceparent of their own (``on`` then makes the queue, batch
and compute spans of each; ``off`` carries the context to the replica and makes none).
Rounds alternate the four rows' order so a noisy moment falls on all alike; per row, the
medians over rounds of: p50 and p99 of one query at a time (the sync client: one message
per query in every row), and the throughput of a burst of queries sent at once (the async
client). In a burst, the async client puts the untraced queries of one loop turn in one
message (up to 64), while traced ones, each of a trace of its own, go one to a message: the
burst rows of traced queries also pay for 64 times the messages.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ketch import AsyncClient, Client, Replica, tracing
from ketch.admin import Admin
from ketch.local import wait_for
from ketchd import Broker, BrokerConfig

from perf._harness import machine, quantiles_ms, table


def sums(xs: list[Any]) -> list[float]:
    return [float(np.sum(x)) for x in xs]


class Stack:
    """A broker thread and a replica thread; whether they trace was fixed when made."""

    def __init__(self, name: str) -> None:
        self.name = name
        cfg = BrokerConfig(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            admin="tcp://127.0.0.1:*",
            state_path=":memory:",
            cache_bytes=0,
        )
        self.broker = Broker(cfg)
        ep = self.broker.bind()
        self.frontend, self.backend, self.admin = ep["frontend"], ep["backend"], ep["admin"]
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()
        with Admin(self.admin) as admin:
            admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=5000, models=["m"])
        self.replica = Replica(sums, name="m", broker=self.backend)
        self.rthread = threading.Thread(target=self.replica.run, daemon=True)
        self.rthread.start()
        with Client(self.frontend) as c:
            wait_for(lambda: c.predict("sum", np.ones(2)).output == 2.0, 30, f"stack {name} to answer")

    def stop(self) -> None:
        self.replica.stop()
        self.rthread.join(10)
        self.broker.request_stop("benchmark over")
        self.thread.join(10)


def traceparent(i: int) -> str:
    return f"00-{i + 1:032x}-{i + 1:016x}-01"


def one_at_a_time(stack: Stack, n: int, traced: bool, start: int) -> list[float]:
    x = np.arange(8, dtype=np.float64)
    out = []
    with Client(stack.frontend) as c:
        for i in range(20):  # warm: templates, connections
            c.predict("sum", x, traceparent=traceparent(start + i) if traced else None)
        for i in range(n):
            tp = traceparent(start + 20 + i) if traced else None
            t0 = time.perf_counter()
            c.predict("sum", x, traceparent=tp)
            out.append(time.perf_counter() - t0)
    return out


def burst(stack: Stack, n: int, traced: bool, start: int) -> float:
    x = np.arange(8, dtype=np.float64)

    async def run() -> float:
        async with AsyncClient(stack.frontend) as c:
            await c.predict("sum", x)
            t0 = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    c.predict("sum", x, traceparent=traceparent(start + i) if traced else None)
                    for i in range(n)
                )
            )
            took = time.perf_counter() - t0
            assert all(a.output == 28.0 for a in answers)
            return n / took

    return asyncio.run(run())


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=300, help="one at a time, per row and round")
    parser.add_argument("--burst", type=int, default=400, help="sent at once, per row and round")
    args = parser.parse_args()
    print(machine())

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        spans = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            Drop.spans += len(spans)
            return SpanExportResult.SUCCESS

    off = Stack("off")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=1 << 16))  # none dropped
    tracing.install(provider)
    on = Stack("on")
    tracing.install(None)
    rows = [
        ("off", off, False),
        ("off", off, True),
        ("on", on, False),
        ("on", on, True),
    ]
    p50: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    p99: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    qps: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    spans: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    start = 0
    try:
        for r in range(args.rounds):
            order = list(range(len(rows)))
            order = order[r % len(order) :] + order[: r % len(order)]
            if r % 2:
                order.reverse()
            for i in order:
                _, stack, traced = rows[i]
                provider.force_flush()
                before = Drop.spans
                lat = one_at_a_time(stack, args.queries, traced, start)
                start += args.queries + 20
                qps[i].append(burst(stack, args.burst, traced, start))
                start += args.burst
                provider.force_flush()
                q = quantiles_ms(lat)
                p50[i].append(q["p50"])
                p99[i].append(q["p99"])
                spans[i].append((Drop.spans - before) / (args.queries + 20 + args.burst))
    finally:
        on.stop()
        off.stop()
        provider.shutdown()
    base50, baseq = median(p50[0]), median(qps[0])
    out = []
    for i, (name, _, traced) in enumerate(rows):
        out.append(
            {
                "tracing": name,
                "queries": "traced" if traced else "untraced",
                "p50 ms": round(median(p50[i]), 3),
                "p99 ms": round(median(p99[i]), 3),
                "p50 vs off": f"x{median(p50[i]) / base50:.3f}",
                "burst q/s": round(median(qps[i])),
                "q/s vs off": f"x{median(qps[i]) / baseq:.3f}",
                "spans/query": round(median(spans[i]), 2),
            }
        )
    print(f"rounds {args.rounds}, {args.queries} one at a time and a burst of {args.burst} per row and round")
    print(table(out, list(out[0])))


if __name__ == "__main__":
    main()
