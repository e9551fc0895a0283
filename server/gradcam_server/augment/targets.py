"""Where an image model is explained: its image input, its explained output (and where that
output's backward pass starts), and the target layer, chosen as the field's recipes choose it.
The score itself and its seed: scores.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from .backward import ancestors, build_backward, descendants, path_nodes
from .errors import AugmentError
from .graph import FLOAT_TYPES, GraphBuilder, computed_tensors
from .layout import detect_view, tiling_view_options

# Ops between the last feature map and the flattening in front of the classifier: the target
# moves back through these.
_POOLING = {
    "GlobalAveragePool",
    "GlobalMaxPool",
    "AveragePool",
    "ReduceMean",
    "ReduceMax",
    "Identity",
    "Dropout",
}
# Ops a head may put between the global pooling and the flattening (ConvNeXt's LayerNorm on the
# pooled map, permutes, reshapes, Q/DQ pairs): stepped over only on the way to a pooling op.
_HEAD_PASS_THROUGH = {
    "Transpose", "LayerNormalization", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast",
    "QuantizeLinear", "DequantizeLinear", "BatchNormalization",
}
_NORMS = {
    "LayerNormalization", "GroupNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
}
# Region pooling: a two-stage detector's RoI heads read these ops' input 0 (the feature map)
_REGION_POOLING = ("RoiAlign", "MaxRoiPool")


def detect_target_layer(
    b: GraphBuilder, score_output: str, image: str, **view_options
) -> str:
    """The default target layer, as the field's recipes choose it:

    - a segmentation network (a 4-D score output [N, classes, h, w]): its coarsest feature map
      (`_coarsest_feature_map`);
    - a transformer (an attention Softmax on the way to the score, and no Conv after the last
      one): the norm in front of the last attention block (pytorch-grad-cam's recipe for ViT,
      DeiT and Swin), or, where that block is post-norm (its norm sits after attention), the
      final norm (`_transformer_target`);
    - a CNN: the last spatial map before the global pooling (`_cnn_target`).

    A transformer candidate whose view is refused (`layout.detect_view` with `view_options`,
    the layout, prefix_tokens and grid given: a window-partitioned or attention layout, a grid
    it cannot tell) falls back to the CNN rule, unless the options ask for tokens.
    """
    if _rank_or_none(b, score_output) == 4:
        return _coarsest_feature_map(b, score_output, image)
    candidate = _transformer_target(b, score_output, image)
    wants_tokens = view_options.get("layout") == "tokens" or any(
        view_options.get(key) is not None for key in ("prefix_tokens", "grid")
    )
    transformer_error = None
    if candidate is not None:
        try:
            detect_view(b, candidate, image, **view_options)
            return candidate
        except AugmentError as error:
            if wants_tokens:
                raise
            transformer_error = error
    if wants_tokens:
        raise AugmentError("could not detect a transformer's target layer (no attention block "
                           "on the way to the score); name the layer")
    try:
        layer = _cnn_target(b, score_output, image)
        detect_view(b, layer, image, **view_options)
        return layer
    except AugmentError as error:
        raise transformer_error or error from None


def region_pooling_nodes(b: GraphBuilder, heads: Sequence[str], image: str) -> list:
    """The region pooling nodes (`RoiAlign`, `MaxRoiPool`) that pool a map of the image into
    what `heads` read: a two-stage detector's RoI heads (empty for any other model)."""
    nodes = list(b.graph.node)
    from_image = descendants(nodes, {image})
    feeding = ancestors(nodes, set(heads))
    return [n for n in nodes if n.op_type in _REGION_POOLING and n.domain in ("", "ai.onnx")
            and n.output[0] in feeding and n.input[0] in from_image]


