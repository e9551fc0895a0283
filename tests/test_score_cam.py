"""Score-CAM's shared passes: channels whose activation maps are equal (zero everywhere, or
repeats of another) are scored once, and the map stays pytorch-grad-cam's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import zoo
from gradcam_server.augment import augment_model
from gradcam_server.augment.score import MAX_CHUNK, score_cam_steps

pytestmark = pytest.mark.slow

ZERO_CHANNELS = 8  # channels 0-7 of the target layer: zero on every input
REPEATED = (range(8, 12), range(12, 16))  # channels 8-11 repeat channels 12-15


class SparseChannels(torch.nn.Module):
    """A small classifier whose target layer (the ReLU of `layer`) has channels that are zero
    on every input and channels that repeat others."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1),
                                        torch.nn.ReLU())
        conv = torch.nn.Conv2d(8, 24, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight[:ZERO_CHANNELS] = 0
            conv.bias[:ZERO_CHANNELS] = -1
            conv.weight[REPEATED[0].start:REPEATED[0].stop] = conv.weight[REPEATED[1].start:
                                                                          REPEATED[1].stop]
            conv.bias[REPEATED[0].start:REPEATED[0].stop] = conv.bias[REPEATED[1].start:
                                                                      REPEATED[1].stop]
        self.layer = torch.nn.Sequential(conv, torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.stem(x)))


def exported(tmp_path, images: int):
    """`SparseChannels`, exported with a dynamic batch; `images` photos at its 64 x 64; its
    layer's values for them."""
    model = SparseChannels().eval()
    x = zoo.sample_batch(images, size=64)
    path = tmp_path / "sparse.onnx"
    torch.onnx.export(model, torch.from_numpy(x), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    with torch.no_grad():
        layer = model.layer(model.stem(torch.from_numpy(x))).numpy()
    return model, x, path, layer


def test_shared_passes_match_pytorch_grad_cam(tmp_path) -> None:
    model, x, path, layer = exported(tmp_path, 3)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    maps = layer.reshape(len(x), layer.shape[1], -1)
    assert (maps[:, :ZERO_CHANNELS] == 0).all()
    assert np.array_equal(maps[:, REPEATED[0]], maps[:, REPEATED[1]])
    distinct = [len(np.unique(m, axis=0)) for m in maps]
    assert max(distinct) <= layer.shape[1] - ZERO_CHANNELS - len(REPEATED[0]) + 1

    classes = [int(logits[0].argmax()), 3, 7]
    session = zoo.ort_session(augment_model(
        path, method="scorecam", layer=zoo.find_matching_tensor(path, x, layer)
    ).SerializeToString())
    ours = session.run(["heatmap"], {"input": x, "target_class": np.array(classes)})[0]
    with ScoreCAM(model=model, target_layers=[model.layer]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert all(np.ptp(t) > 0.5 for t in theirs)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_steps_give_the_map_of_one_run(tmp_path) -> None:
    """The server's steps: the scores fed back, a few iterations per run; the run completing
    the scores gives the map of a single run, and the runs before it name the iterations
    needed."""
    _, x, path, layer = exported(tmp_path, 4)
    graph = augment_model(path, method="scorecam",
                          layer=zoo.find_matching_tensor(path, x, layer))
    (loop,) = score_cam_steps(i.name for i in graph.graph.input)
    session = zoo.ort_session(graph.SerializeToString())
    assert {i.name for i in session.get_inputs()} == {"input", "target_class"}
    feeds = {"input": x, "target_class": np.array([-1, 7, 3, -1])}
    whole = session.run(["heatmap"], feeds)[0]

    distinct = sum(len(np.unique(m.reshape(len(m), -1), axis=0)) for m in layer)
    scores, iterations = session.run([loop.scores, loop.iterations],
                                     {**feeds, loop.steps: np.array([0])})
    assert scores.shape == (0,)
    assert iterations[0] == -(-distinct // MAX_CHUNK) >= 2  # of 4 * 24 channels
    steps = 0
    while len(scores) < iterations[0] * -(-distinct // iterations[0]):
        heatmap, scores = session.run(["heatmap", loop.scores],
                                      {**feeds, loop.known: scores, loop.steps: np.array([1])})
        steps += 1
    assert steps == iterations[0]
    np.testing.assert_allclose(heatmap, whole, atol=1e-6)
