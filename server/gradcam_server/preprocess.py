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
without allocating it; truncated or corrupt data is refused rather than padded. Pixels are taken
as stored: EXIF orientation is not applied, so the heatmap lines up with the pixels the client
sent.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

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
    larger than ``max_pixels`` (read from the header, before anything is decoded), or truncated
    or corrupt. Pillow's own decompression-bomb limit is not consulted: this function's limit
    replaces it.
    """
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    image_format = _sniff_format(data)
    if image_format is None:
        raise InvalidInput(_unsupported_format_message(data))
    check_header, image_class = _DECODERS[image_format]

    header_size = check_header(data)
    if header_size is not None:
        _check_dimensions(header_size, max_pixels)
    try:
        # The plugin class parses the header only; Image.open would also run Pillow's own
        # size check, which warns or raises on its own terms.
        image = image_class(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the {image_format} image is too large to decode") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"the data is not a readable {image_format} image") from exc
    _check_dimensions(image.size, max_pixels)

    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the {image_format} image is too large to decode") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(
            f"the {image_format} image could not be decoded: the data is truncated or corrupt"
        ) from exc
    if image_format == "PNG" and not _png_reaches_iend(data):
        # Pillow stops reading after the last pixel data it needs, so a PNG cut between its
        # image data and its end chunk would otherwise decode.
        raise InvalidInput("the PNG image could not be decoded: the data is truncated")
    return image


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


_DECODERS: dict[
    str, tuple[Callable[[bytes], tuple[int, int] | None], type[ImageFile.ImageFile]]
] = {
    "JPEG": (_no_header_size, JpegImagePlugin.JpegImageFile),
    "PNG": (_no_header_size, PngImagePlugin.PngImageFile),
    "WEBP": (_webp_canvas_size, WebPImagePlugin.WebPImageFile),
    "BMP": (_no_header_size, BmpImagePlugin.BmpImageFile),
}


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