def pooled_feature_maps(b: GraphBuilder, heads: Sequence[str], image: str) -> list[str] | None:
    """A two-stage detector's default target layers: the feature maps its region pooling
    (`RoiAlign`, `MaxRoiPool`) reads, as pytorch-grad-cam's Faster R-CNN tutorial targets the
    backbone's FPN outputs. None where no region pooling lies between the image and `heads`
    (a single-stage detector: `detection.detection_target_layer`).

    Several pooled maps (the FPN levels of torchvision's MultiScaleRoIAlign) are all returned,
    finest first (largest h x w; ties in graph order, so level "0" first), for the multi-layer
    fusion (`cam.mean_of_maps`): each proposal is pooled from one level, every other level
    gets an exactly zero gradient and a zero map, so the fused heatmap is the map of the level
    the explained proposal was pooled from, whichever it is; ``activations`` and ``gradients``
    are the finest level's. A single pooled map (one RoiAlign over the backbone's last map) is
    the target alone. Refused, naming the pooled tensors, where a pooled map is not a 4-D
    float map of the image, or is computed from another region pooling's output (nested or
    cascaded heads: which stage to explain is the caller's choice)."""
    nodes = list(b.graph.node)
    pooling = region_pooling_nodes(b, heads, image)
    if not pooling:
        return None
    maps = list(dict.fromkeys(n.input[0] for n in pooling))
    pooled_outputs = descendants(nodes, {n.output[0] for n in pooling})
    listed = "; ".join(f"{m} {list(b.static_shape(m) or ['?'])} (read by "
                       + ", ".join(f"{n.op_type} {n.name!r}" if n.name else n.op_type
                                   for n in pooling if n.input[0] == m)
                       + ")" for m in maps)
    nested = [m for m in maps if m in pooled_outputs]
    if nested:
        raise AugmentError(
            "cannot choose a two-stage detector's target layer: the region pooling reads maps "
            f"computed from another region pooling's output ({', '.join(nested)}); name the "
            f"layer(s) with the layer option. Pooled maps: {listed}"
        )
    shapes = {m: b.static_shape(m) for m in maps}
    unusable = [m for m in maps if shapes[m] is None or len(shapes[m]) != 4
                or b.elem_type(m) not in FLOAT_TYPES]
    if unusable:
        raise AugmentError(
            "cannot choose a two-stage detector's target layer: the region pooling reads "
            f"tensors that are not 4-D float feature maps of known rank ({', '.join(unusable)});"
            f" name the layer(s) with the layer option. Pooled maps: {listed}"
        )

    def area(tensor: str) -> int:
        height, width = shapes[tensor][2:]
        known = isinstance(height, int) and isinstance(width, int)
        return height * width if known else 0

    return sorted(maps, key=lambda m: -area(m))  # stable: graph order among equal sizes


def _transformer_target(b: GraphBuilder, score_output: str, image: str) -> str | None:
    """The transformer recipe's layer (see `detect_target_layer`), or None where no attention
    Softmax (one feeding a MatMul) lies on the way to the score, or Convs follow the last."""
    nodes = list(b.graph.node)
    from_image = descendants(nodes, {image})
    on_path = from_image & ancestors(nodes, {score_output})
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    attention = [
        node for node in nodes
        if node.op_type == "Softmax" and node.output[0] in on_path
        and any(c.op_type == "MatMul" for c in consumers.get(node.output[0], []))
    ]
    if not attention:
        return None
    after = descendants(nodes, {attention[-1].output[0]})
    if any(node.op_type == "Conv" and node.output[0] in after and node.output[0] in on_path
           for node in nodes):
        return None  # convolutions after the last attention: a hybrid whose head is a CNN's
    feeding = ancestors(nodes, {attention[-1].input[0]})
    norms = [node for node in nodes if node.op_type in _NORMS and node.output[0] in feeding
             and node.output[0] in on_path]
    last_norm = norms[-1].output[0] if norms else None
    if last_norm and _feeds_attention_directly(nodes, last_norm, attention[-1], from_image):
        return last_norm  # pre-norm: x + attention(norm(x))
    finals = [node for node in nodes if node.op_type in _NORMS and node.output[0] in after
              and node.output[0] in on_path and _rank_or_none(b, node.output[0]) in (3, 4)]
    return finals[-1].output[0] if finals else None


def _feeds_attention_directly(nodes: list, norm: str, softmax, from_image: set[str]) -> bool:
    """Whether `norm` reaches the attention `softmax` through the query/key projections alone,
    as the norm in front of a pre-norm block does (ViT, Swin; CaiT's class attention, whose
    norm reads the class token and the patches). In a post-norm block the last norm before
    the attention closes the previous block: a residual sum of two activations lies between."""
    return not any(
        node.op_type in ("Add", "Sum") and sum(t in from_image for t in node.input) >= 2
        for node in path_nodes(nodes, norm, softmax.input[0])
    )


def _cnn_target(b: GraphBuilder, score_output: str, image: str) -> str:
    """The last spatial map before the global pooling in front of the classifier.

    Finds the last node (in graph order) that turns a 4-D tensor into one of lower rank on the
    way to `score_output` (Flatten, Reshape, Squeeze, a ReduceMean without keepdims, ...), then
    steps back through pooling-like ops (global/average pooling, means, identities) to the 4-D
    map they pool, and over what a head puts between pooling and flattening (LayerNorm,
    transposes, reshapes, Q/DQ) where a pooling op lies behind it. Max pooling inside the
    feature extractor is not stepped over, so VGG's target is its last MaxPool output, as in
    the Grad-CAM paper. Where that walk ends on a pooled 1 x 1 map (an exporter's own ops
    between pooling and head, such as dynamo's as_strided Gather), the target is the last
    tensor before it with a spatial grid larger than 1 x 1.
    """
    nodes = list(b.graph.node)
    producers = {t: node for node in nodes for t in node.output}
    feeds_score = ancestors(nodes, {score_output})
    collapse = None
    for node in nodes:
        if not node.output or node.output[0] not in feeds_score or not node.input:
            continue
        if (
            _rank_or_none(b, node.input[0]) == 4
            and _rank_or_none(b, node.output[0]) in (1, 2, 3)
            and b.elem_type(node.output[0]) in FLOAT_TYPES  # not Shape and other index ops
        ):
            collapse = node
    if collapse is None:
        raise AugmentError(
            "could not detect a target layer: no 4-D feature map is flattened on the way to "
            f"output {score_output!r}; name one with the layer option"
        )
    target = walked = collapse.input[0]
    while walked in producers and producers[walked].op_type in _POOLING | _HEAD_PASS_THROUGH:
        node = producers[walked]
        if _rank_or_none(b, node.input[0]) != 4:
            break
        walked = node.input[0]
        if node.op_type in _POOLING:
            target = walked
    shape = b.static_shape(target)
    if shape and all(isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] == 1:
        before = candidate_layers(b, target, image, limit=1, names_only=True)
        if before:
            return before[0]
    return target


