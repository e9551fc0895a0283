"""Image decoding (formats, truncation, decompression bombs) and the image-to-tensor conversion."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gradcam_server.arrow import float_pixels
from gradcam_server.errors import InvalidInput
from gradcam_server.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    decode_image,
    to_tensor,
)

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "models/efficientnet_lite0/config.json"

# 2 rows x 3 columns of known RGB values.
TINY = np.array(
    [
        [[0, 128, 255], [10, 20, 30], [255, 0, 0]],
        [[1, 2, 3], [200, 100, 50], [0, 255, 0]],
    ],
    dtype=np.uint8,
)


def encode(image: Image.Image | np.ndarray, image_format: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def crafted_png(width: int, height: int) -> bytes:
    """A grayscale PNG whose header claims width x height, carrying one row of pixel data.

    A complete all-zero 20000 x 20000 stream would compress to ~390 KB but takes seconds to
    compress; the decoder must refuse on the header alone, so one row is enough.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", one_row)
        + png_chunk(b"IEND", b"")
    )


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A baseline or progressive JPEG with the size fields of its SOF0/SOF2 segment rewritten."""
    start = data.find(b"\xff\xc0")
    if start < 0:
        start = data.index(b"\xff\xc2")
    patched = bytearray(data)
    struct.pack_into(">HH", patched, start + 5, height, width)
    return bytes(patched)


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan's coded data: after its SOS segment, up to the next marker
    (0xFF then neither 0x00, a stuffed byte, nor RST0-7)."""
    scans = []
    position = 0
    while (sos := data.find(b"\xff\xda", position)) >= 0:
        start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
        end = start
        while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
            end += 1
        scans.append((start, end))
        position = end
    return scans


def pillow_pixels(data: bytes) -> bytes:
    """The pixels Pillow decodes on its own, for comparison."""
    with Image.open(io.BytesIO(data)) as image:
        return image.tobytes()


