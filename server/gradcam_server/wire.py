"""Large byte fields written into serialized protobuf messages without copying them first.

A heatmap at a photo's size is half a MiB; put into a message with ``tobytes()``, appended to
the message and serialized, it is copied three times (on these machines a copy of it costs as
much as resizing it). Here a message is serialized without its large fields, and each large
field is appended in protobuf's wire format (tag, length, then the array's own memory, read
through a memoryview), so that one `join` makes the only copy. The wire format allows it:
fields may come in any order, and a message field is its serialized bytes, length-prefixed.

A large message (tens of MiB of heatmaps) is joined without holding the GIL: ``b"".join`` holds
it through the whole copy, during which the event loop (and health checks) cannot run.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np

Part = bytes | memoryview

_LENGTH_DELIMITED = 2  # the wire type of bytes, strings and messages


def varint(value: int) -> bytes:
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            encoded.append(low | 0x80)
        else:
            encoded.append(low)
            return bytes(encoded)


def field(number: int, parts: Iterable[Part]) -> list[Part]:
    """A length-delimited field `number` (bytes, or an embedded message) holding `parts`."""
    parts = list(parts)
    length = sum(_size(p) for p in parts)
    return [varint(number << 3 | _LENGTH_DELIMITED), varint(length), *parts]


def array_bytes(array: np.ndarray, dtype: str | np.dtype = "<f4") -> Part:
    """The little-endian bytes of `array` as `dtype`, without a copy where it is already so."""
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    return memoryview(contiguous).cast("B") if contiguous.size else b""


# A bytes object of a given size whose contents its creator writes before sharing it, as C
# code builds one: PyBytes_FromStringAndSize(NULL, size).
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)

GIL_FREE_JOIN_BYTES = 1 << 20
"""Messages from this size up are joined by numpy copies, which release the GIL."""


def _size(part: Part) -> int:
    return len(part) if isinstance(part, bytes) else part.nbytes


def join(parts: Iterable[Part]) -> bytes:
    """The concatenation of `parts`, copied once; from GIL_FREE_JOIN_BYTES up without holding
    the GIL (into a new bytes object that nothing else sees until it is returned)."""
    parts = list(parts)
    size = sum(_size(part) for part in parts)
    if size < GIL_FREE_JOIN_BYTES:
        return b"".join(parts)
    joined = _new_bytes(None, size)
    address = ctypes.cast(ctypes.c_char_p(joined), ctypes.c_void_p).value
    target = np.frombuffer((ctypes.c_char * size).from_address(address), np.uint8)
    start = 0
    for part in parts:
        end = start + _size(part)
        target[start:end] = np.frombuffer(part, np.uint8)
        start = end
    return joined
