"""Large byte fields written into serialized protobuf messages without copying them first.

A heatmap at a photo's size is half a MiB; put into a message with ``tobytes()``, appended to
the message and serialized, it is copied three times (on these machines a copy of it costs as
much as resizing it). Here a message is serialized without its large fields, and each large
field is appended in protobuf's wire format (tag, length, then the array's own memory, read
through a memoryview), so that one ``b"".join`` makes the only copy. The wire format allows it:
fields may come in any order, and a message field is its serialized bytes, length-prefixed.
"""

from __future__ import annotations

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
    length = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return [varint(number << 3 | _LENGTH_DELIMITED), varint(length), *parts]


def array_bytes(array: np.ndarray, dtype: str | np.dtype = "<f4") -> Part:
    """The little-endian bytes of `array` as `dtype`, without a copy where it is already so."""
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    return memoryview(contiguous).cast("B") if contiguous.size else b""


def join(parts: Iterable[Part]) -> bytes:
    return b"".join(parts)
