"""The gateway's pure limits: bounded JSON, exact integers both ways, the body budget.

Adversarial inputs a client can send in one body: JSON nested past any sane depth, text
that is not UTF-8, integers of thousands of digits, numbers at and past every dtype's
range, mixes numpy would silently turn into float64. Each is either exact or a 4xx with a
message; never a 5xx, never a rounded number.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ketch.gateway import tensors, values
from ketch.gateway.errors import HTTPError

# imported where used, so that the tests of behaviour that exists on every version run
# (and fail where it was wrong) even where these modules do not exist yet


def limits():
    from ketch.gateway import limits

    return limits


INT_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
V2_NAMES = {t: t.upper() for t in INT_TYPES}


def infer_doc(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


# ---------------------------------------------------------------- bounded JSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k'), inner, max_size=3)
    ),
    max_leaves=30,
)


@given(JSON)
@settings(max_examples=300, deadline=None, derandomize=True)
def test_json_depth_counts_brackets_outside_strings_only(value):
    text = json.dumps(value).encode()
    assert limits().json_depth(text) == depth_of(value)


@pytest.mark.parametrize("depth", [65, 900, 5_000, 100_000])
@pytest.mark.parametrize("kind", ["[", "{"])
def test_deep_json_is_400_on_every_parse_path(depth, kind):
    inner = b"[" * depth + b"]" * depth if kind == "[" else b'{"a":' * depth + b"1" + b"}" * depth
    bodies = [
        (b'{"input": ' + inner + b"}", lambda b: limits().parse_json(b, max_bytes=1 << 30, max_depth=64)),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": ' + inner + b"}]}",
            tensors.parse_infer_request,
        ),
    ]
    for body, parse in bodies:
        with pytest.raises(HTTPError, match="deeper than 64") as info:
            parse(body)
        assert info.value.status == 400


def test_json_at_the_depth_limit_is_read():
    inner = [[[[0]]]]
    for _ in range(59):
        inner = [inner]
    text = json.dumps({"input": inner}).encode()
    assert limits().json_depth(text) == 64
    assert limits().parse_json(text, max_bytes=1 << 20, max_depth=64) == {"input": inner}


@pytest.mark.parametrize(
    ("text", "status", "needle"),
    [
        (b'{"input": "\xff\xfe"}', 400, "UTF-8"),
        (b'{"input": ' + b"9" * 5000 + b"}", 400, "not JSON"),
        (b'{"input": [1, 2', 400, "not JSON"),
        (b"[" + b"0," * 600_000 + b"0]", 413, "over the gateway's limit"),
    ],
)
def test_json_that_cannot_be_read_is_a_4xx_with_a_message(text, status, needle):
    with pytest.raises(HTTPError, match=needle) as info:
        limits().parse_json(text, max_bytes=1 << 20, max_depth=64)
    assert info.value.status == status


def test_a_json_app_element_is_bounded_too():
    deep = b"[" * 5000 + b"]" * 5000
    t = tensors.Tensor("x", "BYTES", (1,), [deep])
    with pytest.raises(HTTPError, match="deeper than") as info:
        tensors.split_queries(t, "json", ())
    assert info.value.status == 400


# ---------------------------------------------------------------- exact integers, both ways


@pytest.mark.parametrize("dtype", INT_TYPES)
def test_every_integer_dtype_takes_its_extremes_exactly_and_refuses_one_past(dtype):
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    for value in ([lo, hi, 0, 1], [[hi], [lo]], [hi, 2, 1], [1, 2, hi]):
        got = values.clipper_input(value, dtype)
        assert got.dtype == np.dtype(dtype) and got.tolist() == value
        doc = infer_doc(
            {"name": "x", "datatype": V2_NAMES[dtype], "shape": list(np.shape(value)), "data": value}
        )
        t = tensors.parse_infer_request(doc).inputs[0]
        assert t.data.tolist() == value
    for value in ([hi + 1], [lo - 1], [1, hi + 1], [lo - 1, 1], [0, 2**64], [2**200]):
        with pytest.raises(HTTPError, match="do not fit") as err:
            values.clipper_input(value, dtype)
        assert err.value.status == 400
        doc = infer_doc({"name": "x", "datatype": V2_NAMES[dtype], "shape": [len(value)], "data": value})
        with pytest.raises(HTTPError, match="do not fit"):
            tensors.parse_infer_request(doc)


def test_uint64_beyond_int64_is_never_rounded():
    # numpy reads [1, 2, 2**64 - 1] as float64, which once came back as [1, 2, 0]
    assert values.clipper_input([1, 2, 18446744073709551615], "uint64").tolist() == [
        1,
        2,
        18446744073709551615,
    ]
    assert values.clipper_input([2**63, 2**63 + 1], "uint64").tolist() == [2**63, 2**63 + 1]
    with pytest.raises(HTTPError, match="do not fit"):
        values.clipper_input([-1, 18446744073709551615], "uint64")


def test_floats_into_integer_apps_only_when_exact():
    assert values.clipper_input([3.0, -2.0, 2.0**53], "int64").tolist() == [3, -2, 2**53]
    for value in ([1e18, 2**63], [1.5, 2**64 - 1], [1.8446744073709552e19]):
        with pytest.raises(HTTPError) as err:
            values.clipper_input(value, "uint64")
        assert err.value.status == 400
    # FP64 data of a V2 tensor is exact binary: whole values convert, 2**64 does not fit uint64
    assert values.cast_array(np.array([2.0**63]), np.dtype("uint64")).tolist() == [2**63]
    with pytest.raises(HTTPError, match="do not fit"):
        values.cast_array(np.array([2.0**64]), np.dtype("uint64"))
    with pytest.raises(HTTPError, match="do not fit"):
        values.cast_array(np.array([2.0**63]), np.dtype("int64"))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_dtypes_take_their_range_and_refuse_overflow(dtype):
    fmax = float(np.finfo(dtype).max)
    got = values.clipper_input([fmax, -fmax, 0.0], dtype)
    assert got.dtype == np.dtype(dtype) and got.tolist() == [fmax, -fmax, 0.0]
    past = [fmax * 2] if dtype != "float64" else [10**400]
    with pytest.raises(HTTPError, match="beyond what") as err:
        values.clipper_input(past, dtype)
    assert err.value.status == 400
    if dtype != "float64":
        with pytest.raises(HTTPError, match="beyond what"):
            values.clipper_input([2**130], dtype)  # an integer past the float's range


@pytest.mark.parametrize("dtype", [*INT_TYPES, "float16", "float32", "float64", "bool"])
@pytest.mark.parametrize("binary", [False, True])
def test_outputs_of_every_dtype_go_out_exactly(dtype, binary):
    if dtype == "bool":
        answers = [np.array([True, False])]
    elif dtype.startswith("float"):
        f = np.finfo(dtype)
        answers = [np.array([f.max, f.min, f.tiny], dtype=dtype), np.array([0, -0.5, 1], dtype=dtype)]
    else:
        i = np.iinfo(dtype)
        answers = [np.array([i.max, i.min, 0], dtype=dtype), np.array([1, i.max - 1, i.min + 1], dtype=dtype)]
    datatype, shape, data = tensors.output_tensor(answers)
    assert datatype == tensors.KETCH_DATATYPES[dtype]
    request = tensors.InferRequest(id=None, parameters={}, inputs=[], binary_output=binary)
    body, headers = tensors.encode_infer_response(
        model_name="m", model_version="1", request=request, outputs={"output": (datatype, shape, data)}
    )
    n = int(headers.get("inference-header-content-length", len(body)))
    (out,) = json.loads(body[:n])["outputs"]
    if binary:
        got = np.frombuffer(body[n:], dtype=tensors.DATATYPES[datatype]).reshape(shape).tolist()
    else:
        got = np.reshape(np.array(out["data"], dtype=object), shape).tolist()
    assert got == np.stack(answers).tolist()


def test_mixed_integer_answers_are_not_stacked_into_floats():
    # an int64 default beside uint64 answers: numpy would make float64 of them and round
    mixed = [np.array([2**64 - 1], dtype=np.uint64), np.array([-1], dtype=np.int64)]
    datatype, _, data = tensors.output_tensor(mixed)
    assert datatype == "BYTES" and [json.loads(e) for e in data] == [[2**64 - 1], [-1]]
    python_ints = [[1, 2**64 - 1], [-1, 0]]  # a json model's answers
    datatype, _, data = tensors.output_tensor(python_ints)
    assert datatype == "BYTES" and [json.loads(e) for e in data] == python_ints
    assert tensors.output_tensor([np.uint8(3), np.int8(-3)])[:2] == ("INT16", [2])
    assert tensors.output_tensor([[0.5, 1e300], [1.0, 2.0]])[0] == "FP64"  # floats stay floats
    assert tensors.output_tensor([[1, 2**60 + 1], [1.5, 2]])[0] == "BYTES"  # float64 would round it


def test_clipper_outputs_keep_every_digit():
    out = values.jsonable(np.array([2**64 - 1, 0], dtype=np.uint64))
    assert json.loads(values.dumps({"output": out})) == {"output": [2**64 - 1, 0]}
    i = np.iinfo(np.int64)
    assert json.loads(values.dumps(values.jsonable(np.array([i.min, i.max])))) == [i.min, i.max]


def test_labels_travel_exactly_or_are_refused():
    from ketch.gateway.clipper import _label_dtype

    assert _label_dtype(1.5) is None and _label_dtype(2**53) is None
    assert _label_dtype(2**64 - 1) == "json"  # float64 would round it: JSON keeps it whole
    assert _label_dtype("cat") == "json" and _label_dtype(True) == "json" and _label_dtype([1, 2]) == "json"
    with pytest.raises(HTTPError, match="beyond float64") as err:
        _label_dtype(10**400)
    assert err.value.status == 400


# ---------------------------------------------------------------- the body budget


class Holder:
    held_bytes = 0


def test_the_body_budget_refuses_large_bodies_past_it_but_never_small_ones():
    budget = limits().BodyBudget(1000 * limits().SMALL_BODY)
    big = [Holder() for _ in range(3)]
    budget.take(big[0], 600 * limits().SMALL_BODY)
    budget.take(big[1], 390 * limits().SMALL_BODY)
    with pytest.raises(HTTPError, match="retry") as err:
        budget.take(big[2], 20 * limits().SMALL_BODY)
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
    small = Holder()
    budget.take(small, limits().SMALL_BODY)  # over the budget, yet a small body gets through
    for h in (*big, small):
        budget.give_back(h)
    assert budget.held == 0 and all(h.held_bytes == 0 for h in (*big, small))
    budget.take(big[2], 20 * limits().SMALL_BODY)


def test_recent_app_metadata_stands_in_when_the_admin_socket_is_slow():
    import asyncio

    import ketch
    from ketch.gateway.backend import BrokerLink

    async def main() -> None:
        link = BrokerLink("tcp://127.0.0.1:1", "tcp://127.0.0.1:1", ttl_s=0.0)
        answers = [{"name": "a", "input_type": "float64", "input_shape": [2], "slo_ms": 50, "models": ["m"]}]

        async def call(op: str, **args):
            if answers:
                return answers.pop()
            raise ketch.Unavailable("no answer from the broker's admin socket")

        link.admin.call = call
        try:
            first = await link.app("a")
            assert await link.app("a") == first  # the admin socket did not answer: the last good one
            with pytest.raises(ketch.Unavailable):
                await link.app("never-seen")
        finally:
            await link.close()

    asyncio.run(main())


def test_a_refused_request_asks_for_the_apps_metadata_again_at_most_every_quarter_second():
    import asyncio

    import ketch
    from ketch.gateway import backend
    from ketch.gateway.backend import BrokerLink

    async def main() -> None:
        link = BrokerLink("tcp://127.0.0.1:1", "tcp://127.0.0.1:1", ttl_s=60.0)
        broker = {"input_type": "float64"}  # what the broker holds now
        asked: list[str] = []

        async def call(op: str, **args):
            asked.append(args["name"])
            return {"name": args["name"], "input_shape": [-1], "slo_ms": 50, **broker}

        async def run(info):
            if info.input_type != broker["input_type"]:  # the broker refuses a stale type
                raise ketch.BadInput(f"app takes {broker['input_type']}, got {info.input_type}")
            return "served"

        def window_passes() -> None:
            link._rechecked["a"] -= backend.RECHECK_APP_S

        link.admin.call = call
        try:
            assert (await link.app("a")).input_type == "float64"  # cached for a minute
            broker["input_type"] = "int64"  # deleted and created again with another type
            assert await link.serve_app("a", run) == "served" and len(asked) == 2
            broker["input_type"] = "bool"  # and again, at once
            with pytest.raises(ketch.BadInput):  # within the quarter second: not asked again
                await link.serve_app("a", run)
            assert len(asked) == 2
            window_passes()
            assert await link.serve_app("a", run) == "served" and len(asked) == 3

            async def refuse(info):
                raise ketch.BadInput("the request itself is wrong")

            window_passes()
            with pytest.raises(ketch.BadInput, match="itself"):  # asked again, the same: it stands
                await link.serve_app("a", refuse)
            assert len(asked) == 4
        finally:
            await link.close()

    asyncio.run(main())


def test_one_clients_share_of_a_worker_is_bounded_and_given_back():
    shares = limits().ClientShares(max_requests=2, max_queries=10)
    shares.enter("a")
    shares.enter("a")
    with pytest.raises(HTTPError) as info:
        shares.enter("a")  # a third request in progress
    assert info.value.status == 429 and info.value.code == "OVERLOADED" and info.value.retry_after_ms
    shares.enter("b")  # another client is not refused for it
    shares.count("a", 0, 6)
    with pytest.raises(HTTPError) as info:
        shares.count("a", 0, 5)  # 11 queries in progress
    assert info.value.status == 429
    shares.count("a", 0, 4)
    shares.count("b", 0, 10)
    with pytest.raises(HTTPError) as info:
        shares.count("b", 0, 11)  # one request of more than a client may ever hold
    assert info.value.status == 413 and info.value.code == "TOO_LARGE"
    shares.count("a", 4, 3)  # a request read again (fresh metadata) counts its new figure
    assert shares.queries["a"] == 9
    shares.leave("a", 6)
    shares.leave("a", 3)
    shares.leave("b", 10)
    assert not shares.requests and not shares.queries  # nothing left behind, not even keys


def test_the_heap_goes_back_to_the_system_once_a_burst_of_bodies_is_answered(monkeypatch):
    lim = limits()
    trims = []
    monkeypatch.setattr(lim, "release_memory", lambda: trims.append(1))

    class Holder:
        held_bytes = 0

    budget = lim.BodyBudget(1 << 40)
    burst = [Holder() for _ in range(3)]
    for h in burst:
        budget.take(h, 30 << 20)
    budget.give_back(burst[0])
    budget.give_back(burst[1])
    assert not trims  # a third of the burst is still held
    budget.give_back(burst[2])
    assert len(trims) == 1
    small = Holder()
    for _ in range(100):  # small requests after it do not trim again and again
        budget.take(small, 1024)
        budget.give_back(small)
    assert len(trims) == 1
    monkeypatch.undo()
    lim.release_memory()  # the real one: glibc's malloc_trim here, a no-op where there is none
