"""Single-stage detectors explained per detection (score "detection"), against torch autograd in
float64 and pytorch-grad-cam's FasterRCNNBoxScoreTarget on the same torch wrapper: torchvision's
SSDlite (320 x 320) and RetinaNet (ResNet-50 FPN, at 192 x 192) exported with their raw head
(`detectors.RawDetector`), and the full SSDlite (with its NMS) refused with the way out. The
SSDlite raw head converted to float16 and quantized (QDQ per channel, dynamic) explains too:
against the float32 network with the same (rounded) weights, and against finite differences of
the quantized graph's continuous relaxation."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import helper
from pytorch_grad_cam import GradCAM

import detectors
import quantized
import zoo
from gradcam_server.augment import AugmentError, augment_model, explained_target
from gradcam_server.augment.graph import GraphBuilder
from gradcam_server.augment.targets import differentiated_score
from test_end_to_end import assert_same_maps
from test_half import to_float16
from test_quantized import TOLERANCE, directional_error

pytestmark = pytest.mark.slow

BOX = np.array([60.0, 80.0, 220.0, 240.0], dtype=np.float32)  # a reference box, input pixels
NO_BOX = np.zeros(4, dtype=np.float32)


@pytest.fixture(scope="module")
def ssdlite_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detection") / "ssdlite_raw.onnx"
    return detectors.export_raw(detectors.ssdlite(), path, detectors.SSD_SIZE)


def run(model: onnx.ModelProto, x: np.ndarray, classes, indices, boxes) -> dict:
    session = zoo.ort_session(model.SerializeToString())
    feeds = {"input": x, "target_class": np.asarray(classes, dtype=np.int64),
             "detection_index": np.asarray(indices, dtype=np.int64),
             "reference_box": np.asarray(boxes, dtype=np.float32)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def assert_gradients_match(ours: np.ndarray, model: detectors.RawDetector,
                           module: torch.nn.Module, x: np.ndarray, anchors, classes,
                           boxes) -> None:
    """Against float64 torch autograd: rel L2 <= 1e-2, or twice float32 torch's own error
    where float32 rounding alone costs more (as tests/test_end_to_end.py bounds deep
    targets)."""
    reference = torch_reference(model, module, x, anchors, classes, boxes, torch.float64)
    assert ours.shape == reference.shape
    error = zoo.rel_l2(ours, reference)
    if error > 1e-2:  # only then is float32's own error needed
        float32 = torch_reference(model, module, x, anchors, classes, boxes, torch.float32)
        assert error <= 2 * zoo.rel_l2(float32, reference)


def torch_reference(model: detectors.RawDetector, module: torch.nn.Module, x: np.ndarray,
                    anchors, classes, boxes, dtype: torch.dtype) -> np.ndarray:
    """d (scores[n, a, c] + IoU(boxes[n, a], reference[n])) / d module's output, by torch
    autograd in `dtype`; a zero-area reference adds no IoU."""
    double = copy.deepcopy(model).to(dtype).requires_grad_(False)
    layer = dict(double.named_modules())[next(
        name for name, m in model.named_modules() if m is module)]
    captured = {}

    def keep(_, __, output):  # the weights are frozen: only this tensor needs a gradient
        output.requires_grad_()
        captured["value"] = output

    hook = layer.register_forward_hook(keep)
    scores, decoded = double(torch.from_numpy(x).to(dtype))
    hook.remove()
    total = 0
    for n, (a, c, box) in enumerate(zip(anchors, classes, boxes)):
        total = total + scores[n, a, c]
        if box[2] > box[0]:
            reference = torch.from_numpy(np.asarray(box, np.float64))[None].to(dtype)
            total = total + torchvision.ops.box_iou(decoded[n, a][None], reference)[0, 0]
    total.backward()
    return captured["value"].grad.double().numpy()


def grad_cam_reference(model, module, x, anchors, classes, boxes) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM of FasterRCNNBoxScoreTarget on each row's detection (of
    the class score alone where the reference has zero area)."""
    wrapped = detectors.PerImage(model, list(anchors), list(classes))
    targets = [
        detectors.box_score_target(box, c) if box[2] > box[0] else _score_only
        for box, c in zip(boxes, classes)
    ]
    with GradCAM(model=wrapped, target_layers=[module]) as cam:
        return cam(torch.from_numpy(x), targets=targets)


def _score_only(detection: dict[str, torch.Tensor]) -> torch.Tensor:
    return detection["scores"].sum()


