"""Property tests of what the server parses from clients, on generated and mutated input.

- `decode_image` on mutations of small valid PNG, JPEG, WebP and BMP files (bytes overwritten,
  inserted, deleted, cut, header fields set to random sizes) and on random bytes behind each
  format's magic: it returns an image within the pixel limit, which converts to a model tensor,
  or raises InvalidInput; never anything else.
- `kserve.decode_inputs` on ModelInferRequests with random names, datatypes, shapes (negative,
  zero, huge, overflowing, of many dimensions) and raw or typed contents: it returns one array
  (or list of bytes) per input holding exactly the elements its shape declares, or raises
  InvalidInput; typed contents decode to the very values sent.

Bounded and deterministic: hypothesis derandomized, a fixed number of examples per property
(``GRADCAM_FUZZ_EXAMPLES``, default 200; `benchmarks/reliability.py` runs 10x as many), no
example database. The whole file runs in well under 30 s on two cores.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gradcam_proto import grpc_service_pb2 as pb
from gradcam_server.datatypes import DATATYPES
from gradcam_server.errors import InvalidInput
from gradcam_server.kserve import decode_inputs
from gradcam_server.preprocess import Preprocessing, decode_image, to_tensor

EXAMPLES = int(os.environ.get("GRADCAM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PIXELS = 1 << 16  # small, so that mutated headers cross it and decoding stays fast
PREPROCESSING = Preprocessing(size=(8, 8))


# -- images --------------------------------------------------------------------------------------


def _saved(mode: str, size: tuple[int, int], image_format: str, **options) -> bytes:
    rng = np.random.default_rng(len(mode) + size[0])
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


SEEDS = {
    "png-rgb": _saved("RGB", (16, 12), "PNG"),
    "png-rgba": _saved("RGBA", (9, 7), "PNG"),
    "png-palette": _saved("P", (12, 10), "PNG"),
    "png-gray16": _saved("I;16", (10, 8), "PNG"),
    "png-interlaced": _saved("RGB", (16, 12), "PNG", interlace=1),
    "jpeg": _saved("RGB", (16, 12), "JPEG", quality=80),
    "jpeg-progressive": _saved("RGB", (24, 16), "JPEG", progressive=True),
    "jpeg-gray": _saved("L", (16, 12), "JPEG"),
    "webp-lossy": _saved("RGB", (16, 12), "WEBP", quality=70),
    "webp-lossless": _saved("RGBA", (16, 12), "WEBP", lossless=True),
    "bmp-rgb": _saved("RGB", (13, 9), "BMP"),
    "bmp-palette": _saved("P", (12, 10), "BMP"),
}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"BM")


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image with a few random mutations."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("overwrite", "insert", "delete", "cut", "header")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "overwrite" and data:
            data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))[: len(data) - at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "cut":
            del data[at:]
        else:  # a size-like field somewhere in the header: 1-4 bytes, either byte order
            at = draw(st.integers(0, min(len(data), 64)))
            width = draw(st.sampled_from((1, 2, 3, 4)))
            value = draw(st.sampled_from((0, 1, 255, 256, 65_535, 2**24 - 1, 2**31, 2**32 - 1))
                         | st.integers(0, 2 ** (8 * width) - 1))
            value %= 2 ** (8 * width)
            order = draw(st.sampled_from(("big", "little")))
            data[at:at + width] = value.to_bytes(width, order)
    return bytes(data)


random_after_magic = st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC),
                               st.binary(max_size=200))


def _decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, MAX_PIXELS)
    except InvalidInput:
        return
    width, height = image.size
    assert 0 < width and 0 < height and width * height <= MAX_PIXELS
    tensor = to_tensor(image, PREPROCESSING)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()


def test_seed_images_decode() -> None:
    for name, data in SEEDS.items():
        assert decode_image(data, MAX_PIXELS).size[0] > 0, name


@FUZZ
@given(mutated_images())
def test_mutated_images_decode_or_are_refused(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(random_after_magic)
def test_random_bytes_behind_a_format_magic_decode_or_are_refused(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    _decodes_or_refuses(data)


# -- KServe tensors ------------------------------------------------------------------------------

DATATYPE_NAMES = (*DATATYPES, "BYTES")
JUNK_DATATYPES = ("", "FP128", "fp32", "STRING", "INT4")
NAMES = ("input", "image", "target_class", "x")
_INT64 = (-(2**63), 2**63 - 1)

dimensions = st.one_of(
    st.integers(0, 4),
    st.sampled_from((-1, -(2**63), 2**31, 2**32, 2**62, 2**63 - 1, 3 * 2**61)),
)
EDGE_SHAPES = ([], [0], [1] * 65, [1] * 64, [2**32, 2**32], [2**62, 4], [2**31, 2**31],
               [-1, 3], [2**63 - 1], [3, 0, 2**62])
shapes = st.one_of(st.sampled_from(EDGE_SHAPES), st.lists(dimensions, max_size=5))
CONTENTS_VALUES = {  # typed contents field -> its values
    "fp32_contents": st.floats(width=32, allow_nan=True),
    "fp64_contents": st.floats(allow_nan=True),
    "int64_contents": st.integers(*_INT64),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "bool_contents": st.booleans(),
    "bytes_contents": st.binary(max_size=8),
}


@st.composite
def raw_contents(draw, datatype: str, shape: list[int]) -> bytes:
    """Bytes that fit the shape when it is small, else random bytes."""
    count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else None
    if count is not None and count <= 256 and draw(st.booleans()):
        if datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
            return b"".join(len(i).to_bytes(4, "little") + i for i in items)
        if datatype in DATATYPES:
            return draw(st.binary(min_size=count * DATATYPES[datatype].itemsize,
                                  max_size=count * DATATYPES[datatype].itemsize))
    return draw(st.just(b"") | st.binary(max_size=64))


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        datatype = draw(st.sampled_from(DATATYPE_NAMES) | st.sampled_from(JUNK_DATATYPES))
        shape = draw(shapes)
        tensor = request.inputs.add(
            name=draw(st.sampled_from(NAMES) | st.text(max_size=8)), datatype=datatype,
            shape=shape,
        )
        if raw:
            request.raw_input_contents.append(draw(raw_contents(datatype, shape)))
        else:
            field = draw(st.sampled_from(sorted(CONTENTS_VALUES)))
            count = math.prod(shape) if all(0 <= d <= 8 for d in shape) else None
            if count is not None and count <= 8 and draw(st.booleans()):
                values = draw(st.lists(CONTENTS_VALUES[field], min_size=count, max_size=count))
            else:
                values = draw(st.lists(CONTENTS_VALUES[field], max_size=8))
            getattr(tensor.contents, field).extend(values)
    if raw and draw(st.integers(0, 9)) == 0:  # raw contents for too few or too many inputs
        if request.raw_input_contents and draw(st.booleans()):
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(b"\x00" * 4)
    return request


def _decoded_or_refused(request: pb.ModelInferRequest) -> dict | None:
    try:
        return decode_inputs(request)
    except InvalidInput:
        return None


@FUZZ
@given(requests())
def test_kserve_tensors_decode_to_their_shapes_or_are_refused(request) -> None:
    decoded = _decoded_or_refused(request)
    if decoded is None:
        return
    assert sorted(decoded) == sorted(t.name for t in request.inputs)
    for tensor in request.inputs:
        value = decoded[tensor.name]
        count = math.prod(tensor.shape)
        if tensor.datatype == "BYTES":
            assert isinstance(value, list) and len(value) == count, (tensor.shape, len(value))
            assert all(isinstance(item, bytes) for item in value)
        else:
            assert isinstance(value, np.ndarray)
            assert value.shape == tuple(tensor.shape) and value.size == count
            assert value.dtype == DATATYPES[tensor.datatype].newbyteorder("=")


_FIELD_OF = {  # the typed contents field each datatype is read from
    "FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
    "INT32": "int_contents", "INT16": "int_contents", "INT8": "int_contents",
    "UINT16": "uint_contents", "UINT8": "uint_contents", "BOOL": "bool_contents",
}


@st.composite
def typed_requests(draw) -> tuple[pb.ModelInferRequest, str, list]:
    """One input in typed contents, of a datatype with a contents field, its values in the
    field's own range."""
    datatype = draw(st.sampled_from(sorted(_FIELD_OF)))
    field = _FIELD_OF[datatype]
    values = draw(st.lists(CONTENTS_VALUES[field], min_size=1, max_size=8))
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    return request, datatype, list(getattr(tensor.contents, field))


