"""The figures of docs/ZOO.md's "Detection" section: torchvision's SSDlite (320 x 320) and
RetinaNet (ResNet-50 FPN, 192 x 192) exported with their raw head (tests/detectors.py), and
Faster R-CNN (fasterrcnn_mobilenet_v3_large_320_fpn, tests/faster_rcnn_model.py), one image
explained by reference box and class at the default layer(s).

    PYTHONPATH=server:client:proto:common:tests python benchmarks/bench_detection.py [MODEL ...]

Prints per model: the default layer, the anchor chosen against torchvision's box_iou choice,
the relative L2 error of `gradients` against float64 torch autograd (and float32 torch's own
error, the floor), the Pearson correlation of `heatmap` with pytorch-grad-cam's map of
FasterRCNNBoxScoreTarget on the same detection, and the median time of the augmented session
over the plain one (batch 1, one intra-op thread, interleaved runs).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import detectors  # noqa: E402
import faster_rcnn_model  # noqa: E402
import zoo  # noqa: E402
from gradcam_server.augment import augment_model  # noqa: E402
from test_detection import grad_cam_reference, torch_reference  # noqa: E402
from test_faster_rcnn import OFFSET, PerImageDetections, reference_choice  # noqa: E402

CASES = {  # model, size, reference box, class, the torch module of the default layer
    "ssdlite320_mobilenet_v3_large": (detectors.ssdlite, detectors.SSD_SIZE,
                                      (60.0, 80.0, 220.0, 240.0), 5,
                                      lambda m: m.detector.backbone.features[0]),
    "retinanet_resnet50_fpn": (detectors.retinanet, detectors.RETINANET_SIZE,
                               (30.0, 40.0, 130.0, 150.0), 3,
                               lambda m: m.detector.backbone.body.layer2),
}
PAIRS = 7


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ratio(plain: bytes, augmented: bytes, feeds: dict) -> float:
    """Median time of the augmented session over the plain one, interleaved pairs."""
    forward, explained = session(plain), session(augmented)
    ratios = []
    for _ in range(PAIRS):
        start = time.perf_counter()
        forward.run(None, {"input": feeds["input"]})
        middle = time.perf_counter()
        explained.run(None, feeds)
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return statistics.median(ratios)


def faster_rcnn() -> None:
    """The two-stage case: the default layers are both pooled FPN levels (fused), the
    gradient compared at level 0 (the `gradients` output)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    size = faster_rcnn_model.SIZE
    with tempfile.TemporaryDirectory() as folder:
        path = faster_rcnn_model.export_raw_head(Path(folder) / "model.onnx", batch=1)
        plain = path.read_bytes()
        augmented = augment_model(path, score="detection")
    x = zoo.sample_batch(1, size)
    model = faster_rcnn_model.build_faster_rcnn()
    with torch.no_grad():
        scores, boxes = (t.numpy() for t in faster_rcnn_model.RawFasterRCNN(model, size)(
            torch.from_numpy(x)))
    r, c = np.unravel_index(np.argmax(scores[0, :, 1:]), scores[0, :, 1:].shape)
    box = np.clip(boxes[0, r, c + 1] + OFFSET, 0, size)
    row, label, _ = reference_choice(scores[0], boxes[0], box, int(c) + 1)
    feeds = {"input": x, "target_class": np.array([label]), "detection_index": np.array([-1]),
             "reference_box": box[None]}
    explained = session(augmented.SerializeToString())
    out = dict(zip([o.name for o in explained.get_outputs()], explained.run(None, feeds)))

    def gradient(dtype: torch.dtype) -> np.ndarray:
        wrapper = faster_rcnn_model.RawFasterRCNN(copy.deepcopy(model).to(dtype), size)
        captured = {}
        level = wrapper.model.backbone.fpn.layer_blocks[0]
        hook = level.register_forward_hook(
            lambda _, __, output: captured.update(value=output.requires_grad_()))
        wrapper.requires_grad_(False)
        s, b = wrapper(torch.from_numpy(x).to(dtype))
        hook.remove()
        reference = torch.from_numpy(box[None]).to(dtype)
        total = s[0, row, label] + torchvision.ops.box_iou(b[0, row, label][None], reference)[0, 0]
        return torch.autograd.grad(total, captured["value"])[0].double().numpy()

    float64, float32 = gradient(torch.float64), gradient(torch.float32)
    wrapper = PerImageDetections([(row, label)]).eval()
    fpn = wrapper.raw.model.backbone.fpn
    target = FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=[box], iou_threshold=0.0)
    with GradCAM(model=wrapper, target_layers=[fpn.layer_blocks[0], fpn.layer_blocks[1]]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[target])
    r_value = float(np.corrcoef(out["heatmap"].ravel(), theirs.ravel())[0, 1])
    layers = next(p.value for p in augmented.metadata_props if p.key == "gradcam.layer")
    print(f"{faster_rcnn_model.NAME}: layers {layers} {list(out['activations'].shape[1:])}; "
          f"proposal {int(out['explained_detection'][0])} (torchvision's choice {row}), class "
          f"{int(out['detection_class'][0])} ({label}), IoU {float(out['detection_iou'][0]):.3f}"
          f"; gradient rel L2 {zoo.rel_l2(out['gradients'], float64):.2e} (float32 torch "
          f"{zoo.rel_l2(float32, float64):.2e}); r {r_value:.6f}, max |diff| "
          f"{np.abs(out['heatmap'] - theirs).max():.1e}; explain/forward "
          f"{ratio(plain, augmented.SerializeToString(), feeds):.2f}")


