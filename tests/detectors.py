"""Torchvision single-stage detectors with their raw head, as docs/DETECTION.md tells users to
export them, and their pytorch-grad-cam references.

`RawDetector` wraps SSD / SSDlite / RetinaNet (built with weights=None, BatchNorm calibrated on
the scikit-image photos as tests/zoo.py does) into backbone + head + anchor decoding, before
any score threshold, top-k or NMS:

    scores [N, A, C]  class probabilities (softmax for SSD, sigmoid for RetinaNet)
    boxes  [N, A, 4]  decoded boxes (x1, y1, x2, y2) in input pixels

The anchors of the fixed input size are computed once and exported as a constant. `PerImage`
turns those outputs into one dict per image for pytorch-grad-cam, and `AnchorBoxScoreTarget`
is its FasterRCNNBoxScoreTarget on the one detection explained.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torchvision.models.detection.image_list import ImageList

import zoo

SSD_SIZE = 320
RETINANET_SIZE = 192


class RawDetector(torch.nn.Module):
    """A torchvision single-stage detector (SSD, SSDlite, RetinaNet) without its transform
    and post-processing: images [N, 3, size, size], already normalised, to (scores, boxes)."""

    def __init__(self, detector: torch.nn.Module, size: int, activation: str) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.activation = activation
        with torch.no_grad():
            dummy = torch.zeros(1, 3, size, size)
            features = self._features(dummy)
            anchors = detector.anchor_generator(ImageList(dummy, [(size, size)]), features)[0]
        self.register_buffer("anchors", anchors)
        self.eval()  # the exporter restores the wrapper's mode on every submodule

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.detector.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return list(features.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.detector.head(self._features(x))
        logits = head["cls_logits"]
        if self.activation == "softmax":
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        return scores, decode_boxes(head["bbox_regression"], self.anchors,
                                    self.detector.box_coder)


def decode_boxes(codes: torch.Tensor, anchors: torch.Tensor, coder) -> torch.Tensor:
    """torchvision's `BoxCoder.decode_single`, batched: codes [N, A, 4] against anchors
    [A, 4] to boxes [N, A, 4] (x1, y1, x2, y2)."""
    wx, wy, ww, wh = coder.weights
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    center_x = anchors[:, 0] + 0.5 * widths
    center_y = anchors[:, 1] + 0.5 * heights
    dx, dy = codes[..., 0] / wx, codes[..., 1] / wy
    dw = torch.clamp(codes[..., 2] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(codes[..., 3] / wh, max=coder.bbox_xform_clip)
    x = dx * widths + center_x
    y = dy * heights + center_y
    half_w = 0.5 * torch.exp(dw) * widths
    half_h = 0.5 * torch.exp(dh) * heights
    return torch.stack([x - half_w, y - half_h, x + half_w, y + half_h], dim=-1)


@functools.cache
def ssdlite() -> RawDetector:
    torch.manual_seed(zoo.model_seed("ssdlite"))
    detector = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None
    )
    return RawDetector(_calibrated(detector.backbone, detector, SSD_SIZE), SSD_SIZE, "softmax")


@functools.cache
def retinanet() -> RawDetector:
    torch.manual_seed(zoo.model_seed("retinanet"))
    detector = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None
    )
    return RawDetector(
        _calibrated(detector.backbone, detector, RETINANET_SIZE), RETINANET_SIZE, "sigmoid"
    )


def _calibrated(backbone: torch.nn.Module, detector: torch.nn.Module, size: int):
    """`detector` with its backbone's BatchNorm statistics calibrated on the photos
    (`zoo.calibrate_batch_norms`, at `size`); RetinaNet's ResNet uses frozen BatchNorm,
    which has no statistics to calibrate and stays as built."""
    zoo.calibrate_batch_norms(backbone, size)
    return detector.eval()


def export_raw(model: RawDetector, path: Path, size: int) -> Path:
    """The raw-head wrapper through the TorchScript exporter, opset 17, batch dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(zoo.sample_batch(2, size)),), str(path), dynamo=False,
            opset_version=17, input_names=["input"], output_names=["scores", "boxes"],
            dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}, "boxes": {0: "N"}},
        )
    return path


class PerImage(torch.nn.Module):
    """The raw detector's outputs as one dict per image (what pytorch-grad-cam zips with its
    targets), holding only the detection explained for that image: "boxes" [1, 4], "scores"
    [1] (the class's score) and "labels" [1]."""

    def __init__(self, model: RawDetector, anchors: list[int], classes: list[int]) -> None:
        super().__init__()
        self.model, self.chosen, self.classes = model, anchors, classes

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scores, boxes = self.model(x)
        return [
            {"boxes": boxes[n, a][None], "scores": scores[n, a, c][None],
             "labels": torch.tensor([c])}
            for n, (a, c) in enumerate(zip(self.chosen, self.classes))
        ]


def box_score_target(box: np.ndarray, label: int) -> FasterRCNNBoxScoreTarget:
    """pytorch-grad-cam's target for one reference box: the class score plus the IoU."""
    return FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=[np.asarray(box)],
                                    iou_threshold=0.0)


def choose_anchor(scores: np.ndarray, boxes: np.ndarray, box: np.ndarray, label: int,
                  threshold: float = 0.5) -> tuple[int, float]:
    """The reference selection, from torch's outputs of one image: among the anchors whose
    box has IoU >= threshold with `box` (torchvision's box_iou), the highest `label` score;
    returns (anchor, IoU), or (-1, 0) where none overlaps enough."""
    ious = torchvision.ops.box_iou(torch.from_numpy(np.asarray(box, np.float32))[None],
                                   torch.from_numpy(boxes))[0].numpy()
    candidates = np.flatnonzero(ious >= threshold)
    if not len(candidates):
        return -1, 0.0
    best = candidates[np.argmax(scores[candidates, label])]
    return int(best), float(ious[best])
