"""Score gradients at every FPN level of a multi-level Faster R-CNN, against torch autograd.

    python benchmarks/check_faster_rcnn_levels.py [--model fasterrcnn_resnet50_fpn] [--size 320]

Too heavy for the test suite (1000 proposals, four pooled levels), the same check as
tests/test_faster_rcnn.py on a model whose MultiScaleRoIAlign spreads its proposals over
several levels: exports the raw head (tests/faster_rcnn_model.py) for one image, compares the
proposals with torch's, and for the top proposal of each level it pools from, compares
d scores[0, r, c] / d each FPN level's map from our backward graph with torch autograd.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from faster_rcnn_model import (  # noqa: E402
    RawFasterRCNN,
    append_score_gradients,
    build_faster_rcnn,
    export_raw_head,
)
from zoo import find_matching_tensor, ort_session, rel_l2, sample_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_resnet50_fpn")
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()

    model = build_faster_rcnn(args.model)
    images = sample_batch(1, args.size)
    levels = model.backbone.fpn.layer_blocks
    maps: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            output.retain_grad()
            maps[name] = output
        return hook

    hooks = [block.register_forward_hook(keep(f"fpn_level_{i}")) for i, block in
             enumerate(levels)]
    scores, _, proposals = RawFasterRCNN(model, args.size, True)(torch.from_numpy(images))
    for hook in hooks:
        hook.remove()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_raw_head(Path(tmp, "raw.onnx"), size=args.size, with_proposals=True,
                               name=args.model)
        ours = ort_session(path).run(None, {"input": images})[2][0]
        theirs = proposals.detach().numpy()[0]
        same_row = np.all(np.abs(ours - theirs) < 0.01, axis=1)
        distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1).min(1)
        print(f"{args.model} at {args.size} x {args.size}: {same_row.sum()} of {len(ours)} "
              f"proposals equal torch's row for row, {(distance < 0.01).sum()} found among them")
        names = {level: find_matching_tensor(path, images, value.detach().numpy())
                 for level, value in maps.items()}
        graph = append_score_gradients(onnx.load(path), names, with_boxes=False)
        session = ort_session(graph.SerializeToString())
    # the level each proposal is pooled from, by the pooler's own LevelMapper
    level_of = model.roi_heads.box_roi_pool.map_levels([proposals[0].detach()]).numpy()
    score_values = scores.detach().numpy()
    for level in np.unique(level_of).astype(int):
        rows = np.nonzero((level_of == level) & same_row)[0]
        r = int(rows[np.argmax(score_values[0, rows, 1:].max(-1))])
        c = int(np.argmax(score_values[0, r, 1:])) + 1
        seed = np.zeros_like(score_values)
        seed[0, r, c] = 1.0
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {"input": images, "seed": seed})))
        expected = torch.autograd.grad(scores[0, r, c], list(maps.values()), retain_graph=True)
        errors = ", ".join(
            f"{name} rel L2 {rel_l2(outputs[f'd_{name}'], grad.numpy()):.2g}"
            f" (max |grad| {np.abs(grad.numpy()).max():.2g})"
            for name, grad in sorted(zip(maps, expected))
        )
        print(f"level {level} ({(level_of == level).sum()} proposals), scores[0, {r}, {c}] = "
              f"{score_values[0, r, c]:.3f}: {errors}")


if __name__ == "__main__":
    main()
