"""The augmentation pipeline: small passes over one ModelProto, each with its pre/post-conditions.

1. `upgrade_opset`     requires an ai.onnx opset; ensures opset >= 17 (the rules' semantics);
                       a graph already augmented (our metadata) is refused.
2. `_target_views`     ensures each target layer exists, feeds the score and has a layout
                       (`layout.detect_view`), or refuses with the candidate layers; a layer
                       read only by a Q/DQ pair is taken at the pair's output
                       (`targets.dequantized_layer`).
3. `add_target_class`  ensures the INT64 [N] input ``target_class`` exists (N as the image's),
                       and the score's own inputs and seed (`scores.ScoreTarget`; the
                       method's own score where it defines one, `CamMethod.explained_score`).
4. `append_backward`   requires the target layer on the path to the score; ensures d score / d
                       layer (and, when asked, d score / d image) tensors exist, started in
                       front of a QDQ model's output quantizer (`targets.append_backward`);
                       each layer and its gradient are then seen as [N, C, h, w] (`Features`).
5. `CamMethod.heatmap` ensures the method's ``heatmap`` [N, H, W] in [0, 1] exists (one map per
                       target layer, fused), and ``pixel_map`` for the pixel-level methods
                       (`methods.py`; the method refused what it cannot combine with first).
6. `expose_outputs`    ensures ``activations``, ``gradients``, ``heatmap`` (and
                       ``input_gradients``; ``coarse_heatmap`` where asked and the heatmap
                       is one map resized) are graph outputs after every original output;
                       `record_target` writes the explained layer and view as metadata.
7. `check`             ensures the result passes onnx's full checker (strict shape inference),
                       after `drop_unused_casts` (half precision); a model that fails it
                       before any change of ours is named as the cause.

Score "detection" takes its own branch (`_augment_detection`): the heads found or cut before
NMS (`detection.find_heads`), the detection's seeds on both heads (`scores.Detection`), the
same backward, heatmap and output passes, and the detection outputs and metadata.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import TensorProto, helper, version_converter

from .backward import ancestors
from .cam import coarse_heatmap
from .detection import (
    DEFAULT_IOU_THRESHOLD,
    DetectionHeads,
    DetectionSeeds,
    detection_target_layer,
    find_heads,
    refuse_unexplainable,
)
from .errors import AugmentError
from .graph import GraphBuilder, model_bytes, opset_version
from .layout import TargetView, check_view_options, detect_view
from .methods import CAM_METHODS, CamMethod, Features, MapInputs
from .names import NAMES
from .scores import SCORE_TARGETS, SCORES, Detection, same_rows
from .smoothing import (
    IDENTITY_TRANSFORM,
    TRANSFORMS,
    identity_rows,
    merge_maps,
    tile_rows,
    tile_transforms,
)
from .sobel import IMAGENET_PIXELS, PixelNormalisation
from .targets import (
    append_backward,
    candidate_layers,
    dequantized_layer,
    detect_target_layer,
    image_input,
    pooled_feature_maps,
    region_pooling_nodes,
    score_output_name,
    spatial_axes,
    validate_target_layer,
)

MIN_OPSET = 17
ALL_METHODS = tuple(CAM_METHODS)  # the served method names (the server reads them here)
_CHECKER_LIMIT_BYTES = 2_000_000_000


METADATA_PREFIX = "gradcam."  # metadata_props keys: gradcam.layer, .layout, .prefix_tokens, .grid


def load_model(source: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Load a model from a path (external data beside it is loaded too), bytes or a proto."""
    if isinstance(source, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(source)
        return copy
    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    path = Path(source)
    if not path.is_file():
        raise AugmentError(f"no model file at {path}")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as error:  # noqa: BLE001 - protobuf and external-data errors vary
        raise AugmentError(f"could not load {path}: {error}") from error


def augment_model(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    layer: str | Sequence[str] | None = None,
    score: str = "logit",
    output: str | int | None = None,
    input_gradients: bool = False,
    method: str = "gradcam",
    counterfactual: bool = False,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    input: str | int | None = None,
    layout: str | None = None,
    prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    boxes: str | None = None,
    detection_format: str | None = None,
    box_format: str | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    background_class: int | None = None,
    pixels: PixelNormalisation | None = None,
    coarse_heatmap: bool = False,
) -> onnx.ModelProto:
    """Return a copy of `model` that also computes Grad-CAM in the same run.

    Args:
        model: the exported image model (path, serialized bytes or ModelProto) with a 4-D
            image input, NCHW (or NHWC, detected from a channel dim of 1 or 3).
        layer: tensor name of the target layer; by default the field's recipe for the
            architecture (`targets.detect_target_layer`): a CNN's last spatial map before the
            global pooling, a transformer's norm in front of its last attention block, a
            segmentation network's coarsest feature map. In a quantized (QDQ) graph, a layer
            read only by a QuantizeLinear/DequantizeLinear pair is explained at the pair's
            output (`targets.dequantized_layer`: the ReLU'd map). Several names:
            each layer's map is computed and the maps are fused (`cam.mean_of_maps`;
            "refinecam" multiplies them, `cam.product_of_maps`); the
            ``activations`` and ``gradients`` outputs are the first layer's.
        score: ``"logit"``, ``"probability"`` (softmax of the score output),
            ``"similarity"`` (cosine similarity of the output, an embedding [N, D], to the
            added input ``reference_embedding`` [N, D]; ``target_class`` is then unused) or
            ``"region"`` (a segmentation output [N, classes, h, w] summed over the added input
            ``target_mask`` [N, h', w'] (any size, resized to the output's) for the target
            class; an all-negative mask row stands for the class's predicted region,
            `scores.Region`).
        output: the graph output explained (name, or index among the outputs); default: the
            first. Class scores [N, classes], an embedding [N, D] for "similarity", or a
            segmentation map [N, classes, h, w] for "region".
        input_gradients: also continue the backward pass to the image input and expose
            d score / d image as ``input_gradients`` (what guided backprop builds on).
        method: the method computing the heatmap (`methods.CAM_METHODS`): a CAM method
            ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam",
            "eigencam", "kpcacam", "fem", "eigengradcam", "seg-eigencam", "shapleycam"), or
            "fullgrad" (every biased layer's bias gradients and the input gradient, fused,
            `fullgrad.py`: `layer` then only chooses ``activations`` and ``gradients``), or a
            pixel-level method ("guided-backprop", "guided-gradcam"), which also outputs
            ``pixel_map`` [N, C, H, W] (the guided gradients, times the Grad-CAM map for
            guided Grad-CAM) and whose heatmap is its per-pixel channel maximum of |value|,
            or a perturbation method: "ablationcam" (`ablation.py`: the layers after the target
            re-run with each channel ablated), "scorecam" (`score.py`: the network re-run on
            the image masked by each channel) or "groupcam" (`group.py`: channel groups as
            masks over a blurred copy), or "integrated-gradcam" (Grad-CAM summed along
            scaled copies of the image, `methods.IntegratedGradCam`), "sess" (`sess.py`:
            Grad-CAM of patches at several scales, in one batch; a fixed input size) or "dff"
            (`factorization.py`: NMF concepts scored by the classifier head; it adds the
            output ``concept_scores`` [N, k], each concept's score for the class).
        counterfactual: explain the negated score (the seed paper's counterfactual
            explanation): the regions whose removal would raise the class score.
        eigen_smooth: project the method's per-channel contributions on their first
            principal component instead of summing them (`cam.principal_projection`).
        aug_smooth: average the maps of flipped and rescaled copies of each image
            (`smoothing.py`); the outputs keep the original image's rows.
        input: the image input (name, or index among the inputs that are not initializers);
            needed when the model has several. The others stay inputs of the result, fed as
            for the original, except for the methods that re-run the network on copies of the
            image (perturbation methods, integrated-gradcam, aug_smooth), which refuse them.
        layout, prefix_tokens, grid: how the target layer is laid out (`layout.py`): "nchw",
            "nhwc" or "tokens" [N, T, C] with `prefix_tokens` class/distillation/register
            tokens before an h x w `grid` of patches. Detected from the graph by default;
            given, they override detection (for every target layer).
        boxes, detection_format, box_format, iou_threshold: the "detection" score's heads
            (`detection.find_heads`): `output` names the pre-NMS class scores and `boxes`
            the decoded boxes (both detected from the outputs' shapes by default, and cut
            out in front of a NonMaxSuppression where it reads them directly);
            `detection_format` "nac" (scores [N, A, C]), "nca" ([N, C, A]) or "yolo" (one
            [N, 4 + C, A] output); `box_format` "xyxy" or "cxcywh"; `iou_threshold` bounds
            the reference box's overlap when a detection is chosen by box.
        background_class: the "detection" score's class that is no object, never explained
            (ranks and the choice by box pass over it; asking for it explains nothing). By
            default 0 for a two-stage detector (its heads read region pooling, as
            torchvision's R-CNNs, whose class 0 is background) and none for a single-stage
            one; give the index for another convention (Detectron2 and MMDetection put it
            last), or -1 for none.
        pixels: how the image input is made from 8-bit pixels (`sobel.PixelNormalisation`:
            mean, std, scale, channel order; default ImageNet's, as the server's default
            preprocessing), for the methods that read the photo itself ("sobel").
        coarse_heatmap: also output ``coarse_heatmap`` [N, h, w] where the heatmap is one
            map resized to the input's size (one target layer, no fusion of maps or copies):
            that map, normalised with the heatmap's min and span, so that its linear
            half-pixel resize is the heatmap (`cam.coarse_heatmap`). The server resizes it
            straight to an image's size (`upsample.py`), a far smaller resize.

    Score "detection" (`detection.py`) explains one detection per row: the class score plus
    the IoU of its box with a reference box (pytorch-grad-cam's FasterRCNNBoxScoreTarget).
    It adds the inputs ``detection_index`` (INT64 [N]: the anchor, or negative to choose by
    box) and ``reference_box`` (FP32 [N, 4]) and the outputs ``explained_detection`` (-1
    where no anchor of the class overlaps the box enough), ``detection_class``,
    ``detection_score``, ``detection_box`` and ``detection_iou``. Its default layer is the
    last feature map every head reads (`detection.detection_target_layer`); for a two-stage
    detector, the maps its region pooling reads, fused (`targets.pooled_feature_maps`).

    The result keeps every original input and output (the batch dimension as the original has
    it) and adds the input ``target_class`` (INT64 [N]; c >= 0 explains class c, -r the r-th
    highest-scoring class of that item, so -1 is its top-1 class) and the
    outputs ``activations`` and ``gradients`` (the target layer and d score / d layer, seen as
    [N, C, h, w] whatever the layer's layout) and ``heatmap`` (FP32 [N, H, W] at the input's
    H x W, each map min-max normalised to [0, 1]). Weights are shared with the forward graph,
    never differentiated. For a float16 or bfloat16 model the backward pass and the CAM math
    run in float32 (`graph.py`), and the added inputs and outputs (``activations``,
    ``gradients``, ``input_gradients``, ``pixel_map``, ``reference_embedding``,
    ``target_mask``) are FP32. The model's metadata records the explained layer and its view
    (`explained_target` reads them).
    """
    if method not in CAM_METHODS:
        raise AugmentError(f"unknown method {method!r}; available: {', '.join(ALL_METHODS)}")
    if score not in SCORE_TARGETS:
        raise AugmentError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")
    cam_method, score_target = CAM_METHODS[method], SCORE_TARGETS[score]
    cam_method.check(score_target, counterfactual=counterfactual, aug_smooth=aug_smooth,
                     input_gradients=input_gradients)
    score_target = cam_method.explained_score(score_target)
    if not 0.0 <= iou_threshold <= 1.0:
        raise AugmentError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    check_view_options(layout, prefix_tokens, grid)
    proto = upgrade_opset(load_model(model))
    if explained_target(proto):
        raise AugmentError(
            "the graph is already augmented (it explains layer "
            f"{explained_target(proto).get('layer')!r}); augment the original export, or run "
            "this graph as it is with any ONNX runtime"
        )
    if isinstance(score_target, Detection):
        return _augment_detection(
            proto, score_target, cam_method, layer, output, input_gradients, counterfactual,
            eigen_smooth, input,
            dict(layout=layout, prefix_tokens=prefix_tokens, grid=grid),
            dict(boxes=boxes, detection_format=detection_format, box_format=box_format),
            iou_threshold, background_class, pixels, coarse_heatmap,
        )
    image = image_input(proto, input)
    score_output = score_output_name(proto, output)
    if aug_smooth or cam_method.runs_on_copies:
        _refuse_other_inputs(proto, image.name, score_output, method)
    transforms = TRANSFORMS if aug_smooth else cam_method.image_transforms(image)
    network_image, network_score = image.name, score_output
    if transforms:
        network_image, tiled = tile_transforms(
            proto, image.name, spatial_axes(image)[1], transforms
        )
        network_score = tiled[score_output]
    b = GraphBuilder(proto)
    views = _target_views(b, layer, network_score, network_image,
                          dict(layout=layout, prefix_tokens=prefix_tokens, grid=grid))
    layers = [view.tensor for view in views]

    target_class = add_target_class(proto, image)
    if cam_method.path:
        target_class = score_target.class_along_path(b, score_output, target_class)
    score_target.add_inputs(b, _dim(image.type.tensor_type.shape.dim[0]), score_output)
    per_row = (lambda t: tile_rows(b, t, len(transforms))) if transforms else same_rows
    seed, resolved_class = score_target.seed(b, network_score, target_class, per_row)
    if counterfactual:
        seed = b.op("Neg", [seed])
    wrt = layers + ([image.name] if input_gradients and image.name not in layers else [])
    gradients = append_backward(b, {network_score: seed}, wrt)
    features = _features(b, views, gradients, network_image)
    heatmap, pixel_map = cam_method.heatmap(MapInputs(
        b, features, image, network_image, network_score, {network_score: seed}, resolved_class,
        eigen_smooth, pixels or IMAGENET_PIXELS,
    ))
    activations, layer_gradients = features[0].activations, features[0].gradients
    if transforms:
        if aug_smooth:
            heatmap = merge_maps(b, heatmap, image.name)
        identity = transforms.index(IDENTITY_TRANSFORM)
        layer_gradients = identity_rows(b, layer_gradients, image.name, identity)
        activations = identity_rows(b, activations, image.name, identity)
    expose_outputs(b, image, views[0], activations, layer_gradients, heatmap, coarse_heatmap)
    _expose_image_maps(b, image, gradients if input_gradients else None, pixel_map)
    b.drop_unused_casts()
    b.write_outputs_directly()
    record_target(proto, views)
    check(proto, model)
    return proto


def _augment_detection(
    proto: onnx.ModelProto,
    score_target: Detection,
    cam_method: CamMethod,
    layer: str | Sequence[str] | None,
    output: str | int | None,
    input_gradients: bool,
    counterfactual: bool,
    eigen_smooth: bool,
    input: str | int | None,
    view_options: dict,
    head_options: dict,
    iou_threshold: float,
    background_class: int | None,
    pixels: PixelNormalisation | None,
    coarse: bool,
) -> onnx.ModelProto:
    """`augment_model` for score "detection": the heads found (or cut before NMS), the
    detection's seeds on them, then the shared backward, heatmap and outputs passes."""
    try:
        image = image_input(proto, input)
    except AugmentError as error:
        raise refuse_unexplainable(proto, error) from None
    scores = None if output is None else score_output_name(proto, output)
    b = GraphBuilder(proto)
    heads = find_heads(b, image.name, scores, **head_options)
    two_stage = bool(region_pooling_nodes(b, heads.sources, image.name))
    if layer is None:
        layer = (pooled_feature_maps(b, heads.sources, image.name)
                 or detection_target_layer(b, heads, image.name))
    background_class = _background_class(b, heads, background_class, two_stage)
    views = _target_views(b, layer, heads.scores, image.name, view_options)
    target_class = add_target_class(proto, image)
    batch = _dim(image.type.tensor_type.shape.dim[0])
    score_target.add_inputs(b, batch, heads.scores)
    chosen = score_target.seeds(b, heads, target_class, iou_threshold, background_class)
    seeds = chosen.seeds
    if counterfactual:
        seeds = {tensor: b.op("Neg", [seed]) for tensor, seed in seeds.items()}
    layers = [view.tensor for view in views]
    wrt = layers + ([image.name] if input_gradients and image.name not in layers else [])
    gradients = append_backward(b, seeds, wrt)
    features = _features(b, views, gradients, image.name)
    heatmap, pixel_map = cam_method.heatmap(MapInputs(
        b, features, image, image.name, heads.scores, seeds, chosen.resolved_class, eigen_smooth,
        pixels or IMAGENET_PIXELS,
    ))
    first = features[0]
    expose_outputs(b, image, views[0], first.activations, first.gradients, heatmap, coarse)
    _expose_image_maps(b, image, gradients if input_gradients else None, pixel_map)
    expose_detection(b, chosen, heads.scores, batch)
    b.drop_unused_casts()
    b.write_outputs_directly()
    record_target(proto, views)
    anchors, classes = (b.static_shape(heads.scores) or (None, None, None))[1:]
    background = () if background_class is None else (("background", background_class),)
    for key, value in (("anchors", anchors), ("classes", classes), *background):
        if isinstance(value, int):  # what a server checks requests against
            proto.metadata_props.add(key=f"{METADATA_PREFIX}detection_{key}", value=str(value))
    check(proto)
    return proto


def _features(
    b: GraphBuilder, views: Sequence[TargetView], gradients: dict[str, str], image: str
) -> list[Features]:
    """Each target layer's values (in their compute type) and gradient, seen as [N, C, h, w]."""
    return [
        Features(view, view.apply(b, b.computed(view.tensor), image),
                 view.apply(b, gradients[view.tensor], image), gradients[view.tensor])
        for view in views
    ]


def _expose_image_maps(
    b: GraphBuilder, image: onnx.ValueInfoProto, gradients: dict[str, str] | None,
    pixel_map: str | None,
) -> None:
    """``input_gradients`` (where `gradients` holds the image's) and ``pixel_map`` (where
    given) as outputs at the image's shape, in its compute type."""
    dims = [_dim(d) for d in image.type.tensor_type.shape.dim]
    if gradients is not None:
        b.add_output(gradients[image.name], NAMES.input_gradients, b.compute_type(image.name),
                     dims)
    if pixel_map is not None:
        b.add_output(pixel_map, NAMES.pixel_map, b.compute_type(image.name), dims)


def _background_class(
    b: GraphBuilder, heads: DetectionHeads, background_class: int | None, two_stage: bool
) -> int | None:
    """The background class as `augment_model` documents it (None: no background class)."""
    if background_class is None:
        return 0 if two_stage else None
    classes = (b.static_shape(heads.scores) or (None,) * 3)[2]
    if background_class < -1 or (isinstance(classes, int) and background_class >= classes):
        raise AugmentError(f"background_class must be -1 (none) or a class of the scores "
                           f"(0 to {classes - 1 if isinstance(classes, int) else 'C - 1'}); "
                           f"got {background_class}")
    return None if background_class == -1 else background_class


def expose_detection(b: GraphBuilder, chosen: DetectionSeeds, scores: str, batch) -> None:
    """The explained detection of each row: anchor (-1: none qualifies), class, class score,
    box (x1, y1, x2, y2) and IoU with the reference box (in the scores' compute type)."""
    dtype = b.compute_type(scores)
    b.add_output(chosen.explained, NAMES.explained_detection, TensorProto.INT64, [batch])
    b.add_output(chosen.resolved_class, NAMES.detection_class, TensorProto.INT64, [batch])
    b.add_output(chosen.score, NAMES.detection_score, dtype, [batch])
    b.add_output(chosen.box, NAMES.detection_box, dtype, [batch, 4])
    b.add_output(chosen.iou, NAMES.detection_iou, dtype, [batch])


def record_target(model: onnx.ModelProto, views: Sequence[TargetView]) -> None:
    """The explained layer(s) and their view, as metadata (`explained_target` reads them)."""
    entries = {f"{METADATA_PREFIX}{key}": value for key, value in views[0].metadata().items()}
    if len(views) > 1:
        entries[f"{METADATA_PREFIX}layer"] = ",".join(view.tensor for view in views)
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def explained_target(model: onnx.ModelProto) -> dict[str, str]:
    """What an augmented model explains: {"layer", "layout", and for tokens "prefix_tokens"
    and "grid" ("hxw") where static; for a detector "detection_anchors", "detection_classes"
    and "detection_background" where known}; "layer" joins several layers with commas."""
    return {
        p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def _refuse_other_inputs(
    model: onnx.ModelProto, image: str, score_output: str, method: str
) -> None:
    """Methods that run the network on copies of the image rows cannot copy other inputs."""
    initializers = {init.name for init in model.graph.initializer}
    feeding = ancestors(list(model.graph.node), {score_output})
    others = [
        i.name for i in model.graph.input
        if i.name not in initializers and i.name != image and i.name in feeding
    ]
    if others:
        raise AugmentError(
            f"{method} (or aug_smooth) re-runs the network on copies of the image alone; the "
            f"score also depends on the input(s) {', '.join(others)}"
        )


def _target_views(
    b: GraphBuilder,
    layer: str | Sequence[str] | None,
    score_output: str,
    image: str,
    view_options: dict,
) -> list[TargetView]:
    """The target layers, validated, and their views: tensors the score depends on, laid out
    as feature maps or tokens (`layout.detect_view` with `view_options`: layout,
    prefix_tokens, grid). A refusal of a layer lists the candidate layers."""
    def refused(error: AugmentError) -> AugmentError:
        candidates = candidate_layers(b, score_output, image, **view_options)
        listed = "; ".join(candidates) if candidates else "none found"
        return AugmentError(f"{error}. Candidate layers (last first): {listed}")

    if layer is None:
        try:
            layers = [detect_target_layer(b, score_output, image, **view_options)]
        except AugmentError as error:
            raise refused(error) from None
    elif isinstance(layer, str):
        layers = [layer]
    else:
        layers = list(dict.fromkeys(layer))
        if not layers:
            raise AugmentError("no target layer given")
    views = []
    for each in dict.fromkeys(dequantized_layer(b, each) for each in layers):
        validate_target_layer(b, each, score_output)
        try:
            views.append(detect_view(b, each, image, **view_options))
        except AugmentError as error:
            raise refused(error) from None
    return views


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert models older than opset 17 (the rules use opset-17 forms of Split, Reduce...)."""
    if opset_version(model) >= MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as error:  # noqa: BLE001 - the converter raises several types
        raise AugmentError(
            f"the model uses opset {opset_version(model)} and could not be converted to "
            f"opset {MIN_OPSET}: {error}"
        ) from error


def add_target_class(model: onnx.ModelProto, image: onnx.ValueInfoProto) -> str:
    batch = _dim(image.type.tensor_type.shape.dim[0])
    model.graph.input.append(
        helper.make_tensor_value_info(NAMES.target_class, TensorProto.INT64, [batch])
    )
    return NAMES.target_class


def expose_outputs(
    b: GraphBuilder,
    image: onnx.ValueInfoProto,
    view: TargetView,
    activations: str,
    gradients: str,
    heatmap: str,
    coarse: bool = False,
) -> None:
    """Expose `activations` and `gradients` (the target layer's view and its gradient, one row
    per image, [N, C, h, w]) and the heatmap; with `coarse`, the map the heatmap was resized
    from too, where it was one (`cam.coarse_heatmap`)."""
    image_dims = [_dim(d) for d in image.type.tensor_type.shape.dim]
    batch = image_dims[0]
    layer_dims = [batch, *_view_dims(b, view)]
    dtype = b.compute_type(view.tensor)
    b.add_output(activations, NAMES.activations, dtype, layer_dims)
    b.add_output(gradients, NAMES.gradients, dtype, layer_dims)
    height, width = spatial_axes(image)
    b.add_output(
        heatmap, NAMES.heatmap, TensorProto.FLOAT, [batch, image_dims[height], image_dims[width]]
    )
    resized_from = coarse_heatmap(b, heatmap) if coarse else None
    if resized_from is not None:
        b.add_output(resized_from, NAMES.coarse_heatmap, TensorProto.FLOAT, [batch, None, None])


def _view_dims(b: GraphBuilder, view: TargetView) -> list:
    """(C, h, w) of the view where shape inference knows them, else None each."""
    shape = b.static_shape(view.tensor) or (None,) * (3 if view.layout == "tokens" else 4)
    if view.layout == "nchw":
        return list(shape[1:])
    if view.layout == "nhwc":
        return [shape[3], shape[1], shape[2]]
    return [shape[2], *(view.grid or (None, None))]


def check(model: onnx.ModelProto, source=None) -> None:
    """onnx's full checker (the graph's rules and strict shape inference) on what we wrote;
    models over protobuf's 2 GiB limit cannot be checked in memory. Where it fails and the
    model augmented (`source`, as `augment_model` took it) fails too, the error says so: the
    input is invalid (e.g. a float16 conversion that left a Cast's declared type behind)."""
    if model_bytes(model) >= _CHECKER_LIMIT_BYTES:
        return
    errors = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    try:
        onnx.checker.check_model(model, full_check=True)
    except errors as error:
        if source is not None:
            try:
                onnx.checker.check_model(upgrade_opset(load_model(source)), full_check=True)
            except errors as original:
                raise AugmentError(
                    f"the model itself fails onnx's checker, before any change of ours: "
                    f"{original}; fix the export (or conversion) that wrote it"
                ) from original
        raise AugmentError(f"the augmented graph fails onnx's checker: {error}") from error


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None