def test_ssdlite_detections_match_torch_and_pytorch_grad_cam(ssdlite_onnx: Path) -> None:
    """Row 0 by box index (class score alone), row 1 by reference box and class, row 2 by
    box with its best class (-1); the default layer is the backbone's last shared map."""
    model = detectors.ssdlite()
    x = zoo.sample_batch(3, detectors.SSD_SIZE)
    with torch.no_grad():
        scores, decoded = (t.numpy() for t in model(torch.from_numpy(x)))
    boxes = np.stack([NO_BOX, BOX, BOX + 20])
    by_box_1 = detectors.choose_anchor(scores[1], decoded[1], BOX, 5)
    best = decoded[2], boxes[2]
    any_class = max(
        (detectors.choose_anchor(scores[2], best[0], best[1], c) + (c,) for c in range(91)),
        key=lambda found: (found[0] >= 0, scores[2][found[0], found[2]] if found[0] >= 0 else 0),
    )
    anchors = [1234, by_box_1[0], any_class[0]]
    classes = [7, 5, any_class[2]]
    assert min(anchors) >= 0, "the reference boxes overlap no anchor: the check is vacuous"

    out = run(augment_model(ssdlite_onnx, score="detection"), x, [7, 5, -1],
              [1234, -1, -1], boxes)
    np.testing.assert_array_equal(out["explained_detection"], anchors)
    np.testing.assert_array_equal(out["detection_class"], classes)
    np.testing.assert_allclose(out["detection_iou"], [0.0, by_box_1[1], any_class[1]],
                               rtol=1e-5)
    np.testing.assert_allclose(out["detection_score"],
                               scores[np.arange(3), anchors, classes], rtol=1e-5)
    np.testing.assert_allclose(out["detection_box"], decoded[np.arange(3), anchors], atol=1e-3)

    module = model.detector.backbone.features[0]
    assert out["gradients"].shape == (3, 672, 20, 20)
    assert_gradients_match(out["gradients"], model, module, x, anchors, classes, boxes)
    assert_same_maps(out["heatmap"],
                     grad_cam_reference(model, module, x, anchors, classes, boxes))


def test_no_anchor_overlapping_enough_is_reported(ssdlite_onnx: Path) -> None:
    """A reference box no anchor of the class overlaps with IoU >= 0.5 (a 2-pixel box):
    explained_detection -1 and a flat (zero-gradient) map, never a wrong anchor."""
    x = zoo.sample_batch(1, detectors.SSD_SIZE)
    out = run(augment_model(ssdlite_onnx, score="detection"), x, [5], [-1],
              [[100, 100, 102, 102]])
    assert out["explained_detection"].tolist() == [-1]
    assert not out["gradients"].any()


def test_nms_fed_directly_by_the_heads_is_cut(ssdlite_onnx: Path) -> None:
    """A graph whose NonMaxSuppression reads the raw heads (boxes [N, A, 4], scores
    [N, C, A]) and outputs only its selected indices: cut before the NMS, the same maps."""
    raw = onnx.load(str(ssdlite_onnx))
    graph = raw.graph
    graph.node.extend([
        helper.make_node("Transpose", ["scores"], ["scores_nca"], perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores_nca", "", "iou", "floor"],
                         ["selected"], name="nms"),
    ])
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
                              onnx.numpy_helper.from_array(np.array([0.01], np.float32), "floor")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("selected", onnx.TensorProto.INT64,
                                                      [None, 3]))
    x = zoo.sample_batch(2, detectors.SSD_SIZE)
    arguments = (x, [5, 7], [-1, 321], [BOX, NO_BOX])
    cut = run(augment_model(raw, score="detection"), *arguments)
    plain = run(augment_model(ssdlite_onnx, score="detection"), *arguments)
    assert "selected" in cut
    for name in ("heatmap", "gradients", "explained_detection", "detection_iou"):
        np.testing.assert_allclose(cut[name], plain[name], rtol=1e-5, atol=1e-6)


def test_full_ssdlite_with_nms_is_refused(tmp_path: Path) -> None:
    """torchvision's whole SSDlite through the TorchScript exporter: its NMS reads boxes
    selected per image (score threshold, top-k), so no pre-NMS head can be cut out; the
    refusal names the NMS node and says to export the raw head."""
    model = detectors.ssdlite().detector
    path = tmp_path / "ssdlite_full.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([torch.rand(3, 320, 320)],), str(path), dynamo=False,
                          opset_version=17, input_names=["input"])
    with pytest.raises(AugmentError, match=r"NonMaxSuppression node.*export the raw head"):
        augment_model(path, score="detection")


