"""The HTTP gateway: a separate process that is a Ketch client of the broker.

    app.py       the ASGI app: routes, per-worker state, one error path, metrics per request
    clipper.py   Clipper's REST API (/{app}/predict, /{app}/update)
    v2.py        the Open Inference Protocol (KServe V2) routes, and what they share with gRPC
    grpc_server.py  the same protocol over gRPC (one grpc.aio server per worker)
    _oip/        its messages and stubs, generated from schemas/grpc_predict_v2.proto
    tensors.py   V2 tensors: JSON and binary data in, queries, outputs back (pure)
    values.py    JSON values to the app's input dtype and outputs to JSON (pure)
    backend.py   the AsyncClient and async admin link to the broker, with a short cache
    errors.py    the one table from Ketch errors to HTTP status codes
    metrics.py   /metrics in Prometheus text
    auth.py      optional bearer tokens
    openapi.py   /openapi.json
    server.py    uvicorn with N worker processes

It needs the ``http`` extra: ``pip install 'ketch[http]'``. Run it with ``ketch gateway``
(``ketch broker start`` starts one by default); routes and status codes: docs/http.md.
"""

from ketch.gateway.app import GatewayConfig, create_app
from ketch.gateway.server import serve

__all__ = ["GatewayConfig", "create_app", "serve"]
