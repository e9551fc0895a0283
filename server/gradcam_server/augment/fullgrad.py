"""FullGrad (Srinivas and Fleuret, NeurIPS 2019) as ONNX ops, as pytorch-grad-cam 1.5.7's
`FullGrad` computes it.

The map fuses the input gradient with the bias gradients of every layer with a bias:

    M = n(|dy/dx * x|) summed over the image's channels
        + sum over biased layers l of resize(sum_k n(|b_l^k * dy/dz_l^k|))

with z_l the layer's output, b_l^k its bias for channel k, n(.) the min-max normalisation of
each [h, w] map on its own ((m - min) / (max - min + 1e-7), `cam.normalize`) and resize the
bilinear upsampling to the image's H x W; the heatmap is M min-max normalised again. The
normalisation of each map before the channel sum is pytorch-grad-cam's
`scale_accross_batch_and_channels`; since the resize is linear, the channel sum is taken
before it, at the layer's own size (one resize per feature-map size, not per channel).

The biased layers are those pytorch-grad-cam picks in torch (`Conv2d` with a bias,
`BatchNorm2d`), as they appear in the ONNX graph on the way from the image to the score:

- every 2-D ``Conv`` with a bias input. An exporter in eval mode folds batch norm into the
  convolution in front of it: the folded bias is beta - mean * gamma / sqrt(var + eps) (plus the
  convolution's own bias, scaled, where it had one) and the folded output is the batch norm's
  output, so for torch convolutions without a bias of their own (ResNets, MobileNets,
  EfficientNets) the folded conv's term is exactly pytorch-grad-cam's batch-norm term. A
  convolution that had its own bias in front of a batch norm (VGG-BN) becomes one layer: FullGrad
  of the exported network, which has one bias there, not two;
- every ``BatchNormalization`` left in the graph (on 4-D maps), its bias taken as
  pytorch-grad-cam takes it (the official implementation's): beta - mean * gamma /
  sqrt(var + eps), at the batch norm's output.

Linear layers (Gemm, MatMul) are not biased layers here, as in pytorch-grad-cam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .backward import ancestors, detached_tensors, quantized_tensors
from .cam import normalize, principal_projection
from .errors import AugmentError
from .graph import FLOAT_TYPES, GraphBuilder

# Ops through which no gradient flows: their float outputs are not differentiable in the input.
_NOT_DIFFERENTIABLE = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}


@dataclass(frozen=True)
class BiasedLayer:
    """A layer with a bias: the forward tensor its bias is added to (`output`, [N, C, h, w])
    and its node (a Conv or a BatchNormalization)."""

    output: str
    node: object


def biased_layers(b: GraphBuilder, image: str, scores: Sequence[str]) -> list[BiasedLayer]:
    """The 2-D Conv nodes with a bias and the BatchNormalization nodes on 4-D maps whose output
    a gradient reaches from `scores` on its way to `image` (graph order). A QDQ model's Convs
    are found through their Q/DQ pairs; a convolution whose bias is added apart
    (quantize_dynamic's ConvInteger) is refused: its bias term would be lost."""
    nodes = list(b.graph.node)
    feeding = ancestors(nodes, set(scores))
    reached = _differentiable_descendants(b, nodes, image) - detached_tensors(nodes)
    found = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        output = node.output[0]
        if node.op_type == "ConvInteger" and output in reached and output in feeding:
            raise AugmentError(
                f"fullgrad needs each convolution's bias, and ConvInteger node {node.name!r} "
                "(quantize_dynamic) adds it apart: quantize in the QDQ format (quantize_static "
                "with QuantFormat.QDQ), or augment the float model"
            )
        if output not in reached or output not in feeding or b.elem_type(output) not in FLOAT_TYPES:
            continue
        shape = b.static_shape(output)
        if shape is None or len(shape) != 4:
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if (node.op_type == "Conv" and has_bias) or node.op_type == "BatchNormalization":
            found.append(BiasedLayer(output, node))
    return found


def _differentiable_descendants(b: GraphBuilder, nodes: Sequence, image: str) -> set[str]:
    """The tensors computed from `image` through ops that pass a gradient: float tensors, and
    the integer tensors of quantized chains (`backward.quantized_tensors`)."""
    quantized = quantized_tensors(b, nodes)
    reached = {image}
    for node in nodes:
        if node.op_type in _NOT_DIFFERENTIABLE or not any(t in reached for t in node.input):
            continue
        reached.update(t for t in node.output
                       if t and (b.elem_type(t) in FLOAT_TYPES or t in quantized))
    return reached


def layer_bias(b: GraphBuilder, layer: BiasedLayer) -> str:
    """The layer's bias per channel [C] in the compute type: a Conv's bias input, or a batch
    norm's beta - mean * gamma / sqrt(var + eps)."""
    node = layer.node
    if node.op_type == "Conv":
        return b.computed(node.input[2])
    scale, beta, mean, variance = (b.computed(t) for t in node.input[1:5])
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    std = b.op("Sqrt", [b.op("Add", [variance, b.const(epsilon)])])
    return b.op("Sub", [beta, b.op("Div", [b.op("Mul", [mean, scale]), std])])


def full_grad(
    b: GraphBuilder,
    image: str,
    image_gradient: str,
    layers: Sequence[BiasedLayer],
    gradients: dict[str, str],
    size_of: str,
    image_hw: tuple[int, int],
    eigen_smooth: bool = False,
) -> str:
    """The FullGrad heatmap [N, H, W] in [0, 1] (see the module docstring): `image` and its
    gradient as the network reads it (NCHW, or NHWC where `image_hw` is (1, 2)), each biased
    layer's gradient in `gradients`, and the map at `size_of`'s H x W.

    With `eigen_smooth`, as pytorch-grad-cam: the image's normalised channels and each layer's
    map (at H x W), normalised again, resized to H/8 x W/8, projected on their first principal
    component (`cam.principal_projection`), and that map normalised and resized back."""
    pixels = b.op("Abs", [b.op("Mul", [image_gradient, b.computed(image)])])
    if image_hw == (1, 2):
        pixels = b.op("Transpose", [pixels], perm=[0, 3, 1, 2])
    pixels = normalize(b, pixels)
    image_size = b.op("Gather", [b.shape(size_of), b.ints(list(image_hw))], axis=0)
    by_size: dict[object, list[str]] = {}
    for layer in layers:
        bias = b.unsqueeze(layer_bias(b, layer), [0, 2, 3])
        saliency = b.op("Abs", [b.op("Mul", [bias, gradients[layer.output]])])
        summed = b.reduce("ReduceSum", normalize(b, saliency), [1], keepdims=True)
        shape = b.static_shape(layer.output)
        known = all(isinstance(d, int) for d in shape[2:]) and not eigen_smooth
        by_size.setdefault(tuple(shape[2:]) if known else layer.output, []).append(summed)
    maps = [_resized(b, m[0] if len(m) == 1 else b.op("Sum", m), image_size)
            for m in by_size.values()]
    if eigen_smooth:
        stacked = normalize(b, b.op("Concat", [pixels, *maps], axis=1))
        small = _resized(b, stacked, b.op("Div", [image_size, b.ints([8, 8])]))
        total = _resized(b, normalize(b, principal_projection(b, small)), image_size)
    else:
        terms = [b.reduce("ReduceSum", pixels, [1], keepdims=True), *maps]
        total = terms[0] if len(terms) == 1 else b.op("Sum", terms)
    return b.squeeze(normalize(b, total), [1])


def _resized(b: GraphBuilder, maps: str, size: str) -> str:
    """Maps [N, K, h, w] resized bilinearly (half-pixel centres, as cv2) to `size` [2]."""
    sizes = b.op("Concat", [b.shape_slice(maps, 0, 2), size], axis=0)
    return b.op("Resize", [maps, "", "", sizes], mode="linear",
                coordinate_transformation_mode="half_pixel")
