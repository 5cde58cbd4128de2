"""The Open Inference Protocol (KServe V2) over gRPC: ``inference.GRPCInferenceService``.

The service is the one in ``schemas/grpc_predict_v2.proto`` (KServe's, which Triton's
``grpc_service.proto`` extends): ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata and ModelInfer; and Triton's repository RPCs (RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload) from ``schemas/triton_repository.proto``. Each
gateway worker runs one ``grpc.aio`` server in its own event loop, on the port the
supervisor reserved (``server.py``; ``SO_REUSEPORT`` lets every worker listen on it), so
gRPC shares the worker's broker link, limits and metrics with HTTP.

ModelInfer is the HTTP route's ``v2.answer_infer``: the same tensor rules (``tensors.py``),
the same backend calls and the same answers; only the framing differs. Inputs come as
``raw_input_contents`` (one per input, in order) or typed ``contents``; the answer comes in
``raw_output_contents`` when the request sent raw inputs, asked for it
(``binary_data_output``) or an output is FP16 (which has no typed field), else typed.

A request's version (ModelReady's and ModelMetadata's ``version``, ModelInfer's
``model_version``) is the HTTP routes' ``/versions/{v}``: the same functions serve it
(``v2.model_readiness``, ``v2.model_metadata_doc``, ``v2.answer_infer``), so a version that
does not exist is NOT_FOUND and one that does is served by its replicas only.

Errors are the HTTP table's (``errors.py``) mapped to gRPC status codes by ``GRPC_CODES``;
the Ketch code rides in the trailing metadata as ``ketch-code`` (and ``retry-after-ms``).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog
from google.protobuf import unknown_fields

from ketch import __version__, errors
from ketch.gateway import repository, v2
from ketch.gateway._oip import grpc_predict_v2_pb2 as pb
from ketch.gateway._oip import grpc_predict_v2_pb2_grpc as pb_grpc
from ketch.gateway._oip import triton_repository_pb2 as repo_pb
from ketch.gateway._oip import triton_repository_pb2_grpc as repo_grpc
from ketch.gateway.auth import bearer_token, token_ok
from ketch.gateway.errors import HTTPError, bad_request, http_error_for
from ketch.gateway.http import Call
from ketch.gateway.protocol import connection_cap
from ketch.gateway.tensors import (
    DATATYPES,
    OUTPUT_NAMES,
    InferRequest,
    Tensor,
    check_datatype,
    check_shape,
    raw_output,
    tensor_from_raw,
)
from ketch.gateway.values import cast_array

T = TypeVar("T")
log = structlog.get_logger("ketch.gateway")

# the HTTP status of an error (errors.py) -> its gRPC code; OVERLOADED is RESOURCE_EXHAUSTED
# whatever its status (a full queue, a worker's or a client's share)
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
CANCELLED = 499  # the metrics' status of a call the client cancelled or let expire
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # no token needed, as HTTP's health routes
# change what serves: admin tokens only, as HTTP's /v2/repository/models/{name}/load and /unload
ADMIN_METHODS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
TRACED_METHODS = frozenset({"ModelInfer"})  # the calls that send queries get a server span (ketch.tracing)
SERVICE = "inference.GRPCInferenceService"

# datatype -> (the typed contents field, the dtype its values arrive in)
_CONTENTS: dict[str, tuple[str, np.dtype | None]] = {
    "BOOL": ("bool_contents", np.dtype(bool)),
    "INT8": ("int_contents", np.dtype("int32")),
    "INT16": ("int_contents", np.dtype("int32")),
    "INT32": ("int_contents", np.dtype("int32")),
    "INT64": ("int64_contents", np.dtype("int64")),
    "UINT8": ("uint_contents", np.dtype("uint32")),
    "UINT16": ("uint_contents", np.dtype("uint32")),
    "UINT32": ("uint_contents", np.dtype("uint32")),
    "UINT64": ("uint64_contents", np.dtype("uint64")),
    "FP32": ("fp32_contents", np.dtype("float32")),
    "FP64": ("fp64_contents", np.dtype("float64")),
    "BYTES": ("bytes_contents", None),
}


def grpc_code(err: HTTPError) -> grpc.StatusCode:
    if err.code == "OVERLOADED":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return GRPC_CODES.get(err.status, grpc.StatusCode.INTERNAL)


# ---------------------------------------------------------------- messages <-> tensors


def parameters_of(params: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values.

    Besides KServe's bool, int64 and string values, Triton's extension of the message
    (``double_param = 4``, ``uint64_param = 5``: tritonclient sends ``priority`` as uint64)
    is read from the fields KServe's proto does not know; a parameter with no value is a 400,
    never dropped.
    """
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
            continue
        for f in unknown_fields.UnknownFieldSet(param):
            if f.field_number == 5 and f.wire_type == 0:  # uint64_param (varint)
                out[key] = f.data
            elif f.field_number == 4 and f.wire_type == 1:  # double_param (fixed64)
                out[key] = struct.unpack("<d", struct.pack("<Q", f.data))[0]
        if key not in out:
            raise bad_request(f"parameter {key!r} has no bool, int64, uint64, double or string value")
    return out


def set_parameters(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        else:
            target[key].string_param = str(value)


def typed_tensor(t: Any, datatype: str, shape: tuple[int, ...], count: int, what: str) -> Tensor:
    """A tensor from an input's typed ``contents``."""
    if datatype == "FP16":
        raise bad_request(f"{what}: FP16 has no typed contents field; send it in raw_input_contents")
    field, arrives_as = _CONTENTS[datatype]
    values = getattr(t.contents, field)
    if len(values) != count:
        raise bad_request(
            f"{what}: shape {list(shape)} needs {count} values in contents.{field}, got {len(values)}"
        )
    if arrives_as is None:
        return Tensor(t.name, datatype, shape, list(values))
    arr = np.asarray(values, dtype=arrives_as)
    return Tensor(t.name, datatype, shape, cast_array(arr, DATATYPES[datatype], what).reshape(shape))


def infer_request(req: Any) -> InferRequest:
    """A ModelInferRequest as the gateway's ``InferRequest`` (400 for anything malformed)."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    tensors = []
    for i, t in enumerate(req.inputs):
        what = f"input {t.name!r}" if t.name else f"input {i}"
        datatype = check_datatype(t.datatype, what)
        shape, count = check_shape(list(t.shape), what)
        if raw:
            if t.HasField("contents"):
                raise bad_request(f"{what}: give raw_input_contents or contents, not both")
            tensors.append(tensor_from_raw(t.name, datatype, shape, raw[i], what))
        else:
            tensors.append(typed_tensor(t, datatype, shape, count, what))
    params = parameters_of(req.parameters)
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise bad_request("parameters.binary_data_output must be a bool parameter")
    outputs: dict[str, bool | None] | None = None
    if req.outputs:
        outputs = {}
        for out in req.outputs:
            if out.name not in OUTPUT_NAMES:
                raise bad_request(f"no output named {out.name!r}: a Ketch app answers 'output' and 'default'")
            outputs[out.name] = None
    return InferRequest(
        id=req.id or None,
        parameters=params,
        inputs=tensors,
        outputs=outputs,
        binary_output=bool(raw) or binary,
    )


def infer_response(answer: v2.InferAnswer, request: InferRequest) -> Any:
    names = list(request.outputs) if request.outputs is not None else list(answer.outputs)
    response = pb.ModelInferResponse(
        model_name=answer.model_name, model_version=answer.model_version, id=request.id or ""
    )
    set_parameters(response.parameters, answer.parameters)
    raw = request.binary_output or any(answer.outputs[n][0] == "FP16" for n in names)
    for name in names:
        datatype, shape, data = answer.outputs[name]
        out = response.outputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            response.raw_output_contents.append(raw_output(datatype, data))
        elif datatype == "BYTES":
            out.contents.bytes_contents.extend(data)
        else:
            field = _CONTENTS[datatype][0]
            getattr(out.contents, field).extend(np.asarray(data).ravel().tolist())
    return response


# ---------------------------------------------------------------- the service


class _Serving:
    """What every RPC goes through (``_serve``): authentication, admission, errors, metrics."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.admin_tokens = [t.encode("utf-8") for t in gw.config.admin_tokens]
        self.tokens = [t.encode("utf-8") for t in gw.config.tokens] + self.admin_tokens

    async def _serve(
        self, method: str, context: grpc.aio.ServicerContext, run: Callable[[Call], Awaitable[T]]
    ) -> T:
        gw = self.gw
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        authorization = metadata.get("authorization", "").encode("latin-1", "replace")
        call = Call(None, gw, client=gw.client_key(authorization, _peer_host(context.peer())))
        started = time.perf_counter()
        status = CANCELLED  # unless it ends otherwise: the client cancelled, or its deadline passed
        try:
            if self.tokens and method not in OPEN_METHODS:
                self._authenticate(authorization, admin=method in ADMIN_METHODS)
            with gw.admitted(call):
                if gw.tracer is not None and method in TRACED_METHODS:
                    answer = await self._traced(method, metadata, call, run)
                else:
                    answer = await run(call)
            status = 200
            return answer
        except Exception as exc:
            err = http_error_for(exc)
            if not isinstance(exc, errors.KetchError | HTTPError):
                log.exception("gateway_bug", route="grpc", method=method)
            status = err.status
        finally:
            gw.metrics.observe(
                f"grpc_{method}", call.app, status, time.perf_counter() - started, call.queries
            )
        trailers = [("ketch-code", err.code)]
        if err.retry_after_ms:
            trailers.append(("retry-after-ms", str(err.retry_after_ms)))
        await context.abort(grpc_code(err), err.message, trailing_metadata=tuple(trailers))
        raise AssertionError("unreachable: abort raises")

    async def _traced(
        self, method: str, metadata: dict[str, str], call: Call, run: Callable[[Call], Awaitable[T]]
    ) -> T:
        """``run`` inside the gateway's server span (OpenTelemetry's RPC conventions), child of
        the caller's ``traceparent`` metadata when it is valid W3C; its queries carry the
        span's context to the broker (``Call.trace``), as HTTP's do (``spans.traced``)."""
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
        name = f"{SERVICE}/{method}"
        traceparent, tracestate = metadata.get("traceparent"), metadata.get("tracestate")
        with self.gw.tracer.server_span(name, traceparent, tracestate, attributes) as (_, carrier):
            call.trace = carrier
            return await run(call)

    def _authenticate(self, authorization: bytes, *, admin: bool) -> None:
        """A 401 (UNAUTHENTICATED) unless ``authorization`` is ``Bearer <a token>``; a 403
        (PERMISSION_DENIED) for an ``admin`` method and a token that is not an admin token."""
        token = bearer_token(authorization)
        if not token_ok(token, self.tokens):
            message = "the bearer token is not valid" if authorization else "a bearer token is required"
            raise HTTPError(401, message, code="UNAUTHENTICATED")
        if admin and not token_ok(token, self.admin_tokens):
            raise HTTPError(403, "this call needs an admin token", code="UNAUTHORIZED")


class InferenceService(_Serving, pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of the OIP service."""

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._serve("ServerLive", context, run)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            # as HTTP's /v2/health/ready: strict (every linked model has a live replica)
            # unless the gateway runs with --no-strict-readiness
            try:
                if call.gw.config.strict_readiness:
                    return pb.ServerReadyResponse(ready=not await call.gw.link.server_readiness())
                await call.gw.link.ping()
            except errors.KetchError:
                return pb.ServerReadyResponse(ready=False)
            return pb.ServerReadyResponse(ready=True)

        return await self._serve("ServerReady", context, run)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            try:
                _, reasons = await v2.model_readiness(call, request.name, request.version)
            except (errors.UnknownApp, errors.NotFound):  # as Triton: not ready, not an error
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=not reasons)

        return await self._serve("ModelReady", context, run)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            return pb.ServerMetadataResponse(name="ketch", version=__version__, extensions=v2.EXTENSIONS)

        return await self._serve("ServerMetadata", context, run)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            doc = await v2.model_metadata_doc(call, request.name, request.version)
            tensors = {
                key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in doc[key]]
                for key in ("inputs", "outputs")
            }
            return pb.ModelMetadataResponse(
                name=doc["name"], versions=doc["versions"], platform=doc["platform"], **tensors
            )

        return await self._serve("ModelMetadata", context, run)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            call.gw.body_budget.take(call, request.ByteSize())
            parsed = infer_request(request)
            remaining = context.time_remaining()  # the caller's deadline, if it set one
            caller_ms = None if remaining is None else remaining * 1000
            answer = await v2.answer_infer(call, request.model_name, parsed, request.model_version, caller_ms)
            return infer_response(answer, parsed)

        return await self._serve("ModelInfer", context, run)


class RepositoryService(_Serving, repo_grpc.GRPCInferenceServiceServicer):
    """Triton's model repository RPCs (index, load, unload): ``repository.py``, as HTTP's
    ``/v2/repository/...`` routes answer them."""

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            _one_repository(request.repository_name)
            entries = await repository.index(call.gw.link, ready=request.ready)
            return repo_pb.RepositoryIndexResponse(
                models=[repo_pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries]
            )

        return await self._serve("RepositoryIndex", context, run)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            v2._model_control(call)
            _one_repository(request.repository_name)
            await repository.load(call.gw.link, request.model_name, _repository_parameters(request))
            return repo_pb.RepositoryModelLoadResponse()

        return await self._serve("RepositoryModelLoad", context, run)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> Any:
            v2._model_control(call)
            _one_repository(request.repository_name)
            await repository.unload(call.gw.link, request.model_name, _repository_parameters(request))
            return repo_pb.RepositoryModelUnloadResponse()

        return await self._serve("RepositoryModelUnload", context, run)


def _one_repository(name: str) -> None:
    if name:
        raise bad_request(
            f"repository {name!r}: Ketch has one repository, the broker's; leave the name empty"
        )


def _repository_parameters(request: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in request.parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which is None:
            raise bad_request(f"parameter {key!r} has no value")
        out[key] = getattr(param, which)
    return out


def _peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    _, _, address = peer.partition(":")
    return address.rpartition(":")[0].strip("[]") or peer


async def start(gw: Any, address: str) -> grpc.aio.Server:
    """A started gRPC server for this worker on ``address`` (HOST:PORT, reserved by the
    supervisor: ``SO_REUSEPORT`` lets each worker listen on it)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", gw.config.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # as HTTP's --max-client-requests: one connection's calls in progress
            ("grpc.max_concurrent_streams", gw.config.max_client_requests),
            # as HTTP's --max-connections: connections per worker (gRPC core's connection quota)
            ("grpc.max_allowed_incoming_connections", connection_cap(gw.config.max_connections)),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(gw), server)
    # the same service's repository RPCs, from Triton's proto: each method is registered by its
    # full name, so the two halves of inference.GRPCInferenceService sit side by side
    repo_grpc.add_GRPCInferenceServiceServicer_to_server(RepositoryService(gw), server)
    server.add_insecure_port(address)
    await server.start()
    return server