def sixteen_bit_png(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (Pillow writes none but grayscale): pixels [H, W] or [H, W, C] of uint16,
    colour type 0 (gray), 2 (RGB), 4 (gray and alpha) or 6 (RGBA)."""
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def with_bmp_size(data: bytes, width: int, height: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into("<ii", patched, 18, width, height)
    return bytes(patched)


def with_webp_lossless_size(data: bytes, width: int, height: int) -> bytes:
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    patched = bytearray(data)
    patched[21:25] = bits.to_bytes(4, "little")
    return bytes(patched)


def expected_tensor(
    pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale: float = 1 / 255
) -> np.ndarray:
    """[3, H, W] by the formula of the module docstring, in float64."""
    values = pixels.astype(np.float64) * scale
    return ((values - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


# --- Preprocessing ------------------------------------------------------------------------


def test_from_shipped_config() -> None:
    config = json.loads(SHIPPED_CONFIG.read_text())
    prep = Preprocessing.from_config(config, default_size=None)
    assert prep == Preprocessing(
        size=(224, 224),
        resize="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        channel_order="RGB",
        scale=1 / 255,
        layout="NCHW",
    )


def test_from_config_defaults() -> None:
    assert Preprocessing.from_config({}, default_size=(32, 48)) == Preprocessing(size=(32, 48))
    assert Preprocessing.from_config({"size": None}, default_size=None).size is None
    assert Preprocessing.from_config({"size": [10, 20]}, default_size=(1, 1)).size == (10, 20)


def test_from_config_converts_lists_to_tuples() -> None:
    prep = Preprocessing.from_config(
        {"size": [4, 5], "mean": [0, 0, 0], "std": [1, 2, 3], "scale": 1}, default_size=None
    )
    assert prep.size == (4, 5)
    assert prep.mean == (0.0, 0.0, 0.0)
    assert prep.std == (1.0, 2.0, 3.0)
    assert isinstance(prep.scale, float)
    hash(prep)  # usable as a cache key


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("size", [224]),
        ("size", [224, 0]),
        ("size", [224.0, 224]),
        ("size", "224x224"),
        ("size", [True, 3]),
        ("resize", "lanczos"),
        ("mean", [0.5, 0.5]),
        ("mean", ["0.5", 0.5, 0.5]),
        ("mean", [float("nan"), 0.5, 0.5]),
        ("std", [0.2, 0.0, 0.2]),
        ("std", [0.2, -1, 0.2]),
        ("channel_order", "rgb"),
        ("scale", 0),
        ("scale", "1/255"),
        ("scale", float("inf")),
        ("layout", "CHW"),
    ],
)
def test_from_config_names_the_bad_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        Preprocessing.from_config({key: value}, default_size=(224, 224))


def test_bad_default_size_is_refused() -> None:
    with pytest.raises(ValueError, match="'size'"):
        Preprocessing.from_config({}, default_size=(0, 224))


def test_bgr_config_must_give_its_own_mean_and_std() -> None:
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        Preprocessing.from_config({"channel_order": "BGR"}, default_size=None)
    with pytest.raises(ValueError, match="'std'"):
        Preprocessing.from_config({"channel_order": "BGR", "mean": [1, 2, 3]}, default_size=None)
    prep = Preprocessing.from_config(
        {"channel_order": "BGR", "mean": [104, 117, 123], "std": [1, 1, 1], "scale": 1},
        default_size=None,
    )
    assert prep.channel_order == "BGR"


def test_config_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Preprocessing.from_config([224, 224], default_size=None)  # type: ignore[arg-type]


def test_preprocessing_is_frozen() -> None:
    prep = Preprocessing(size=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.size = (1, 1)  # type: ignore[misc]


# --- decode_image: what is accepted ---------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "options"),
    [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})],
)
def test_decodes_lossless_formats_exactly(image_format: str, options: dict) -> None:
    pixels = noise(7, 5)
    image = decode_image(encode(pixels, image_format, **options))
    assert image.size == (5, 7)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
def test_decodes_lossy_formats(image_format: str) -> None:
    flat = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    image = decode_image(encode(flat, image_format, quality=95))
    assert image.size == (24, 16)
    assert np.abs(np.asarray(image.convert("RGB")).astype(int) - flat).max() <= 4


def test_decodes_progressive_jpeg() -> None:
    image = decode_image(encode(noise(32, 32), "JPEG", progressive=True))
    assert image.size == (32, 32)


# --- decode_image: what is refused ----------------------------------------------------------


def test_empty_data_is_refused() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("image_format", ["GIF", "TIFF", "PPM", "ICO"])
def test_other_formats_are_refused_by_name(image_format: str) -> None:
    data = encode(noise(8, 8), image_format)
    with pytest.raises(InvalidInput, match=f"is {image_format}; only JPEG, PNG, WebP and BMP"):
        decode_image(data)


def test_unknown_data_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not an image in a known format"):
        decode_image(b"this is certainly not an image")


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"\xff\xd8\xff" + b"\x00" * 40,
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 40,
        b"BM" + b"\xff" * 60,
    ],
    ids=["png", "jpeg", "webp", "bmp"],
)
def test_right_magic_with_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a readable|truncated or corrupt"):
        decode_image(data)


@pytest.mark.parametrize(
    ("image_format", "options"),
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
    ],
)
def test_truncated_data_is_refused_at_every_cut(image_format: str, options: dict) -> None:
    # Image.open only reads the header, so each cut must fail in decode_image's full load,
    # down to the last byte of the file (a PNG without its IEND chunk, a JPEG without EOI).
    data = encode(noise(24, 16), image_format, **options)
    spread = range(1, len(data), max(1, len(data) // 40))
    cuts = sorted({*spread, *range(len(data) - 24, len(data))})
    for cut in cuts:
        with pytest.raises(InvalidInput):
            decode_image(data[:cut])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_cut_inside_its_end_chunk_is_refused() -> None:
    data = encode(noise(8, 8), "PNG")
    assert data.endswith(png_chunk(b"IEND", b""))
    for missing in (1, 4, 11, 12):
        with pytest.raises(InvalidInput, match="truncated"):
            decode_image(data[:-missing])
    decode_image(data + b"trailing bytes after IEND")


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(encode(noise(32, 32), "PNG"))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(bytes(data))


CHELSEA = Path(__file__).resolve().parents[1] / "samples/chelsea.jpg"


def photo(width: int, height: int) -> Image.Image:
    """The bundled photo at another size: real JPEG statistics, unlike noise."""
    with Image.open(CHELSEA) as image:
        return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_scan_cut_before_an_end_marker_is_refused(fraction: float, progressive: bool) -> None:
    # libjpeg pads a scan whose data stops at a marker with grey blocks and only warns; Pillow
    # drops the warning, so this decoded to a full-size image before.
    data = CHELSEA.read_bytes()
    if progressive:
        data = encode(photo(451, 300), "JPEG", progressive=True)
    start, end = jpeg_scans(data)[-1]
    cut = start + round(fraction * (end - start - 2)) + 1  # at least one byte is missing
    truncated = data[:cut] + b"\xff\xd9"
    with pytest.raises(InvalidInput, match="truncated"):
        decode_image(truncated)


def test_every_cut_of_a_baseline_scan_is_refused() -> None:
    data = encode(photo(64, 48), "JPEG")
    (start, end), = jpeg_scans(data)
    for cut in range(start, end):
        with pytest.raises(InvalidInput, match="truncated"):
            decode_image(data[:cut] + b"\xff\xd9")


def test_jpeg_cut_at_a_restart_marker_is_refused() -> None:
    # Cut just after a restart marker, every interval left is whole: the restart markers the
    # scan lacks tell.
    data = encode(photo(64, 48), "JPEG", restart_marker_blocks=2)
    start, end = jpeg_scans(data)[0]
    restart = data.index(b"\xff\xd3", start)
    with pytest.raises(InvalidInput, match="restart markers"):
        decode_image(data[: restart + 2] + b"\xff\xd9")


def test_huge_jpeg_header_with_little_data_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 49 MP, under the pixel limit, from a few hundred bytes: the scan cannot code so many
    # blocks, which is known before anything is allocated.
    for options in ({}, {"progressive": True}):
        data = with_jpeg_size(encode(noise(8, 8), "JPEG", **options), 7000, 7000)
        assert len(data) < 1500
        monkeypatch.setattr(ImageFile.ImageFile, "load", _refuse_load)
        started = time.perf_counter()
        with pytest.raises(InvalidInput, match=r"truncated .*7000x7000"):
            decode_image(data)
        assert time.perf_counter() - started < 0.5
        monkeypatch.undo()


def test_jpeg_without_a_dc_scan_is_refused() -> None:
    data = encode(photo(32, 32), "JPEG", progressive=True)
    first_sos = data.index(b"\xff\xda")
    _, first_end = jpeg_scans(data)[0]
    with pytest.raises(InvalidInput, match="no DC scan"):
        decode_image(data[:first_sos] + data[first_end:])


def test_progressive_jpeg_whose_last_scans_are_missing_still_decodes() -> None:
    # The standard lets a progression stop early (libjpeg's encoder asks only for every
    # component's DC): whole scans are a valid, less detailed image, not padding.
    data = encode(photo(64, 48), "JPEG", progressive=True)
    _, second_end = jpeg_scans(data)[1]
    shorter = data[:second_end] + b"\xff\xd9"
    assert decode_image(shorter).tobytes() == pillow_pixels(shorter)


def _solid(colour: tuple[int, int, int], width: int = 640, height: int = 480) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


VALID_JPEGS: dict[str, tuple[Callable[[], Image.Image], dict]] = {
    "baseline": (lambda: photo(451, 300), {}),
    "progressive": (lambda: photo(451, 300), {"progressive": True}),
    "optimized": (lambda: photo(451, 300), {"optimize": True}),
    "progressive-optimized-q5": (
        lambda: photo(451, 300), {"progressive": True, "optimize": True, "quality": 5}
    ),
    "q100-444": (lambda: photo(451, 300), {"quality": 100, "subsampling": 0}),
    "restarts": (lambda: photo(451, 300), {"restart_marker_blocks": 1}),
    "restarts-progressive": (
        lambda: photo(451, 300), {"restart_marker_rows": 1, "progressive": True}
    ),
    "gray": (lambda: photo(451, 300).convert("L"), {}),
    "cmyk": (lambda: photo(451, 300).convert("CMYK"), {}),
    # Solid colours code each block in as few bits as the format allows.
    "solid-grey-optimized": (lambda: _solid((128, 128, 128)), {"optimize": True}),
    "solid-grey-progressive": (
        lambda: _solid((128, 128, 128)), {"optimize": True, "progressive": True}
    ),
    "solid": (lambda: _solid((200, 30, 60)), {}),
    "solid-black-444": (lambda: _solid((0, 0, 0)), {"optimize": True, "subsampling": 0}),
    "solid-12mp": (lambda: _solid((255, 255, 255), 4000, 3000), {"optimize": True}),
    "1x1-gray": (lambda: Image.new("L", (1, 1), 77), {}),
    "1x1-progressive": (lambda: _solid((10, 20, 30), 1, 1), {"progressive": True}),
    "large": (lambda: photo(2000, 1500), {"quality": 90}),
}


@pytest.mark.parametrize("kind", VALID_JPEGS)
def test_valid_jpegs_decode_as_pillow_decodes_them(kind: str) -> None:
    make, options = VALID_JPEGS[kind]
    image = make()
    data = encode(image, "JPEG", **options)
    decoded = decode_image(data)
    assert decoded.size == image.size
    assert decoded.tobytes() == pillow_pixels(data)


def test_valid_jpeg_oddities_decode() -> None:
    data = CHELSEA.read_bytes()
    expected = pillow_pixels(data)
    # Fill bytes before markers, data after the end marker, and an EXIF block whose thumbnail
    # holds its own end marker.
    filled = data.replace(b"\xff\xda", b"\xff\xff\xff\xda").replace(b"\xff\xd9", b"\xff\xff\xd9")
    assert decode_image(filled).tobytes() == expected
    assert decode_image(data + b"trailing \xff\xd8 bytes").tobytes() == expected
    progressive = encode(photo(120, 80), "JPEG", progressive=True)
    filled = progressive.replace(b"\xff\xc4", b"\xff\xff\xc4")
    assert decode_image(filled).tobytes() == pillow_pixels(progressive)
    exif = Image.Exif()
    exif[0x010F] = "camera \xff\xd9"
    with_exif = encode(photo(120, 80), "JPEG", exif=exif.tobytes(), comment=b"\xff\xd9 comment")
    assert decode_image(with_exif).tobytes() == pillow_pixels(with_exif)


@pytest.mark.parametrize(
    "data",
    [
        crafted_png(0, 5),
        crafted_png(5, 0),
        with_bmp_size(encode(noise(8, 8), "BMP"), 0, 8),
        with_jpeg_size(encode(noise(8, 8), "JPEG"), 8, 0),
    ],
    ids=["png-width", "png-height", "bmp-width", "jpeg-height"],
)
def test_zero_sized_image_is_refused(data: bytes) -> None:
    # Pillow's plugins refuse these headers themselves; decode_image checks the sides too.
    with pytest.raises(InvalidInput, match="sides must be positive|not a readable"):
        decode_image(data)


# --- decode_image: decompression bombs ------------------------------------------------------


def _refuse_load(self: ImageFile.ImageFile) -> None:
    raise AssertionError("load() was called on an image over the pixel limit")


@pytest.mark.parametrize(
    "image_format",
    ["PNG", "JPEG", "BMP", "WEBP"],
)
def test_bomb_is_refused_from_the_header(
    image_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    width = height = 20000
    if image_format == "PNG":
        data = crafted_png(width, height)
    elif image_format == "JPEG":
        data = with_jpeg_size(encode(noise(8, 8), "JPEG"), width, height)
    elif image_format == "BMP":
        data = with_bmp_size(encode(noise(8, 8), "BMP"), width, height)
    else:  # lossless WebP headers hold 14 bits per side
        width = height = 16384
        data = with_webp_lossless_size(encode(noise(8, 8), "WEBP", lossless=True), width, height)
    assert len(data) < 2000
    monkeypatch.setattr(ImageFile.ImageFile, "load", _refuse_load)

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput) as refused:
            decode_image(data)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5
    message = str(refused.value)
    assert f"{width}x{height}" in message
    assert f"{width * height} pixels" in message
    assert "limit of 50000000 pixels" in message


def test_limit_is_the_callers() -> None:
    data = encode(noise(20, 20), "PNG")
    with pytest.raises(InvalidInput, match=r"20x20 = 400 pixels, over the limit of 399 pixels"):
        decode_image(data, max_pixels=399)
    assert decode_image(data, max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "BMP"])
def test_pillows_own_limit_never_warns_or_raises(
    image_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow would warn at 11, raise at 21
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_image(encode(noise(20, 20), image_format))
    assert image.size == (20, 20)


def test_pillows_webp_limit_becomes_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's WebP plugin checks its own limit while parsing the header; that error is mapped.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput, match="too large"):
            decode_image(encode(noise(20, 20), "WEBP"))


# --- to_tensor ------------------------------------------------------------------------------


def test_tensor_by_hand_on_a_tiny_image() -> None:
    tensor = to_tensor(Image.fromarray(TINY), Preprocessing(size=None))
    assert tensor.dtype == np.float32
    assert tensor.shape == (3, 2, 3)
    assert tensor.flags["C_CONTIGUOUS"]
    # Pixel (row 0, col 0) is (0, 128, 255).
    assert tensor[0, 0, 0] == pytest.approx((0 / 255 - 0.485) / 0.229, abs=1e-6)
    assert tensor[1, 0, 0] == pytest.approx((128 / 255 - 0.456) / 0.224, abs=1e-6)
    assert tensor[2, 0, 0] == pytest.approx((255 / 255 - 0.406) / 0.225, abs=1e-6)
    np.testing.assert_allclose(tensor, expected_tensor(TINY), atol=1e-6)


def test_raw_pixels_with_identity_normalisation() -> None:
    prep = Preprocessing(size=None, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    tensor = to_tensor(Image.fromarray(TINY), prep)
    np.testing.assert_array_equal(tensor, TINY.transpose(2, 0, 1).astype(np.float32))


def test_bgr_order_with_mean_and_std_per_tensor_channel() -> None:
    mean, std = (104.0, 117.0, 123.0), (2.0, 4.0, 8.0)
    prep = Preprocessing(size=None, channel_order="BGR", mean=mean, std=std, scale=1.0)
    tensor = to_tensor(Image.fromarray(TINY), prep)
    np.testing.assert_allclose(tensor, expected_tensor(TINY[:, :, ::-1], mean, std, 1.0), atol=1e-5)
    # Channel 0 is blue: pixel (0, 0) has blue 255.
    assert tensor[0, 0, 0] == pytest.approx((255 - 104) / 2)


def test_nhwc_layout() -> None:
    image = Image.fromarray(TINY)
    nchw = to_tensor(image, Preprocessing(size=None))
    nhwc = to_tensor(image, Preprocessing(size=None, layout="NHWC"))
    assert nhwc.shape == (2, 3, 3)
    assert nhwc.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))


def test_size_is_height_then_width() -> None:
    tensor = to_tensor(Image.fromarray(noise(10, 30)), Preprocessing(size=(4, 6)))
    assert tensor.shape == (3, 4, 6)
    nhwc = to_tensor(Image.fromarray(noise(10, 30)), Preprocessing(size=(4, 6), layout="NHWC"))
    assert nhwc.shape == (4, 6, 3)


def test_nearest_upscale_repeats_pixels() -> None:
    prep = Preprocessing(size=(4, 6), resize="nearest", mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    tensor = to_tensor(Image.fromarray(TINY), prep)
    repeated = TINY.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_array_equal(tensor, repeated.transpose(2, 0, 1).astype(np.float32))


def test_area_downscale_averages_blocks() -> None:
    pixels = noise(4, 6, seed=3)
    prep = Preprocessing(size=(2, 3), resize="area", mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
    tensor = to_tensor(Image.fromarray(pixels), prep)
    block_means = pixels.reshape(2, 2, 3, 2, 3).astype(np.float64).mean(axis=(1, 3))
    # Pillow resamples 8-bit images in fixed point: within one level of the exact mean.
    np.testing.assert_allclose(tensor, block_means.transpose(2, 0, 1), atol=1.0)


@pytest.mark.parametrize(
    ("name", "resample"),
    [
        ("bilinear", Image.Resampling.BILINEAR),
        ("bicubic", Image.Resampling.BICUBIC),
        ("nearest", Image.Resampling.NEAREST),
        ("area", Image.Resampling.BOX),
    ],
)
def test_resize_filters_are_pillows(name: str, resample: Image.Resampling) -> None:
    image = Image.fromarray(noise(17, 23, seed=1))
    tensor = to_tensor(image, Preprocessing(size=(8, 12), resize=name))
    reference = np.asarray(image.resize((12, 8), resample))
    np.testing.assert_allclose(tensor, expected_tensor(reference), atol=1e-5)


def test_resize_filters_differ() -> None:
    image = Image.fromarray(noise(17, 23, seed=2))
    tensors = {
        name: to_tensor(image, Preprocessing(size=(8, 12), resize=name))
        for name in ("bilinear", "bicubic", "nearest", "area")
    }
    names = list(tensors)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not np.allclose(tensors[first], tensors[second]), (first, second)


def test_image_already_at_size_is_not_resampled() -> None:
    tensor = to_tensor(Image.fromarray(TINY), Preprocessing(size=(2, 3), resize="bicubic"))
    np.testing.assert_allclose(tensor, expected_tensor(TINY), atol=1e-6)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = np.array([[0, 100, 255]], dtype=np.uint8)
    image = decode_image(encode(gray, "PNG"))
    assert image.mode == "L"
    tensor = to_tensor(image, Preprocessing(size=None, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0))
    assert tensor.shape == (3, 1, 3)
    for channel in tensor:
        np.testing.assert_array_equal(channel, gray.astype(np.float32))


RAW = Preprocessing(size=None, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0)
EVERY_16_BIT_VALUE = np.arange(65536, dtype=np.uint16).reshape(256, 256)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits() -> None:
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = decode_image(encode(wide, "PNG"))
    assert image.mode.startswith("I;16")
    tensor = to_tensor(image, RAW)
    np.testing.assert_array_equal(tensor[0], [[0.0, 100.0, 255.0]])


@pytest.mark.parametrize("source", ["pillow-png", "crafted-png"])
def test_sixteen_bit_grayscale_png_rounds_every_value(source: str) -> None:
    if source == "pillow-png":
        data = encode(EVERY_16_BIT_VALUE, "PNG")
    else:
        data = sixteen_bit_png(EVERY_16_BIT_VALUE, color_type=0)
    image = decode_image(data)
    assert image.mode == "I;16"
    tensor = to_tensor(image, RAW)
    expected = np.round(EVERY_16_BIT_VALUE / 257)  # round(v / 257): no value lies on a half
    for channel in tensor:
        np.testing.assert_array_equal(channel, expected)
    assert tensor[0, 0, 128] == 0 and tensor[0, 0, 129] == 1  # 128/257 < 0.5 < 129/257
    assert tensor[0, 255, 126] == 254 and tensor[0, 255, 127] == 255  # 65406, 65407


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_every_sixteen_bit_mode_rounds_the_same(mode: str) -> None:
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (256, 256), EVERY_16_BIT_VALUE.astype(dtype).tobytes())
    assert image.mode == mode
    tensor = to_tensor(image, RAW)
    np.testing.assert_array_equal(tensor[1], np.round(EVERY_16_BIT_VALUE / 257))


def test_wider_i_mode_values_are_clipped_to_sixteen_bits() -> None:
    values = np.array([[-5, 0, 65535, 70000, 2**31 - 1]], dtype="<i4")
    image = Image.frombytes("I", (5, 1), values.tobytes())
    np.testing.assert_array_equal(to_tensor(image, RAW)[0], [[0, 0, 255, 255, 255]])


@pytest.mark.parametrize(
    ("color_type", "mode"),
    [(2, "RGB"), (6, "RGBA"), (4, "RGBA")],
    ids=["rgb", "rgba", "gray-alpha"],
)
def test_sixteen_bit_colour_pngs_keep_the_high_byte(color_type: int, mode: str) -> None:
    # Pillow's decoder stores 16-bit colour PNGs as 8-bit RGB(A) itself, keeping v >> 8; that
    # is round(v / 257) or one less, and costs no extra memory.
    channels = {2: 3, 6: 4, 4: 2}[color_type]
    wide = np.random.default_rng(4).integers(0, 65536, (16, 16, channels), dtype=np.uint16)
    wide[0, :4, 0] = [0, 128, 129, 65535]
    image = decode_image(sixteen_bit_png(wide, color_type))
    assert image.mode == mode
    high = (wide >> 8).astype(np.float32)
    rgb = high[:, :, :3] if channels >= 3 else np.repeat(high[:, :, :1], 3, axis=2)
    raw_nhwc = dataclasses.replace(RAW, layout="NHWC")
    np.testing.assert_array_equal(to_tensor(image, raw_nhwc), rgb)
    assert rgb[0, :4, 0].tolist() == [0, 0, 0, 255]


def test_sixteen_bit_conversion_allocates_little_beside_the_result() -> None:
    # The float64 conversion held three 8-byte copies of every pixel (a 95 KB PNG of 50 MP
    # cost 1.2 GB); now it is the 8-bit result and a few MB of bands. tracemalloc sees numpy's
    # and Python's allocations, not Pillow's image memory.
    side = 2048
    image = Image.frombytes("I;16", (side, side), np.zeros((side, side), "<u2").tobytes())
    tracemalloc.start()
    try:
        to_tensor(image, Preprocessing(size=(8, 8)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * side * side  # the old conversion peaked near 24 bytes per pixel


def test_alpha_is_dropped() -> None:
    rgba = np.concatenate([TINY, np.full((2, 3, 1), 7, np.uint8)], axis=2)
    image = decode_image(encode(rgba, "PNG"))
    assert image.mode == "RGBA"
    tensor = to_tensor(image, Preprocessing(size=None))
    np.testing.assert_allclose(tensor, expected_tensor(TINY), atol=1e-6)


def test_palette_with_transparency_converts_without_warning() -> None:
    palette_image = Image.fromarray(TINY).quantize(colors=6)
    data = encode(palette_image, "PNG", transparency=0)
    image = decode_image(data)
    assert image.mode == "P" and "transparency" in image.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = to_tensor(image, Preprocessing(size=None))
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_allclose(tensor, expected_tensor(expected), atol=1e-6)


def test_decoded_png_round_trips_to_the_tensor() -> None:
    image = decode_image(encode(TINY, "PNG"))
    np.testing.assert_allclose(
        to_tensor(image, Preprocessing(size=None)), expected_tensor(TINY), atol=1e-6
    )


@pytest.mark.parametrize("size", [(451, 300), (1, 1), (2100, 2100)])  # the last: several blocks
def test_float_pixels_read_a_float_image_as_numpy_does(size: tuple[int, int]) -> None:
    values = np.random.default_rng(0).random((7, 9), dtype=np.float32)
    image = Image.fromarray(values).resize(size, Image.BILINEAR)
    expected = np.asarray(image)
    np.testing.assert_array_equal(float_pixels(image), expected)
    out = np.full((size[1], size[0]), np.nan, np.float32)
    assert float_pixels(image, out) is out
    np.testing.assert_array_equal(out, expected)
