"""Faster R-CNN's box head (torchvision fasterrcnn_mobilenet_v3_large_320_fpn, weights=None)
exported raw (tests/faster_rcnn_model.py): d scores[n, r, c] / d a backbone or FPN feature map
from our backward graph against torch autograd of the same wrapper on the same images.

The gradient reaches the features only through the head's RoiAlign (proposals are constants in
both), so the proposals of the ONNX graph and of torch are compared first. One export and one
augmented graph per session (batch 2 at 320 x 320).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from faster_rcnn_model import (
    SIZE,
    TARGETS,
    RawFasterRCNN,
    append_score_gradients,
    build_faster_rcnn,
    export_raw_head,
    find_targets,
    run_with_targets,
)
from zoo import ort_session, rel_l2, sample_batch
from zoo_reference import R_MIN, map_agreement

pytestmark = pytest.mark.slow

BATCH = 2
STRIDE = 32  # both FPN levels of the 320 model are 10 x 10


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return sample_batch(BATCH, SIZE)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> str:
    return str(export_raw_head(tmp_path_factory.mktemp("frcnn") / "raw.onnx", batch=BATCH,
                               with_proposals=True))


class Captured:
    """The wrapper run by torch with the target activations kept for autograd."""

    def __init__(self, images: np.ndarray) -> None:
        wrapper = RawFasterRCNN(build_faster_rcnn(), SIZE, with_proposals=True)
        outputs, self.activations = run_with_targets(wrapper, images)
        self.scores, self.boxes, self.proposals = outputs

    def gradients(self, score: torch.Tensor) -> dict[str, np.ndarray]:
        grads = torch.autograd.grad(score, [self.activations[t] for t in TARGETS],
                                    retain_graph=True)
        return {t: g.numpy() for t, g in zip(TARGETS, grads)}


@pytest.fixture(scope="session")
def reference(images) -> Captured:
    return Captured(images)


@pytest.fixture(scope="session")
def augmented(exported, images, reference):
    """A session computing the exported graph's outputs, d <seed, scores> / d each target (the
    targets found as the ONNX tensors equal to torch's activations) and the Grad-CAM heatmap
    [N, H, W] at the FPN level the head pools, from the seeds of scores and boxes."""
    targets = find_targets(exported, images, reference.activations)
    model = append_score_gradients(onnx.load(exported), targets, heatmap_of="fpn_level_0")
    return ort_session(model.SerializeToString())


def run_seeded(session, images: np.ndarray, seed: np.ndarray, box_seed=None) -> dict:
    """The augmented session's outputs by name for these seeds (boxes' seed zero by default)."""
    if box_seed is None:
        box_seed = np.zeros((*seed.shape, 4), np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": images, "seed": seed,
                                              "box_seed": box_seed})))


def test_export_matches_torch_and_proposals_agree(exported, images, reference) -> None:
    scores, boxes, proposals = ort_session(exported).run(None, {"input": images})
    count = build_faster_rcnn().rpn.post_nms_top_n()
    assert scores.shape == (BATCH, count, 91) and boxes.shape == (BATCH, count, 91, 4)
    assert proposals.shape == (BATCH, count, 4)
    # the same proposals, row for row (coordinates in pixels of a 320 x 320 image)
    np.testing.assert_allclose(proposals, reference.proposals.detach().numpy(), atol=0.01)
    np.testing.assert_allclose(scores, reference.scores.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(boxes, reference.boxes.detach().numpy(), atol=0.01)
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
    assert scores.max() > 0.1  # not uniform over the 91 classes
    assert boxes.min() >= 0 and boxes.max() <= SIZE


def chosen_detections(scores: np.ndarray) -> list[tuple[int, int, int]]:
    """Per image, the proposal with the highest non-background score, and that class."""
    picks = []
    for n in range(scores.shape[0]):
        r, c = np.unravel_index(np.argmax(scores[n, :, 1:]), scores[n, :, 1:].shape)
        picks.append((n, int(r), int(c) + 1))
    return picks


def test_score_gradients_match_torch_autograd(augmented, images, reference) -> None:
    session = augmented
    scores = reference.scores.detach().numpy()
    for n, r, c in chosen_detections(scores):
        seed = np.zeros_like(scores)
        seed[n, r, c] = 1.0
        ours = run_seeded(session, images, seed)
        expected = reference.gradients(reference.scores[n, r, c])
        for target in TARGETS:
            grad = ours[f"d_{target}"]
            assert np.abs(expected[target]).max() > 1e-6, (target, n)  # a live gradient
            assert rel_l2(grad, expected[target]) < 1e-4, (target, n, r, c)
            assert np.abs(grad[1 - n]).max() == 0  # the other image's features get nothing


def test_box_gradients_match_torch_autograd(augmented, images, reference) -> None:
    """d <v, boxes[n, r]> / d the feature maps (a score over boxes, such as an IoU with a
    reference box, differentiates the box regression and its decoding, clipping included)."""
    session = augmented
    scores = reference.scores.detach().numpy()
    rng = np.random.default_rng(3)
    for n, r, c in chosen_detections(scores):
        box_seed = np.zeros(tuple(reference.boxes.shape), np.float32)
        box_seed[n, r] = rng.standard_normal(box_seed.shape[2:])
        ours = run_seeded(session, images, np.zeros_like(scores), box_seed)
        expected = reference.gradients((reference.boxes * torch.from_numpy(box_seed)).sum())
        for target in TARGETS:
            assert np.abs(expected[target]).max() > 1e-6, (target, n)
            assert rel_l2(ours[f"d_{target}"], expected[target]) < 1e-4, (target, n, r)


def test_gradient_stays_inside_the_proposal(augmented, images, reference) -> None:
    """d scores[n, r, c] / d the pooled FPN map is zero beyond proposal r's bilinear taps."""
    session = augmented
    scores = reference.scores.detach().numpy()
    proposals = reference.proposals.detach().numpy()
    n, r, c = chosen_detections(scores)[0]
    seed = np.zeros_like(scores)
    seed[n, r, c] = 1.0
    grad = run_seeded(session, images, seed)["d_fpn_level_0"]
    x1, y1, x2, y2 = proposals[n, r] / STRIDE
    rows, columns = np.nonzero(np.abs(grad[n]).sum(0))
    assert rows.size > 0
    assert rows.min() >= np.floor(y1) - 1 and rows.max() <= np.ceil(y2) + 1
    assert columns.min() >= np.floor(x1) - 1 and columns.max() <= np.ceil(x2) + 1


