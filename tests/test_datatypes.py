"""KServe tensor bytes to numpy arrays: datatypes, byte counts and declared shapes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from gradcam_server.datatypes import (
    DATATYPES,
    MAX_DIMENSIONS,
    MAX_ELEMENTS,
    carried_datatype,
    datatype_of,
    element_count,
    from_bytes,
)
from gradcam_server.errors import InvalidInput


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_round_trip_in_native_order(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    values = np.arange(6).astype(dtype).reshape(2, 3)
    array = from_bytes(values.tobytes(), datatype, (2, 3), "input 'x'")
    assert array.shape == (2, 3)
    assert array.dtype == dtype.newbyteorder("=")
    np.testing.assert_array_equal(array, values)
    assert datatype_of(array.dtype) == datatype


def test_bfloat16_is_carried_as_fp32_and_the_rest_as_themselves() -> None:
    """KServe v2 defines no bfloat16 datatype; FP16 it does."""
    assert carried_datatype(np.dtype(ml_dtypes.bfloat16)) == "FP32"
    assert carried_datatype(np.dtype(np.float16)) == "FP16"
    assert carried_datatype(np.dtype(">f4")) == "FP32"
    with pytest.raises(TypeError):
        datatype_of(np.dtype(ml_dtypes.bfloat16))


def test_scalar_and_empty_shapes() -> None:
    assert from_bytes(b"\x07", "UINT8", (), "input 'x'").tolist() == 7
    assert from_bytes(b"", "FP32", (0, 3), "input 'x'").shape == (0, 3)


def test_unknown_datatype_is_refused() -> None:
    with pytest.raises(InvalidInput, match="input 'x' has unsupported datatype 'FP128'"):
        from_bytes(b"", "FP128", (0,), "input 'x'")


def test_byte_count_must_match() -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': 5 bytes do not hold FP32 \[2\]"):
        from_bytes(b"\x00" * 5, "FP32", (2,), "input 'x'")


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        # np.prod wraps around in int64: 2**64 elements became 0, matching 0 bytes.
        ((2**32, 2**32, 1, 1), "[4294967296, 4294967296, 1, 1]: 18446744073709551616 elements"),
        ((2**62, 4), "too many"),
        ((2**63 - 1, 2**63 - 1), "too many"),
        ((3, 2**62, 4), "too many"),
        ((MAX_ELEMENTS + 1,), "too many"),
        # No element at all, but no array numpy could make either.
        ((2**62, 2**62, 0), f"non-zero dimensions multiply to {2**124}"),
        ((0, 2**63 - 1, 2**63 - 1), "too many"),
        ((-1, -2, 2), "negative dimension [-1, -2, 2]"),
        ((4, -1), "negative dimension [4, -1]"),
        ((1,) * (MAX_DIMENSIONS + 1), f"{MAX_DIMENSIONS + 1} dimensions, at most {MAX_DIMENSIONS}"),
        ((1,) * 65, "65 dimensions"),
    ],
)
@pytest.mark.parametrize("data", [b"", b"\x00" * 4], ids=["empty", "one-element"])
def test_absurd_shapes_are_invalid_input(
    shape: tuple[int, ...], fragment: str, data: bytes
) -> None:
    with pytest.raises(InvalidInput) as refused:
        from_bytes(data, "FP32", shape, "input 'x'")
    message = str(refused.value)
    assert message.startswith("input 'x'")
    assert fragment in message
    with pytest.raises(InvalidInput, match="^input 'x'"):
        element_count(shape, "input 'x'")


def test_largest_accepted_shapes() -> None:
    assert element_count((MAX_ELEMENTS,), "x") == MAX_ELEMENTS
    assert element_count((2**16, 2**15, 0), "x") == 0
    assert element_count((1,) * MAX_DIMENSIONS, "x") == 1
    assert from_bytes(b"\x00" * 4, "FP32", (1,) * MAX_DIMENSIONS, "x").ndim == MAX_DIMENSIONS
