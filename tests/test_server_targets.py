"""Serving targets beyond a classifier's logit, through both APIs of a real server: a
segmentation model explained for a region of its output, and a model with two inputs and two
outputs explained for a chosen output.

The served heatmaps are compared with the augmented graph run directly (the augmenter's own
gradients are checked against torch autograd in test_segmentation.py and test_augment.py);
which classes are explained, and the predictions, are checked against the torch models.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image

import servers
from gradcam_client import GradCamClient
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from gradcam_server.augment import augment_model
from servers import expect_error

CALL_TIMEOUT_S = 60.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SIZE = servers.TINY_SIZE


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("targets")
    servers.export_segmenter(root / "segmenter" / "model.onnx")  # model.onnx alone
    servers.export_two_heads(root / "two_heads" / "model.onnx")
    servers.write_config(root / "two_heads", input=1, score_output=1, size=[SIZE, SIZE])
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with servers.serving(repository, log) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(server.address) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server) -> pb_grpc.GradCamStub:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GradCamStub(channel)


@pytest.fixture(scope="module")
def segmenter() -> servers.TinySegmenter:
    torch.manual_seed(0)
    return servers.TinySegmenter().eval()


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def tensor(name: str, value: np.ndarray) -> triton.InferInput:
    datatype = {np.float32: "FP32", np.int64: "INT64", np.float16: "FP16"}[value.dtype.type]
    item = triton.InferInput(name, list(value.shape), datatype)
    item.set_data_from_numpy(value)
    return item


def infer(client, model: str, inputs, outputs=("heatmap",), **parameters) -> dict:
    result = client.infer(
        model, inputs, outputs=[triton.InferRequestedOutput(n) for n in outputs],
        parameters=parameters or None, client_timeout=CALL_TIMEOUT_S,
    )
    return {name: result.as_numpy(name) for name in outputs}


def direct(model_path: Path, feeds: dict, **options) -> np.ndarray:
    """The heatmap of the augmented graph, run here."""
    augmented = augment_model(model_path, **options)
    session = ort.InferenceSession(augmented.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["heatmap"], feeds)[0]


def explain(stub, **fields) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(**fields), timeout=CALL_TIMEOUT_S)


def proto_tensor(value: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(value.shape), data=value.astype("<f4").tobytes())


def proto_image(value: np.ndarray) -> pb.Image:
    return pb.Image(tensor=proto_tensor(value))


# -- a segmentation model ------------------------------------------------------------------------


def test_segmentation_model_serves_with_detected_defaults(stub) -> None:
    """A folder with only model.onnx: the region score, and the coarsest map (conv2's relu,
    8 x 8) as the layer."""
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="segmenter"), timeout=CALL_TIMEOUT_S)
    assert info.default_score == "region"
    assert list(info.layer_shape) == [-1, 16, SIZE // 4, SIZE // 4]
    assert info.num_classes == servers.SEGMENT_CLASSES


def test_kserve_region_defaults_to_the_predicted_region(client, repository) -> None:
    x = images(2)
    served = infer(client, "segmenter", [tensor("input", x)])["heatmap"]
    expected = direct(repository / "segmenter" / "model.onnx", {
        "input": x, "target_class": np.array([-1, -1]),
        "target_mask": np.full((2, SIZE, SIZE), -1.0, dtype=np.float32),
    }, score="region")
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_kserve_region_with_a_mask_of_another_size(client, repository) -> None:
    """A [h, w] mask for every image, at twice the output's size, is resized to it (nearest
    pixel). HiResCAM
    (gradients times activations, element-wise) shows where the region is; Grad-CAM would not
    here, as its channel means cancel the mask through this model's linear head."""
    x = images(2, seed=1)
    mask = np.zeros((2 * SIZE, 2 * SIZE), dtype=np.float32)
    mask[:SIZE, :SIZE] = 1.0  # the top-left quarter
    classes = tensor("target_class", np.array([2, 3]))
    served = infer(client, "segmenter", [tensor("input", x), tensor("target_mask", mask), classes],
                   method="hirescam")["heatmap"]
    small = np.zeros((2, SIZE, SIZE), dtype=np.float32)
    small[:, : SIZE // 2, : SIZE // 2] = 1.0
    expected = direct(repository / "segmenter" / "model.onnx", {
        "input": x, "target_class": np.array([2, 3]), "target_mask": small,
    }, score="region", method="hirescam")
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert served[:, SIZE // 2 + 2:, SIZE // 2 + 2:].max() <= 1e-6  # nothing far from it
    unmasked = infer(client, "segmenter", [tensor("input", x), classes],
                     method="hirescam")["heatmap"]
    assert not np.allclose(served, unmasked, atol=1e-3)


def test_typed_top_k_ranks_classes_by_predicted_area(stub, segmenter) -> None:
    x = images(1, seed=2)
    with torch.no_grad():
        predicted = segmenter(torch.from_numpy(x))[0].argmax(0)
    areas = torch.bincount(predicted.flatten(), minlength=servers.SEGMENT_CLASSES).numpy()
    by_area = np.argsort(-areas, kind="stable")
    response = explain(stub, model="segmenter", images=[proto_image(x[0])],
                       target=pb.Target(top_k=2))
    explanation = response.explanations[0]
    assert [h.class_index for h in explanation.heatmaps] == list(by_area[:2])
    shares = {p.class_index: p.score for p in explanation.predictions}
    for c, area in enumerate(areas):
        if area:
            assert shares[c] == pytest.approx(area / areas.sum(), abs=1e-6)


def test_typed_mask_ranks_classes_by_masked_score(stub, segmenter, repository) -> None:
    x = images(1, seed=3)
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    mask[SIZE // 2:, :] = 1.0  # the bottom half
    with torch.no_grad():
        scores = segmenter(torch.from_numpy(x))[0]
    best = int((scores * torch.from_numpy(mask)).sum((1, 2)).argmax())
    response = explain(stub, model="segmenter", images=[proto_image(x[0])],
                       target_mask=proto_tensor(mask))
    heatmap = response.explanations[0].heatmaps[0]
    assert heatmap.class_index == best
    expected = direct(repository / "segmenter" / "model.onnx", {
        "input": x, "target_class": np.array([-1]), "target_mask": mask[None],
    }, score="region")
    served = np.frombuffer(heatmap.data, dtype="<f4").reshape(SIZE, SIZE)
    np.testing.assert_allclose(served, expected[0], atol=1e-5)


def test_bad_segmentation_requests_are_refused(client, stub) -> None:
    x = images(1)
    expect_error(
        lambda: infer(client, "segmenter", [tensor("input", x)], score="logit"),
        INVALID, "needs an output [N, classes]",
    )
    expect_error(
        lambda: infer(client, "segmenter", [
            tensor("input", x), tensor("target_mask", np.ones((2, SIZE, SIZE), np.float32)),
        ]),
        INVALID, "target mask has 2 rows for 1 images",
    )
    expect_error(
        lambda: explain(stub, model="segmenter", images=[proto_image(x[0])],
                        target_mask=pb.Tensor(shape=[SIZE], data=b"\0" * 4 * SIZE)),
        INVALID, "target_mask must be [h, w] or [N, h, w]",
    )
    expect_error(
        lambda: explain(stub, model="segmenter", images=[proto_image(x[0])],
                        target_mask=proto_tensor(np.full((4, 4), np.nan, np.float32))),
        INVALID, "target mask contains NaN",
    )
    expect_error(
        lambda: infer(client, "two_heads", [
            tensor("image", x), tensor("meta", np.ones((1, 1), np.float32)),
            tensor("target_mask", np.ones((SIZE, SIZE), np.float32)),
        ]),
        INVALID, "only used with score 'region'",
    )


# -- a model with two inputs and two outputs -----------------------------------------------------


def test_other_input_fed_and_output_chosen_by_index(client, repository) -> None:
    """config.json names the image input and the default output by index; a request picks an
    output by index (an INT64 parameter, 0 included) or by name, and feeds the other input by
    name."""
    x = images(2, seed=4)
    meta = np.array([[0.5], [2.0]], dtype=np.float32)
    inputs = [tensor("image", x), tensor("meta", meta),
              tensor("target_class", np.array([1, 3]))]
    default = infer(client, "two_heads", inputs, outputs=("heatmap", "attributes"))
    by_name = infer(client, "two_heads", inputs, output="attributes")
    logits = infer(client, "two_heads", inputs, output=0)
    expected = direct(repository / "two_heads" / "model.onnx", {
        "image": x, "meta": meta, "target_class": np.array([1, 3]),
    }, input="image", output="attributes")
    np.testing.assert_allclose(default["heatmap"], expected, atol=1e-5)
    np.testing.assert_allclose(by_name["heatmap"], expected, atol=1e-5)
    np.testing.assert_allclose(logits["heatmap"], direct(
        repository / "two_heads" / "model.onnx",
        {"image": x, "meta": meta, "target_class": np.array([1, 3])}, input=1, output=0,
    ), atol=1e-5)
    assert not np.allclose(logits["heatmap"], expected, atol=1e-3)
    torch.manual_seed(0)
    model = servers.TwoHeads().eval()
    with torch.no_grad():
        attributes = model(torch.from_numpy(meta), torch.from_numpy(x))[1].numpy()
    np.testing.assert_allclose(default["attributes"], attributes, atol=1e-5)


def test_bad_two_input_requests_are_refused(client, stub) -> None:
    x = images(1)
    expect_error(lambda: infer(client, "two_heads", [tensor("image", x)]),
                   INVALID, "also needs the input(s) meta")
    expect_error(
        lambda: infer(client, "two_heads",
                      [tensor("image", x), tensor("meta", np.ones((1, 1), np.int64))]),
        INVALID, "input 'meta' must be float32",
    )
    expect_error(
        lambda: infer(client, "two_heads",
                      [tensor("image", x), tensor("meta", np.ones((1, 1), np.float16))]),
        INVALID, "input 'meta' must be float32, got float16",
    )
    expect_error(
        lambda: infer(client, "two_heads",
                      [tensor("image", x), tensor("meta", np.ones((1, 1), np.float32))],
                      output=7),
        INVALID, "no output at index 7",
    )
    expect_error(
        lambda: explain(stub, model="two_heads", images=[proto_image(x[0])]),
        INVALID, "also needs the input(s) meta",
    )
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="two_heads"), timeout=CALL_TIMEOUT_S)
    assert list(info.other_inputs) == ["meta"]
    assert info.input == "image"


def test_client_sdk_sends_masks_per_image_and_the_output(server, stub, segmenter) -> None:
    """The SDK takes an [N, h, w] mask (split with the images across requests) and an output
    name; each image's explained class is the one of highest score over its own mask."""
    x = images(2, seed=5)
    masks = np.zeros((2, SIZE, SIZE), dtype=np.float32)
    masks[0, :, : SIZE // 2] = 1.0  # left half
    masks[1, :, SIZE // 2:] = 1.0  # right half
    with torch.no_grad():
        scores = segmenter(torch.from_numpy(x))
    best = (scores * torch.from_numpy(masks)[:, None]).sum((2, 3)).argmax(1).tolist()
    with GradCamClient(server.address) as client:
        explained = client.explain(x, model="segmenter", target_mask=masks, output="scores")
        info = client.model_info("segmenter")
    assert [e.heatmaps[0].class_index for e in explained] == best
    assert (info.default_score, info.other_inputs) == ("region", ())


def test_command_line_mask_is_a_picture(server, tmp_path: Path) -> None:
    """`gradcam explain --mask PICTURE`: the picture's non-black pixels are the region; the
    saved heatmap is the SDK's for the same 0/1 mask."""
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(6).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    region = np.zeros((SIZE, SIZE), dtype=np.uint8)
    region[4:20, 10:30] = 200
    Image.fromarray(region).save(tmp_path / "mask.png")
    done = subprocess.run(
        [sys.executable, "-m", "gradcam_client", "explain", str(photo), "--model", "segmenter",
         "--method", "hirescam", "--mask", str(tmp_path / "mask.png"),
         "--save-npy", str(tmp_path / "map.npy"), "--server", server.address],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with GradCamClient(server.address) as client:
        expected = client.explain(photo, model="segmenter", method="hirescam",
                                  target_mask=(region > 0).astype(np.float32))
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected.heatmap, atol=1e-6)
    missing = subprocess.run(
        [sys.executable, "-m", "gradcam_client", "explain", str(photo), "--model", "segmenter",
         "--mask", str(tmp_path / "absent.png"), "--server", server.address],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 1 and "cannot read the mask" in missing.stderr


def test_typed_api_and_sdk_feed_other_inputs(client, stub, server) -> None:
    """The typed API takes the other input as a TypedTensor (one row per image, here a mix of
    tensor sizes in two batches), and the SDK as an array; both give KServe's heatmaps."""
    x = images(3, seed=7)
    meta = np.array([[0.5], [2.0], [-1.0]], dtype=np.float32)
    kserve = infer(client, "two_heads", [tensor("image", x), tensor("meta", meta)])["heatmap"]
    typed = explain(
        stub, model="two_heads", images=[proto_image(i) for i in x],
        inputs={"meta": pb.TypedTensor(datatype="FP32", shape=[3, 1], data=meta.tobytes())},
    )
    for served, expected in zip(typed.explanations, kserve):
        heatmap = np.frombuffer(served.heatmaps[0].data, dtype="<f4").reshape(SIZE, SIZE)
        np.testing.assert_allclose(heatmap, expected, atol=1e-5)
    with GradCamClient(server.address) as sdk:
        explained = sdk.explain(x, model="two_heads", inputs={"meta": meta})
    np.testing.assert_allclose(np.stack([e.heatmap for e in explained]), kserve, atol=1e-5)

    expect_error(
        lambda: explain(stub, model="two_heads", images=[proto_image(x[0])], inputs={
            "meta": pb.TypedTensor(datatype="FP32", shape=[2, 1], data=meta[:2].tobytes()),
        }),
        INVALID, "input 'meta' must have one row per image (1)",
    )
    expect_error(
        lambda: explain(stub, model="two_heads", images=[proto_image(x[0])], inputs={
            "meta": pb.TypedTensor(datatype="FP32", shape=[1, 1], data=meta[:1].tobytes()),
            "extra": pb.TypedTensor(datatype="INT64", shape=[1], data=b"\0" * 8),
        }),
        INVALID, "unknown input 'extra'",
    )
    expect_error(
        lambda: explain(stub, model="two_heads", images=[proto_image(x[0])], inputs={
            "meta": pb.TypedTensor(datatype="COMPLEX", shape=[1, 1], data=b"\0" * 8),
        }),
        INVALID, "unsupported datatype 'COMPLEX'",
    )