class _Scores(torch.nn.Module):
    """The raw head's scores alone, the output pytorch-grad-cam's targets read."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = RawFasterRCNN(build_faster_rcnn(), SIZE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.raw(images)[0]


def test_grad_cam_matches_pytorch_grad_cam(augmented, images, reference) -> None:
    """Grad-CAM of each image's top detection at the pooled FPN level: our graph's heatmap
    against pytorch-grad-cam's GradCAM on the same wrapper, both images in one batch."""
    from pytorch_grad_cam import GradCAM

    session = augmented
    scores = reference.scores.detach().numpy()
    picks = chosen_detections(scores)
    seed = np.zeros_like(scores)
    for n, r, c in picks:
        seed[n, r, c] = 1.0
    ours = run_seeded(session, images, seed)["heatmap"]
    wrapper = _Scores().eval()
    targets = [lambda out, r=r, c=c: out[r, c] for _, r, c in picks]
    with GradCAM(model=wrapper, target_layers=[wrapper.raw.model.backbone.fpn.layer_blocks[0]]
                 ) as cam:
        theirs = cam(torch.from_numpy(images), targets=targets)
    lowest, flat = map_agreement(ours, theirs)
    assert flat == 0 and lowest >= R_MIN, (lowest, flat)
    assert np.abs(ours - theirs).max() < 1e-3
