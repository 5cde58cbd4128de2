"""What the gateway's access log costs one request, in process: no sockets, no broker.

Drives ``ketch.gateway.access.AccessLog`` around a bare ASGI app that answers at once, with
the access line on and off, alternating rounds in the same run, and prints microseconds of
CPU per request for each and for the bare app. Log lines go to ``--log`` (by default
/dev/null: the cost of a write, without a disk's), rendered as the gateway renders them
(``ketch.logs.configure``, JSON).

    python -m perf.access_log                     # 5 rounds of 20,000 requests each way
    python -m perf.access_log --rounds 9 --requests 50000 --log /tmp/access.log
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time


async def _bare(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> dict:
    return {"type": "http.request", "body": b""}


async def _send(message: dict) -> None:
    return None


async def _per_request_us(app, n: int) -> float:
    headers = [(b"host", b"127.0.0.1"), (b"x-request-id", b"bench-1")]
    started = time.process_time()
    for _ in range(n):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v2/models/bench/infer",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "endpoint": _bare,
        }
        await app(scope, _receive, _send)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000, help="Requests per round and way.")
    parser.add_argument("--log", default=os.devnull, help="Where the log lines go.")
    args = parser.parse_args()
    sys.stderr = open(args.log, "w")  # noqa: SIM115 (the process's stderr until it exits)
    from ketch import logs
    from ketch.gateway.access import AccessLog

    logs.configure(json=True)
    on = AccessLog(_bare, lambda endpoint: "/v2/models/{name}/infer", enabled=True)
    off = AccessLog(_bare, lambda endpoint: "/v2/models/{name}/infer", enabled=False)
    figures: dict[str, list[float]] = {"access log on": [], "access log off": [], "bare app": []}
    for _ in range(args.rounds):
        for name, app in (("access log on", on), ("access log off", off), ("bare app", _bare)):
            figures[name].append(asyncio.run(_per_request_us(app, args.requests)))
    print(f"{args.rounds} rounds of {args.requests:,} requests each way; log lines to {args.log}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"  {name:15} median {median:6.1f} us of CPU a request  (min {min(values):.1f})")
    added = statistics.median(figures["access log on"]) - statistics.median(figures["access log off"])
    print(f"  the access line: {added:.1f} us a request")


if __name__ == "__main__":
    main()
