"""Group-CAM inside the graph: gradient-weighted channel groups as masks that keep parts of the
image sharp over a blurred copy, scored by the network, in an ONNX Loop over the images.

Group-CAM (Zhang et al., 2021), as the authors' released code computes it: the Grad-CAM weighted
channels alpha_k A^k are split into 32 groups of consecutive channels (as torch.chunk splits);
each group's sum, ReLU'd, is zeroed below its 70th percentile, upsampled bilinearly to the input
and min-max normalised into a mask M_g (a flat group is skipped); with x~ the image blurred by a
51 x 51 Gaussian (sigma 50, reflected borders), the group's score is
s_g = softmax(f(x M_g + x~ (1 - M_g)))_c - softmax(f(x~))_c, and the map is
ReLU(sum_g s_g M_g), normalised to [0, 1].

Each Loop iteration runs the cloned network once, on the blurred image and its 32 blends.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from .backward import path_nodes
from .errors import AugmentError
from .graph import GraphBuilder, LoopBody

GROUPS = 32
PERCENTILE = 70.0
BLUR_SIZE = 51
BLUR_SIGMA = 50.0


def group_cam(
    b: GraphBuilder,
    activations: str,
    gradients: str,
    image: str,
    score_output: str,
    resolved_class: str,
) -> str:
    """Group-CAM's raw map at the input's size, [N, 1, H, W]."""
    shape = b.static_shape(activations)
    channels = shape[1] if shape else None
    if not isinstance(channels, int) or not all(isinstance(d, int) for d in shape[2:]):
        raise AugmentError("groupcam needs the target layer's channels and size to be static")
    chunk = math.ceil(channels / GROUPS)
    groups = math.ceil(channels / chunk)
    positions = shape[2] * shape[3]

    weights = b.reduce("ReduceMean", gradients, [2, 3], keepdims=True)
    weighted = b.op("Mul", [weights, activations])
    padding = groups * chunk - channels  # torch.chunk's last group may be shorter
    if padding:
        weighted = b.op("Pad", [weighted, b.ints([0, 0, 0, 0, 0, padding, 0, 0])])
    split = b.op("Reshape", [weighted, b.ints([0, groups, chunk, shape[2], shape[3]])])
    masks = b.op("Relu", [b.reduce("ReduceSum", split, [2], keepdims=False)])  # [N, G, u, v]

    flat = b.op("Reshape", [masks, b.ints([0, groups, positions])])
    ascending, _ = b.op_multi("TopK", [flat, b.ints([positions])], 2, axis=2, largest=0)
    position = PERCENTILE / 100 * (positions - 1)  # numpy's linear percentile
    low = b.op("Gather", [ascending, b.ints([math.floor(position)])], axis=2)
    high = b.op("Gather", [ascending, b.ints([math.ceil(position)])], axis=2)
    fraction = position - math.floor(position)
    threshold = b.op("Add", [low, b.op("Mul", [b.op("Sub", [high, low]), b.const(fraction)])])
    threshold = b.unsqueeze(threshold, [3])  # [N, G, 1, 1]
    kept = b.op("Where", [b.op("Greater", [masks, threshold]), masks, b.const(0.0)])

    size = b.op("Concat", [b.shape_slice(kept, 0, 2), b.shape_slice(image, 2)], axis=0)
    upsampled = b.op("Resize", [kept, "", "", size], mode="linear",
                     coordinate_transformation_mode="half_pixel")
    least = b.reduce("ReduceMin", upsampled, [2, 3], keepdims=True)
    span = b.op("Sub", [b.reduce("ReduceMax", upsampled, [2, 3], keepdims=True), least])
    varies = b.op("Greater", [span, b.const(0.0)])
    normalised = b.op("Div", [b.op("Sub", [upsampled, least]),
                              b.op("Where", [varies, span, b.const(1.0)])])
    normalised = b.op("Mul", [normalised, b.op("Cast", [varies], to=TensorProto.FLOAT)])

    blurred = _gaussian_blur(b, image)
    probabilities = _loop(b, image, blurred, normalised, score_output, resolved_class, groups)
    baseline = b.op("Slice", [probabilities, b.ints([0]), b.ints([1]), b.ints([1])])
    blends = b.op("Slice", [probabilities, b.ints([1]), b.ints([1 + groups]), b.ints([1])])
    gains = b.unsqueeze(b.op("Sub", [blends, baseline]), [2, 3])  # [N, G, 1, 1]
    return b.reduce("ReduceSum", b.op("Mul", [gains, normalised]), [1], keepdims=True)


def _gaussian_blur(b: GraphBuilder, image: str) -> str:
    """The separable 51 x 51 Gaussian blur (sigma 50) with reflected borders, per channel."""
    shape = b.static_shape(image)
    channels = shape[1] if shape else None
    if not isinstance(channels, int):
        raise AugmentError("groupcam needs the image's channel count to be static")
    offsets = np.arange(BLUR_SIZE) - (BLUR_SIZE - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    half = BLUR_SIZE // 2
    x = image
    for axis, kernel_shape in ((3, (1, BLUR_SIZE)), (2, (BLUR_SIZE, 1))):
        pads = [0, 0, 0, 0, 0, 0, 0, 0]
        pads[axis], pads[axis + 4] = half, half
        padded = b.op("Pad", [x, b.ints(pads)], mode="reflect")
        weight = b.const(np.tile(kernel.reshape(1, 1, *kernel_shape), (channels, 1, 1, 1)))
        x = b.op("Conv", [padded, weight], group=channels)
    return x


def _loop(
    b: GraphBuilder,
    image: str,
    blurred: str,
    masks: str,
    score_output: str,
    resolved_class: str,
    groups: int,
) -> str:
    """One iteration per image n: the softmax probability of its class for its blurred copy
    and its G blends; [N, 1 + G]."""
    forward = path_nodes(list(b.graph.node), image, score_output)
    body = LoopBody(b, "group")
    start = body.op("Reshape", [body.step, b.ints([1])])
    end = body.op("Add", [start, b.ints([1])])
    axis0 = b.ints([0])
    pixels = body.op("Slice", [image, start, end, axis0])  # [1, C, H, W]
    soft = body.op("Slice", [blurred, start, end, axis0])
    mask = body.op("Transpose", [body.op("Slice", [masks, start, end, axis0])],
                   perm=[1, 0, 2, 3])  # [G, 1, H, W]
    kept = body.op("Mul", [pixels, mask])  # [G, C, H, W]
    rest = body.op("Mul", [soft, body.op("Sub", [b.const(1.0), mask])])
    batch = body.op("Concat", [soft, body.op("Add", [kept, rest])], axis=0)  # [1 + G, C, H, W]

    renamed = {image: batch}
    body.clone(forward, renamed)
    probabilities = body.op("Softmax", [renamed[score_output]], axis=1)
    category = body.op("Gather", [resolved_class, start], axis=0)
    chosen = body.op("Reshape", [body.op("Gather", [probabilities, category], axis=1),
                                 b.ints([1 + groups])])
    count = b.squeeze(b.shape_slice(image, 0, 1), [0])
    return body.loop(count, chosen, b.elem_type(score_output), [1 + groups])
