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

Half precision: the masks, the blur and the blends are computed in float32 (from the image's
float32 cast) and the blends cast to the image's type where they meet the network; the
probabilities are computed in float32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .backward import path_nodes
from .cam import normalize
from .graph import GraphBuilder, LoopBody

GROUPS = 32
PERCENTILE = 70  # percent
BLUR_SIZE = 51
BLUR_SIGMA = 50.0
_TO_THE_END = 2**63 - 1  # a Slice end past any size


def group_cam(
    b: GraphBuilder,
    activations: str,
    gradients: str,
    image: str,
    score_output: str,
    resolved_class: str,
) -> str:
    """Group-CAM's raw map at the input's size, [N, 1, H, W].

    Every size (the layer's channels, hence the group count and size, its h x w, hence the
    percentile's position, and the image's) is read with Shape at run time, so exports whose
    shapes inference cannot follow (TF-style "same" padding, a dynamic batch) work as well."""
    channels = b.shape_slice(activations, 1, 2)  # [1]
    chunk = _ceil_div(b, channels, b.ints([GROUPS]))
    groups = _ceil_div(b, channels, chunk)  # torch.chunk may make fewer than GROUPS groups

    weights = b.reduce("ReduceMean", gradients, [2, 3], keepdims=True)
    weighted = b.op("Mul", [weights, activations])
    padding = b.op("Sub", [b.op("Mul", [groups, chunk]), channels])  # the last group's gap
    pads = b.op("Concat", [b.ints([0, 0, 0, 0, 0]), padding, b.ints([0, 0])], axis=0)
    weighted = b.op("Pad", [weighted, pads])
    split_shape = b.op("Concat", [b.shape_slice(weighted, 0, 1), groups, chunk,
                                  b.shape_slice(weighted, 2)], axis=0)
    split = b.op("Reshape", [weighted, split_shape])
    masks = b.op("Relu", [b.reduce("ReduceSum", split, [2], keepdims=False)])  # [N, G, u, v]

    flat = b.op("Reshape", [masks, b.ints([0, 0, -1])])  # [N, G, u v]
    positions = b.shape_slice(flat, 2, 3)
    ascending, _ = b.op_multi("TopK", [flat, positions], 2, axis=2, largest=0)
    low_index, high_index, fraction = _percentile_position(b, positions)
    low = b.op("Gather", [ascending, low_index], axis=2)
    high = b.op("Gather", [ascending, high_index], axis=2)
    threshold = b.op("Add", [low, b.op("Mul", [b.op("Sub", [high, low]), fraction])])
    threshold = b.unsqueeze(threshold, [3])  # [N, G, 1, 1]
    kept = b.op("Where", [b.op("Greater", [masks, threshold]), masks, b.const(0.0)])

    size = b.op("Concat", [b.shape_slice(kept, 0, 2), b.shape_slice(image, 2)], axis=0)
    upsampled = b.op("Resize", [kept, "", "", size], mode="linear",
                     coordinate_transformation_mode="half_pixel")
    normalised = normalize(b, upsampled, epsilon=0.0)  # exact; a flat group all zero

    blurred = gaussian_blur(b, b.computed(image))
    probabilities = _loop(b, image, blurred, normalised, score_output, resolved_class)
    baseline = b.op("Slice", [probabilities, b.ints([0]), b.ints([1]), b.ints([1])])
    blends = b.op("Slice", [probabilities, b.ints([1]), b.ints([_TO_THE_END]), b.ints([1])])
    gains = b.unsqueeze(b.op("Sub", [blends, baseline]), [2, 3])  # [N, G, 1, 1]
    return b.reduce("ReduceSum", b.op("Mul", [gains, normalised]), [1], keepdims=True)


def _ceil_div(b: GraphBuilder, numerator: str, denominator: str) -> str:
    """ceil(numerator / denominator) of positive INT64 tensors."""
    one = b.ints([1])
    return b.op("Div", [b.op("Sub", [b.op("Add", [numerator, denominator]), one]), denominator])


def _percentile_position(b: GraphBuilder, count: str) -> tuple[str, str, str]:
    """numpy's linear percentile of `count` (INT64 [1]) sorted values at PERCENTILE: the
    indices around position PERCENTILE / 100 * (count - 1) and the fraction between them,
    in integers, so the indices are exact."""
    scaled = b.op("Mul", [b.op("Sub", [count, b.ints([1])]), b.ints([PERCENTILE])])
    low = b.op("Div", [scaled, b.ints([100])])
    high = _ceil_div(b, scaled, b.ints([100]))
    remainder = b.op("Cast", [b.op("Mod", [scaled, b.ints([100])])], to=TensorProto.FLOAT)
    return low, high, b.op("Div", [remainder, b.const(100.0)])


def gaussian_blur(b: GraphBuilder, image: str, size: int = BLUR_SIZE,
                  sigma: float = BLUR_SIGMA) -> str:
    """The separable `size` x `size` Gaussian blur (sigma `sigma`; Group-CAM's 51 x 51,
    sigma 50 by default) with reflected borders (cv2's default BORDER_REFLECT_101), per
    channel: the channels folded into the batch, [N C, 1, H, W], so their count may be
    dynamic."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    half = size // 2
    x = b.op("Reshape", [image, b.ints([-1, 1, 0, 0])])
    for axis, kernel_shape in ((3, (1, size)), (2, (size, 1))):
        pads = [0, 0, 0, 0, 0, 0, 0, 0]
        pads[axis], pads[axis + 4] = half, half
        padded = b.op("Pad", [x, b.ints(pads)], mode="reflect")
        x = b.op("Conv", [padded, b.const(kernel.reshape(1, 1, *kernel_shape))])
    return b.op("Reshape", [x, b.shape(image)])


def _loop(
    b: GraphBuilder,
    image: str,
    blurred: str,
    masks: str,
    score_output: str,
    resolved_class: str,
) -> str:
    """One iteration per image n: the softmax probability of its class for its blurred copy
    and its G blends; [N, 1 + G]."""
    forward = path_nodes(list(b.graph.node), image, score_output)
    body = LoopBody(b, "group")
    start = body.op("Reshape", [body.step, b.ints([1])])
    end = body.op("Add", [start, b.ints([1])])
    axis0 = b.ints([0])
    pixels = body.op("Slice", [b.computed(image), start, end, axis0])  # [1, C, H, W]
    soft = body.op("Slice", [blurred, start, end, axis0])
    mask = body.op("Transpose", [body.op("Slice", [masks, start, end, axis0])],
                   perm=[1, 0, 2, 3])  # [G, 1, H, W]
    kept = body.op("Mul", [pixels, mask])  # [G, C, H, W]
    rest = body.op("Mul", [soft, body.op("Sub", [b.const(1.0), mask])])
    batch = body.op("Concat", [soft, body.op("Add", [kept, rest])], axis=0)  # [1 + G, C, H, W]

    renamed = {image: body.cast_like(batch, image)}
    body.clone(forward, renamed)
    probabilities = body.op("Softmax", [body.computed(renamed[score_output], score_output)],
                            axis=1)
    category = body.op("Gather", [resolved_class, start], axis=0)
    chosen = body.op("Reshape", [body.op("Gather", [probabilities, category], axis=1),
                                 b.ints([-1])])
    count = b.squeeze(b.shape_slice(image, 0, 1), [0])
    return body.loop(count, chosen, b.compute_type(score_output), [None])
