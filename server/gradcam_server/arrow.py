"""A float image's pixels read in place, through the Arrow C data interface Pillow exports.

``np.asarray(image)`` goes through ``Image.tobytes()``: Pillow packs the pixels into chunks and
joins them, holding the GIL, at about 1 GB/s (half a millisecond for a photo-sized heatmap, more
than the resize that made it). Pillow >= 11.2 also exports an image as an Arrow array
(``Image.__arrow_c_array__``); its structs are fixed by the Arrow specification
(https://arrow.apache.org/docs/format/CDataInterface.html), and a mode "F" image is a float32
array of width x height values in one buffer. `float_pixels` copies from that buffer with numpy,
which releases the GIL, and falls back to ``np.asarray`` where Pillow cannot export the image
(rows in several memory blocks: images over 16 MiB) or is older.
"""

from __future__ import annotations

import ctypes

import numpy as np
from PIL import Image


class _ArrowSchema(ctypes.Structure):
    _fields_ = [
        ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
        ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
        ("children", ctypes.c_void_p), ("dictionary", ctypes.c_void_p),
        ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
    ]


class _ArrowArray(ctypes.Structure):
    _fields_ = [
        ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
        ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
        ("buffers", ctypes.POINTER(ctypes.c_void_p)), ("children", ctypes.c_void_p),
        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
        ("private_data", ctypes.c_void_p),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = (ctypes.py_object, ctypes.c_char_p)

_FLOAT32 = b"f"


def float_pixels(image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """The pixels of mode "F" `image` as a float32 [height, width] array: `out` filled where
    given, else a new array."""
    height, width = image.height, image.width
    if out is None:
        out = np.empty((height, width), np.float32)
    try:
        schema_capsule, array_capsule = image.__arrow_c_array__()
    except (AttributeError, ValueError):  # an older Pillow; rows in several blocks
        np.copyto(out, np.asarray(image, dtype=np.float32))
        return out
    # The capsules own the exported structs (released when they are collected): they stay
    # referenced here until the copy is made.
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    if (schema.format != _FLOAT32 or array.n_buffers != 2 or array.null_count != 0
            or array.length != height * width or not array.buffers[1]):
        np.copyto(out, np.asarray(image, dtype=np.float32))
        return out
    start = array.buffers[1] + array.offset * 4
    pixels = np.frombuffer((ctypes.c_float * (height * width)).from_address(start), np.float32)
    np.copyto(out, pixels.reshape(height, width))
    del schema_capsule, array_capsule
    return out
