"""The Open Inference Protocol (KServe V2) REST routes, where a model is a Ketch app.

    GET  /v2                         server metadata
    GET  /v2/health/live             200 {"live": true} while this process works
    GET  /v2/health/ready            200 {"ready": true} when the broker answers and (strict, the
                                     default) every model an app links has a live replica, else 503
    GET  /v2/models/{name}           the app: input datatype and shape, versions, outputs
    GET  /v2/models/{name}/ready     200 when the app has a live replica, 503 if not, 404 unknown
    POST /v2/models/{name}/infer     one input tensor in, ``output`` and ``default`` out
    GET  /v2/models/{name}/versions/{v}         the same, of one version: 404 for a version
    GET  /v2/models/{name}/versions/{v}/ready   that does not exist; one that does is served
    POST /v2/models/{name}/versions/{v}/infer   by its replicas only (``ketch.pins``,
                                                ``repository.py``), active or not

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
from ketch.gateway import repository
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


def not_ready(message: str, **extra: Any) -> HTTPError:
    """503 NOT_READY, with ``"ready": false`` and ``extra`` in the body; retry in a second."""
    return HTTPError(503, message, code="NOT_READY", retry_after_ms=1000, extra={**extra, "ready": False})


async def live(call: Call) -> Response:
    return json_response({"live": True})


async def ready(call: Call) -> Response:
    """Ready when the broker answers and, with strict readiness (as Triton's, the default),
    every model an app links has a live replica; 503 with the reasons otherwise. The route
    is open without a token: a caller without one is told how many models lack a replica,
    not which."""
    try:
        if call.gw.config.strict_readiness:
            reasons = await call.gw.link.server_readiness()
        else:
            await call.gw.link.ping()
            reasons = []
    except errors.KetchError as exc:
        raise not_ready(f"the broker does not answer: {exc}") from None
    if reasons:
        shown = reasons if call.authenticated() else [f"{len(reasons)} linked model(s) have no live replica"]
        raise not_ready("; ".join(shown), reasons=shown)
    return json_response({"ready": True})


async def model_metadata_doc(call: Call, name: str, version: str = "") -> dict[str, Any]:
    """The app's V2 metadata, or one version's (404 when it does not exist): HTTP's JSON body;
    gRPC's ModelMetadataResponse is made from it."""
    if not version:
        info = await call.gw.link.app(name)
    else:
        info = (await repository.resolve(call.gw.link, name, version)).info
    call.app = info.name
    versions = await repository.versions(call.gw.link, info)
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
    name, version = call.request.path_params["name"], call.request.path_params.get("version", "")
    return json_response(await model_metadata_doc(call, name, version))


async def model_readiness(call: Call, name: str, version: str = "") -> tuple[AppInfo, list[str]]:
    """The app (or one version of it: 404 when it does not exist) and why it is not ready
    (empty: ready), for HTTP and gRPC."""
    if not version:
        info, reasons = await call.gw.link.app_readiness(name)
    else:
        pin, reason = await repository.version_readiness(call.gw.link, name, version)
        info, reasons = pin.info, [reason] if reason else []
    call.app = info.name
    return info, reasons


async def model_ready(call: Call) -> Response:
    name, version = call.request.path_params["name"], call.request.path_params.get("version", "")
    _, reasons = await model_readiness(call, name, version)
    if reasons:
        raise not_ready("; ".join(reasons), name=name)
    return json_response({"name": name, "ready": True})


@dataclass
class InferAnswer:
    """What an infer request is answered with, before HTTP or gRPC encodes it."""

    model_name: str
    model_version: str
    outputs: dict[str, OutputTensor]  # "output" and "default", in that order
    parameters: dict[str, Any]


async def answer_infer(
    call: Call, name: str, request: InferRequest, version: str = "", caller_ms: float | None = None
) -> InferAnswer:
    """Send the request's queries to the app and gather the answers (HTTP and gRPC).

    ``version`` (the route's ``/versions/{v}``, gRPC's ``model_version``; "" for the app's
    policy) pins every query to that version: the broker checks it (404 when it does not
    exist) and only that version's replicas answer. ``caller_ms``: the time the caller
    still waits (a gRPC deadline), which shortens the queries' deadline to it.
    """
    link = call.gw.link
    info = await link.app(name)
    call.app = info.name
    if len(request.inputs) != 1:
        raise bad_request(f"a Ketch app takes one input tensor; the request has {len(request.inputs)}")
    asked_ms, priority = query_options(request.parameters)

    async def run(info: AppInfo) -> tuple[AppInfo, list[Prediction]]:
        timeout_ms = asked_ms
        if caller_ms is not None:  # no work for an answer nobody waits for
            timeout_ms = max(1.0, min(info.slo_ms if asked_ms is None else asked_ms, caller_ms))
        xs, _ = split_queries(
            request.inputs[0],
            info.input_type,
            info.input_shape,
            lambda element: parse_json(call, element, "a JSON input"),
        )
        call.send_queries(len(xs))
        dtype = send_dtype(info.input_type)
        if len(xs) == 1:
            pred = await link.predict(
                info,
                xs[0],
                timeout_ms=timeout_ms,
                priority=priority,
                dtype=dtype,
                version=version,
                trace=call.trace,
            )
            return info, [pred]
        answers = await link.predict_many(
            info, xs, timeout_ms=timeout_ms, priority=priority, dtype=dtype, version=version, trace=call.trace
        )
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
    version = call.request.path_params.get("version", "")  # pinned: the broker checks it (404)
    call.app = (await call.gw.link.app(name)).name  # an unknown app is a 404 before the body is parsed
    request = parse_infer_request(
        body,
        call.request.headers.get("inference-header-content-length"),
        lambda head: parse_json(call, head, "the request"),
    )
    answer = await answer_infer(call, name, request, version)
    body, headers = encode_infer_response(
        model_name=answer.model_name,
        model_version=answer.model_version,
        request=request,
        outputs=answer.outputs,
        parameters=answer.parameters,
    )
    return Response(body, headers=headers)


# ---------------------------------------------------------------- the model repository (Triton's)


async def _repository_body(call: Call, keys: tuple[str, ...]) -> dict:
    """The JSON object of a repository request (an empty body is ``{}``), with only ``keys``."""
    body = await read_body(call)
    doc = parse_json(call, body) if body.strip() else {}
    if not isinstance(doc, dict):
        raise bad_request("the body must be a JSON object")
    unknown = sorted(set(doc) - set(keys))
    if unknown:
        raise bad_request(f"unknown key {unknown[0]!r} (this request takes {', '.join(keys)})")
    return doc


async def repository_index(call: Call) -> Response:
    doc = await _repository_body(call, ("ready",))
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise bad_request("ready must be true or false")
    return json_response(await repository.index(call.gw.link, ready=ready))


async def _repository_parameters(call: Call) -> dict:
    doc = await _repository_body(call, ("parameters",))
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request("parameters must be a JSON object")
    return parameters


def _model_control(call: Call) -> None:
    if not call.gw.config.model_control:  # as Triton without --model-control-mode=explicit
        raise errors.Unauthorized(
            "model control is off: this gateway does not load or unload models"
            " (start it with ketch gateway --model-control)"
        )


async def repository_load(call: Call) -> Response:
    _model_control(call)
    parameters = await _repository_parameters(call)
    name = call.request.path_params["name"]
    return json_response(await repository.load(call.gw.link, name, parameters))


async def repository_unload(call: Call) -> Response:
    _model_control(call)
    parameters = await _repository_parameters(call)
    name = call.request.path_params["name"]
    return json_response(await repository.unload(call.gw.link, name, parameters))
