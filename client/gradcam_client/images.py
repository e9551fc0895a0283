"""Images as the typed API carries them: what `explain` takes, one at a time or as a list, made
into ``pb.Image`` messages, each with the `ImageSource` its overlay is later drawn on.

* a path (``str`` or ``os.PathLike``) or the bytes of an encoded JPEG, PNG, WebP or BMP file:
  sent as they are;
* a PIL image, or a ``uint8`` array [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4]: sent as a
  lossless PNG of exactly those pixels, preprocessed by the server as the model's config says;
* a floating-point array [C, H, W]: one tensor already preprocessed as the graph expects, sent
  as little-endian float32; a 4-D float array [N, C, H, W] is N of them.

A list, a tuple or a 4-D array is "many" (`is_many`: `explain` then gives a list). Refusals
are `InvalidInputError` (a ValueError), TypeError for something that is not an image, and
FileNotFoundError for a missing path; nothing is sent anywhere from here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from gradcam_proto import gradcam_pb2 as pb

from .errors import InvalidInputError

ImageInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""One image: a path, encoded bytes, a PIL image, a uint8 image array or a float tensor."""

_KEEP_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # sent as they are; others as RGB


class ImageSource:
    """What an explanation was computed from, kept to draw its overlay (decoded lazily), and
    the file name of a path."""

    def __init__(
        self,
        encoded: bytes | None = None,
        picture: Image.Image | None = None,
        name: str | None = None,
    ) -> None:
        self._encoded = encoded
        self._picture = picture
        self.name = name

    def picture(self) -> Image.Image:
        """The image as RGB, decoded on first use."""
        if self._picture is None:
            with Image.open(io.BytesIO(self._encoded or b"")) as opened:
                self._picture = opened.convert("RGB")
        elif self._picture.mode != "RGB":
            self._picture = self._picture.convert("RGB")
        return self._picture


def is_many(images: Any) -> bool:
    """Whether `images` is several (a list, a tuple or a 4-D batch): `explain` gives a list."""
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return isinstance(images, (list, tuple))


def encode_images(images: Any) -> list[tuple[pb.Image, ImageSource | None]]:
    """Messages for one input or many, each with what its overlay is drawn on."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if not np.issubdtype(images.dtype, np.floating):
            raise InvalidInputError(
                f"a 4-D array is a batch of preprocessed tensors and must be floating point, "
                f"got {images.dtype}"
            )
        return [_tensor(tensor) for tensor in images]
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InvalidInputError("no image given")
    encoded = []
    for item in items:
        if isinstance(item, np.ndarray) and item.ndim == 4:
            raise InvalidInputError("a list item must be one image; pass a 4-D batch on its own")
        encoded.append(_encode_one(item))
    return encoded


def _encode_one(image: Any) -> tuple[pb.Image, ImageSource | None]:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()  # FileNotFoundError names the path
        return pb.Image(encoded=data), ImageSource(encoded=data, name=path.name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return pb.Image(encoded=data), ImageSource(encoded=data)
    if isinstance(image, Image.Image):
        return pb.Image(encoded=_png(image)), ImageSource(picture=image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            picture = _picture_of(image)
            return pb.Image(encoded=_png(picture)), ImageSource(picture=picture)
        if np.issubdtype(image.dtype, np.floating):
            return _tensor(image)
        raise InvalidInputError(
            f"an array must be a uint8 image or a floating-point tensor, got {image.dtype}"
        )
    raise TypeError(
        "an image must be a path, bytes, a PIL image or a numpy array, "
        f"got {type(image).__name__}"
    )


def _tensor(tensor: np.ndarray) -> tuple[pb.Image, None]:
    if tensor.ndim != 3:
        raise InvalidInputError(
            f"a preprocessed tensor must be [C, H, W] (or [N, C, H, W]), got shape {tensor.shape}"
        )
    data = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    return pb.Image(tensor=pb.Tensor(shape=list(tensor.shape), data=data)), None


def _picture_of(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels), mode="L")
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        mode = "RGB" if pixels.shape[2] == 3 else "RGBA"
        return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
    raise InvalidInputError(
        f"a uint8 image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {pixels.shape}; "
        "a preprocessed tensor must be floating point"
    )


def _png(picture: Image.Image) -> bytes:
    """Lossless and quick: what the server decodes is exactly these pixels."""
    if picture.mode not in _KEEP_MODES:
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