@pytest.mark.parametrize("options, message", [
    (dict(output="boxes"), "name both the scores and the boxes"),
    (dict(detection_format="diagonal"), "unknown detection format"),
    (dict(method="scorecam"), "gradient methods"),
    (dict(iou_threshold=1.5), r"iou_threshold must be in \[0, 1\]"),
])
def test_refusals_name_the_problem(ssdlite_onnx: Path, options: dict, message: str) -> None:
    with pytest.raises(AugmentError, match=message):
        augment_model(ssdlite_onnx, score="detection", **options)


def test_retinanet_detection_matches_torch(tmp_path: Path) -> None:
    """RetinaNet (sigmoid scores, ResNet-50 FPN) at 192 x 192, one image by box: the default
    layer is the first FPN level's input (layer2), which every head reads."""
    model = detectors.retinanet()
    path = detectors.export_raw(model, tmp_path / "retinanet.onnx", detectors.RETINANET_SIZE)
    x = zoo.sample_batch(1, detectors.RETINANET_SIZE)
    with torch.no_grad():
        scores, decoded = (t.numpy() for t in model(torch.from_numpy(x)))
    box = np.array([30.0, 40.0, 130.0, 150.0], dtype=np.float32)
    label = 3
    anchor, iou = detectors.choose_anchor(scores[0], decoded[0], box, label)
    assert anchor >= 0
    out = run(augment_model(path, score="detection"), x, [label], [-1], [box])
    assert out["explained_detection"].tolist() == [anchor]
    np.testing.assert_allclose(out["detection_iou"], [iou], rtol=1e-5)
    module = model.detector.backbone.body.layer2
    assert_gradients_match(out["gradients"], model, module, x, [anchor], [label], [box])
    assert_same_maps(out["heatmap"], grad_cam_reference(model, module, x, [anchor], [label],
                                                        [box]))


class TinyHeads(torch.nn.Module):
    """A small conv net with a detector's heads over a 8 x 8 grid of anchors (A = 64), in the
    layouts a two-stage head ("per-class": boxes [N, A, C, 4]) and Ultralytics ("yolo": one
    [N, 4 + C, A] output, cx, cy, w, h) give; boxes in input pixels (32 x 32)."""

    CLASSES = 3

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(zoo.model_seed(f"tiny-{layout}"))
        self.layout = layout
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=4, padding=1), torch.nn.ReLU(),
        )
        box_values = 4 * self.CLASSES if layout == "per-class" else 4
        self.head = torch.nn.Conv2d(16, self.CLASSES + box_values, 1)
        centres = (torch.arange(8, dtype=torch.float32) + 0.5) * 4
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("centres", torch.stack([x.flatten(), y.flatten()], dim=-1))

    def forward(self, x: torch.Tensor):
        out = self.head(self.features(x)).flatten(2).transpose(1, 2)  # [N, A, C + boxes]
        scores = torch.sigmoid(out[..., :self.CLASSES])
        codes = out[..., self.CLASSES:].reshape(len(x), 64, -1, 4)  # [N, A, 1 or C, 4]
        centre = self.centres[:, None] + 4 * torch.tanh(codes[..., :2])
        size = 8 * torch.exp(0.5 * torch.tanh(codes[..., 2:]))
        if self.layout == "yolo":
            return torch.cat([centre[:, :, 0], size[:, :, 0], scores], dim=-1).transpose(1, 2)
        return scores, torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def _tiny_boxes(model: TinyHeads, x: torch.Tensor):
    """(scores [N, A, C], boxes [N, A, C, 4] xyxy) of either layout, by torch."""
    out = model(x)
    if model.layout == "per-class":
        return out
    centre, size = out[:, :2].transpose(1, 2), out[:, 2:4].transpose(1, 2)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    return out[:, 4:].transpose(1, 2), boxes[:, :, None].expand(-1, -1, TinyHeads.CLASSES, -1)


@pytest.mark.parametrize("layout", ["per-class", "yolo"])
def test_per_class_and_yolo_heads_match_torch(layout: str, tmp_path: Path) -> None:
    """Per-class boxes (the class's box is read) and a YOLO output (split and converted from
    centre-size in the graph), detected from the output shapes: by box and by index, the
    anchor and the gradient at the first ReLU against float64 torch autograd."""
    model = TinyHeads(layout).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    names = ["output0"] if layout == "yolo" else ["scores", "boxes"]
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=names,
                      dynamic_axes={"input": {0: "N"}, **{n: {0: "N"} for n in names}})
    with torch.no_grad():
        scores, boxes = (t.numpy() for t in _tiny_boxes(model, torch.from_numpy(x)))
    box, label = np.array([6.0, 6.0, 18.0, 16.0], np.float32), 1
    ious = torchvision.ops.box_iou(torch.from_numpy(box[None]),
                                   torch.from_numpy(boxes[0, :, label]))[0].numpy()
    candidates = np.flatnonzero(ious >= 0.3)
    assert len(candidates), "the reference box overlaps no anchor: the check is vacuous"
    anchor = int(candidates[np.argmax(scores[0, candidates, label])])

    augmented = augment_model(path, score="detection", iou_threshold=0.3,
                              layer="/features/features.1/Relu_output_0", input_gradients=True)
    out = run(augmented, x, [label, 2], [-1, 17], [box, box])
    assert out["explained_detection"].tolist() == [anchor, 17]

    double = copy.deepcopy(model).double().requires_grad_(False)
    captured = {}
    hook = double.features[1].register_forward_hook(
        lambda _, __, output: captured.update(relu=output.requires_grad_()))
    image = torch.from_numpy(x).double().requires_grad_()
    scores64, boxes64 = _tiny_boxes(double, image)
    hook.remove()
    reference = torch.from_numpy(box[None]).double()
    total = 0
    for n, (a, c) in enumerate([(anchor, label), (17, 2)]):
        total = total + scores64[n, a, c] + torchvision.ops.box_iou(
            boxes64[n, a, c][None], reference)[0, 0]
    gradient, input_gradient = torch.autograd.grad(total, [captured["relu"], image])
    assert zoo.rel_l2(out["gradients"], gradient.numpy()) <= 1e-5
    assert zoo.rel_l2(out["input_gradients"], input_gradient.numpy()) <= 1e-5


def test_guided_backprop_of_a_detection(tmp_path: Path) -> None:
    """The pixel-level methods seed both heads too: a finite, nonzero pixel map per row."""
    model = TinyHeads("per-class").eval()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["scores", "boxes"])
    augmented = augment_model(path, score="detection", method="guided-backprop")
    # the default layer: the last map both heads read, not one head's own reshape
    assert explained_target(augmented)["layer"] == "/features/features.3/Relu_output_0"
    out = run(augmented, x, [0], [5], [[4, 4, 20, 20]])
    assert out["pixel_map"].shape == x.shape
    assert np.isfinite(out["pixel_map"]).all() and np.abs(out["pixel_map"]).max() > 0


def _rounded_to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 network computing what its float16 conversion computes: weights rounded."""
    rounded = copy.deepcopy(model)
    for weight in rounded.graph.initializer:
        if weight.data_type == onnx.TensorProto.FLOAT:
            value = onnx.numpy_helper.to_array(weight).astype(np.float16).astype(np.float32)
            weight.CopyFrom(onnx.numpy_helper.from_array(value, weight.name))
    return rounded


def test_float16_detector(ssdlite_onnx: Path) -> None:
    """The float16 SSDlite (image fed as float16) chooses the same detections as the float32
    network holding its rounded weights, and its maps match that network's (r >= 0.98; 0.998
    and 0.990 measured: the rest is the float16 activations' own rounding, which that network
    does not have, such as the softmax of 91 nearly equal class scores computed in float16):
    the detection score is computed in float32 like the rest of the backward pass."""
    float32 = onnx.load(str(ssdlite_onnx))
    x = zoo.sample_batch(2, detectors.SSD_SIZE)
    rows = dict(classes=[7, 5], indices=[1234, -1], boxes=np.stack([NO_BOX, BOX]))
    reference = run(augment_model(_rounded_to_float16(float32), score="detection"), x, **rows)
    half = augment_model(to_float16(float32, keep_io_types=False), score="detection")
    out = run(half, x.astype(np.float16), **rows)
    assert out["heatmap"].dtype == np.float32
    np.testing.assert_array_equal(out["explained_detection"], reference["explained_detection"])
    assert reference["explained_detection"].min() >= 0
    for ours, theirs in zip(out["heatmap"], reference["heatmap"]):
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.98


@pytest.mark.parametrize("fmt", ["qdq-per-channel", "dynamic"])
def test_quantized_detector_gradients_match_the_relaxation(ssdlite_onnx: Path, tmp_path: Path,
                                                           fmt: str) -> None:
    """d score / d target layer of a detection of the quantized SSDlite against central
    differences of the relaxed graph's head. (Its maps differ from the float model's far more
    than a classifier's do, r about 0.6 here: with random weights the 91 class probabilities
    are nearly equal, and the quantization's own error moves them.)"""
    path = quantized.quantize(ssdlite_onnx, tmp_path / f"ssdlite-{fmt}.onnx", fmt,
                              zoo.sample_batch(8, detectors.SSD_SIZE))
    model = onnx.load(str(path))
    augmented = augment_model(model, score="detection")
    layer = explained_target(augmented)["layer"]
    x = zoo.sample_batch(1, detectors.SSD_SIZE)
    out = run(augmented, x, [7], [1234], [NO_BOX])
    relaxed = onnx.shape_inference.infer_shapes(quantized.relax(model, at={"input": x}))
    start = differentiated_score(GraphBuilder(model), "scores")
    head = zoo.ort_session(onnx.utils.Extractor(relaxed).extract_model(
        [layer, "input"], [start]).SerializeToString())

    def score(activations: np.ndarray) -> float:
        scores = head.run(None, {"input": x, layer: activations.astype(np.float32)})[0]
        return float(scores.astype(np.float64)[0, 1234, 7])

    assert directional_error(out["gradients"], score, out["activations"]) < TOLERANCE


