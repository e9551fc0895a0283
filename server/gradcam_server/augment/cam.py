"""The CAM math as ONNX ops: the channel-weight methods' contributions (which methods.py's
classes build on), the principal projection and the shared tail.

Notation: A^k is channel k of the target layer's feature map [N, C, h, w], G^k = dy^c / dA^k the
gradient of the explained score. Each method turns (A, G) into per-channel contributions
[N, C, h, w], most as w_k A^k with channel weights w_k; the raw map M [N, 1, h, w] is their sum
over channels, or, with ``eigen_smooth`` (and always for the Eigen methods), their projection on
their first principal component. The tail is shared: ReLU(M), resized bilinearly (half-pixel
centres, as cv2 and torch's align_corners=False) to the input's H x W, and min-max normalised per
image with a pinned epsilon, (m - min) / (max - min + 1e-7), so each map spans [0, 1] unless it
is flat (all zero). Definitions follow pytorch-grad-cam 1.5.7.
"""

from __future__ import annotations

from onnx import TensorProto

from .graph import GraphBuilder, LoopBody

NORMALIZE_EPSILON = 1e-7
POWER_ITERATIONS = 64
_SPATIAL = [2, 3]


def grad_cam(b: GraphBuilder, a: str, g: str) -> str:
    """Grad-CAM (Selvaraju et al., ICCV 2017): w_k = mean_ij G^k_ij."""
    return b.op("Mul", [b.reduce("ReduceMean", g, _SPATIAL, keepdims=True), a])


def shapley_cam(b: GraphBuilder, a: str, g: str, hessian_a: str | None) -> str:
    """ShapleyCAM (Cai et al., 2025; pytorch-grad-cam's `ShapleyCAM`): w_k = mean_ij (G - H A
    / 2)^k_ij, H A the Hessian of the score at the layer times the activations
    (`hessian.hessian_vector_product`; None where it is zero, and the map is Grad-CAM's)."""
    if hessian_a is not None:
        g = b.op("Sub", [g, b.op("Mul", [hessian_a, b.const(0.5)])])
    return grad_cam(b, a, g)


