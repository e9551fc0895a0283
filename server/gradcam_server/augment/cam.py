"""The CAM tail appended as ONNX ops: channel weights, weighted sum, ReLU, resize, normalise.

Grad-CAM (Selvaraju et al., ICCV 2017): with A^k the target layer's feature maps and y^c the
score, the channel weights are alpha_k = mean over (i, j) of dy^c / dA^k_ij, and the map is
ReLU(sum_k alpha_k A^k). It is resized bilinearly (half-pixel centres, as cv2 and torch's
align_corners=False) to the input's H x W and min-max normalised per image with a pinned epsilon,
(m - min) / (max - min + 1e-7), so each map spans [0, 1] unless the map is flat (all zero).
"""

from __future__ import annotations

from .graph import GraphBuilder

NORMALIZE_EPSILON = 1e-7


def gradcam_weights(b: GraphBuilder, gradients: str) -> str:
    """alpha_k = mean of the gradients over the spatial axes: [N, C, 1, 1]."""
    return b.reduce("ReduceMean", gradients, [2, 3], keepdims=True)


def cam_heatmap(
    b: GraphBuilder, activations: str, weights: str, image: str, image_hw: tuple[int, int]
) -> str:
    """ReLU(sum_k weights_k A^k), resized to `image`'s H x W and normalised: [N, H, W]."""
    weighted = b.reduce("ReduceSum", b.op("Mul", [weights, activations]), [1], keepdims=True)
    cam = b.op("Relu", [weighted])
    image_shape = b.shape(image)
    image_size = b.op("Gather", [image_shape, b.ints(list(image_hw))], axis=0)
    sizes = b.op("Concat", [b.shape_slice(cam, 0, 2), image_size], axis=0)
    resized = b.op(
        "Resize",
        [cam, "", "", sizes],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    low = b.reduce("ReduceMin", resized, [2, 3], keepdims=True)
    shifted = b.op("Sub", [resized, low])
    high = b.reduce("ReduceMax", shifted, [2, 3], keepdims=True)
    normalized = b.op("Div", [shifted, b.op("Add", [high, b.const(NORMALIZE_EPSILON)])])
    return b.squeeze(normalized, [1])
