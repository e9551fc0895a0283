"""Faster R-CNN's box head (torchvision fasterrcnn_mobilenet_v3_large_320_fpn, weights=None)
exported raw (tests/faster_rcnn_model.py): d scores[n, r, c] / d a backbone or FPN feature map
from our backward graph against torch autograd of the same wrapper on the same images, and the
"detection" score (augment_model(score="detection")) against torch autograd and
pytorch-grad-cam's FasterRCNNBoxScoreTarget.

The gradient reaches the features only through the head's RoiAlign (proposals are constants in
both), so the proposals of the ONNX graph and of torch are compared first. One export and one
augmented graph per session (batch 2 at 320 x 320).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torchvision.ops import box_iou

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
from gradcam_server.augment import augment_model, explained_target
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


# The "detection" score on the raw head (augment_model(score="detection")): the proposal chosen
# by box or by index, class 0 (background) never explained, padding rows never chosen, the
# default layers (the FPN levels the RoI head pools, fused) against torch autograd and
# pytorch-grad-cam's FasterRCNNBoxScoreTarget on the same wrapper.

OFFSET = np.array([4.0, -3.0, -5.0, 6.0], np.float32)  # reference = a detection's box, moved


@pytest.fixture(scope="session")
def detection_model(exported) -> onnx.ModelProto:
    return augment_model(exported, score="detection")


def run_detection(model: onnx.ModelProto, images, classes, indices, boxes) -> dict:
    session = ort_session(model.SerializeToString())
    feeds = {"input": images, "target_class": np.asarray(classes, np.int64),
             "detection_index": np.asarray(indices, np.int64),
             "reference_box": np.asarray(boxes, np.float32)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def reference_choice(scores: np.ndarray, boxes: np.ndarray, box: np.ndarray, label: int,
                     threshold: float = 0.5) -> tuple[int, int, float]:
    """From one image's torch outputs (scores [R, 91], boxes [R, 91, 4]): among the proposals
    whose box for `label` (for -1: for its best class but background) has an area and IoU >=
    threshold with `box` (torchvision's box_iou), the highest-scoring; (row, class, IoU)."""
    rows = np.arange(len(scores))
    classes = np.full(len(rows), label) if label >= 0 else np.argmax(scores[:, 1:], 1) + 1
    row_boxes = boxes[rows, classes]
    ious = box_iou(torch.from_numpy(box[None]), torch.from_numpy(row_boxes))[0].numpy()
    area = (row_boxes[:, 2] > row_boxes[:, 0]) & (row_boxes[:, 3] > row_boxes[:, 1])
    candidates = np.flatnonzero((ious >= threshold) & area)
    assert len(candidates), "the reference box overlaps no proposal: the check is vacuous"
    best = candidates[np.argmax(scores[candidates, classes[candidates]])]
    return int(best), int(classes[best]), float(ious[best])


def torch_detection_score(reference: Captured, picks, boxes) -> torch.Tensor:
    """sum over images of scores[n, r, c] + box_iou(boxes[n, r, c], reference box) (no IoU for
    a zero reference), FasterRCNNBoxScoreTarget's score, in torch."""
    total = 0
    for n, ((r, c), box) in enumerate(zip(picks, boxes)):
        total = total + reference.scores[n, r, c]
        if box[2] > box[0]:
            total = total + box_iou(reference.boxes[n, r, c][None],
                                    torch.from_numpy(np.asarray(box, np.float32))[None])[0, 0]
    return total


class PerImageDetections(torch.nn.Module):
    """The raw head as one dict per image holding the detection explained for it (what
    pytorch-grad-cam zips with FasterRCNNBoxScoreTarget): its box, class score and label."""

    def __init__(self, picks) -> None:
        super().__init__()
        self.raw, self.picks = RawFasterRCNN(build_faster_rcnn(), SIZE), picks

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scores, boxes = self.raw(images)
        return [{"boxes": boxes[n, r, c][None], "scores": scores[n, r, c][None],
                 "labels": torch.tensor([c])} for n, (r, c) in enumerate(self.picks)]


def test_detection_by_box_matches_torch_and_pytorch_grad_cam(
    detection_model, exported, images, reference
) -> None:
    """Image 0 by reference box and class, image 1 by reference box and its best class (-1):
    the proposal against torchvision's box_iou choice, the default layers (both pooled FPN
    levels, level 0 first), d score / d level 0 against torch autograd, and the fused
    heatmap against pytorch-grad-cam's GradCAM of FasterRCNNBoxScoreTarget at both levels."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    scores = reference.scores.detach().numpy()
    boxes = reference.boxes.detach().numpy()
    tops = chosen_detections(scores)
    references = np.stack([np.clip(boxes[n, r, c] + OFFSET, 0, SIZE) for n, r, c in tops])
    expected = [reference_choice(scores[0], boxes[0], references[0], tops[0][2]),
                reference_choice(scores[1], boxes[1], references[1], -1)]

    layers = explained_target(detection_model)["layer"].split(",")
    level_0 = find_targets(exported, images, reference.activations)["fpn_level_0"]
    assert layers[0] == level_0 and len(layers) == 2  # the two levels MultiScaleRoIAlign pools
    out = run_detection(detection_model, images, [tops[0][2], -1], [-1, -1], references)
    assert out["explained_detection"].tolist() == [r for r, _, _ in expected]
    assert out["detection_class"].tolist() == [c for _, c, _ in expected]
    np.testing.assert_allclose(out["detection_iou"], [iou for _, _, iou in expected], rtol=1e-4)
    picks = [(r, c) for r, c, _ in expected]
    np.testing.assert_allclose(out["detection_score"], [scores[n, r, c] for n, (r, c) in
                                                        enumerate(picks)], rtol=1e-4)

    expected_gradient = reference.gradients(torch_detection_score(reference, picks,
                                                                  references))["fpn_level_0"]
    assert np.abs(expected_gradient).max() > 1e-6
    assert rel_l2(out["gradients"], expected_gradient) < 1e-4

    wrapper = PerImageDetections(picks).eval()
    targets = [FasterRCNNBoxScoreTarget(labels=[c], bounding_boxes=[box], iou_threshold=0.0)
               for (_, c), box in zip(picks, references)]
    fpn = wrapper.raw.model.backbone.fpn
    with GradCAM(model=wrapper, target_layers=[fpn.layer_blocks[0], fpn.layer_blocks[1]]) as cam:
        theirs = cam(torch.from_numpy(images), targets=targets)
    lowest, flat = map_agreement(out["heatmap"], theirs)
    assert flat == 0 and lowest >= R_MIN, (lowest, flat)
    assert np.abs(out["heatmap"] - theirs).max() < 1e-3


def test_detection_by_index_ranks_classes_without_background(
    detection_model, images, reference
) -> None:
    """Image 1 by proposal index, at the proposal where background ranks highest (k - 1
    classes above it), for its k-th class (-k): ranked without background, the k-th class
    but background, where the plain k-th would be background; the class score alone (no
    reference box). Image 0 asks for class 0, the background: nothing is explained (-1) and
    its features get a zero gradient."""
    scores = reference.scores.detach().numpy()
    above = (scores[1] > scores[1, :, :1]).sum(-1)  # classes scoring above background
    row, k = int(np.argmin(above)), int(above.min()) + 1
    assert np.argsort(-scores[1, row])[k - 1] == 0  # the plain k-th class is background
    kth = int(np.argsort(-scores[1, row, 1:])[k - 1]) + 1
    out = run_detection(detection_model, images, [0, -k], [row, row], np.zeros((2, 4)))
    assert out["explained_detection"].tolist() == [-1, row]
    assert out["detection_class"][1] == kth
    np.testing.assert_allclose(out["detection_score"][1], scores[1, row, kth], rtol=1e-4)
    expected = reference.gradients(reference.scores[1, row, kth])["fpn_level_0"]
    assert np.abs(expected[1]).max() > 1e-6
    assert rel_l2(out["gradients"][1], expected[1]) < 1e-4
    assert not out["gradients"][0].any()


def test_padding_rows_are_never_chosen(exported, images, reference) -> None:
    """Rows of zero boxes (an image with fewer proposals than R) are not chosen by box, even
    at IoU threshold 0 where their IoU of 0 would pass, and explain nothing by index. The
    export's photos fill all R rows, so the boxes of the rows that score class c highest are
    zeroed in the graph, as the wrapper's padding does."""
    scores = reference.scores.detach().numpy()
    boxes = reference.boxes.detach().numpy()
    n, r, c = chosen_detections(scores)[0]
    padded = np.argsort(scores[0, :, c])[-5:]  # the five best rows for c become padding
    mask = np.ones((1, scores.shape[1], 1, 1), np.float32)
    mask[0, padded] = 0.0
    model = onnx.load(exported)
    producer = next(node for node in model.graph.node if "boxes" in node.output)
    producer.output[list(producer.output).index("boxes")] = "decoded_boxes"
    model.graph.initializer.append(onnx.numpy_helper.from_array(mask, "padding_mask"))
    model.graph.node.append(onnx.helper.make_node("Mul", ["decoded_boxes", "padding_mask"],
                                                  ["boxes"]))
    box = np.clip(boxes[0, r, c] + OFFSET, 0, SIZE)
    expected, _, _ = reference_choice(scores[0], boxes[0] * mask[0], box, c, threshold=0.0)
    assert expected not in padded
    out = run_detection(augment_model(model, score="detection", iou_threshold=0.0), images,
                        [c, c], [-1, int(padded[-1])], [box, box])
    assert out["explained_detection"].tolist() == [expected, -1]
    assert not out["gradients"][1].any()


def test_served_in_process(exported, detection_model, images, reference, tmp_path) -> None:
    """The export served through the service, in process (config.json: score "detection"):
    its default layers are both pooled levels, its facts 150 proposals, 91 classes and
    background 0; a detection by box gives the augmented graph's map; another method builds
    its graph at the same default layers; class 0 is refused by name."""
    import asyncio

    import servers
    from gradcam_server.errors import InvalidInput
    from gradcam_server.model import Explaining
    from gradcam_server.repository import ModelRepository
    from gradcam_server.runtime import RuntimeOptions
    from gradcam_server.service import GradCamService

    (tmp_path / "frcnn").mkdir()
    (tmp_path / "frcnn" / "model.onnx").symlink_to(exported)
    servers.write_config(tmp_path / "frcnn", score="detection")
    repository = ModelRepository(tmp_path, RuntimeOptions("cpu", 1))
    repository.load_all()
    model = repository.get("frcnn")
    layers = tuple(explained_target(detection_model)["layer"].split(","))
    assert model.default_layer == layers
    assert (model.num_anchors, model.num_classes, model.background_class) == (150, 91, 0)

    scores = reference.scores.detach().numpy()
    boxes = reference.boxes.detach().numpy()
    n, r, c = chosen_detections(scores)[0]
    wanted = np.stack([np.clip(boxes[n, r, c] + OFFSET, 0, SIZE)] * BATCH)
    service = GradCamService(repository)

    def served(method: str, classes) -> dict:
        detection = (np.full(BATCH, -1, np.int64), wanted)
        return asyncio.run(service.run(model, images, explain=Explaining(method),
                                       target_class=np.array(classes, np.int64),
                                       detection=detection)).outputs

    direct = run_detection(detection_model, images, [c, -1], [-1, -1], wanted)
    out = served("gradcam", [c, -1])
    np.testing.assert_array_equal(out["explained_detection"], direct["explained_detection"])
    np.testing.assert_allclose(out["heatmap"], direct["heatmap"], atol=1e-5)
    assert served("gradcam++", [c, -1])["heatmap"].shape == (BATCH, SIZE, SIZE)
    with pytest.raises(InvalidInput, match="target_class 0 is the detector's background"):
        served("gradcam", [0, -1])
