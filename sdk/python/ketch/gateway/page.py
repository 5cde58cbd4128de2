"""The gateway's status page: ``GET /`` (apps, models, replicas, live p99 and throughput
charts, a "try it" form per app), its files under ``/ui/`` and the data it polls,
``GET /ui/status.json`` (``ketch status --json``'s document).

Everything the page needs is in this package (``static/``): no CDN, no build step, no
third-party script. The page reads only the broker's figures through the gateway's own
admin link and sends predictions to the gateway's Clipper route, like any client.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ketch.gateway.http import json_response
from ketch.status import overview

if TYPE_CHECKING:
    from ketch.gateway.app import Gateway
    from ketch.gateway.http import Call

STATIC = resources.files("ketch.gateway") / "static"


async def status(call: Call) -> Response:
    """The overview document, from four admin calls made together."""
    admin = call.gw.link.admin
    doc = overview(
        *await asyncio.gather(
            admin.call("status"), admin.call("app.list"), admin.call("model.list"), admin.call("stats")
        )
    )
    return json_response(doc, headers={"Cache-Control": "no-store"})


async def index(call: Call) -> Response:
    html = (STATIC / "index.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


def routes(gw: Gateway) -> list[Route | Mount]:
    """The page's routes, in the order they must be matched (before ``/{app}/...``)."""
    e = gw.endpoint
    return [
        Route("/", e("page", index), methods=["GET"]),
        Route("/ui/status.json", e("page_status", status), methods=["GET"]),
        Mount("/ui", StaticFiles(directory=str(STATIC)), name="ui"),
    ]