def candidate_layers(
    b: GraphBuilder, score_output: str, image: str, limit: int = 6, names_only: bool = False,
    **view_options,
) -> list[str]:
    """The last `limit` tensors (graph order) on the way from the image to the score that
    would make valid targets (with `view_options` where they fit, detected otherwise; listed,
    tokens with the one grid their count tiles the input with), each as "name [shape] layout",
    or its name alone."""
    nodes = list(b.graph.node)
    on_path = descendants(nodes, {image}) & ancestors(nodes, {score_output})
    found: list[str] = []
    for node in reversed(nodes):
        tensor = node.output[0] if node.output else ""
        if (not tensor or tensor not in on_path or b.elem_type(tensor) not in FLOAT_TYPES
                or _rank_or_none(b, tensor) not in (3, 4)):
            continue
        view = None
        # a listed candidate shows the options it needs: tokens merged after the patch
        # embedding, their own grid; a name picked for use as it is must need none
        for options in (view_options, {}) if names_only else (view_options, {}, None):
            if options is None:
                options = tiling_view_options(b, tensor, image)
                if options is None:
                    break
            try:
                view = detect_view(b, tensor, image, **options)
                break
            except AugmentError:
                continue
        if view is None:
            continue
        shape = ", ".join("?" if d is None else str(d) for d in b.static_shape(tensor))
        found.append(tensor if names_only else f"{tensor} [{shape}] {view.describe()}")
        if len(found) == limit:
            break
    return found


def _coarsest_feature_map(b: GraphBuilder, score_output: str, image: str) -> str:
    """A segmentation network's default target: of the 4-D float maps on the way from the
    image to the output whose spatial size shape inference knows, the last (in graph order)
    of the smallest size above 1 x 1: the end of the encoder, where pytorch-grad-cam's
    segmentation tutorial targets the backbone. Globally pooled context branches (1 x 1) are
    skipped, and so are maps with one channel per class (the class scores before they are
    upsampled, whose map would only repeat the score)."""
    nodes = list(b.graph.node)
    on_path = descendants(nodes, {image}) & ancestors(nodes, {score_output})
    classes = (b.static_shape(score_output) or (None, None))[1]
    best, best_area = None, None
    for node in nodes:
        for tensor in node.output:
            shape = b.static_shape(tensor)
            if (
                tensor not in on_path or shape is None or len(shape) != 4
                or b.elem_type(tensor) not in FLOAT_TYPES
                or not all(isinstance(d, int) for d in shape[2:])
                or shape[1] == classes
            ):
                continue
            area = shape[2] * shape[3]
            if area > 1 and (best_area is None or area <= best_area):
                best, best_area = tensor, area
    if best is None:
        raise AugmentError(
            "could not detect a target layer: no 4-D feature map of known size lies between "
            f"the image and the segmentation output {score_output!r}; name one with the layer "
            "option"
        )
    return best


def dequantized_layer(b: GraphBuilder, layer: str) -> str:
    """The tensor a quantized (QDQ) graph computes with in place of `layer`: where `layer` is
    read only by one QuantizeLinear whose output only one DequantizeLinear reads, that
    DequantizeLinear's output; `layer` itself otherwise. onnxruntime's quantizer drops the ReLU
    in front of such a pair (the integer range clips instead) and gives its name to the tensor
    before it, so a float model's layer name then names the pre-ReLU values, and the ReLU'd
    map is the DequantizeLinear output."""
    consumers: dict[str, list] = {}
    for node in b.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    readers = consumers.get(layer, [])
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or readers[0].input[0] != layer:
        return layer
    dequantizers = consumers.get(readers[0].output[0], [])
    if len(dequantizers) != 1 or dequantizers[0].op_type != "DequantizeLinear":
        return layer
    return dequantizers[0].output[0]


