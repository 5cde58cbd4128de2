"""Open Inference Protocol (KServe V2) tensors: parse requests, split queries, build answers.

Pure functions, no I/O. An infer request's body is JSON, or, with the binary tensor data
extension, JSON of ``Inference-Header-Content-Length`` bytes followed by the raw data of
each input whose ``parameters.binary_data_size`` is set, in input order. Numeric raw data is
little-endian, row-major; a BYTES element is a 4-byte little-endian length and its bytes.
An output goes out as JSON ``data`` unless binary was asked for; BYTES elements that are
not UTF-8 are then base64 text, with the output's ``parameters.content_type`` ``"base64"``
(as MLServer's codec).

A Ketch app takes one input per query, so a request carries one input tensor. Its first
dimension is the batch when the tensor has one more dimension than the app's per-query
shape: ``[N, 4]`` for a ``[4]`` app is N queries; ``[4]`` is one. Each query is answered
by the broker on its own (batched with others there); the answer is the ``output`` tensor,
``[N, ...]``, and a BOOL ``default`` tensor saying which answers are the app's default.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ketch.gateway import limits
from ketch.gateway.errors import HTTPError, bad_request
from ketch.gateway.values import cast_array, dumps, exact_stack, json_to_array, jsonable, numpy_dtype, whole

# KServe datatype -> numpy dtype (little-endian, as on the wire)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_OF_NUMPY = {v.newbyteorder("="): k for k, v in DATATYPES.items()}

# Ketch dtype name -> KServe datatype
KETCH_DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bytes": "BYTES",
    "string": "BYTES",
    "json": "BYTES",
}

OUTPUT_NAMES = ("output", "default")
OutputTensor = tuple[str, list[int], "np.ndarray | list[bytes]"]  # datatype, shape, data
MAX_ELEMENTS = 1 << 26  # per tensor; the body limit usually bites first
MAX_TIMEOUT_US = 3_600_000_000  # an hour, the broker's longest SLO


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]  # numeric: an array of ``shape``; BYTES: its elements, flat


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    outputs: dict[str, bool | None] | None = None  # requested name -> binary (None: request default)
    binary_output: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def datatype_of(arr: np.ndarray) -> str | None:
    return _DATATYPE_OF_NUMPY.get(arr.dtype.newbyteorder("="))


def _count(shape: tuple[int, ...], what: str) -> int:
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise HTTPError(413, f"{what}: shape {list(shape)} has {n} elements, over {MAX_ELEMENTS}")
    span = math.prod(d for d in shape if d)  # an empty tensor too: numpy cannot shape past this
    if span > MAX_ELEMENTS:
        raise HTTPError(
            413, f"{what}: shape {list(shape)} spans {span} elements besides its 0 sizes, over {MAX_ELEMENTS}"
        )
    return n


def _shape(value: Any, what: str) -> tuple[int, ...]:
    dims = [whole(d) for d in value] if isinstance(value, list) else [None]
    if not all(d is not None and d >= 0 for d in dims):
        raise bad_request(f"{what}: 'shape' must be a list of sizes (whole numbers, 0 or more)")
    if len(dims) > 32:
        raise bad_request(f"{what}: 'shape' has {len(dims)} dimensions, at most 32")
    return tuple(dims)  # type: ignore[arg-type]


def _flatten_strings(data: Any, what: str) -> list[bytes]:
    out: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise bad_request(f"{what}: BYTES data must be strings, got {type(item).__name__}")
            out.append(item.encode("utf-8"))
        else:
            stack.pop()
    return out


def parse_bytes_elements(raw: bytes | memoryview, what: str) -> list[bytes]:
    """BYTES raw data: a 4-byte little-endian length, then that many bytes, repeated."""
    out, off, n = [], 0, len(raw)
    view = memoryview(raw)
    while off < n:
        if off + 4 > n:
            raise bad_request(f"{what}: BYTES data ends inside a length prefix")
        (size,) = struct.unpack_from("<I", view, off)
        off += 4
        if off + size > n:
            raise bad_request(f"{what}: a BYTES element of {size} bytes runs past the data")
        out.append(bytes(view[off : off + size]))
        off += size
    return out


def encode_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def check_datatype(datatype: Any, what: str) -> str:
    """``datatype`` when it is one the gateway takes (HTTP and gRPC), else a 400."""
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DATATYPES):
        known = ", ".join([*DATATYPES, "BYTES"])
        raise bad_request(f"{what}: datatype {datatype!r} is not one of {known}")
    return str(datatype)


def check_shape(value: Any, what: str) -> tuple[tuple[int, ...], int]:
    """The shape and its element count (HTTP and gRPC), else a 400 (413 past MAX_ELEMENTS)."""
    shape = _shape(value, what)
    return shape, _count(shape, what)


def tensor_from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview, what: str
) -> Tensor:
    """A tensor from its raw data: HTTP's binary tensor data and gRPC's raw contents alike."""
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = parse_bytes_elements(raw, what)
        if len(elements) != count:
            raise bad_request(f"{what}: shape {list(shape)} needs {count} elements, got {len(elements)}")
        return Tensor(name, datatype, shape, elements)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"{what}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def raw_output(datatype: str, data: np.ndarray | list[bytes]) -> bytes:
    """An output tensor's raw data (little-endian, row-major; BYTES length-prefixed)."""
    if datatype == "BYTES":
        return encode_bytes_elements(data)  # type: ignore[arg-type]
    return np.ascontiguousarray(data, dtype=DATATYPES[datatype]).tobytes()