def main() -> None:
    wanted = sys.argv[1:] or [faster_rcnn_model.NAME, *CASES]
    if faster_rcnn_model.NAME in wanted:
        faster_rcnn()
    for name, (build, size, box, label, module_of) in CASES.items():
        if name not in wanted:
            continue
        model = build()
        with tempfile.TemporaryDirectory() as folder:
            path = detectors.export_raw(model, Path(folder) / "model.onnx", size)
            plain = path.read_bytes()
            augmented = augment_model(path, score="detection")
        layer = next(p.value for p in augmented.metadata_props if p.key == "gradcam.layer")
        x = zoo.sample_batch(1, size)
        box = np.array(box, np.float32)
        feeds = {"input": x, "target_class": np.array([label]),
                 "detection_index": np.array([-1]), "reference_box": box[None]}
        explained = session(augmented.SerializeToString())
        out = dict(zip([o.name for o in explained.get_outputs()], explained.run(None, feeds)))
        with torch.no_grad():
            scores, boxes = (t.numpy() for t in model(torch.from_numpy(x)))
        anchor, _ = detectors.choose_anchor(scores[0], boxes[0], box, label)
        module = module_of(model)
        reference = torch_reference(model, module, x, [anchor], [label], [box], torch.float64)
        float32 = torch_reference(model, module, x, [anchor], [label], [box], torch.float32)
        cam = grad_cam_reference(model, module, x, [anchor], [label], [box])
        r = float(np.corrcoef(out["heatmap"].ravel(), cam.ravel())[0, 1])
        forward = session(plain)
        ratios = []
        for _ in range(PAIRS):
            start = time.perf_counter()
            forward.run(None, {"input": x})
            middle = time.perf_counter()
            explained.run(None, feeds)
            ratios.append((time.perf_counter() - middle) / (middle - start))
        print(f"{name}: layer {layer} {list(out['activations'].shape[1:])}; anchor "
              f"{int(out['explained_detection'][0])} (torchvision's choice {anchor}), IoU "
              f"{float(out['detection_iou'][0]):.3f}; gradient rel L2 "
              f"{zoo.rel_l2(out['gradients'], reference):.2e} (float32 torch "
              f"{zoo.rel_l2(float32, reference):.2e}); r {r:.4f}; explain/forward "
              f"{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
