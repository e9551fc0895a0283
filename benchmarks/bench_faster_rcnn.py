"""Cost of Grad-CAM on Faster R-CNN's raw box head, as ratios to its plain forward.

    python benchmarks/bench_faster_rcnn.py [--model NAME] [--threads 2] [--seconds 20] [--batch 1]

Exports torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (or --model, e.g.
fasterrcnn_resnet50_fpn; weights=None, seeded and calibrated as in the tests: speed does not
depend on the weights) through tests/faster_rcnn_model.py at 320 x 320, and times,
interleaved, the plain graph and the graph with Grad-CAM of one score scores[n, r, c] (a
one-hot seed) appended at each target layer: the finest FPN level, and the backbone's last
stage before the FPN; and, for scale, torch's forward of the same wrapper and
pytorch-grad-cam's GradCAM at the FPN level.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pytorch_grad_cam import GradCAM

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).parent)]

from bench_augment import interleaved, make_session  # noqa: E402
from faster_rcnn_model import (  # noqa: E402
    NAME,
    SIZE,
    RawFasterRCNN,
    append_score_gradients,
    build_faster_rcnn,
    export_raw_head,
    find_targets,
    run_with_targets,
)
from zoo import sample_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=NAME)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    images = sample_batch(args.batch, SIZE)
    wrapper = RawFasterRCNN(build_faster_rcnn(args.model), SIZE)
    (scores, _), activations = run_with_targets(wrapper, images)
    seed = np.zeros(tuple(scores.shape), np.float32)
    seed[0, 0, 1] = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        plain = export_raw_head(Path(tmp, "raw.onnx"), batch=args.batch, name=args.model)
        targets = find_targets(plain, images, activations)
        sessions = {"forward": make_session(plain, args.threads)}
        runs = {"forward": lambda: sessions["forward"].run(None, {"input": images})}
        for name in targets:
            model = append_score_gradients(onnx.load(plain), {name: targets[name]}, name,
                                           with_boxes=False)
            path = Path(tmp, f"{name}.onnx")
            onnx.save(model, str(path))
            sessions[name] = make_session(path, args.threads)
            runs[name] = (lambda s=sessions[name]:
                          s.run(["scores", "boxes", "heatmap"], {"input": images, "seed": seed}))
        torch.set_num_threads(args.threads)
        batch = torch.from_numpy(images)

        def torch_forward() -> None:
            with torch.no_grad():
                wrapper(batch)

        scores_only = _ScoresOnly(wrapper)
        layer = wrapper.model.backbone.fpn.layer_blocks[0]
        with GradCAM(model=scores_only, target_layers=[layer]) as cam:
            targets = [lambda out: out[0, 1]] * args.batch
            runs["torch forward"] = torch_forward
            runs["pytorch-grad-cam at fpn_level_0"] = lambda: cam(batch, targets=targets)
            medians = interleaved(runs, args.seconds)
    print(f"{args.model} raw head, batch {args.batch}, {SIZE} x {SIZE}, "
          f"CPU, {args.threads} threads, onnxruntime {ort.__version__}")
    print("run                                     ms   ratio to the onnxruntime forward")
    for name, seconds in medians.items():
        label = name if name in ("forward", "torch forward") or " " in name else (
            f"grad-cam at {name}")
        print(f"{label:<36s} {seconds * 1e3:7.1f}  {seconds / medians['forward']:5.3f}")


class _ScoresOnly(torch.nn.Module):
    """The wrapper's scores, the output pytorch-grad-cam's targets read."""

    def __init__(self, wrapper: RawFasterRCNN) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapper(images)[0]


if __name__ == "__main__":
    main()