def _tensor(doc: Any, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    what = f"input {index}"
    if not isinstance(doc, dict):
        raise bad_request(f"{what} must be an object with name, datatype, shape and data")
    name = doc.get("name", "")
    if not isinstance(name, str):
        raise bad_request(f"{what}: 'name' must be a string")
    what = f"input {name!r}" if name else what
    datatype = check_datatype(doc.get("datatype"), what)
    shape, count = check_shape(doc.get("shape"), what)
    params = {} if doc.get("parameters") is None else doc["parameters"]
    if not isinstance(params, dict):
        raise bad_request(f"{what}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        size = whole(size)
        if size is None or size < 0:
            raise bad_request(f"{what}: binary_data_size must be a whole number of bytes")
        if offset + size > len(binary):
            raise bad_request(
                f"{what}: binary_data_size {size} runs past the {len(binary)} bytes after the JSON header"
            )
        return tensor_from_raw(name, datatype, shape, binary[offset : offset + size], what), offset + size
    if "data" not in doc:
        raise bad_request(f"{what}: give 'data', or binary data with parameters.binary_data_size")
    data = doc["data"]
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        elements = _flatten_strings(data, what)
        if len(elements) != count:
            raise bad_request(f"{what}: shape {list(shape)} needs {count} elements, got {len(elements)}")
        return Tensor(name, datatype, shape, elements), offset
    arr = json_to_array(data, DATATYPES[datatype], f"{what} ({datatype})")
    if arr.size != count:
        raise bad_request(f"{what}: shape {list(shape)} needs {count} values, got {arr.size}")
    return Tensor(name, datatype, shape, arr.reshape(shape)), offset


def _bounded_json(head: bytes) -> Any:
    return limits.parse_json(
        head, max_bytes=limits.MAX_JSON_BYTES, max_depth=limits.MAX_JSON_DEPTH, what="the request"
    )


def parse_infer_request(
    body: bytes, header_length: str | None = None, load: Callable[[bytes], Any] = _bounded_json
) -> InferRequest:
    """Parse an infer request body (JSON, or JSON plus binary tensor data).

    ``load`` reads the JSON part (by default within the gateway's default limits).
    """
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_request("Inference-Header-Content-Length must be a number of bytes") from None
        if not 0 <= n <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
        head, binary = body[:n], memoryview(body)[n:]
    doc = load(bytes(head))
    if not isinstance(doc, dict):
        raise bad_request("the request must be a JSON object with 'inputs'")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string")
    params = {} if doc.get("parameters") is None else doc["parameters"]
    if not isinstance(params, dict):
        raise bad_request("'parameters' must be an object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list of tensors")
    tensors, offset = [], 0
    for i, t in enumerate(inputs):
        tensor, offset = _tensor(t, i, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad_request("parameters.binary_data_output must be true or false")
    return InferRequest(
        id=request_id,
        parameters=params,
        inputs=tensors,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_output=binary_output,
    )


def _requested_outputs(outputs: Any) -> dict[str, bool | None] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise bad_request("'outputs' must be a list")
    wanted: dict[str, bool | None] = {}
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise bad_request("each requested output must be an object with a 'name'")
        if out["name"] not in OUTPUT_NAMES:
            raise bad_request(f"no output named {out['name']!r}: a Ketch app answers 'output' and 'default'")
        params = {} if out.get("parameters") is None else out["parameters"]
        if not isinstance(params, dict):
            raise bad_request(f"output {out['name']!r}: 'parameters' must be an object")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise bad_request("an output's parameters.binary_data must be true or false")
        wanted[out["name"]] = binary
    return wanted


def query_options(params: dict[str, Any]) -> tuple[float | None, int]:
    """(timeout in ms or None for the app's SLO, priority) from request parameters.

    ``timeout`` is in microseconds, as Triton's; 0 means the app's SLO. ``priority`` is
    Ketch's: higher is served first, -128..127, 0 by default.
    """
    timeout = params.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout):
        raise bad_request("parameters.timeout must be a number of microseconds")
    if not 0 <= timeout <= MAX_TIMEOUT_US:
        raise bad_request(f"parameters.timeout must be 0 (the app's SLO) to {MAX_TIMEOUT_US} microseconds")
    priority = whole(params.get("priority", 0))
    if priority is None or not -128 <= priority <= 127:
        raise bad_request("parameters.priority must be a whole number from -128 to 127 (higher first)")
    return (timeout / 1000 if timeout else None), priority


def split_queries(
    t: Tensor, input_type: str, app_shape: tuple[int, ...], load: Callable[[bytes], Any] = _bounded_json
) -> tuple[list[Any], bool]:
    """The queries one input tensor holds for an app, and whether it was a batch.

    ``load`` reads the JSON text of each element for a json app.
    """
    what = f"input {t.name!r}" if t.name else "the input"
    rank = len(t.shape)
    if input_type in ("string", "bytes", "json"):
        if t.datatype != "BYTES":
            if input_type != "json":
                raise bad_request(f"{what} is {t.datatype}; a {input_type} app takes BYTES")
            arr = t.data  # numbers for a json app: each query is a (nested) list
            if rank == 0:
                return [arr.tolist()], False
            _nonempty(t, what)
            return [row.tolist() for row in arr], True
        if rank == 0:
            values, batched = list(t.data), False
        elif all(d == 1 for d in t.shape[1:]):
            _nonempty(t, what)
            values, batched = list(t.data), True
        else:
            raise bad_request(
                f"{what}: shape {list(t.shape)} does not fit a {input_type} app: "
                "send [N] (or [N, 1]) for N queries"
            )
        return [_text_value(v, input_type, what, load) for v in values], batched
    if t.datatype == "BYTES":
        raise bad_request(f"{what} is BYTES; the app takes {KETCH_DATATYPES.get(input_type, input_type)}")
    want = numpy_dtype(input_type)
    if want is None:
        raise bad_request(f"the app's input type {input_type!r} is not known to this gateway")
    arr = cast_array(t.data, want, f"{what} ({t.datatype})")
    if rank == len(app_shape) + 1:
        _nonempty(t, what)
        return list(arr), True
    if rank == len(app_shape):
        return [arr], False
    want = [-1 if d < 0 else d for d in app_shape]
    raise bad_request(
        f"{what}: shape {list(t.shape)} does not fit the app's per-query shape {want}: "
        f"send [N, {', '.join(map(str, want))}] for N queries".replace("[N, ]", "[N]")
    )


def _nonempty(t: Tensor, what: str) -> None:
    if t.shape[0] == 0:
        raise bad_request(f"{what}: the first dimension is 0, so there is no query")


def _text_value(raw: bytes, input_type: str, what: str, load: Callable[[bytes], Any]) -> Any:
    if input_type == "bytes":
        return raw
    if input_type == "json":
        return load(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what}: a {input_type} app takes UTF-8 text") from None


def output_tensor(values: list[Any]) -> tuple[str, list[int], np.ndarray | list[bytes]]:
    """Stack answers into one tensor: numbers of one shape as a numeric tensor, else BYTES.

    Numbers are stacked only when no value changes (``values.exact_stack``): a uint64 answer
    beside an int64 default, say, goes out as BYTES (JSON text per answer), never as
    float64 that rounds it.
    """
    arr = exact_stack(values)
    if arr is not None:
        datatype = datatype_of(arr)
        if datatype is not None:
            return datatype, list(arr.shape), arr
    elements = []
    for v in values:
        if isinstance(v, str):
            elements.append(v.encode("utf-8"))
        elif isinstance(v, bytes | bytearray | memoryview):
            elements.append(bytes(v))
        else:
            elements.append(dumps(jsonable(v)))
    return "BYTES", [len(elements)], elements


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, tuple[str, list[int], np.ndarray | list[bytes]]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON plus binary data when asked for."""
    names = list(request.outputs) if request.outputs is not None else list(outputs)
    docs, blobs = [], []
    for name in names:
        datatype, shape, data = outputs[name]
        binary = request.outputs.get(name) if request.outputs is not None else None
        if binary is None:
            binary = request.binary_output
        doc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if not binary:
            if datatype == "BYTES":
                try:
                    doc["data"] = [e.decode("utf-8") for e in data]
                except UnicodeDecodeError:
                    # raw bytes are not JSON text: base64, said so as MLServer's codec does
                    doc["data"] = [base64.b64encode(e).decode("ascii") for e in data]
                    doc["parameters"] = {"content_type": "base64"}
            else:
                doc["data"] = data.ravel().tolist()
        else:
            raw = raw_output(datatype, data)
            doc["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        docs.append(doc)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = docs
    head = dumps(response)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }
