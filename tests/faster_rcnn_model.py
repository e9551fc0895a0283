"""Faster R-CNN's raw box head as one ONNX graph, for the two-stage detector tests.

torchvision's detection models end in per-class NMS and a variable number of detections, and
start with GeneralizedRCNNTransform, which resizes the image. `RawFasterRCNN` keeps what lies
between: it takes an already normalised image batch at a fixed size and runs the backbone (with
its FPN), the RPN (whose proposal NMS stays in the graph: it only selects integer indices) and
the RoI heads up to the box predictor, returning for every proposal

* ``scores`` [N, R, classes]: softmax of the class logits,
* ``boxes`` [N, R, classes, 4]: the per-class decoded boxes (x1, y1, x2, y2 in input pixels),
  clipped to the image,
* ``proposals`` [N, R, 4] (only `with_proposals`): the RPN's boxes the head pooled.

R is fixed, the RPN's post-NMS count at test time (150 for fasterrcnn_mobilenet_v3_large_320_fpn):
an image with fewer proposals gets rows of zeros, whose boxes decode to [0, 0, 0, 0] for every
class (they overlap nothing). There is no final per-class NMS and no score threshold.

Gradients reach the features only through the head's RoiAlign (scores and boxes) and box
regression (boxes): the proposals are constants, as torch decodes them from detached RPN outputs
and our walker sends no gradient into RoiAlign's rois nor what only computes them
(`backward.detached_tensors`).

* `build_faster_rcnn()`: the seeded, BatchNorm-calibrated torchvision model (weights=None), eval.
* `export_raw_head(path, batch, size, with_proposals)`: the TorchScript export at opset 17.
* `run_with_targets(wrapper, images)`: torch's outputs and the TARGETS activations, kept for
  autograd; `find_targets` names the ONNX tensors holding them.
* `append_score_gradients(model, targets, heatmap_of, with_boxes)`: the export plus inputs
  "seed" and "box_seed" (d score / d scores and / d boxes), outputs "d_<target>" and optionally
  a Grad-CAM "heatmap" [N, H, W].
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

from gradcam_server.augment.backward import build_backward
from gradcam_server.augment.cam import cam_heatmap, channel_sum, grad_cam
from gradcam_server.augment.graph import GraphBuilder
from zoo import calibrate_batch_norms, find_matching_tensor, model_seed, sample_batch

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
SIZE = 320
OUTPUTS = ["scores", "boxes"]
CLASS_WEIGHT_SCALE = 10.0
# Target layers: the FPN level the box head pools (both levels of the 320 model are 10 x 10, so
# every proposal maps to level "0") and the backbone's last stage, which feeds both FPN levels.
TARGETS = {
    "fpn_level_0": lambda model: model.backbone.fpn.layer_blocks[0],
    "backbone_last_stage": lambda model: model.backbone.body,
}


class RawFasterRCNN(torch.nn.Module):
    """A torchvision Faster R-CNN from normalised images to every proposal's class scores and
    per-class boxes (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, size: int, with_proposals: bool = False) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.with_proposals = with_proposals

    @property
    def proposals_per_image(self) -> int:
        return self.model.rpn.post_nms_top_n()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, count = self.model, self.proposals_per_image
        sizes = [(self.size, self.size)] * images.shape[0]
        features = model.backbone(images)
        proposals, _ = model.rpn(ImageList(images, sizes), features)
        # exactly `count` rows per image: padding with zero boxes keeps every size static
        proposals = [torch.cat([p, p.new_zeros(count, 4)])[:count] for p in proposals]
        heads = model.roi_heads
        pooled = heads.box_roi_pool(features, proposals, sizes)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        boxes = box_ops.clip_boxes_to_image(
            heads.box_coder.decode(box_regression, proposals), (self.size, self.size)
        )
        classes = class_logits.shape[-1]
        scores = F.softmax(class_logits, -1).reshape(-1, count, classes)
        boxes = boxes.reshape(-1, count, classes, 4)
        if self.with_proposals:
            return scores, boxes, torch.stack(proposals)
        return scores, boxes


@functools.cache
def build_faster_rcnn(name: str = NAME) -> torch.nn.Module:
    """torchvision's Faster R-CNN `name` (default fasterrcnn_mobilenet_v3_large_320_fpn; the
    benchmarks also use fasterrcnn_resnet50_fpn) without any weights file (seeded), its
    backbone's BatchNorm statistics calibrated on the scikit-image photos at SIZE, in eval mode.

    The class-score layer's random weights are scaled by CLASS_WEIGHT_SCALE: at torch's default
    initialisation no proposal of the mobilenet model scores any class above 0.016 (uniform:
    1/91); scaled, the top scores reach ~0.27 and the top class differs between proposals."""
    torch.manual_seed(model_seed(name))
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    calibrate_batch_norms(model.backbone, size=SIZE)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(CLASS_WEIGHT_SCALE)
    return model.eval()


def export_raw_head(
    path: str | Path, batch: int = 1, size: int = SIZE, with_proposals: bool = False,
    name: str = NAME,
) -> Path:
    """`RawFasterRCNN` of `build_faster_rcnn(name)` through the TorchScript exporter at opset
    17, input "input" [batch, 3, size, size] (fixed: the RPN's per-image loops are unrolled for
    the traced batch), outputs "scores", "boxes" (and "proposals")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = RawFasterRCNN(build_faster_rcnn(name), size, with_proposals).eval()
    images = torch.from_numpy(sample_batch(batch, size))
    outputs = OUTPUTS + (["proposals"] if with_proposals else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapper, (images,), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=outputs,
        )
    return path


def run_with_targets(
    wrapper: RawFasterRCNN, images: np.ndarray
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """wrapper(images) with the TARGETS activations kept (retain_grad) for torch autograd."""
    activations: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def hook(module, inputs, output):
            if isinstance(output, dict):  # the backbone body: its stages, the last one kept
                output = list(output.values())[-1]
            output.retain_grad()
            activations[name] = output
        return hook

    hooks = [find(wrapper.model).register_forward_hook(keeper(name))
             for name, find in TARGETS.items()]
    try:
        outputs = wrapper(torch.from_numpy(images))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, activations


def find_targets(
    path: str | Path, images: np.ndarray, activations: dict[str, torch.Tensor]
) -> dict[str, str]:
    """The ONNX tensor of `path` equal to each torch activation on `images`."""
    return {name: find_matching_tensor(path, images, value.detach().numpy())
            for name, value in activations.items()}


def append_score_gradients(
    model: onnx.ModelProto, targets: dict[str, str], heatmap_of: str | None = None,
    with_boxes: bool = True,
) -> onnx.ModelProto:
    """`model` (the raw head) plus graph inputs "seed" [N, R, classes] and (`with_boxes`)
    "box_seed" [N, R, classes, 4], the gradient of the explained score with respect to "scores"
    and "boxes" (a one-hot "seed" at (n, r, c) and a zero "box_seed" explain scores[n, r, c]),
    one output "d_<name>" per target tensor, and with `heatmap_of` the Grad-CAM heatmap
    [N, H, W] at that target as output "heatmap". Built with the library's walker and CAM tail,
    in place."""
    b = GraphBuilder(model)
    seeds = {"scores": "seed", "boxes": "box_seed"} if with_boxes else {"scores": "seed"}
    for seed in seeds.values():
        model.graph.input.append(helper.make_tensor_value_info(seed, TensorProto.FLOAT, None))
    grads = build_backward(b, seeds, list(targets.values()))
    outputs = {f"d_{name}": grads[tensor] for name, tensor in targets.items()}
    if heatmap_of is not None:
        tensor = targets[heatmap_of]
        raw = channel_sum(b, grad_cam(b, tensor, grads[tensor]))
        outputs["heatmap"] = cam_heatmap(b, raw, model.graph.input[0].name, (2, 3))
    for name, tensor in outputs.items():
        model.graph.node.append(helper.make_node("Identity", [tensor], [name]))
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model
