"""KServe v2's tensor datatype names and the numpy dtypes they stand for, as the wire carries
them (little-endian). The server decodes requests with this table; the client encodes the
typed API's model inputs with it."""

from __future__ import annotations

import numpy as np

DATATYPES: dict[str, np.dtype] = {
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
    """The datatype name of a numpy dtype (either byte order); TypeError for one KServe has
    no name for."""
    for name, known in DATATYPES.items():
        if np.dtype(dtype).newbyteorder("<") == known:
            return name
    raise TypeError(f"no KServe datatype for {dtype}")