@FUZZ
@given(typed_requests())
def test_typed_contents_decode_to_the_values_sent_or_are_refused(case) -> None:
    """A value its datatype cannot hold (300 as INT8) is refused, not wrapped around."""
    request, datatype, sent = case
    decoded = _decoded_or_refused(request)
    if decoded is None:
        return
    got = decoded["x"].tolist()
    if datatype in ("FP32", "FP64"):
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float64),
                                      np.asarray(sent, dtype=np.float64))
    else:
        assert got == sent, (datatype, sent, got)


OVERFLOWING = ([2**32, 2**32], [2**62, 4], [3, 2**62, 2**2])


@pytest.mark.parametrize("shape", OVERFLOWING)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_shapes_whose_element_count_overflows_are_refused(shape, datatype, raw) -> None:
    """Shapes whose element count overflows int64, sent with no elements."""
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput):
        decode_inputs(request)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_a_tensor_of_more_dimensions_than_numpy_holds_is_refused(raw) -> None:
    """65 dimensions of size 1: one value, but numpy arrays have at most 64 dimensions."""
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1] * 65)
    if raw:
        request.raw_input_contents.append(b"\x00" * 4)
    else:
        tensor.contents.fp32_contents.append(0.0)
    with pytest.raises(InvalidInput):
        decode_inputs(request)