def grad_cam_plus_plus(b: GraphBuilder, a: str, g: str) -> str:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018): w_k = sum_ij relu(G_ij) a_ij with
    a_ij = G^2 / (2 G^2 + sum_ij(A^k) G^3 + 1e-6), and a_ij = 0 where G = 0."""
    square = b.op("Mul", [g, g])
    cube = b.op("Mul", [square, g])
    total = b.reduce("ReduceSum", a, _SPATIAL, keepdims=True)
    denominator = b.op(
        "Add",
        [b.op("Add", [b.op("Mul", [square, b.const(2.0)]), b.op("Mul", [total, cube])]),
         b.const(1e-6)],
    )
    alpha = b.op("Div", [square, denominator])
    alpha = b.op("Where", [b.op("Equal", [g, b.const(0.0)]), b.const(0.0), alpha])
    weights = b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), alpha]), _SPATIAL, True)
    return b.op("Mul", [weights, a])


def x_grad_cam(b: GraphBuilder, a: str, g: str) -> str:
    """XGrad-CAM (Fu et al., BMVC 2020): w_k = sum_ij G_ij A_ij / (sum_ij A_ij + 1e-7)."""
    total = b.reduce("ReduceSum", a, _SPATIAL, keepdims=True)
    share = b.op("Div", [b.op("Mul", [g, a]), b.op("Add", [total, b.const(1e-7)])])
    return b.op("Mul", [b.reduce("ReduceSum", share, _SPATIAL, keepdims=True), a])


def hires_cam(b: GraphBuilder, a: str, g: str) -> str:
    """HiResCAM (Draelos and Carin, 2020): G^k * A^k, element-wise."""
    return b.op("Mul", [g, a])


def grad_cam_element_wise(b: GraphBuilder, a: str, g: str) -> str:
    """Grad-CAM element-wise (pytorch-grad-cam): relu(G^k * A^k)."""
    return b.op("Relu", [b.op("Mul", [g, a])])


def layer_cam(b: GraphBuilder, a: str, g: str) -> str:
    """LayerCAM (Jiang et al., TIP 2021): relu(G^k) * A^k."""
    return b.op("Mul", [b.op("Relu", [g]), a])


def eigen_cam(b: GraphBuilder, a: str, g: str) -> str:
    """EigenCAM (Muhammad and Yeasin, IJCNN 2020): the activations themselves, projected on
    their first principal component (`principal_projection`). Gradient-free."""
    return a


def eigen_grad_cam(b: GraphBuilder, a: str, g: str) -> str:
    """EigenGradCAM (pytorch-grad-cam): G * A, projected on its first principal component."""
    return b.op("Mul", [g, a])


FEM_SIGMAS = 2.0  # k of FEM's k-sigma rule, as pytorch-grad-cam's default


def fem(b: GraphBuilder, a: str, g: str) -> str:
    """FEM (Fuad et al., IPTA 2020; pytorch-grad-cam's `FEM`): w_k is the share of the
    positions of A^k above mean(A^k) + k std(A^k) (the population deviation, k = 2).
    Gradient-free."""
    mean = b.reduce("ReduceMean", a, _SPATIAL, keepdims=True)
    centred = b.op("Sub", [a, mean])
    variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), _SPATIAL, keepdims=True)
    threshold = b.op("Add", [mean, b.op("Mul", [b.op("Sqrt", [variance]), b.const(FEM_SIGMAS)])])
    above = b.op("Cast", [b.op("Greater", [a, threshold])], to=TensorProto.FLOAT)
    return b.op("Mul", [b.reduce("ReduceMean", above, _SPATIAL, keepdims=True), a])


def seg_eigen_cam(b: GraphBuilder, a: str, g: str) -> str:
    """Seg-Eigen-CAM (Chung and Ying, Appl. Sci. 2025; pytorch-grad-cam's `SegEigenCAM`):
    |G| * A, projected on its first principal component (`principal_projection`, whose sign
    correction is the paper's: the largest magnitude made positive)."""
    return b.op("Mul", [b.op("Abs", [g]), a])


RANDOM_WEIGHT_RANGE = (-1.0, 1.0)


def random_cam(b: GraphBuilder, a: str, g: str) -> str:
    """RandomCAM (pytorch-grad-cam), a sanity baseline: w_k ~ U(-1, 1), independent for each
    row and channel, drawn by a RandomUniformLike without a seed, so anew in every run (its
    input depends on the image: nothing to fold into a constant). onnxruntime seeds its
    generator from the clock at start; `onnxruntime.set_seed` fixes it. Gradient-free."""
    shape_of_weights = b.reduce("ReduceMean", a, _SPATIAL, keepdims=True)  # [N, C, 1, 1]
    low, high = RANDOM_WEIGHT_RANGE
    weights = b.op("RandomUniformLike", [shape_of_weights], low=low, high=high)
    return b.op("Mul", [weights, a])


def channel_sum(b: GraphBuilder, contributions: str) -> str:
    """The raw map: sum over channels, [N, 1, h, w]."""
    return b.reduce("ReduceSum", contributions, [1], keepdims=True)


def principal_projection(b: GraphBuilder, x: str) -> str:
    """The raw map as pytorch-grad-cam's `get_2d_projection`: M = x as [N, h*w, C], centred
    over positions, projected on its first right singular vector v1: [N, 1, h, w].

    M v1 = s1 u1 with u1 the top eigenvector of the small [h*w, h*w] Gram matrix M M^T, found
    by power iteration; the tail's min-max normalisation makes s1 irrelevant. The singular
    vectors' sign is arbitrary (LAPACK picks one): it is fixed so that the projection's largest
    magnitude is positive."""
    centred = _centred_positions(b, x)
    gram = b.op("MatMul", [centred, b.op("Transpose", [centred], perm=[0, 2, 1])])
    return _position_map(b, _top_eigenvector(b, gram), x)


KPCA_COEF0 = 1.0  # the sigmoid kernel's coef0, scikit-learn's default


def kernel_principal_projection(b: GraphBuilder, x: str) -> str:
    """The raw map as pytorch-grad-cam's KPCA-CAM makes it (scikit-learn's `KernelPCA`, one
    component, sigmoid kernel, gamma = 1 / C): positions X = x as [N, h*w, C] centred over
    positions, K = tanh(gamma X X^T + 1) centred in feature space (K - 1K - K1 + 1K1), and K's
    eigenvector of largest eigenvalue, its sign as scikit-learn's `svd_flip` sets it (the
    largest magnitude positive): [N, 1, h, w]. The kernel is not positive semi-definite: the
    power iteration is run again on K - min(lambda, 0) I, lambda its first estimate, so that a
    negative eigenvalue of larger magnitude cannot win."""
    centred = _centred_positions(b, x)
    channels = b.op("Cast", [b.shape_slice(x, 1, 2)], to=TensorProto.FLOAT)
    inner = b.op("MatMul", [centred, b.op("Transpose", [centred], perm=[0, 2, 1])])
    kernel = b.op("Tanh", [b.op("Add", [b.op("Div", [inner, channels]), b.const(KPCA_COEF0)])])
    kernel = b.op("Add", [
        b.op("Sub", [kernel, b.op("Add", [b.reduce("ReduceMean", kernel, [1], keepdims=True),
                                          b.reduce("ReduceMean", kernel, [2], keepdims=True)])]),
        b.reduce("ReduceMean", kernel, [1, 2], keepdims=True),
    ])
    first = _top_eigenvector(b, kernel)
    eigenvalue = b.op("MatMul", [b.op("Transpose", [first], perm=[0, 2, 1]),
                                 b.op("MatMul", [kernel, first])])  # [N, 1, 1], |first| = 1
    shift = b.op("Min", [eigenvalue, b.const(0.0)])
    return _position_map(b, _top_eigenvector(b, kernel, first, shift), x)


def _centred_positions(b: GraphBuilder, x: str) -> str:
    """x [N, C, h, w] as positions [N, h*w, C], centred over positions."""
    flat = b.op("Transpose", [b.op("Reshape", [x, b.ints([0, 0, -1])])], perm=[0, 2, 1])
    return b.op("Sub", [flat, b.reduce("ReduceMean", flat, [1], keepdims=True)])


def _top_eigenvector(b: GraphBuilder, matrix: str, start: str | None = None,
                     shift: str | None = None) -> str:
    """The unit eigenvector [N, n, 1] of the largest-magnitude eigenvalue of `matrix` - `shift`
    I ([N, n, n]; `shift` [N, 1, 1]) by POWER_ITERATIONS power iterations from `start` (by
    default the rows' squared norms)."""
    vector = start or b.reduce("ReduceSum", b.op("Mul", [matrix, matrix]), [2], keepdims=True)
    for _ in range(POWER_ITERATIONS):
        product = b.op("MatMul", [matrix, vector])
        if shift is not None:
            product = b.op("Sub", [product, b.op("Mul", [shift, vector])])
        norm = b.op("Sqrt", [b.reduce("ReduceSum", b.op("Mul", [product, product]), [1], True)])
        vector = b.op("Div", [product, b.op("Add", [norm, b.const(1e-30)])])
    return vector


def _position_map(b: GraphBuilder, vector: str, x: str) -> str:
    """A per-position vector [N, h*w, 1] as a map [N, 1, h, w] of x's positions, its sign
    fixed so that its largest magnitude is positive."""
    high = b.reduce("ReduceMax", vector, [1], keepdims=True)
    low = b.reduce("ReduceMin", vector, [1], keepdims=True)
    sign = b.op("Where", [b.op("Less", [high, b.op("Neg", [low])]), b.const(-1.0),
                          b.const(1.0)])
    projection = b.op("Mul", [vector, sign])
    shape = b.op("Concat", [b.shape_slice(x, 0, 1), b.ints([1]), b.shape_slice(x, 2)], axis=0)
    return b.op("Reshape", [projection, shape])


def pixel_heatmap(b: GraphBuilder, pixels: str) -> str:
    """A pixel-level map [N, C, H, W] as a heatmap: max over channels of |value|, min-max
    normalised per image: [N, H, W]."""
    magnitude = b.reduce("ReduceMax", b.op("Abs", [pixels]), [1], keepdims=True)
    return b.squeeze(normalize(b, magnitude), [1])


def cam_heatmap(
    b: GraphBuilder, raw: str, image: str, image_hw: tuple[int, int]
) -> str:
    """ReLU(raw map [N, 1, h, w]), resized to `image`'s H x W and normalised: [N, H, W].
    The builder keeps how (`GraphBuilder.upsampled_heatmaps`), so that the map before the
    resize can be output too (`coarse_heatmap`)."""
    cam = b.op("Relu", [raw])
    image_size = b.op("Gather", [b.shape(image), b.ints(list(image_hw))], axis=0)
    sizes = b.op("Concat", [b.shape_slice(cam, 0, 2), image_size], axis=0)
    resized = b.op(
        "Resize",
        [cam, "", "", sizes],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    normalized, low, span = _min_max(b, resized, NORMALIZE_EPSILON)
    heatmap = b.squeeze(normalized, [1])
    b.upsampled_heatmaps[heatmap] = (cam, low, span)
    return heatmap


def coarse_heatmap(b: GraphBuilder, heatmap: str) -> str | None:
    """The map [N, h, w] `heatmap` was resized from, normalised by the heatmap's own min and
    span: resized as the graph resizes it (linear, half-pixel), it is the heatmap. None for
    a heatmap `cam_heatmap` did not make by one resize of one map (fused layers, pixel maps,
    averaged copies)."""
    if heatmap not in b.upsampled_heatmaps:
        return None
    cam, low, span = b.upsampled_heatmaps[heatmap]
    return b.squeeze(b.op("Div", [b.op("Sub", [cam, low]), span]), [1])


def mean_of_maps(b: GraphBuilder, maps: list[str]) -> str:
    """Heatmaps [N, H, W] averaged and min-max normalised again (pytorch-grad-cam's fusion of
    several layers, and of augmented copies)."""
    mean = b.op("Mul", [b.op("Sum", maps), b.const(1.0 / len(maps))])
    return b.squeeze(normalize(b, b.unsqueeze(mean, [1])), [1])


def product_of_maps(b: GraphBuilder, maps: list[str]) -> str:
    """Heatmaps [N, H, W] multiplied and min-max normalised again (RefineCAM's fusion of
    several layers: a region stays where every layer's map keeps it)."""
    product = maps[0]
    for each in maps[1:]:
        product = b.op("Mul", [product, each])
    return b.squeeze(normalize(b, b.unsqueeze(product, [1])), [1])


def normalize(
    b: GraphBuilder | LoopBody, maps: str, epsilon: float = NORMALIZE_EPSILON
) -> str:
    """Min-max normalisation of each map [H, W] of [N, K, H, W], the one every method uses:
    (m - min) / (max - min + epsilon), each pinned as its reference pins it (heatmaps 1e-7,
    Score-CAM's masks 1e-8); `epsilon` 0 divides exactly, a flat map becoming all zero
    (Group-CAM's masks). In a Loop body too (`b` a `LoopBody`)."""
    return _min_max(b, maps, epsilon)[0]


def _min_max(
    b: GraphBuilder | LoopBody, maps: str, epsilon: float
) -> tuple[str, str, str]:
    """`normalize`'s maps, and the min and span [N, K, 1, 1] they were normalised with."""
    low = b.reduce("ReduceMin", maps, _SPATIAL, keepdims=True)
    shifted = b.op("Sub", [maps, low])
    high = b.reduce("ReduceMax", shifted, _SPATIAL, keepdims=True)
    if epsilon:
        span = b.op("Add", [high, b.const(epsilon)])
    else:
        span = b.op("Where", [b.op("Greater", [high, b.const(0.0)]), high, b.const(1.0)])
    return b.op("Div", [shifted, span]), low, span
