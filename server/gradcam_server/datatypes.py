"""KServe's tensor datatype names and the numpy dtypes they stand for, for both gRPC APIs."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from .errors import InvalidInput

DATATYPES = {  # little-endian, as the wire carries them
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT16": np.dtype("<u2"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def datatype_of(dtype: np.dtype) -> str:
    """The datatype name of a numpy dtype (either byte order)."""
    for name, known in DATATYPES.items():
        if np.dtype(dtype).newbyteorder("<") == known:
            return name
    raise TypeError(f"no KServe datatype for {dtype}")


def carried_datatype(dtype: np.dtype) -> str:
    """The datatype a tensor of `dtype` travels as: its own, but bfloat16 (which KServe v2
    does not define) as FP32."""
    if np.dtype(dtype) == ml_dtypes.bfloat16:
        return "FP32"
    return datatype_of(dtype)


MAX_ELEMENTS = 2**31  # far above anything a 64 MiB message can hold
MAX_DIMENSIONS = 32  # what numpy 1.x arrays hold (numpy 2 holds 64); no model input has more


def element_count(shape: tuple[int, ...], what: str) -> int:
    """The number of elements of a declared `shape`, in exact integer arithmetic (no int64 to
    overflow); InvalidInput naming `what` and the shape for a negative dimension, more than
    MAX_DIMENSIONS dimensions, or a count no message could hold. A zero dimension does not
    excuse the others: [2**62, 2**62, 0] holds no element but is no shape numpy can make."""
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what} has a negative dimension {list(shape)}")
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(
            f"{what} declares shape {list(shape)}: {len(shape)} dimensions, "
            f"at most {MAX_DIMENSIONS} are accepted"
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidInput(f"{what} declares shape {list(shape)}: {count} elements is too many")
    extent = math.prod(d for d in shape if d)
    if extent > MAX_ELEMENTS:
        raise InvalidInput(
            f"{what} declares shape {list(shape)}: its non-zero dimensions multiply to {extent}, "
            "too many elements"
        )
    return count


def from_bytes(data: bytes, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The array `data` holds as `datatype` [shape], in native byte order; InvalidInput when
    the datatype is unknown or the byte count does not match."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"{what} has unsupported datatype {datatype!r}")
    count = element_count(shape, what)
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"{what}: {len(data)} bytes do not hold {datatype} {list(shape)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
