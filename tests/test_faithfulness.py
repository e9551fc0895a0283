"""Evaluate: the faithfulness metrics of served maps, against independent references on the
same weights, inputs and maps.

- ROAD (MoRF, LeRF, combined) and the confidence change, average drop and increase: against
  pytorch-grad-cam 1.5.7's ``ROADMostRelevantFirstAverage``, ``ROADLeastRelevantFirstAverage``,
  ``ROADCombined``, ``CamMultImageConfidenceChange``, ``DropInConfidence`` and
  ``IncreaseInConfidence``, run on the torch model with the server's maps.
- Deletion and insertion: pytorch-grad-cam has none; against `rise_reference` below, RISE's
  ``CausalMetric.single_run`` (Petsiuk et al.'s evaluation code) written again in torch: one
  forward per step, the pixels moved in place.
- The pointing game: against boxes and masks whose answer is known by construction.

The small CNN (`servers.tiny_cnn`, 32 x 32) runs in every suite; resnet18 (224 x 224, its
torchvision weights seeded and calibrated, exported by TorchScript) in the slow one. A served
map is the method's heatmap output at the model's size: `maps` reads it from the augmented
graph, as Evaluate does.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.cam_mult_image import (
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.metrics.road import (
    ROADCombined,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from scipy.ndimage import gaussian_filter

import servers
import zoo
from gradcam_server import faithfulness
from gradcam_server.augment.names import NAMES
from gradcam_server.errors import InvalidInput
from gradcam_server.model import Explaining
from gradcam_server.repository import ModelRepository
from gradcam_server.request import (
    MAX_EVALUATION_COPIES,
    EvaluateRequest,
    PointingTarget,
    resolve_evaluate,
)
from gradcam_server.runtime import RuntimeOptions
from gradcam_server.service import GradCamService

SIZE = servers.TINY_SIZE
TOLERANCE = 0.01  # the bound on |ours - reference|


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faithfulness-repository")
    servers.export_torch(servers.tiny_cnn(), SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "tiny", max_batch_size=8)
    servers.export_segmenter(root / "segmenter" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def repository(root: Path) -> ModelRepository:
    repository = ModelRepository(root, RuntimeOptions("cpu", 1))
    repository.load_all()
    return repository


@pytest.fixture(scope="module")
def tiny(repository: ModelRepository):
    return repository.get("tiny")


def tiny_images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def evaluate(repository: ModelRepository, request: EvaluateRequest, model: str = "tiny",
             on_batch=None):
    """The request evaluated in process; returns (Evaluated, the service's forward batches)."""
    batches = []

    async def scenario():
        service = GradCamService(repository, on_batch=lambda name, graph, stats: (
            batches.append(stats.rows) if graph == "forward" else None))
        try:
            return await service.evaluate(resolve_evaluate(repository.get(model), request))
        finally:
            await service.close()

    return asyncio.run(scenario()), batches


def maps(repository: ModelRepository, model: str, x: np.ndarray, method: str,
         class_index: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The method's maps of `x` at the model's size and the explained classes, read from one
    run of the augmented graph."""

    async def scenario():
        service = GradCamService(repository)
        try:
            served = repository.get(model)
            return await service.run(served, x, explain=Explaining(method=method),
                                     target_class=np.full(len(x), class_index, np.int64))
        finally:
            await service.close()

    result = asyncio.run(scenario())
    logits = next(v for k, v in result.outputs.items() if v.ndim == 2)
    classes = logits.argmax(1) if class_index == -1 else np.full(len(x), class_index)
    return result.outputs[NAMES.heatmap], classes


# -- the references ----------------------------------------------------------------------------
def rise_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's substrate for insertion: ``gkern(11, 5)`` (scipy's gaussian_filter of a delta)
    per channel, ``conv2d(x, kern, padding=11 // 2)``."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = torch.zeros(3, 3, 11, 11)
    for c in range(3):
        kernel[c, c] = torch.from_numpy(gaussian_filter(delta, 5)).float()
    return torch.nn.functional.conv2d(x, kernel, padding=5)


def rise_reference(model: torch.nn.Module, x: np.ndarray, saliency: np.ndarray, category: int,
                   steps: int, mode: str, score: str) -> tuple[float, np.ndarray]:
    """RISE's CausalMetric.single_run for one image: (AUC, the curve of `steps` + 1 scores);
    `steps` equal steps of round(i * H * W / steps) pixels, taken in the map's descending
    order (ties by position); deletion towards zeros, insertion from the blurred image."""
    image = torch.from_numpy(x[None].copy())
    channels, height, width = x.shape
    pixels = height * width
    if mode == "deletion":
        start, finish = image.clone(), torch.zeros_like(image)
    else:
        start, finish = rise_blur(image), image.clone()
    order = torch.argsort(torch.from_numpy(saliency).reshape(-1), descending=True, stable=True)
    curve = []
    for i in range(steps + 1):
        with torch.no_grad():
            output = model(start)
        value = output.softmax(1) if score == "probability" else output
        curve.append(float(value[0, category]))
        if i < steps:
            coords = order[math.floor(i * pixels / steps + 0.5):
                           math.floor((i + 1) * pixels / steps + 0.5)]
            start.view(1, channels, pixels)[0, :, coords] = finish.view(
                1, channels, pixels)[0, :, coords]
    values = np.array(curve)
    return float((values.sum() - values[0] / 2 - values[-1] / 2) / steps), values


def grad_cam_metrics(model: torch.nn.Module, x: np.ndarray, heatmaps: np.ndarray,
                     classes: np.ndarray, score: str,
                     percentiles: list[float]) -> dict[str, np.ndarray]:
    """pytorch-grad-cam's metrics of the maps, per image."""
    target = ClassifierOutputSoftmaxTarget if score == "probability" else ClassifierOutputTarget
    targets = [target(int(c)) for c in classes]
    tensor = torch.from_numpy(x)
    cams = heatmaps.astype(np.float32)
    with torch.no_grad():
        original = np.float32([t(o) for t, o in zip(targets, model(tensor))])
    torch.manual_seed(0)
    values = {
        "road_morf": ROADMostRelevantFirstAverage(percentiles)(tensor, cams, targets, model),
        "road_lerf": ROADLeastRelevantFirstAverage(percentiles)(tensor, cams, targets, model),
        "road_combined": ROADCombined(percentiles)(tensor, cams, targets, model),
        "confidence_change": CamMultImageConfidenceChange()(tensor, cams, targets, model),
        "increase_in_confidence": 100 * IncreaseInConfidence()(tensor, cams, targets, model),
    }
    # Grad-CAM++'s average drop, per image: DropInConfidence is max(0, Y - O).
    values["average_drop"] = 100 * DropInConfidence()(tensor, cams, targets, model) / original
    return {name: np.asarray(value, np.float64).reshape(-1) for name, value in values.items()}


def check_against_references(repository, model_name: str, torch_model, x: np.ndarray,
                             methods: list[str], score: str, steps: int,
                             percentiles: list[float]) -> dict:
    """Evaluate the methods' maps of `x` and compare every metric with its reference; returns
    the served values {method: [per image {metric: value}]}."""
    evaluated, _ = evaluate(repository, EvaluateRequest(
        images=list(x), methods=methods, steps=steps, percentiles=percentiles, score=score,
        metrics=[m for m in faithfulness.METRICS if m != "pointing_game"],
    ), model=model_name)
    served: dict[str, list[dict]] = {method: [] for method in methods}
    for image in evaluated.images:
        for method, values in image.methods:
            served[method].append(values)
    for method in methods:
        heatmaps, classes = maps(repository, model_name, x, method)
        assert [image.class_index for image in evaluated.images] == classes.tolist()
        theirs = grad_cam_metrics(torch_model, x, heatmaps, classes, score, percentiles)
        for number, values in enumerate(served[method]):
            for name, reference in theirs.items():
                assert abs(values[name].value - reference[number]) <= TOLERANCE, (
                    method, number, name, values[name].value, reference[number])
            for mode in ("deletion", "insertion"):
                auc, curve = rise_reference(torch_model, x[number], heatmaps[number],
                                            int(classes[number]), steps, mode, score)
                assert abs(values[mode].value - auc) <= TOLERANCE, (method, mode, auc)
                np.testing.assert_allclose(values[mode].curve, curve, atol=1e-3, rtol=1e-3)
    return served


# -- the small CNN, in every suite --------------------------------------------------------------
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_every_metric_matches_its_reference_on_the_small_cnn(repository, score) -> None:
    x = tiny_images(2)
    check_against_references(repository, "tiny", servers.tiny_cnn(), x,
                             ["gradcam", "gradcam++"], score, steps=16,
                             percentiles=[20, 50, 80])


def test_copies_are_scored_in_batches_of_the_measured_size(repository) -> None:
    """Two images x two methods x (2 x 17 deletion and insertion copies): 136 copies, run
    `batch_size` rows at a time (the last run shorter), never one run per step."""
    evaluated, batches = evaluate(repository, EvaluateRequest(
        images=list(tiny_images(2)), methods=["gradcam", "xgradcam"], steps=16,
        metrics=["deletion", "insertion"]))
    assert evaluated.copies == 2 * 2 * 2 * 17
    size = evaluated.batch_size
    assert size > 1
    # Per method, the copies of both images share runs: 68 copies each.
    runs = [size] * (68 // size) + ([68 % size] if 68 % size else [])
    assert batches[-2 * len(runs):] == runs * 2
    curve = evaluated.images[0].methods[0][1]["deletion"].curve
    assert len(curve) == 17 and curve[0] == pytest.approx(evaluated.images[0].score,
                                                          abs=1e-6)


def test_the_default_metrics_percentiles_and_steps(repository) -> None:
    evaluated, _ = evaluate(repository, EvaluateRequest(images=list(tiny_images(1))))
    plan = evaluated.plan
    assert plan.steps == 100 and plan.percentiles == (10, 20, 30, 40, 50, 60, 70, 80, 90)
    assert plan.metrics == tuple(m for m in faithfulness.METRICS if m != "pointing_game")
    (method, values), = evaluated.images[0].methods
    assert method == "gradcam" and len(values["deletion"].curve) == 101
    assert len(values["road_morf"].curve) == 9


def test_the_pointing_game_hits_within_the_tolerance() -> None:
    heatmap = np.zeros((40, 60), np.float32)
    heatmap[10, 20] = 1  # the maximum: centre (20.5, 10.5) in (x, y)
    hit = faithfulness.pointing_game
    assert hit(heatmap, box=(15, 5, 25, 15)).value == 1
    assert hit(heatmap, box=(40, 10, 50, 20)).value == 0  # 19.5 pixels away
    assert hit(heatmap, box=(40, 10, 50, 20), tolerance=20).value == 1
    mask = np.zeros((40, 60), np.float32)
    mask[30:, 50:] = 1
    assert hit(heatmap, mask=mask).value == 0
    mask[10, 34] = 1  # 14 pixels to the right
    assert hit(heatmap, mask=mask).value == 1
    assert hit(heatmap, mask=mask, tolerance=13).value == 0


def test_the_pointing_game_is_played_at_the_images_size(repository) -> None:
    """The map's maximum, at the image's size, inside a box around it: a hit; in the
    opposite corner: a miss."""
    x = tiny_images(1)
    heatmap = maps(repository, "tiny", x, "gradcam")[0][0]
    row, col = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    near = (col - 1, row - 1, col + 2, row + 2)
    far_x = 0 if col > SIZE / 2 else SIZE - 1
    far_y = 0 if row > SIZE / 2 else SIZE - 1
    far = (far_x, far_y, far_x, far_y)
    evaluated, _ = evaluate(repository, EvaluateRequest(
        images=[x[0], x[0]], metrics=["pointing_game"], pointing_tolerance=0,
        pointing=[PointingTarget(box=near), PointingTarget(box=far)]))
    assert [image.methods[0][1]["pointing_game"].value for image in evaluated.images] == [1, 0]


@pytest.mark.parametrize(("request_", "message", "field"), [
    (EvaluateRequest([]), "holds no image", "images"),
    (EvaluateRequest([b"x"], metrics=["auc"]), "unknown metric 'auc'", "metrics"),
    (EvaluateRequest([b"x"], steps=1001), "steps must be in 1..1000", "steps"),
    (EvaluateRequest([b"x"], percentiles=[0]), r"must be in \(0, 100\)", "road_percentiles"),
    (EvaluateRequest([b"x"], percentiles=list(range(1, 21))), "at most 19 ROAD",
     "road_percentiles"),
    (EvaluateRequest([b"x"], methods=["gradcam", "gradcam"]), "compared once", "methods"),
    (EvaluateRequest([b"x"], metrics=["pointing_game"]), "needs a box or a mask", "pointing"),
    (EvaluateRequest([b"x"], pointing=[PointingTarget(box=(5, 0, 1, 1))]), "x1 <= x2",
     "pointing[0]"),
    (EvaluateRequest([b"x"], pointing=[PointingTarget()] * 2), "2 pointing targets for 1",
     "pointing"),
    (EvaluateRequest([b"x"], score="margin"), "unknown score 'margin'", "score"),
    (EvaluateRequest([b"x"] * 50, methods=["gradcam", "gradcam++"], steps=1000,
                     metrics=["deletion"]),
     f"over the limit of {MAX_EVALUATION_COPIES} copies per request", "steps"),
    (EvaluateRequest([b"x"] * 64, methods=["gradcam", "gradcam++"],
                     metrics=["road_morf", "road_lerf"]),
     "18 ROAD imputations per map is over the limit of 2000 per request", "road_percentiles"),
])
def test_requests_over_a_limit_or_malformed_are_refused_naming_it(
        tiny, request_, message, field) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        resolve_evaluate(tiny, request_)
    assert caught.value.field == field


def test_models_that_are_not_classifiers_are_refused(repository) -> None:
    with pytest.raises(InvalidInput, match="is not a classifier"):
        resolve_evaluate(repository.get("segmenter"), EvaluateRequest([b"x"]))


def test_a_pointing_mask_must_have_its_images_size(repository) -> None:
    with pytest.raises(InvalidInput, match=r"the pointing mask is \[4, 4\], the image \[32, 32\]"):
        evaluate(repository, EvaluateRequest(
            images=list(tiny_images(1)), metrics=["pointing_game"],
            pointing=[PointingTarget(mask=np.ones((4, 4), np.float32))]))


# -- through gRPC: the SDK against an in-process server -----------------------------------------
def test_evaluate_through_grpc_and_the_sdk(root: Path, repository) -> None:
    """GradCamClient.evaluate (and the asyncio client's) against a served model gives what the
    service computes in process; errors come back as INVALID_ARGUMENT naming the field."""
    from gradcam_client import AsyncGradCamClient, GradCamClient, InvalidInputError
    from gradcam_proto import gradcam_pb2 as pb
    from gradcam_proto import gradcam_pb2_grpc as pb_grpc
    from gradcam_server.server import GradCamServer, ServerOptions

    x = tiny_images(2)
    box = (0.0, 0.0, 16.0, 16.0)
    expected, _ = evaluate(repository, EvaluateRequest(
        images=list(x), methods=["gradcam", "layercam"], steps=10, class_index=3,
        pointing=[PointingTarget(box=box)] * 2))

    def calls(port: int):
        address = f"127.0.0.1:{port}"
        with GradCamClient(address, timeout=120) as client:
            result = client.evaluate(x, model="tiny", methods=["gradcam", "layercam"], steps=10,
                                     target_class=3, pointing=[box, box])
            with pytest.raises(InvalidInputError, match="steps must be in 1..1000") as caught:
                client.evaluate(x, model="tiny", steps=5000)
            refused = caught.value
        async def awaited():
            async with AsyncGradCamClient(address, timeout=120) as client:
                return await client.evaluate(x, model="tiny", methods=["layercam"], steps=10,
                                             metrics=["insertion"], target_class=3)

        assert asyncio.run(awaited()).images[1].methods["layercam"]["insertion"].value == (
            pytest.approx(result.images[1].methods["layercam"]["insertion"].value, abs=1e-6))
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GradCamStub(channel)
            request = pb.EvaluateRequest(model="tiny", metrics=[42])
            request.images.add().tensor.CopyFrom(
                pb.Tensor(shape=[3, SIZE, SIZE], data=x[0].tobytes()))
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Evaluate(request)
            request.metrics[:] = []
            request.target.top_k = 2
            with pytest.raises(grpc.RpcError) as top_k:
                stub.Evaluate(request)
        return result, refused, unknown.value, top_k.value

    async def scenario():
        server = GradCamServer(ServerOptions(root, port=0, metrics_port=None, threads=1))
        port = await server.start()
        await server.wait_until_loaded()
        try:
            return await asyncio.to_thread(calls, port)
        finally:
            await server.stop(grace=1)

    result, refused, unknown, top_k = asyncio.run(scenario())
    assert result.methods == ["gradcam", "layercam"]
    assert result.metrics == list(faithfulness.METRICS)
    assert result.steps == 10 and result.score == "probability"
    for image, reference in zip(result.images, expected.images):
        assert image.class_index == 3 == reference.class_index
        for method, values in reference.methods:
            for name, value in values.items():
                got = image.methods[method][name]
                assert got.value == pytest.approx(value.value, abs=1e-6)
                np.testing.assert_allclose(got.curve, value.curve, atol=1e-6)
    assert result.mean("gradcam", "deletion") == pytest.approx(np.mean(
        [i.methods[0][1]["deletion"].value for i in expected.images]), abs=1e-6)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refused.field_violations] == ["steps"]
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown metric 42" in unknown.details()
    assert top_k.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one class per image" in top_k.details()


def test_the_kserve_parameter_evaluate(root: Path, repository) -> None:
    """KServe's ``evaluate`` parameter (tritonclient, in-process server) gives the metrics and
    curves Evaluate computes; a target class that differs between rows is refused."""
    import tritonclient.grpc as triton

    from gradcam_server.server import GradCamServer, ServerOptions

    x = tiny_images(2)
    expected, _ = evaluate(repository, EvaluateRequest(
        images=list(x), methods=["xgradcam"], steps=8, metrics=["deletion", "road_combined"]))

    def call(port: int):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        parameters = {"evaluate": "deletion,road_combined", "steps": 8, "method": "xgradcam"}
        result = client.infer("tiny", [tensor], parameters=parameters)
        classes = triton.InferInput("target_class", [2], "INT64")
        classes.set_data_from_numpy(np.array([1, 2], np.int64))
        with pytest.raises(triton.InferenceServerException) as refused:
            client.infer("tiny", [tensor, classes], parameters=parameters)
        client.close()
        return result, refused.value

    async def scenario():
        server = GradCamServer(ServerOptions(root, port=0, metrics_port=None, threads=1))
        port = await server.start()
        await server.wait_until_loaded()
        try:
            return await asyncio.to_thread(call, port)
        finally:
            await server.stop(grace=1)

    result, refused = asyncio.run(scenario())
    deletion = [image.methods[0][1]["deletion"] for image in expected.images]
    np.testing.assert_allclose(result.as_numpy("faithfulness_deletion"),
                               [v.value for v in deletion], atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("faithfulness_deletion_curve"),
                               [v.curve for v in deletion], atol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("faithfulness_road_combined"),
        [image.methods[0][1]["road_combined"].value for image in expected.images], atol=1e-6)
    assert "one class for every row" in refused.message()


# -- resnet18 and the shipped EfficientNet-Lite0, in the slow suite -------------------------------
@pytest.fixture(scope="module")
def zoo_repository(tmp_path_factory, onnx_zoo) -> ModelRepository:
    root = tmp_path_factory.mktemp("faithfulness-zoo")
    (root / "resnet18").mkdir()
    shutil.copy(onnx_zoo("resnet18", "torchscript"), root / "resnet18" / "model.onnx")
    servers.write_config(root / "resnet18", max_batch_size=16)
    servers.link_lite0(root / zoo.LITE0)
    repository = ModelRepository(root, RuntimeOptions("cpu"))
    repository.load_all()
    return repository


@pytest.mark.slow
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_every_metric_matches_its_reference_on_resnet18(zoo_repository, score) -> None:
    x = zoo.sample_batch(2)
    check_against_references(zoo_repository, "resnet18", zoo.build_torch_model("resnet18"), x,
                             ["gradcam"], score, steps=50, percentiles=[20, 50, 80])


@pytest.mark.slow
def test_grad_cam_beats_a_random_map_on_deletion_and_insertion(zoo_repository) -> None:
    """On the shipped EfficientNet-Lite0 (pretrained), for two photos: deleting the pixels
    Grad-CAM ranks first drops the class probability faster than deleting them in the order
    of a random map, and inserting them raises it faster (the random map's curves:
    `rise_reference`). The random map is a CAM's: uniform noise at the target layer's 7 x 7,
    upsampled bilinearly (pytorch-grad-cam's RandomCAM has random channel weights); noise per
    pixel would delete a scattered pattern, which destroys any photo faster than a region."""
    x = zoo.sample_batch(2)
    evaluated, _ = evaluate(zoo_repository, EvaluateRequest(
        images=list(x), steps=50, metrics=["deletion", "insertion"]), model=zoo.LITE0)
    torch_model = zoo.build_torch_model(zoo.LITE0)
    noise = torch.from_numpy(np.random.default_rng(0).random((1, 1, 7, 7), np.float32))
    random_map = torch.nn.functional.interpolate(
        noise, size=(224, 224), mode="bilinear", align_corners=False)[0, 0].numpy()
    for number, image in enumerate(evaluated.images):
        values = image.methods[0][1]
        for mode in ("deletion", "insertion"):
            random_auc, _ = rise_reference(torch_model, x[number], random_map,
                                           image.class_index, 50, mode, "probability")
            if mode == "deletion":
                assert values[mode].value < random_auc, (number, values[mode], random_auc)
            else:
                assert values[mode].value > random_auc, (number, values[mode], random_auc)


def test_the_sdk_builds_the_request_and_refuses_before_sending() -> None:
    from gradcam_client import InvalidInputError
    from gradcam_client.protocol import evaluate_request
    from gradcam_proto import gradcam_pb2 as pb

    x = tiny_images(2)
    mask = np.zeros((SIZE, SIZE), np.float32)
    request = evaluate_request(x, model="tiny", methods=["gradcam", "scorecam"],
                               metrics=["deletion", "pointing_game"], target_class=-2,
                               steps=20, pointing=[(1, 2, 3, 4), mask], score="logit")
    assert list(request.methods) == [pb.METHOD_GRADCAM, pb.METHOD_SCORECAM]
    assert list(request.metrics) == [pb.METRIC_DELETION, pb.METRIC_POINTING_GAME]
    assert request.target.class_index == -2 and request.steps == 20 and request.score == "logit"
    assert request.pointing[0].box == pb.BoundingBox(x1=1, y1=2, x2=3, y2=4)
    assert list(request.pointing[1].mask.shape) == [SIZE, SIZE]
    with pytest.raises(InvalidInputError, match="unknown metric 'auc'"):
        evaluate_request(x, model="tiny", metrics=["auc"])
    with pytest.raises(InvalidInputError, match="a box .* or a mask"):
        evaluate_request(x, model="tiny", pointing=[(1, 2, 3)])
    with pytest.raises(InvalidInputError, match="unknown method"):
        evaluate_request(x, model="tiny", methods=["gradkam"])
