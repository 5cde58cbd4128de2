"""Clipper's REST API: ``POST /{app}/predict`` and ``POST /{app}/update``.

    POST /{app}/predict  {"input": X}              -> {"query_id", "output", "default",
                                                       "default_explanation", "model", "version"}
    POST /{app}/predict  {"input_batch": [X, ...]} -> {"batch_predictions": [answer, ...]}
                         either with "version": V  -> answered by that model version only
                         (a batch of one is answered as one input is, as Clipper does)
    POST /{app}/update   {"label": Y, "input": X}  -> {"app", "accepted": true, "learned": bool}
                         {"label": Y, "query_id": Q}

``X`` is converted to the app's input type (``values.clipper_input``): numbers to its dtype,
base64 text to bytes. A query past its deadline gets the app's default (``"default": true``
with the reason), or 504 when the app has none. In a batch, an item that failed is
``{"query_id", "error", "code"}`` in its place; when every item failed, the answer is the
first item's error status.

Where Clipper's own query frontend (``src/frontends/src/query_frontend.hpp``) answers
otherwise, a Clipper client would break, so these follow it: an ``input_batch`` of one item
comes back as that item's answer, not wrapped in ``batch_predictions``
(``get_batch_prediction_response_content``); feedback to an app whose policy learns nothing
(``single``, Clipper's default policy) is acknowledged with 200, as Clipper acknowledges it,
with ``"learned": false`` saying nothing was learned.

``"version"`` pins the model version as Clipper's query frontend does: the app's model's
version ``V``, whichever is current (400 for an app of several models, as Clipper; Ketch also
takes ``"MODEL:VERSION"`` there, ``ketch.pins``). A version the model does not have is 404
(Clipper answers 400).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import Response

from ketch import errors
from ketch.client import Prediction
from ketch.gateway.backend import GRACE_S, AppInfo
from ketch.gateway.errors import bad_request, http_error_for
from ketch.gateway.http import Call, json_response, parse_json, read_body
from ketch.gateway.values import clipper_input, jsonable, send_dtype, whole

FEEDBACK_TIMEOUT_MS = 5000
MAX_UID_CHARS = 256  # a selection key (a user id), not a document


def answer(pred: Prediction) -> dict[str, Any]:
    return {
        "query_id": pred.request_id,
        "output": jsonable(pred.output),
        "default": pred.default,
        "default_explanation": pred.default_explanation,
        "model": pred.model,
        "version": pred.version,
    }


def failed(exc: BaseException) -> dict[str, Any]:
    err = http_error_for(exc)
    return {"query_id": getattr(exc, "request_id", 0), "error": err.message, "code": err.code}


async def predict(call: Call) -> Response:
    body = await read_body(call)
    name = call.request.path_params["app"]
    info = await call.gw.link.app(name)  # an unknown app is 404 first
    call.app = info.name
    doc = parse_json(call, body)
    if not isinstance(doc, dict) or ("input" in doc) == ("input_batch" in doc):
        raise bad_request('send {"input": ...} for one query or {"input_batch": [...]} for several')
    batch = doc.get("input_batch")
    if "input_batch" in doc and (not isinstance(batch, list) or not batch):
        raise bad_request("input_batch must be a non-empty list of inputs")
    version = doc.get("version", "")
    if isinstance(version, bool) or not isinstance(version, str | int):
        raise bad_request("version must be a string (a version of the app's model)")
    version = str(version)

    async def run(info: AppInfo) -> Response:
        dtype = send_dtype(info.input_type)
        if "input" in doc:
            x = clipper_input(doc["input"], info.input_type)
            call.send_queries(1)
            pred = await call.gw.link.predict(
                info, x, timeout_ms=None, priority=0, dtype=dtype, version=version, trace=call.trace
            )
            return json_response(answer(pred))
        xs = [clipper_input(v, info.input_type, f"input_batch[{i}]") for i, v in enumerate(batch)]
        call.send_queries(len(xs))
        answers = await call.gw.link.predict_many(
            info, xs, timeout_ms=None, priority=0, dtype=dtype, version=version, trace=call.trace
        )
        if all(isinstance(a, BaseException) for a in answers):
            raise answers[0]
        if len(answers) == 1:  # Clipper answers a batch of one as one input
            (only,) = answers
            assert isinstance(only, Prediction)
            return json_response(answer(only))
        return json_response(
            {"batch_predictions": [failed(a) if isinstance(a, BaseException) else answer(a) for a in answers]}
        )

    return await call.gw.link.serve_app(name, run)


async def update(call: Call) -> Response:
    body = await read_body(call)
    name = call.request.path_params["app"]
    info = await call.gw.link.app(name)
    call.app = info.name
    doc = parse_json(call, body)
    if not isinstance(doc, dict) or "label" not in doc:
        raise bad_request('send {"label": ..., "input": ...} or {"label": ..., "query_id": ...}')
    given_id = doc.get("query_id")
    if ("input" in doc) == (given_id is not None):
        raise bad_request("name the query by 'input' or by 'query_id' (one of them)")
    query_id = None if given_id is None else whole(given_id)
    if given_id is not None and (query_id is None or not 0 < query_id < 1 << 64):
        raise bad_request("query_id must be a whole number from an earlier answer")
    label = doc["label"]
    label_dtype = _label_dtype(label)
    raw_uid = doc.get("uid")  # a string, or a whole number (7.0 is 7, as JSON Schema's integer)
    uid = raw_uid if raw_uid is None or isinstance(raw_uid, str) else whole(raw_uid)
    if raw_uid is not None and (uid is None or len(str(uid)) > MAX_UID_CHARS):
        raise bad_request(f"uid must be a string or a whole number of at most {MAX_UID_CHARS} characters")

    async def run(info: AppInfo) -> Response:
        x = None
        if "input" in doc:
            if info.input_type == "json":
                raise bad_request("feedback for a json app names the query by query_id")
            x = clipper_input(doc["input"], info.input_type)
        if info.policy == "single":
            # Clipper's default policy takes feedback and acknowledges it (200) without
            # learning; the broker refuses it to a native client, which should know
            return json_response(
                {
                    "app": info.name,
                    "accepted": True,
                    "learned": False,
                    "reason": f"app {info.name!r} uses the single policy, which learns nothing from "
                    "feedback (ketch app set-policy: exp3, exp4, weighted or shadow learn)",
                }
            )
        call.send_queries(1)
        try:
            async with asyncio.timeout(FEEDBACK_TIMEOUT_MS / 1000 + GRACE_S):
                await call.gw.link.client.feedback(
                    info.name,
                    label,
                    query_id=query_id,
                    x=x,
                    context="" if uid is None else str(uid),
                    label_dtype=label_dtype,
                    timeout_ms=FEEDBACK_TIMEOUT_MS,
                )
        except TimeoutError:
            raise errors.Timeout("no answer from the broker in time for the feedback") from None
        return json_response({"app": info.name, "accepted": True, "learned": True})

    return await call.gw.link.serve_app(name, run)


def _label_dtype(label: Any) -> str | None:
    """How a label travels: a number float64 holds exactly as float64, anything else as JSON.

    An integer past 2**53 goes as JSON (exact, so it still equals an integer answer); one
    past float64's range is refused: the policies weigh numeric labels as floats.
    """
    if isinstance(label, bool) or not isinstance(label, int | float):
        return "json"
    if isinstance(label, float) or abs(label) <= 2**53:
        return None
    if abs(label) >= 2**1024:
        raise bad_request("label is a number beyond float64's range")
    return "json"
