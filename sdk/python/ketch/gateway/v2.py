"""The Open Inference Protocol (KServe V2) REST routes, where a model is a Ketch app.

    GET  /v2                         server metadata
    GET  /v2/health/live             200 {"live": true} while this process works
    GET  /v2/health/ready            200 {"ready": true} when the broker answers, else 503
    GET  /v2/models/{name}           the app: input datatype and shape, versions, outputs
    GET  /v2/models/{name}/ready     200 when the app has a live replica, 503 if not, 404 unknown
    POST /v2/models/{name}/infer     one input tensor in, ``output`` and ``default`` out

Request parameters honoured: ``timeout`` (microseconds, as Triton's; 0 is the app's SLO),
``priority`` (Ketch's: higher first, -128..127) and ``binary_data_output``. The tensor
rules are in ``tensors.py``. A Ketch app does not declare its output type, so the
metadata reports the datatype of the last answer this worker returned for the app as it is
now (BYTES before any).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.responses import Response

from ketch import __version__, errors
from ketch.client import Prediction
from ketch.gateway.backend import AppInfo
from ketch.gateway.errors import HTTPError, bad_request
from ketch.gateway.http import Call, json_response, parse_json, read_body
from ketch.gateway.tensors import (
    KETCH_DATATYPES,
    InferRequest,
    OutputTensor,
    encode_infer_response,
    output_tensor,
    parse_infer_request,
    query_options,
    split_queries,
)
from ketch.gateway.values import send_dtype

EXTENSIONS = ["binary_tensor_data", "parameters"]


async def server_metadata(call: Call) -> Response:
    return json_response({"name": "ketch", "version": __version__, "extensions": EXTENSIONS})


async def live(call: Call) -> Response:
    return json_response({"live": True})


async def ready(call: Call) -> Response:
    try:
        await call.gw.link.ping()
    except errors.KetchError as exc:
        raise HTTPError(
            503,
            f"the broker does not answer: {exc}",
            code="NOT_READY",
            retry_after_ms=1000,
            extra={"ready": False},
        ) from None
    return json_response({"ready": True})


def check_version(name: str, version: str) -> None:
    """The one place a request's model version is checked, on HTTP and gRPC alike.

    A Ketch app picks the model version that answers (its policy and the active version);
    pinning a request to a version is not served yet, so asking for one is refused with a
    clear error rather than silently answered by whichever version the app picks.
    """
    if version:
        raise HTTPError(
            501,
            f"model {name!r}: version {version!r} was asked for, and this gateway does not pin "
            "requests to a version yet; leave the version empty to be served by the app's active version",
            code="NOT_IMPLEMENTED",
        )


async def model_metadata_doc(call: Call, name: str, version: str = "") -> dict[str, Any]:
    """The app's V2 metadata (HTTP's JSON body; gRPC's ModelMetadataResponse is made from it)."""
    info = await call.gw.link.app(name)
    call.app = info.name
    check_version(name, version)
    versions = []
    for model in info.models:
        try:
            doc = await call.gw.link.model(model)
        except errors.NotFound:
            continue
        if doc.get("active_version"):
            version = str(doc["active_version"])
            versions.append(version if len(info.models) == 1 else f"{model}:{version}")
    seen_under, seen_type, seen_shape = call.gw.outputs_seen.get(info.name, (info, "BYTES", []))
    if seen_under != info:  # seen of an app of this name before it was changed or created again
        seen_type, seen_shape = "BYTES", []
    return {
        "name": info.name,
        "versions": versions,
        "platform": "ketch",
        "inputs": [
            {
                "name": "input",
                "datatype": KETCH_DATATYPES.get(info.input_type, "BYTES"),
                "shape": [-1, *info.input_shape],
            }
        ],
        "outputs": [
            {"name": "output", "datatype": seen_type, "shape": [-1, *seen_shape]},
            {"name": "default", "datatype": "BOOL", "shape": [-1]},
        ],
    }


async def model_metadata(call: Call) -> Response:
    return json_response(await model_metadata_doc(call, call.request.path_params["name"]))


async def model_ready(call: Call) -> Response:
    name = call.request.path_params["name"]
    info, reasons = await call.gw.link.app_readiness(name)
    call.app = info.name
    if reasons:
        raise HTTPError(
            503,
            "; ".join(reasons),
            code="NOT_READY",
            retry_after_ms=1000,
            extra={"name": name, "ready": False},
        )
    return json_response({"name": name, "ready": True})


@dataclass
class InferAnswer:
    """What an infer request is answered with, before HTTP or gRPC encodes it."""

    model_name: str
    model_version: str
    outputs: dict[str, OutputTensor]  # "output" and "default", in that order
    parameters: dict[str, Any]


async def answer_infer(call: Call, name: str, request: InferRequest, version: str = "") -> InferAnswer:
    """Send the request's queries to the app and gather the answers (HTTP and gRPC).

    ``version`` is the request's model version (the HTTP route's, gRPC's ``model_version``):
    it reaches the broker only through ``check_version``.
    """
    link = call.gw.link
    info = await link.app(name)
    call.app = info.name
    check_version(name, version)
    if len(request.inputs) != 1:
        raise bad_request(f"a Ketch app takes one input tensor; the request has {len(request.inputs)}")
    timeout_ms, priority = query_options(request.parameters)

    async def run(info: AppInfo) -> tuple[AppInfo, list[Prediction]]:
        xs, _ = split_queries(
            request.inputs[0],
            info.input_type,
            info.input_shape,
            lambda element: parse_json(call, element, "a JSON input"),
        )
        call.send_queries(len(xs))
        dtype = send_dtype(info.input_type)
        if len(xs) == 1:
            pred = await link.predict(info, xs[0], timeout_ms=timeout_ms, priority=priority, dtype=dtype)
            return info, [pred]
        answers = await link.predict_many(info, xs, timeout_ms=timeout_ms, priority=priority, dtype=dtype)
        preds = []
        for p in answers:
            if isinstance(p, BaseException):
                raise p
            preds.append(p)
        return info, preds

    info, preds = await link.serve_app(name, run)
    output = output_tensor([p.output for p in preds])
    call.gw.outputs_seen[info.name] = (info, output[0], output[1][1:])
    defaults = [p.default for p in preds]
    parameters: dict[str, Any] = {}
    if any(defaults):
        parameters["defaults"] = sum(defaults)
        parameters["default_explanation"] = next(p.default_explanation for p in preds if p.default)
    return InferAnswer(
        model_name=info.name,
        model_version=next((p.version for p in preds if not p.default and p.version), ""),
        outputs={"output": output, "default": ("BOOL", [len(preds)], np.asarray(defaults, dtype=bool))},
        parameters=parameters,
    )


async def infer(call: Call) -> Response:
    body = await read_body(call)
    name = call.request.path_params["name"]
    call.app = (await call.gw.link.app(name)).name  # an unknown app is a 404 before the body is parsed
    request = parse_infer_request(
        body,
        call.request.headers.get("inference-header-content-length"),
        lambda head: parse_json(call, head, "the request"),
    )
    answer = await answer_infer(call, name, request)
    body, headers = encode_infer_response(
        model_name=answer.model_name,
        model_version=answer.model_version,
        request=request,
        outputs=answer.outputs,
        parameters=answer.parameters,
    )
    return Response(body, headers=headers)
