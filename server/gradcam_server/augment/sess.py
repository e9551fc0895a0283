"""SESS inside the graph: Grad-CAM of patches slid over the image at several scales, all patches
run as one batch, weighted, pasted back and fused.

SESS, Saliency Enhancing with Scaling and Sliding (Tursun et al., 2022), as pytorch-grad-cam
1.5.7's `SESS` computes it with Grad-CAM as the base method, no pre-filtering, theta 0 and the
mean pooling: the image is resized so that its shorter side is each of the scales s_i = w +
i round(2 w / 7), i < `SESS_SCALES` (w the shorter side of the model's input, torchvision's
resize rule for the longer side); a window of the model's input size slides over each resized
image with a stride of its own size, the windows crossing the right or bottom border shifted
back inside (`window_starts`). The patches (`patches`; the first is the image itself) are
tiled along the batch in front of the network (`smoothing.tile_transforms`), so the network and
its backward run once on all of them.

Each patch p gets its Grad-CAM map m_p (the shared tail: [0, 1] at the input's size) and its
score s_p, the softmax probability of the image's class on the patch; w_p = s_p / max_p s_p.
w_p m_p is pasted at its corner into a zero canvas of its scale's size and resized bilinearly
back to the input's size (half-pixel centres, as cv2.resize's INTER_LINEAR); the fused map
averages, at each pixel, the pasted maps that are positive there (theta 0), is blurred by an
11 x 11 Gaussian of sigma 5 with reflected borders (cv2.GaussianBlur's default) and min-max
normalised.

Window: pytorch-grad-cam's default window is a square of the input's shorter side; the network
here takes only its fixed input size, so the window is the input's H x W (the same for a square
input). With the default 4 scales, each image makes 1 + 4 + 4 + 4 = 13 patches, at any input
size (the windows scale with the input); pytorch-grad-cam's default of 12 scales makes 122.
"""

from __future__ import annotations

import numpy as np
import onnx

from .cam import normalize
from .errors import AugmentError
from .graph import GraphBuilder
from .group import gaussian_blur
from .smoothing import IDENTITY_TRANSFORM, Patch, Transform
from .targets import spatial_axes

SESS_SCALES = 4  # 13 patches; pytorch-grad-cam's default is 12 (122 patches)
SCALE_STEP_RATIO = 2.0 / 7.0  # pytorch-grad-cam's and the paper's
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


def window_starts(length: int, window: int) -> list[int]:
    """Where the windows of one axis start (stride = window), as pytorch-grad-cam's
    `window_starts`: a window crossing the end is shifted back inside."""
    starts = []
    for start in range(0, length, window):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def scaled_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The size torchvision's resize(image, shorter) gives an H x W image."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def patches(height: int, width: int, scales: int = SESS_SCALES) -> tuple[Transform, ...]:
    """The patches of an H x W input, scale by scale, windows row by row; the first is the
    image itself (`smoothing.IDENTITY_TRANSFORM`)."""
    shorter = min(height, width)
    step = int(round(shorter * SCALE_STEP_RATIO))
    found: list[Transform] = []
    for index in range(scales):
        size = scaled_size(height, width, shorter + step * index)
        for y in window_starts(size[0], height):
            for x in window_starts(size[1], width):
                found.append(IDENTITY_TRANSFORM if (size, (y, x)) == ((height, width), (0, 0))
                             else Patch(size, (y, x)))
    if found[0] != IDENTITY_TRANSFORM:
        raise AugmentError(f"sess: the first patch of a {height}x{width} input is not the image")
    return tuple(found)


def input_size(image: onnx.ValueInfoProto) -> tuple[int, int]:
    """The image input's static H x W; refused when either is not fixed."""
    dims = image.type.tensor_type.shape.dim
    size = tuple(dims[axis].dim_value or dims[axis].dim_param or "?"
                 for axis in spatial_axes(image))
    if not all(isinstance(d, int) and d > 0 for d in size):
        raise AugmentError(
            f"sess slides windows of the model's input size over the image: the input "
            f"{image.name!r} needs a fixed height and width (it has {size[0]} x {size[1]})"
        )
    return size


def sess_fusion(
    b: GraphBuilder, maps: str, probabilities: str, image: onnx.ValueInfoProto,
    transforms: tuple[Transform, ...],
) -> str:
    """The SESS heatmap [N, H, W] from the patches' maps [P*N, H, W] (patch-major rows, in
    the order of `transforms`) and their class probabilities [P*N]."""
    height, width = input_size(image)
    count = len(transforms)
    batch = b.shape_slice(image.name, 0, 1)
    grouped = b.op("Reshape", [maps, b.op("Concat", [b.ints([count]), batch,
                                                     b.ints([height, width])], axis=0)])
    scores = b.op("Reshape", [b.op("Relu", [probabilities]),
                              b.op("Concat", [b.ints([count]), batch], axis=0)])  # [P, N]
    top = b.reduce("ReduceMax", scores, [0], keepdims=True)
    weights = b.op("Where", [b.op("Greater", [top, b.const(0.0)]),
                             b.op("Div", [scores, b.op("Max", [top, b.const(1e-30)])]),
                             b.const(1.0)])
    weighted = b.op("Mul", [grouped, b.unsqueeze(weights, [2, 3])])  # [P, N, H, W]
    pasted = []
    by_size: dict[tuple[int, int], list[tuple[int, tuple[int, int]]]] = {}
    for index, transform in enumerate(transforms):
        size, corner = ((height, width), (0, 0)) if transform == IDENTITY_TRANSFORM else (
            transform.size, transform.corner)
        by_size.setdefault(size, []).append((index, corner))
    for size, placed in by_size.items():
        canvases = []
        for index, (y, x) in placed:
            one = b.op("Gather", [weighted, b.const(index, np.int64)], axis=0)  # [N, H, W]
            pads = [0, y, x, 0, size[0] - y - height, size[1] - x - width]
            canvases.append(b.op("Pad", [one, b.ints(pads)]) if any(pads) else one)
        stacked = b.op("Concat", [b.unsqueeze(c, [0]) for c in canvases], axis=0)
        if size != (height, width):  # [k, N, H', W'] back to the input's size
            sizes = b.op("Concat", [b.shape_slice(stacked, 0, 2), b.ints([height, width])],
                         axis=0)
            stacked = b.op("Resize", [stacked, "", "", sizes], mode="linear",
                           coordinate_transformation_mode="half_pixel")
        pasted.append(stacked)
    pasted = b.op("Concat", pasted, axis=0) if len(pasted) > 1 else pasted[0]
    total = b.reduce("ReduceSum", pasted, [0], keepdims=False)  # [N, H, W]
    counts = b.reduce("ReduceSum", b.op("Cast", [b.op("Greater", [pasted, b.const(0.0)])],
                                        to=1), [0], keepdims=False)
    covered = b.op("Greater", [counts, b.const(0.0)])
    mean = b.op("Where", [covered, b.op("Div", [total, b.op("Max", [counts, b.const(1.0)])]),
                          b.const(0.0)])
    blurred = gaussian_blur(b, b.unsqueeze(mean, [1]), BLUR_SIZE, BLUR_SIGMA)
    return b.squeeze(normalize(b, blurred), [1])
