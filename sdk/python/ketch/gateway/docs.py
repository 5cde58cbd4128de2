"""``GET /docs``: Swagger UI on the gateway's own ``/openapi.json``, with no CDN.

The Swagger UI files (5.x, which reads OpenAPI 3.1) come from the ``swagger-ui-py``
package's ``static/`` folder, served under ``/docs/static/``; only the page that starts
it is written here. The package is located without being imported (its ``__init__``
loads its web-framework glue, which the gateway does not use). With bearer tokens on,
``/docs`` needs one like every other route (``auth.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ketch.gateway.errors import HTTPError

if TYPE_CHECKING:
    from ketch.gateway.app import Gateway
    from ketch.gateway.http import Call

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Ketch HTTP gateway: API</title>
<link rel="stylesheet" href="{root}/docs/static/swagger-ui.css">
<link rel="icon" type="image/png" href="{root}/docs/static/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{root}/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "{root}/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files in the installed ``swagger-ui-py``, or None."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


async def page(call: Call) -> Response:
    if swagger_ui_dir() is None:
        raise HTTPError(404, "Swagger UI is not installed: pip install swagger-ui-py (the http extra has it)")
    root = call.request.scope.get("root_path", "").rstrip("/")
    return Response(
        PAGE.format(root=root), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


def routes(gw: Gateway) -> list[Route | Mount]:
    """``/docs`` and, when Swagger UI is installed, its files under ``/docs/static``."""
    out: list[Route | Mount] = [Route("/docs", gw.endpoint("docs", page), methods=["GET"])]
    folder = swagger_ui_dir()
    if folder is not None:
        out.append(Mount("/docs/static", StaticFiles(directory=str(folder)), name="docs"))
    return out
