"""How Python values become payloads on the client and the model side, and back."""

import numpy as np
import pytest
from ketch import protocol as proto
from ketch.client import encode_input
from ketch.runtime import as_predict, encode_output


def test_inputs_keep_numpy_dtypes_and_lists_become_float64():
    code, shape, payload = encode_input(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert (proto.dtype_name(code), shape, len(bytes(payload))) == ("int32", (2, 3), 24)
    code, shape, payload = encode_input([1, 2, 3])
    assert (proto.dtype_name(code), shape) == ("float64", (3,))
    assert np.frombuffer(payload, "<f8").tolist() == [1.0, 2.0, 3.0]
    assert encode_input("hé")[0] == proto.STRING and encode_input(b"\x00")[0] == proto.BYTES
    code, shape, payload = encode_input(np.float32(1.5))
    assert shape == () and np.frombuffer(payload, "<f4")[0] == 1.5
    big_endian = np.arange(3, dtype=">i4")
    code, shape, payload = encode_input(big_endian)
    assert np.frombuffer(bytes(payload), "<i4").tolist() == [0, 1, 2]


def test_input_dtype_override_and_refusals():
    code, _, payload = encode_input([1, 2], dtype="int64")
    assert proto.dtype_name(code) == "int64" and np.frombuffer(payload, "<i8").tolist() == [1, 2]
    with pytest.raises(TypeError):
        encode_input({"a": 1})
    with pytest.raises(TypeError):
        encode_input(np.array([object()]))
    with pytest.raises(ValueError):
        encode_input([1], dtype="complex")


@pytest.mark.parametrize(
    ("value", "dtype", "back"),
    [
        (3, "int64", 3),
        (2.5, "float64", 2.5),
        (True, "bool", True),
        ("setosa", "string", "setosa"),
        (b"\x01\x02", "bytes", b"\x01\x02"),
        ({"label": 1, "p": [0.1, 0.9]}, "json", {"label": 1, "p": [0.1, 0.9]}),
        (None, "json", None),
        (np.int64(7), "int64", 7),
        (np.array([[1.0, 2.0]], dtype=np.float32), "float32", [[1.0, 2.0]]),
        (np.array(["a", "b"]), "json", ["a", "b"]),
    ],
)
def test_outputs_round_trip(value, dtype, back):
    code, shape, payload = encode_output(value)
    assert proto.dtype_name(code) == dtype
    got = proto.payload_to_value(code, shape, payload)
    got = got.tolist() if isinstance(got, np.ndarray | np.generic) else got
    assert got == back


def test_as_predict_accepts_functions_objects_and_estimators():
    from sklearn.linear_model import LinearRegression

    assert as_predict(lambda xs: xs)([1]) == [1]

    class M:
        def predict(self, xs):
            return [x * 2 for x in xs]

    assert as_predict(M())([2]) == [4]
    est = LinearRegression().fit(np.array([[0.0], [1.0]]), np.array([0.0, 2.0]))
    assert np.allclose(as_predict(est)([np.array([3.0])]), [6.0])
    with pytest.raises(TypeError):
        as_predict(42)
