"""Image bytes to the model's input tensor: decode safely, convert to RGB, resize, normalise.

A model folder's ``config.json`` says how its model wants images (the shipped example is
``models/efficientnet_lite0/config.json``); the preprocessing keys are::

    size           [height, width] the whole image is resized to (no crop); absent or null:
                   the size the model's graph declares, or the image's own size if it has none
    resize         "bilinear" | "bicubic" | "nearest" | "area" (Pillow's filters; "area" is BOX)
    mean, std      three numbers each, per channel of the tensor, in ``channel_order`` order
    channel_order  "RGB" | "BGR"
    scale          what a 0..255 pixel value is multiplied by before the mean is subtracted
    layout         "NCHW" | "NHWC" (the tensor of one image is [3, H, W] or [H, W, 3])

so a pixel becomes ``(value * scale - mean[c]) / std[c]``. Other keys of the file (``input``,
``labels``, ``target_layer``) belong to other parts of the server and are ignored here.

Decoding accepts JPEG, PNG, WebP and BMP only. The pixel count is read from the header and checked
against a limit before any pixel is decoded, so a small file that claims a huge size is refused
without allocating it; truncated data is refused rather than padded. Pixels are taken as stored:
EXIF orientation is not applied, so the heatmap lines up with the pixels the client sent.

JPEG needs more than Pillow gives: libjpeg pads a scan whose coded data stops early (at an
appended end marker, say) with flat grey blocks, and Pillow discards the warning. So the marker
structure is read first: every segment whole, an end-of-image marker after the scans, all the
restart markers a scan's size calls for, and enough coded data for every 8x8 block a Huffman
scan must code (one or two bits each, the least the format allows), so that a small file cannot
stand for a large image. Then, after decoding, the file is decoded a second time with filler
bytes after each scan's coded data: a complete scan never reads them and gives the same pixels,
a cut scan reads them in place of the padding and gives different ones. Every JPEG thus costs a
second decode, and holds two decoded copies while they are compared.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import (
    BmpImagePlugin,
    Image,
    ImageChops,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from .errors import InvalidInput

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")

DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class Preprocessing:
    """How one model wants its images; every field is checked when the object is made."""

    size: tuple[int, int] | None
    """(height, width) the whole image is resized to; None keeps the image's size."""
    resize: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    scale: float = 1 / 255
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.size is not None:
            object.__setattr__(self, "size", _parse_size(self.size, "size"))
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(_one_of("resize", self.resize, RESIZE_FILTERS))
        object.__setattr__(self, "mean", _parse_triple(self.mean, "mean"))
        std = _parse_triple(self.std, "std")
        if any(value <= 0 for value in std):
            raise ValueError(f"'std' must be three positive numbers, got {list(std)}")
        object.__setattr__(self, "std", std)
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(_one_of("channel_order", self.channel_order, CHANNEL_ORDERS))
        scale = _parse_number(self.scale, "scale")
        if scale <= 0:
            raise ValueError(f"'scale' must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if self.layout not in LAYOUTS:
            raise ValueError(_one_of("layout", self.layout, LAYOUTS))

    @classmethod
    def from_config(
        cls, config: dict[str, Any], default_size: tuple[int, int] | None
    ) -> Preprocessing:
        """The preprocessing keys of a model's ``config.json``, parsed and checked.

        ``default_size`` is used when the config has no ``size`` (or ``null``): the (H, W) the
        model's graph declares, or None when the graph takes any size. A config that says
        ``"channel_order": "BGR"`` must give ``mean`` and ``std`` itself, because the ImageNet
        defaults are in R, G, B order. Raises ValueError naming the bad key.
        """
        if not isinstance(config, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(config).__name__}")
        size = config.get("size")
        if size is None:
            size = default_size
        fields: dict[str, Any] = {"size": size}
        for key in ("resize", "mean", "std", "channel_order", "scale", "layout"):
            if key in config:
                fields[key] = config[key]
        if fields.get("channel_order") == "BGR":
            missing = [key for key in ("mean", "std") if key not in config]
            if missing:
                raise ValueError(
                    f"'channel_order' is 'BGR' but {' and '.join(repr(k) for k in missing)} "
                    "not given; list them per channel in B, G, R order"
                )
        return cls(**fields)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decoded pixels of a JPEG, PNG, WebP or BMP file, in the file's own mode.

    Raises InvalidInput when the data is empty, in another format (named when Pillow knows it),
    larger than ``max_pixels`` (read from the header, before anything is decoded), truncated, or
    corrupt in a way the decoder notices. A JPEG is decoded twice (see the module docstring).
    Pillow's own decompression-bomb limit is not consulted: this function's limit replaces it.
    """
    image, image_format = _open(data, max_pixels)
    image_class = type(image)
    jpeg_scans = _jpeg_scans(data) if image_format == "JPEG" else None

    _load(image, image_format)
    if image_format == "PNG" and not _png_reaches_iend(data):
        # Pillow stops reading after the last pixel data it needs, so a PNG cut between its
        # image data and its end chunk would otherwise decode.
        raise InvalidInput("the PNG image could not be decoded: the data is truncated")
    if jpeg_scans is not None:
        probe = _parse_header(image_class, _with_jpeg_probe(data, jpeg_scans), image_format)
        _load(probe, image_format)
        if not _same_pixels(image, probe):
            raise InvalidInput(
                "the JPEG image could not be decoded: its coded data ends before its last "
                "pixel (truncated or corrupt)"
            )
    return image


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header without decoding a pixel;
    InvalidInput as `decode_image` raises it for what the header already shows."""
    return _open(data, max_pixels)[0].size


def _open(data: bytes, max_pixels: int) -> tuple[ImageFile.ImageFile, str]:
    """The image with its header parsed and its size checked, nothing decoded, and its format."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    image_format = _sniff_format(data)
    if image_format is None:
        raise InvalidInput(_unsupported_format_message(data))
    check_header, image_class = _DECODERS[image_format]
    header_size = check_header(data)
    if header_size is not None:
        _check_dimensions(header_size, max_pixels)
    image = _parse_header(image_class, data, image_format)
    _check_dimensions(image.size, max_pixels)
    return image, image_format


def to_tensor(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """One image as the model's float32 input without the batch axis: [3, H, W] or [H, W, 3].

    The image is converted to 8-bit RGB (grayscale and palette are expanded, alpha is dropped,
    16-bit grayscale v becomes round(v / 257), in integer arithmetic), resized as a whole to
    ``prep.size`` if it has another size, reordered to ``prep.channel_order``, then scaled and
    normalised per channel.
    """
    rgb = _to_rgb(image)
    if prep.size is not None:
        height, width = prep.size
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), RESIZE_FILTERS[prep.resize])
    pixels = np.asarray(rgb, dtype=np.float32)
    if prep.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    tensor = (pixels * np.float32(prep.scale) - mean) / std
    if prep.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor, dtype=np.float32)


# --- decoding helpers ---------------------------------------------------------------------

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_BAND_PIXELS = 1 << 18  # pixels per band where whole images are copied a band of rows at a time


def _parse_header(
    image_class: type[ImageFile.ImageFile], data: bytes, image_format: str
) -> ImageFile.ImageFile:
    try:
        # The plugin class parses the header only; Image.open would also run Pillow's own
        # size check, which warns or raises on its own terms.
        return image_class(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the {image_format} image is too large to decode") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"the data is not a readable {image_format} image") from exc


def _load(image: ImageFile.ImageFile, image_format: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the {image_format} image is too large to decode") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(
            f"the {image_format} image could not be decoded: the data is truncated or corrupt"
        ) from exc


def _sniff_format(data: bytes) -> str | None:
    """The accepted format the leading bytes announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _unsupported_format_message(data: bytes) -> str:
    """Names the format when one of Pillow's other plugins recognises the leading bytes."""
    accepted = "only JPEG, PNG, WebP and BMP images are accepted"
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            recognised = accept is not None and accept(prefix)
        except Exception:  # a plugin's check on a short or odd prefix; it is only a name
            recognised = False
        if recognised and not isinstance(recognised, str):
            return f"the image is {name}; {accepted}"
    return f"the data is not an image in a known format; {accepted}"


def _no_header_size(data: bytes) -> tuple[int, int] | None:
    """For formats whose Pillow plugin allocates nothing before load()."""
    return None


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP header, if it can be read; libwebp allocates the whole canvas
    when Pillow parses the header, so the size has to be checked before Pillow sees the data."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _check_dimensions(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"the image is {width}x{height} pixels; both sides must be positive")
    if width * height > max_pixels:
        raise InvalidInput(
            f"the image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels"
        )


def _png_reaches_iend(data: bytes) -> bool:
    """Whether the PNG's chunks are complete up to and including the IEND chunk."""
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, chunk_type = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length  # length, type, data, CRC
        if end > len(data):
            return False
        if chunk_type == b"IEND":
            return True
        position = end
    return False


# --- JPEG structure -------------------------------------------------------------------------

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC are not frames
_JPEG_ARITHMETIC_SOF = frozenset(range(0xC9, 0xD0)) - {0xCC}
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_JPEG_EOI, _JPEG_SOS, _JPEG_DRI = 0xD9, 0xDA, 0xDD
_JPEG_NO_LENGTH = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7

# Outside a scan: 0xFF and a code other than 0x00 and 0xFF (extra 0xFF before it are fill).
# Bytes in between that are not a marker are skipped, as libjpeg skips them.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
# The marker that ends a scan's coded data: 0xFF 0x00 is a stuffed data byte and RST0-7 belong
# to the scan.
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_RESTART = re.compile(rb"\xff[\xd0-\xd7]")

# Written after each scan's coded data for the second decode: no 0xFF, so never a marker, and
# irregular, so a decoder that reads it as coded data decodes other coefficients than the grey
# padding it substitutes when the data stops.
_JPEG_PROBE = bytes(byte % 255 for byte in hashlib.shake_128(b"jpeg scan probe").digest(256))


@dataclass(frozen=True)
class _JpegFrame:
    marker: int  # SOF0..SOF15: the coding process
    width: int
    height: int
    sampling: dict[int, tuple[int, int]]  # component id: (horizontal, vertical) factors


@dataclass(frozen=True)
class _JpegScan:
    components: tuple[int, ...]
    spectral_start: int  # Ss: 0 for sequential scans and progressive DC scans
    approximation_high: int  # Ah: 0 for a progressive scan's first pass over its coefficients
    restart_interval: int  # MCUs between restart markers, 0 for none
    data_start: int
    data_end: int


def _jpeg_segments(data: bytes) -> Iterator[tuple[int | None, int, int]]:
    """(marker, start, end) of each segment after SOI up to and including EOI, where start..end
    is the segment's payload (after its length), and (None, start, end) for the coded data
    after each SOS segment; raises InvalidInput where the data ends inside a segment or scan."""
    position = 2
    while True:
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            raise _jpeg_truncated("it ends before its end-of-image marker")
        marker, position = found.group(1)[0], found.end()
        if marker == _JPEG_EOI:
            yield marker, position, position
            return
        if marker in _JPEG_NO_LENGTH:
            continue
        if position + 2 > len(data):
            raise _jpeg_truncated("it ends inside a marker segment")
        length = int.from_bytes(data[position : position + 2], "big")
        end = position + length
        if length < 2 or end > len(data):
            raise _jpeg_truncated("a marker segment runs past the end of the data")
        yield marker, position + 2, end
        position = end
        if marker == _JPEG_SOS:
            scan_end = _JPEG_SCAN_END.search(data, position)
            if scan_end is None:
                raise _jpeg_truncated("a scan's coded data has no end marker")
            data_end = scan_end.start()
            while data_end > position and data[data_end - 1] == 0xFF:
                data_end -= 1  # fill bytes belong to the marker
            yield None, position, data_end
            position = scan_end.start()


def _jpeg_truncated(detail: str) -> InvalidInput:
    return InvalidInput(f"the JPEG image could not be decoded: the data is truncated ({detail})")


def _jpeg_corrupt(detail: str) -> InvalidInput:
    return InvalidInput(f"the JPEG image could not be decoded: {detail}")


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG's frame header, or None where there is none to read (the
    whole structure is checked later, after Pillow has parsed the header)."""
    try:
        for marker, start, end in _jpeg_segments(data):
            if marker in _JPEG_SOF and end - start >= 5:
                height, width = struct.unpack_from(">HH", data, start + 1)
                return width, height
    except InvalidInput:
        return None
    return None


def _jpeg_scans(data: bytes) -> list[_JpegScan]:
    """The scans of a JPEG whose marker structure is whole; raises InvalidInput where it is not,
    or where a scan cannot be complete for the frame it belongs to:

    - a Huffman-coded scan that must code every 8x8 block of its components holds too few bits
      for them. The bound is exact, not a guess, and holds for a solid-colour image too: in a
      sequential scan each block takes a DC code and at least one AC code (EOB), each at least
      one bit long, and in a progressive DC scan a DC code or a correction bit. Arithmetic
      coding can spend less than a bit on a block, so those scans are not bounded.
    - a scan with a restart interval holds fewer restart markers than its MCUs call for.
    - a component has no scan (no first DC scan, in a progressive JPEG): the checks libjpeg's
      encoder makes. A progression may stop before the last bit of every coefficient, so a
      progressive JPEG cut exactly between two scans is a valid, less detailed image.
    """
    frame: _JpegFrame | None = None
    scans: list[_JpegScan] = []
    restart_interval = 0
    header: tuple[tuple[int, ...], int, int] | None = None
    for marker, start, end in _jpeg_segments(data):
        if marker in _JPEG_SOF and frame is None:
            frame = _jpeg_frame(data[start:end], marker)
        elif marker == _JPEG_DRI and end - start >= 2:
            restart_interval = int.from_bytes(data[start : start + 2], "big")
        elif marker == _JPEG_SOS:
            header = _jpeg_scan_header(data[start:end])
        elif marker is None and header is not None:
            scans.append(_JpegScan(*header, restart_interval, start, end))
            header = None
    if frame is None or not scans:
        raise _jpeg_corrupt("it has no frame header or no scan")
    progressive = frame.marker in _JPEG_PROGRESSIVE_SOF
    covered: set[int] = set()
    blocks = _jpeg_blocks(frame)
    for scan in scans:
        _check_jpeg_scan(data, frame, blocks, scan)
        if not progressive or (scan.spectral_start == 0 and scan.approximation_high == 0):
            covered.update(scan.components)
    missing = sorted(set(frame.sampling) - covered)
    if missing:
        raise _jpeg_truncated(
            f"component {missing[0]} has no {'DC scan' if progressive else 'scan'}"
        )
    return scans


def _check_jpeg_scan(
    data: bytes, frame: _JpegFrame, blocks: dict[int, int], scan: _JpegScan
) -> None:
    progressive = frame.marker in _JPEG_PROGRESSIVE_SOF
    size = scan.data_end - scan.data_start
    every_block = not progressive or scan.spectral_start == 0
    if every_block and frame.marker not in _JPEG_ARITHMETIC_SOF:
        block_count = sum(blocks.get(component, 0) for component in scan.components)
        bits_per_block = 1 if progressive else 2
        if 8 * size < bits_per_block * block_count:
            raise _jpeg_truncated(
                f"a scan of {size} bytes cannot code the {block_count} 8x8 blocks of a "
                f"{frame.width}x{frame.height} image at {bits_per_block} bits or more each"
            )
    if scan.restart_interval and frame.marker not in _JPEG_LOSSLESS_SOF:
        if len(scan.components) == 1:  # a non-interleaved scan's MCU is one block
            mcus = blocks.get(scan.components[0], 0)
        else:
            max_h = max(h for h, _ in frame.sampling.values())
            max_v = max(v for _, v in frame.sampling.values())
            mcus = -(-frame.width // (8 * max_h)) * -(-frame.height // (8 * max_v))
        expected = -(-mcus // scan.restart_interval) - 1
        found = len(_JPEG_RESTART.findall(data, scan.data_start, scan.data_end))
        if found < expected:
            raise _jpeg_truncated(
                f"a scan holds {found} of the {expected} restart markers of its {mcus} MCUs"
            )


def _jpeg_frame(payload: bytes, marker: int) -> _JpegFrame:
    if len(payload) < 6 or len(payload) < 6 + 3 * payload[5]:
        raise _jpeg_corrupt("its frame header is corrupt")
    height, width = struct.unpack_from(">HH", payload, 1)
    sampling = {}
    for index in range(payload[5]):
        component, factors = payload[6 + 3 * index], payload[7 + 3 * index]
        sampling[component] = (factors >> 4, factors & 0x0F)
    if not sampling or any(h == 0 or v == 0 for h, v in sampling.values()):
        raise _jpeg_corrupt("its frame header is corrupt")
    return _JpegFrame(marker, width, height, sampling)


def _jpeg_scan_header(payload: bytes) -> tuple[tuple[int, ...], int, int]:
    """(component ids, Ss, Ah) of a scan header."""
    if len(payload) < 1 or len(payload) < 4 + 2 * payload[0]:
        raise _jpeg_corrupt("a scan header is corrupt")
    count = payload[0]
    components = tuple(payload[1 + 2 * index] for index in range(count))
    return components, payload[1 + 2 * count], payload[3 + 2 * count] >> 4


def _jpeg_blocks(frame: _JpegFrame) -> dict[int, int]:
    """The 8x8 blocks of each component (without the padding an interleaved scan adds)."""
    max_h = max(h for h, _ in frame.sampling.values())
    max_v = max(v for _, v in frame.sampling.values())
    blocks = {}
    for component, (h, v) in frame.sampling.items():
        samples_wide = -(-frame.width * h // max_h)
        samples_high = -(-frame.height * v // max_v)
        blocks[component] = -(-samples_wide // 8) * -(-samples_high // 8)
    return blocks


def _with_jpeg_probe(data: bytes, scans: list[_JpegScan]) -> bytes:
    """The JPEG with the probe bytes after each scan's coded data, where libjpeg skips them
    (with a warning Pillow discards) unless the scan is cut short and reads them as data."""
    pieces = []
    previous = 0
    for scan in scans:
        pieces += [data[previous : scan.data_end], _JPEG_PROBE]
        previous = scan.data_end
    pieces.append(data[previous:])
    return b"".join(pieces)


def _same_pixels(first: Image.Image, second: Image.Image) -> bool:
    """Whether two decoded images are equal, compared a band of rows at a time so that the
    difference image stays small."""
    if first.mode != second.mode or first.size != second.size:
        return False
    width, height = first.size
    if width * height <= _BAND_PIXELS:  # one band: no copies needed
        return ImageChops.difference(first, second).getbbox() is None
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        box = (0, top, width, min(top + rows, height))
        if ImageChops.difference(first.crop(box), second.crop(box)).getbbox() is not None:
            return False
    return True


_DECODERS: dict[
    str, tuple[Callable[[bytes], tuple[int, int] | None], type[ImageFile.ImageFile]]
] = {
    "JPEG": (_jpeg_frame_size, JpegImagePlugin.JpegImageFile),
    "PNG": (_no_header_size, PngImagePlugin.PngImageFile),
    "WEBP": (_webp_canvas_size, WebPImagePlugin.WebPImageFile),
    "BMP": (_no_header_size, BmpImagePlugin.BmpImageFile),
}


# --- conversion to RGB --------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _sixteen_bit_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale (I;16, I;16L, I;16B, I;16N, or I holding 0..65535, as some Pillow
    versions give such PNGs; values outside are clipped) as 8-bit L, each value v becoming
    round(v / 257), computed exactly in integers as (v + 128) // 257 (no v lies on a half).

    Pillow's own convert clips at 255 instead of scaling. The arithmetic is done on bands of rows
    in uint32 (v + 128 needs 17 bits), so beside the 8-bit result only a few MB are allocated.

    16-bit RGB, RGBA and gray+alpha PNGs never get here: Pillow's decoder already stores them as
    8-bit RGB or RGBA, keeping the high byte (v >> 8, which is round(v / 257) or one less).
    """
    width, height = image.size
    result = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = np.asarray(image.crop((0, top, width, bottom)))
        if image.mode == "I":
            band = np.clip(band, 0, 65535)
        wide = band.astype(np.uint32)
        wide += 128
        wide //= 257
        result[top:bottom] = wide
    return Image.fromarray(result)


# --- config parsing helpers ---------------------------------------------------------------


def _one_of(key: str, value: object, choices: Any) -> str:
    return f"'{key}' must be one of {', '.join(choices)}; got {value!r}"


def _parse_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"'{key}' must be finite, got {value!r}")
    return number


def _parse_triple(value: object, key: str) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"'{key}' must be a list of 3 numbers (one per channel), got {value!r}")
    first, second, third = (_parse_number(item, key) for item in value)
    return first, second, third


def _parse_size(value: object, key: str) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(side, bool) or not isinstance(side, int) or side <= 0 for side in value)
    ):
        raise ValueError(f"'{key}' must be [height, width], two positive integers; got {value!r}")
    height, width = value
    return height, width
