"""Check the "detection" score on an Ultralytics YOLOv8 head ([N, 4 + C, A]: cx, cy, w, h in
input pixels, then sigmoid class scores), against torch autograd on the same weights.

    pip install --target /tmp/ulpkgs --no-deps ultralytics==8.4.190 ultralytics-thop psutil \\
        requests charset-normalizer urllib3 certifi polars polars-runtime-32
    PYTHONPATH=server:client:proto:common:tests:/tmp/ulpkgs YOLO_OFFLINE=1 python scripts/yolo_check.py

yolov8n is built from its YAML (random weights, nothing downloaded), its BatchNorm calibrated
on the scikit-image photos (tests/zoo.py), and exported through the TorchScript exporter at
opset 17 with the raw head alone (the eval output's first element, before any NMS). The
augmenter detects the YOLO layout from the one [N, 84, A] output; the script prints the chosen
anchor against a numpy choice, and the relative L2 error of the gradient at the default layer
against float64 torch autograd of score + IoU. Ultralytics is not a test dependency.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import zoo  # noqa: E402
from gradcam_server.augment import augment_model  # noqa: E402

SIZE = 320
BOX = np.array([60.0, 80.0, 220.0, 240.0], dtype=np.float32)
CLASS = 0


class RawHead(torch.nn.Module):
    """The YOLO network's raw head [N, 4 + C, A], as `model.export(format="onnx")` writes it
    before any NMS."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def main() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    torch.manual_seed(0)
    net = YOLO("yolov8n.yaml").model
    for module in net.modules():  # Ultralytics builds BatchNorm with momentum 0.03
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
            module.train()
    with torch.no_grad():
        net(torch.from_numpy(zoo.sample_batch(len(zoo.PHOTOS), SIZE)))
    model = RawHead(net.eval()).eval()
    x = zoo.sample_batch(1, SIZE)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "yolov8n.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["output0"],
                              dynamic_axes={"input": {0: "N"}, "output0": {0: "N"}})
        augmented = augment_model(path, score="detection")
    layer = next(p.value for p in augmented.metadata_props if p.key == "gradcam.layer")
    session = zoo.ort_session(augmented.SerializeToString())
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
        "input": x, "target_class": np.array([CLASS]), "detection_index": np.array([-1]),
        "reference_box": BOX[None]})))

    with torch.no_grad():
        raw = model(torch.from_numpy(x))[0].numpy()  # [84, A]
    centre, half = raw[:2].T, raw[2:4].T / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    ious = torchvision.ops.box_iou(torch.from_numpy(BOX[None]), torch.from_numpy(boxes))[0]
    candidates = np.flatnonzero(ious.numpy() >= 0.5)
    expected = int(candidates[np.argmax(raw[4 + CLASS, candidates])]) if len(candidates) else -1
    print(f"layer {layer}; anchors overlapping the box: {len(candidates)}; chosen "
          f"{int(out['explained_detection'][0])}, numpy {expected}; IoU "
          f"{float(out['detection_iou'][0]):.4f}")
    if expected < 0:
        return
    gradient = _torch_gradient(model, out["activations"], x, expected)
    error = zoo.rel_l2(out["gradients"], gradient)
    print(f"gradient at the default layer: rel L2 {error:.2e} against float64 torch autograd")


def _torch_gradient(model: RawHead, activations: np.ndarray, x: np.ndarray,
                    anchor: int) -> np.ndarray:
    """d (score + IoU) / d the module output equal to `activations` (the augmented graph's
    target layer), float64 torch autograd."""
    shape = activations.shape
    double = copy.deepcopy(model).double().requires_grad_(False)
    captured = []

    def keep(_, __, output):
        if isinstance(output, torch.Tensor) and tuple(output.shape) == tuple(shape):
            output.requires_grad_()
            captured.append(output)

    hooks = [m.register_forward_hook(keep) for m in double.net.model]
    raw = double(torch.from_numpy(x).double())[0]
    for hook in hooks:
        hook.remove()
    centre, half = raw[:2, anchor], raw[2:4, anchor] / 2
    box = torch.cat([centre - half, centre + half])[None]
    score = raw[4 + CLASS, anchor] + torchvision.ops.box_iou(
        box, torch.from_numpy(BOX[None]).double())[0, 0]
    layer = next(t for t in captured
                 if zoo.rel_l2(activations, t.detach().numpy()) < 1e-4)
    (gradient,) = torch.autograd.grad(score, layer)
    return gradient.numpy()


if __name__ == "__main__":
    main()
