"""The OpenAPI 3.1 description of the gateway's routes, served at ``/openapi.json``.

Written by hand, next to the routes it describes (``clipper.py``, ``v2.py``); the tests fuzz
the running gateway from this very document, so a route whose description drifts from its
behaviour shows up there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ketch import __version__
from ketch.gateway.tensors import DATATYPES, MAX_TIMEOUT_US

NAME = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "The request is malformed or its input does not fit the app.",
        401: "A bearer token is required (only when the gateway has tokens).",
        403: "Model control is off (ketch gateway --model-control turns it on).",
        404: "No such app (or version).",
        409: "Another app links a model this would drain (parameters.force drains it anyway).",
        413: "The request is too large.",
        415: "The body's Content-Encoding is not gzip, deflate or identity.",
        429: "This client already has its share of the worker in progress (see Retry-After).",
        502: "The model failed on this input.",
        503: "Overloaded (see Retry-After), draining, or the broker does not answer.",
        504: "No answer within the deadline and the app has no default.",
    }
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


def _path_param(name: str, description: str, schema: dict[str, Any] = NAME) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


VERSION = {"type": "string", "minLength": 1, "maxLength": 256}


_QUERY_ERRORS = (400, 401, 404, 413, 415, 429, 502, 503, 504)


def build_spec(*, auth: bool = False) -> dict[str, Any]:
    """The document; with ``auth``, every route but health declares the bearer scheme."""
    app_param = _path_param("app", "A Ketch app.")
    model_param = _path_param("name", "A Ketch app (the protocol calls it a model).")
    version_param = _path_param(
        "version",
        "A version of the app's model (MODEL:VERSION for an app of several models); "
        "served by that version's replicas only, active or not.",
        VERSION,
    )
    infer = _infer_operation("model_infer", [model_param])
    paths: dict[str, Any] = {
        "/{app}/predict": {
            "post": {
                "summary": "Clipper-compatible prediction: one input or a batch.",
                "operationId": "clipper_predict",
                "parameters": [app_param],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("ClipperRequest"),
                            "example": {"input": [5.1, 3.5, 1.4, 0.2]},
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("ClipperPrediction"), _ref("ClipperBatch")]},
                        "The prediction (or the app's default, marked so); a batch of one input "
                        "is answered as one input, as Clipper does.",
                    ),
                    **_errors(*_QUERY_ERRORS),
                },
            }
        },
        "/{app}/update": {
            "post": {
                "summary": "Clipper-compatible feedback: the true label of an earlier query.",
                "operationId": "clipper_update",
                "parameters": [app_param],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ClipperFeedback")}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "app": {"type": "string"},
                                "accepted": {"type": "boolean"},
                                "learned": {"type": "boolean"},
                                "reason": {"type": "string"},
                            },
                        },
                        "The app took the feedback (``learned``: false when its policy learns nothing).",
                    ),
                    **_errors(*_QUERY_ERRORS),
                },
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata.",
                "operationId": "server_metadata",
                "responses": {
                    "200": _json(_ref("ServerMetadata"), "Name, version and extensions."),
                    **_errors(401),
                },
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "200 while the gateway process works.",
                "operationId": "server_live",
                "security": [],
                "responses": {"200": _json(_ref("Live"), "Live.")},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "200 when the broker answers.",
                "operationId": "server_ready",
                "security": [],
                "responses": {"200": _json(_ref("Ready"), "Ready."), **_errors(503)},
            }
        },
        "/v2/models/{name}": {
            "get": {
                "summary": "An app's metadata: input datatype and shape, versions.",
                "operationId": "model_metadata",
                "parameters": [model_param],
                "responses": {"200": _json(_ref("ModelMetadata"), "The app."), **_errors(401, 404, 503)},
            }
        },
        "/v2/models/{name}/ready": {
            "get": {
                "summary": "200 when the app has at least one live replica.",
                "operationId": "model_ready",
                "parameters": [model_param],
                "responses": {"200": _json(_ref("ModelReady"), "Ready."), **_errors(401, 404, 503)},
            }
        },
        "/v2/models/{name}/infer": {"post": infer},
        "/v2/models/{name}/versions/{version}": {
            "get": {
                "summary": "An app's metadata, through one of its versions (404 for one it lacks).",
                "operationId": "model_version_metadata",
                "parameters": [model_param, version_param],
                "responses": {"200": _json(_ref("ModelMetadata"), "The app."), **_errors(400, 401, 404, 503)},
            }
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "get": {
                "summary": "200 when a replica of this version takes work (active or not).",
                "operationId": "model_version_ready",
                "parameters": [model_param, version_param],
                "responses": {"200": _json(_ref("ModelReady"), "Ready."), **_errors(400, 401, 404, 503)},
            }
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "post": _infer_operation("model_version_infer", [model_param, version_param])
        },
        "/v2/repository/index": {
            "post": {
                "summary": "Every app and version with its state (Triton's repository index).",
                "operationId": "repository_index",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RepositoryIndexRequest")}},
                },
                "responses": {
                    "200": _json({"type": "array", "items": _ref("RepositoryIndexEntry")}, "The index."),
                    **_errors(400, 401, 413, 415, 503),
                },
            }
        },
        "/v2/repository/models/{name}/load": {
            "post": _repository_operation(
                "repository_model_load",
                "Ketch starts no model processes: 200 when the app's models each have a live "
                "replica of their active version (loaded already), else 400 saying which needs one.",
                model_param,
                _json(_ref("RepositoryLoaded"), "Loaded."),
                (400, 401, 403, 404, 413, 415, 503),
            )
        },
        "/v2/repository/models/{name}/unload": {
            "post": _repository_operation(
                "repository_model_unload",
                "Drain the replicas of the app's models (or of parameters.version): they "
                "finish what they hold and leave.",
                model_param,
                _json(_ref("RepositoryUnloaded"), "Draining."),
                (400, 401, 403, 404, 409, 413, 415, 503),
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text: the broker's figures and the gateway's own.",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1."), **_errors(401)},
            }
        },
    }
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Ketch HTTP gateway",
            "version": __version__,
            "description": "Clipper's REST API and the Open Inference Protocol (KServe V2) in front of a "
            "Ketch broker. An app is what the V2 routes call a model.",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if auth:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    else:
        for item in paths.values():
            for op in item.values():
                op.pop("security", None)
                op["responses"].pop("401", None)
    return spec


def _repository_operation(
    operation_id: str, summary: str, name: dict[str, Any], ok: dict[str, Any], codes: tuple[int, ...]
) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "parameters": [name],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _ref("RepositoryRequest")}},
        },
        "responses": {"200": ok, **_errors(*codes)},
    }


def _infer_operation(operation_id: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": "Open Inference Protocol inference; JSON tensors or the binary data extension.",
        "operationId": operation_id,
        "description": "The body described here is JSON. With the binary tensor data extension, "
        "the body is that JSON (inputs with `parameters.binary_data_size` in place of `data`) "
        "followed by the raw tensor data, and the `Inference-Header-Content-Length` header says "
        "how many bytes the JSON is; a schema cannot describe such a body, so it is not listed.",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _ref("InferenceRequest"),
                    "example": {
                        "inputs": [
                            {
                                "name": "input",
                                "datatype": "FP64",
                                "shape": [1, 4],
                                "data": [5.1, 3.5, 1.4, 0.2],
                            }
                        ]
                    },
                },
            },
        },
        "responses": {
            "200": {
                "description": "The outputs: JSON, or JSON then binary data "
                "(Inference-Header-Content-Length says where the JSON ends).",
                "content": {
                    "application/json": {"schema": _ref("InferenceResponse")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(*_QUERY_ERRORS),
        },
    }


def _element(datatype: str) -> dict[str, Any]:
    """What one element of a tensor of ``datatype`` may be in JSON (the values it holds)."""
    if datatype == "BYTES":
        return {"type": "string"}
    if datatype == "BOOL":
        return {"anyOf": [{"type": "boolean"}, {"enum": [0, 1]}]}
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
    biggest = float(np.finfo(dtype).max)
    return {"type": "number", "minimum": -biggest, "maximum": biggest}


def _input_tensor(datatype: str, shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": shape,
            "datatype": {"const": datatype},
            "parameters": {"type": ["object", "null"]},
            "data": {"type": "array", "items": _element(datatype)},
        },
    }


def _schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": [*DATATYPES, "BYTES"]}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    clipper_version = {
        "type": "string",
        "description": "Answered by this version of the app's model only (MODEL:VERSION for an app of "
        "several models); 404 for a version it lacks.",
    }
    tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": datatype,
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "code": {"type": "string"},
                "retry_after_ms": {"type": "integer"},
            },
        },
        "ClipperRequest": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["input"],
                    "properties": {"input": {}, "version": clipper_version},
                    "not": {"required": ["input_batch"]},
                },
                {
                    "type": "object",
                    "required": ["input_batch"],
                    "properties": {
                        "input_batch": {"type": "array", "minItems": 1},
                        "version": clipper_version,
                    },
                    "not": {"required": ["input"]},
                },
            ]
        },
        "RepositoryIndexRequest": {
            "type": "object",
            "properties": {"ready": {"type": "boolean", "description": "Only the READY versions."}},
            "additionalProperties": False,
        },
        "RepositoryIndexEntry": {
            "type": "object",
            "required": ["name", "version", "state", "reason"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
                "reason": {"type": "string"},
            },
        },
        "RepositoryRequest": {
            "type": "object",
            "properties": {
                "parameters": {
                    "type": "object",
                    "properties": {
                        "version": {**VERSION, "description": "unload: drain this version only."},
                        "force": {
                            "type": "boolean",
                            "description": "unload: drain models that other apps link too.",
                        },
                        "unload_dependents": {"type": "boolean", "description": "Taken; Ketch has none."},
                    },
                }
            },
            "additionalProperties": False,
        },
        "RepositoryLoaded": {
            "type": "object",
            "required": ["name", "loaded"],
            "properties": {"name": {"type": "string"}, "loaded": {"type": "boolean"}},
        },
        "RepositoryUnloaded": {
            "type": "object",
            "required": ["name", "draining"],
            "properties": {
                "name": {"type": "string"},
                "draining": {
                    "type": "object",
                    "description": "Model -> the replica ids asked to drain.",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "ClipperPrediction": {
            "type": "object",
            "required": ["query_id", "output", "default", "default_explanation"],
            "properties": {
                "query_id": {"type": "integer"},
                "output": {},
                "default": {"type": "boolean"},
                "default_explanation": {"type": "string"},
                "model": {"type": "string"},
                "version": {"type": "string"},
            },
        },
        "ClipperBatch": {
            "type": "object",
            "required": ["batch_predictions"],
            "properties": {"batch_predictions": {"type": "array", "items": {"type": "object"}}},
        },
        "ClipperFeedback": {
            "type": "object",
            "required": ["label"],
            "properties": {
                "label": {},
                "input": {},
                "query_id": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**64 - 1},
                "uid": {  # at most 256 characters, as a string or written as a number
                    "anyOf": [
                        {"type": "null"},
                        {"type": "string", "maxLength": 256},
                        {"type": "integer", "minimum": 1 - 10**255, "maximum": 10**256 - 1},
                    ]
                },
            },
            # the query is named by its input or by its query_id (null: not given), never both
            "oneOf": [
                {
                    "required": ["input"],
                    "not": {"required": ["query_id"], "properties": {"query_id": {"type": "integer"}}},
                },
                {
                    "required": ["query_id"],
                    "properties": {"query_id": {"type": "integer"}},
                    "not": {"required": ["input"]},
                },
            ],
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "ModelReady": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": tensor_meta},
                "outputs": {"type": "array", "items": tensor_meta},
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            # null where the gateway reads null as absent
            "properties": {
                "id": {"type": ["string", "null"]},
                "parameters": {
                    "type": ["object", "null"],
                    "properties": {
                        "timeout": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": MAX_TIMEOUT_US,
                            "description": "Microseconds; 0 is the app's SLO.",
                        },
                        "priority": {
                            "type": "integer",
                            "minimum": -128,
                            "maximum": 127,
                            "description": "Higher is served first.",
                        },
                        "binary_data_output": {"type": "boolean"},
                    },
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "description": "A Ketch app takes one input tensor a request. `data` holds "
                    "the product of `shape` elements, flat in row-major order (nested lists of that "
                    "shape are taken too).",
                    "items": {"oneOf": [_input_tensor(dt, shape) for dt in [*DATATYPES, "BYTES"]]},
                },
                "outputs": {
                    "type": ["array", "null"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "enum": ["output", "default"]},
                            "parameters": {
                                "type": ["object", "null"],
                                "properties": {"binary_data": {"type": ["boolean", "null"]}},
                            },
                        },
                    },
                },
            },
        },
        "InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "parameters": {"type": "object"},
                            "data": {"type": "array"},
                        },
                    },
                },
            },
        },
    }
