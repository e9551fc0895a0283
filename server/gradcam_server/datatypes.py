"""Decoding KServe tensors from the wire, bounded: datatypes (`gradcam_common.datatypes`), declared
shapes and byte counts."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
from gradcam_common.datatypes import DATATYPES, datatype_of

from .errors import InvalidInput

__all__ = ["DATATYPES", "carried_datatype", "datatype_of", "element_count", "from_bytes"]


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