def _two_stage_graph(nested: bool) -> onnx.ModelProto:
    """A tiny two-stage head: a conv map pooled by RoiAlign over two fixed rois (both from
    image 0), a linear layer to scores [1, 2, 3] and per-class boxes [1, 2, 3, 4]; `nested`
    pools the pooled map again (a cascade whose stage a default cannot choose)."""
    rng = np.random.default_rng(0)

    def constant(name: str, value: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(value, name)

    pooled_channels = 4 * (2 * 2 if nested else 4 * 4)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["features"], pads=[1, 1, 1, 1]),
        helper.make_node("RoiAlign", ["features", "rois", "batch"], ["pooled"],
                         output_height=4, output_width=4, sampling_ratio=2),
    ]
    if nested:
        nodes.append(helper.make_node("RoiAlign", ["pooled", "small_rois", "rows"],
                                      ["pooled_again"], output_height=2, output_width=2,
                                      sampling_ratio=2))
    nodes += [
        helper.make_node("Flatten", ["pooled_again" if nested else "pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_scores"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("Reshape", ["probabilities", "score_shape"], ["scores"]),
        helper.make_node("MatMul", ["flat", "w_boxes"], ["codes"]),
        helper.make_node("Reshape", ["codes", "box_shape"], ["boxes"]),
    ]
    initializers = [
        constant("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        constant("rois", np.array([[1, 1, 9, 9], [4, 2, 14, 12]], np.float32)),
        constant("batch", np.zeros(2, np.int64)),
        constant("small_rois", np.array([[0, 0, 3, 3], [1, 1, 3, 3]], np.float32)),
        constant("rows", np.array([0, 1], np.int64)),
        constant("w_scores", rng.standard_normal((pooled_channels, 3)).astype(np.float32)),
        constant("w_boxes", rng.standard_normal((pooled_channels, 12)).astype(np.float32)),
        constant("score_shape", np.array([1, 2, 3], np.int64)),
        constant("box_shape", np.array([1, 2, 3, 4], np.int64)),
    ]
    graph = helper.make_graph(
        nodes, "two_stage", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                           [1, 3, 16, 16])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 2, 3]),
         helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 2, 3, 4])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_stage_default_layer_and_background() -> None:
    """A head read through RoiAlign: the default layer is the pooled map, class 0 is the
    background (recorded; -1 and out-of-range classes as documented); nested region pooling is
    refused with the pooled maps listed (tests/test_faster_rcnn.py checks Faster R-CNN)."""
    augmented = augment_model(_two_stage_graph(nested=False), score="detection")
    target = explained_target(augmented)
    assert target["layer"] == "features" and target["detection_background"] == "0"
    plain = explained_target(augment_model(_two_stage_graph(nested=False), score="detection",
                                           background_class=-1))
    assert "detection_background" not in plain
    with pytest.raises(AugmentError, match="background_class must be -1"):
        augment_model(_two_stage_graph(nested=False), score="detection", background_class=3)
    with pytest.raises(AugmentError, match=r"another region pooling's output \(pooled\).*"
                                           r"Pooled maps: features .*pooled \["):
        augment_model(_two_stage_graph(nested=True), score="detection")