def differentiated_score(b: GraphBuilder, score_output: str) -> str:
    """The tensor the backward pass of `score_output` starts from: where the output is a
    DequantizeLinear of a QuantizeLinear of a float tensor with the same scale and zero point
    (a QDQ model's quantized logits), that float tensor, seeded as the output would be
    (straight through, the pair's derivative is 1). The output's own quantizer is not
    differentiated: its saturation would zero the gradient, and blank the map, of every class
    whose score passes the range calibrated for the output."""
    producers = {t: node for node in b.graph.node for t in node.output}
    dequantize = producers.get(score_output)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return score_output
    quantize = producers.get(dequantize.input[0])
    if (
        quantize is None or quantize.op_type != "QuantizeLinear"
        or not _same_parameters(b, quantize.input[1:], dequantize.input[1:])
        or list(quantize.attribute) != list(dequantize.attribute)
        or b.elem_type(quantize.input[0]) not in FLOAT_TYPES
    ):
        return score_output
    return quantize.input[0]


def append_backward(
    b: GraphBuilder, seeds: dict[str, str], wrt: list[str], guided: bool = False
) -> dict[str, str]:
    """d score / d tensor for each of `wrt`, from `seeds` (d score / d output), each output's
    backward pass started in front of its own quantizer (`differentiated_score`)."""
    starts = {differentiated_score(b, tensor): seed for tensor, seed in seeds.items()}
    return build_backward(b, starts, wrt, guided=guided)


def _same_parameters(b: GraphBuilder, first: Sequence[str], second: Sequence[str]) -> bool:
    """Whether two Q/DQ nodes' scale and zero point are the same: the same tensors, or
    constants of equal values."""
    if list(first) == list(second):
        return True
    if len(first) != len(second):
        return False
    for a, z in zip(first, second):
        va, vz = b.initializer_value(a), b.initializer_value(z)
        if va is None or vz is None or va.dtype != vz.dtype or not np.array_equal(va, vz):
            return False
    return True


def validate_target_layer(b: GraphBuilder, layer: str, score_output: str) -> None:
    if layer not in computed_tensors(b.graph):
        raise AugmentError(f"target layer {layer!r} is not a tensor of the graph")
    if b.elem_type(layer) not in FLOAT_TYPES:
        raise AugmentError(f"target layer {layer!r} is not a floating-point tensor")
    if layer not in ancestors(list(b.graph.node), {score_output}):
        raise AugmentError(f"output {score_output!r} does not depend on target layer {layer!r}")


def image_input(model: onnx.ModelProto, name: str | int | None = None) -> onnx.ValueInfoProto:
    """The image tensor: the graph input named `name`, or at position `name` among the inputs
    that are not initializers; by default the only such input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = ", ".join(i.name for i in inputs)
    if isinstance(name, int):
        if not 0 <= name < len(inputs):
            raise AugmentError(f"no input at index {name}; the model's inputs are: {names}")
        image = inputs[name]
    elif name is not None:
        image = next((i for i in inputs if i.name == name), None)
        if image is None:
            raise AugmentError(f"{name!r} is not an input of the model; its inputs are: {names}")
    elif len(inputs) != 1:
        raise AugmentError(
            f"expected one image input, found {len(inputs)}: {names}; name the image input"
        )
    else:
        image = inputs[0]
    if len(image.type.tensor_type.shape.dim) != 4:
        raise AugmentError(f"the image input {image.name!r} must be 4-D")
    return image


def score_output_name(model: onnx.ModelProto, output: str | int | None) -> str:
    """The output explained: named, at a position among the graph outputs, or the first."""
    outputs = [o.name for o in model.graph.output]
    if output is None:
        return outputs[0]
    if isinstance(output, int):
        if not 0 <= output < len(outputs):
            raise AugmentError(
                f"no output at index {output}; the model's outputs are: {', '.join(outputs)}"
            )
        return outputs[output]
    if output not in outputs:
        raise AugmentError(f"{output!r} is not an output of the model; its outputs are: "
                           f"{', '.join(outputs)}")
    return output


def default_score(output_rank: int | None) -> str:
    """The score an output is explained with when none is asked, by the server and by
    ``gradcam-augment`` alike: "region" for a segmentation map [N, classes, h, w], "logit" for
    anything else."""
    return "region" if output_rank == 4 else "logit"


def spatial_axes(image: onnx.ValueInfoProto) -> tuple[int, int]:
    """(H, W) axes of the image input: NCHW unless the shape says channels-last."""
    dims = image.type.tensor_type.shape.dim
    if dims[1].dim_value not in (1, 3) and dims[3].dim_value in (1, 3):
        return 1, 2
    return 2, 3


def _rank_or_none(b: GraphBuilder, tensor: str) -> int | None:
    shape = b.static_shape(tensor)
    return None if shape is None else len(shape)


