"""The Sobel baseline as ONNX ops: the edges of the photo itself, which a map that only follows
edges cannot beat (pytorch-grad-cam's `sobel_cam`, on the same 8-bit RGB photo).

The graph sees the normalised image x = (pixel * scale - mean) / std (per channel, in the
model's channel order), not the photo: the pixels are recovered first, pixel = (x std + mean)
/ scale, with the model's own preprocessing (`PixelNormalisation`; the server passes its
config.json's, the default is the server's default, ImageNet's). That is what makes the map
pytorch-grad-cam's and not one that depends on the normalisation: its cv2 code saturates each
|gradient| at 255 (8-bit), which on photos clips 1-6 % of the pixels and moves the map's
correlation with the unclipped one down to 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .cam import normalize
from .errors import AugmentError
from .graph import GraphBuilder

GRAY_WEIGHTS_RGB = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY (ITU-R BT.601)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))  # cv2.Sobel, ksize 3, dx
PIXEL_MAX = 255.0  # cv2.convertScaleAbs saturates |gradient| to 8 bits


@dataclass(frozen=True)
class PixelNormalisation:
    """How the model's image input is made from 8-bit pixels p (0-255): x = (p * scale - mean)
    / std per channel, the channels in `channel_order` ("RGB" or "BGR"); the server's
    `preprocess.Preprocessing` fields of the same names."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise AugmentError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0 or self.scale <= 0:
            raise AugmentError("the pixel normalisation needs three means, three positive "
                               "deviations and a positive scale")


IMAGENET_PIXELS = PixelNormalisation()


def sobel_heatmap(
    b: GraphBuilder, image: onnx.ValueInfoProto, image_hw: tuple[int, int],
    pixels: PixelNormalisation,
) -> str:
    """The heatmap [N, H, W] of `image` (a 3-channel input, NCHW or NHWC as `image_hw` says):
    its pixels recovered, grayscale g = 0.299 R + 0.587 G + 0.114 B, the 3 x 3 Sobel
    derivatives g_x and g_y with reflected borders (cv2's default, BORDER_REFLECT_101),
    M = (min(|g_x|, 255) + min(|g_y|, 255)) / 2, min-max normalised. cv2's roundings to 8 bits
    (the gray image, the saturated magnitudes, their mean) are not made: they move the map by
    less than its 8-bit steps."""
    x = b.computed(image.name)
    if image_hw == (1, 2):
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    channels = (b.static_shape(x) or (None, None))[1]
    if channels != 3 and isinstance(channels, int):
        raise AugmentError(f"sobel needs a 3-channel (RGB or BGR) image input; "
                           f"{image.name!r} has {channels} channels")
    per_channel = (1, 3, 1, 1)
    photo = b.op("Div", [
        b.op("Add", [b.op("Mul", [x, b.const(np.reshape(pixels.std, per_channel))]),
                     b.const(np.reshape(pixels.mean, per_channel))]),
        b.const(pixels.scale),
    ])
    weights = GRAY_WEIGHTS_RGB if pixels.channel_order == "RGB" else GRAY_WEIGHTS_RGB[::-1]
    gray = b.reduce("ReduceSum", b.op("Mul", [photo, b.const(np.reshape(weights, per_channel))]),
                    [1], keepdims=True)
    padded = b.op("Pad", [gray, b.ints([0, 0, 1, 1, 0, 0, 1, 1])], mode="reflect")
    kernels = np.stack([np.asarray(SOBEL_X), np.asarray(SOBEL_X).T])[:, None]  # [2, 1, 3, 3]
    derivatives = b.op("Conv", [padded, b.const(kernels)])  # [N, 2, H, W]: g_x, g_y
    saturated = b.op("Min", [b.op("Abs", [derivatives]), b.const(PIXEL_MAX)])
    magnitude = b.reduce("ReduceMean", saturated, [1], keepdims=True)
    return b.squeeze(normalize(b, magnitude), [1])
