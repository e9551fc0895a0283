"""The serving core in process, no gRPC and no subprocess: resolution at the edge, validation as
pure functions, the engine's batching, post-processing, the whole typed and KServe paths, and
tritonclient against a server in this very process.

References are independent of the code under test: the augmented graph run directly in
onnxruntime, numpy's softmax and argsort, Pillow's resize.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import servers
from gradcam_server.augment import augment_model, load_model
from gradcam_server.augment.names import NAMES
from gradcam_server.batching import BatchStats
from gradcam_server.engine import Engine
from gradcam_server.errors import InvalidInput
from gradcam_server.model import Explaining, Graph
from gradcam_server.postprocess import HeatmapSize, class_explanation, resize_heatmap
from gradcam_server.repository import ModelRepository
from gradcam_server.request import (
    ExplainRequest,
    InferRequest,
    resolve_explain,
    resolve_infer,
)
from gradcam_server.runtime import RuntimeOptions
from gradcam_server.service import GradCamService
from gradcam_server.validate import check_mask, check_target_class, feeds

SIZE = servers.TINY_SIZE
CLASSES = servers.TINY_CLASSES
MAX_PIXELS = 10_000_000


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("core-repository")
    servers.export_torch(servers.tiny_cnn(), SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "tiny", max_batch_size=8, max_queue_delay_microseconds=20000)
    servers.export_torch(servers.tiny_cnn(), SIZE, root / "twice" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "twice", max_batch_size=2, max_queue_size=3, instances=2)
    servers.export_torch(servers.strided_cnn(), SIZE, root / "strided" / "model.onnx",
                         dynamic_batch=True)
    return root


@pytest.fixture(scope="module")
def repository(root: Path) -> ModelRepository:
    repository = ModelRepository(root, RuntimeOptions("cpu", 1))
    repository.load_all()
    return repository


@pytest.fixture(scope="module")
def model(repository: ModelRepository):
    return repository.get("tiny")


@pytest.fixture(scope="module")
def session(root: Path) -> ort.InferenceSession:
    """The augmented graph of the model's default layer, run directly: the reference."""
    return ort.InferenceSession(
        augment_model(load_model(root / "tiny" / "model.onnx")).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocessed(model, data: bytes) -> np.ndarray:
    """The image as the model takes it, computed here from the config's numbers: resized
    bilinearly to the input size, scaled and normalised per channel."""
    prep = model.config.preprocessing
    rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    pixels = np.asarray(rgb, np.float32) * np.float32(prep.scale)
    pixels = (pixels - np.float32(prep.mean)) / np.float32(prep.std)
    return pixels.transpose(2, 0, 1).astype(np.float32)


# -- resolution, once, at the edge -------------------------------------------------------------
def test_resolve_fills_the_model_defaults_into_a_graph(model) -> None:
    resolved = resolve_explain(model, ExplainRequest([b"x"]), MAX_PIXELS)
    assert type(resolved.graph) is Graph
    assert resolved.graph.method == "gradcam" and resolved.graph.score == "logit"
    assert resolved.graph.layer == model.default_layer
    assert resolved.heatmap_size == HeatmapSize()
    assert model.explained(resolved.graph) == model.default_target


@pytest.mark.parametrize(("request_", "message", "field"), [
    (ExplainRequest([]), "holds no image", "images"),
    (ExplainRequest([b"x"] * 65), "at most 64 images", None),
    (ExplainRequest([b"x"], top_k=CLASSES + 1), f"top_k must be in 1..{CLASSES}",
     "target.top_k"),
    (ExplainRequest([b"x"], class_index=CLASSES), f"target_class {CLASSES} is out of range",
     "target_class"),
    (ExplainRequest([b"x"], graph=Explaining(method="nope")), "unknown method 'nope'", None),
    (ExplainRequest([b"x"], heatmap_size="big"), "heatmap_size must be", "heatmap_size"),
    (ExplainRequest([b"x"], mask=np.zeros((2, 4, 4), np.float32)), "2 rows for 1 images",
     "target_mask"),
])
def test_resolve_refuses_request_level_mistakes_with_their_field(
    model, request_: ExplainRequest, message: str, field: str | None,
) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        resolve_explain(model, request_, MAX_PIXELS)
    assert caught.value.field == field


def test_only_resolve_makes_graphs_and_sessions_take_only_graphs(model) -> None:
    with pytest.raises(TypeError, match="takes a Graph"):
        model.explainer(Explaining("gradcam"))
    assert model.explainer(model.resolve(Explaining("gradcam"))) is not None


# -- validation: pure functions ------------------------------------------------------------------
def test_target_class_takes_n_or_n_by_1_and_names_the_range(model) -> None:
    graph = model.resolve(Explaining())
    np.testing.assert_array_equal(
        check_target_class(model, graph, np.array([[3], [-2]], np.int64), 2), [3, -2])
    np.testing.assert_array_equal(check_target_class(model, graph, None, 3), [-1, -1, -1])
    with pytest.raises(InvalidInput, match=f"the model has {CLASSES} classes"):
        check_target_class(model, graph, np.array([-CLASSES - 1], np.int64), 1)
    with pytest.raises(InvalidInput, match="must be INT64"):
        check_target_class(model, graph, np.array([1], np.int32), 1)


def test_feeds_check_what_the_graph_reads_and_refuse_what_it_does_not(model) -> None:
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    plain = feeds(model, None, x, max_pixels=MAX_PIXELS)
    assert plain.target_class is None and plain.rows == 2
    logit = model.resolve(Explaining())
    with pytest.raises(InvalidInput, match="only used with score 'region'") as caught:
        feeds(model, logit, x, mask=np.ones((4, 4), np.float32), max_pixels=MAX_PIXELS)
    assert caught.value.field == "target_mask"
    with pytest.raises(InvalidInput, match="unknown input 'extra'"):
        feeds(model, logit, x, others={"extra": np.zeros(2)}, max_pixels=MAX_PIXELS)


def test_a_region_mask_is_resized_to_the_images_by_nearest_pixel(model) -> None:
    region = Graph(**{**Explaining().__dict__, "score": "region"})
    mask = np.zeros((2, 2), np.float32)
    mask[0, 1] = 1  # the top right quarter
    resized = check_mask(model, region, mask, np.zeros((3, 3, 8, 6), np.float32), MAX_PIXELS)
    assert resized.shape == (3, 8, 6)
    expected = np.zeros((8, 6), np.float32)
    expected[:4, 3:] = 1
    for row in resized:
        np.testing.assert_array_equal(row, expected)


# -- the engine: batching -------------------------------------------------------------------------
def test_concurrent_requests_share_one_batch_and_each_gets_its_rows(model, session) -> None:
    """Three requests of 1, 2 and 3 rows submitted together run as one batch of 6 (the model
    waits 20 ms to fill a batch of up to 8); each gets exactly its rows of the reference."""
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32) for n in (1, 2, 3)]
    graph = model.resolve(Explaining())
    batches: list[BatchStats] = []

    async def scenario():
        engine = Engine(on_batch=lambda name, graph_name, stats: batches.append(stats))
        checked = [feeds(model, graph, x, max_pixels=MAX_PIXELS) for x in parts]
        results = await asyncio.gather(*(engine.run(model, graph, f) for f in checked))
        await engine.close()
        return results

    results = asyncio.run(scenario())
    assert [(b.rows, b.requests) for b in batches] == [(6, 3)]
    for x, result in zip(parts, results):
        expected = session.run([NAMES.heatmap], {"input": x, NAMES.target_class:
                                                 np.full(len(x), -1, np.int64)})[0]
        np.testing.assert_allclose(result.outputs[NAMES.heatmap], expected, atol=1e-6)


def test_instances_run_batches_at_once_on_their_share_of_the_cores(root: Path) -> None:
    """A model with `instances` 2 gets a batcher that runs two batches at once, sessions on
    half the cores each (where --threads leaves them to the server), and room for its queue
    plus two running batches."""
    import os

    from gradcam_server.errors import QueueFull

    repository = ModelRepository(root, RuntimeOptions("cpu"))  # threads: one per core
    repository.load_all()
    model = repository.get("twice")
    assert model.runtime.intra_op_threads == max(1, (os.cpu_count() or 1) // 2)
    assert repository.get("tiny").runtime.intra_op_threads == 0  # one instance: all cores
    engine = Engine()
    graph = model.resolve(Explaining())
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)

    async def scenario() -> int:
        await engine.run(model, graph, feeds(model, graph, x, max_pixels=MAX_PIXELS))
        return engine._batchers[("twice", graph, x.shape[1:])].instances

    assert asyncio.run(scenario()) == 2
    held = [engine.admit(model) for _ in range(3 + 2 * 2)]  # max_queue_size 3, two batches
    for place in held:
        place.__enter__()
    with pytest.raises(QueueFull):
        engine.admit(model).__enter__()
    for place in held:
        place.__exit__(None, None, None)


# -- post-processing ---------------------------------------------------------------------------
def test_class_explanation_ranks_as_softmax_and_argsort_do(model) -> None:
    graph = model.resolve(Explaining())
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, CLASSES)).astype(np.float32)
    logits[1] = logits[0]  # one image, two ranks: both rows are the image's
    heatmaps = rng.random((2, 4, 4)).astype(np.float32)
    gradients = rng.standard_normal((2, 6, 4, 4)).astype(np.float32)
    outputs = {graph.output: logits, NAMES.heatmap: heatmaps, NAMES.gradients: gradients}
    explained = class_explanation(model, graph, outputs, slice(0, 2), (12, 8), None, 3, 2, None,
                                  HeatmapSize())
    order = np.argsort(-logits[0])
    probabilities = np.exp(logits[0] - logits[0].max())
    probabilities /= probabilities.sum()
    assert [p.class_index for p in explained.predictions] == list(order[:3])
    np.testing.assert_allclose([p.score for p in explained.predictions],
                               probabilities[order[:3]], rtol=1e-6)
    assert [m.class_index for m in explained.maps] == list(order[:2])
    weights = gradients[1].mean(axis=(1, 2))
    assert explained.maps[1].channels[0][0] == int(np.argmax(weights))
    reference = np.asarray(Image.fromarray(heatmaps[0]).resize((12, 8), Image.BILINEAR))
    np.testing.assert_allclose(explained.maps[0].heatmap, np.clip(reference, 0, 1), atol=1e-7)
    assert explained.maps[0].heatmap.shape == (8, 12)


# -- the whole paths, in process -------------------------------------------------------------------
def test_the_typed_path_explains_encoded_images_of_two_sizes(repository, model, session) -> None:
    images = [png(40, 30, 0), png(SIZE, SIZE, 1), png(40, 30, 2)]

    async def scenario():
        service = GradCamService(repository)
        resolved = resolve_explain(model, ExplainRequest(images, top_k=2), MAX_PIXELS)
        explained = await service.explain(resolved)
        await service.close()
        return explained

    explained = asyncio.run(scenario())
    for data, explanation in zip(images, explained.explanations):
        x = np.repeat(preprocessed(model, data)[None], 2, axis=0)
        expected = session.run([NAMES.heatmap], {"input": x, NAMES.target_class:
                                                 np.array([-1, -2], np.int64)})[0]
        width, height = Image.open(io.BytesIO(data)).size
        for rank, class_map in enumerate(explanation.maps):
            assert class_map.heatmap.shape == (height, width)
            np.testing.assert_allclose(
                class_map.heatmap, resize_heatmap(expected[rank], (width, height)), atol=2e-3)


def test_the_kserve_path_runs_the_forward_graph_unless_a_map_is_asked_for(
    repository, model, session,
) -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)

    async def scenario():
        service = GradCamService(repository)
        outputs = {}
        for requested in (["logits"], ["logits", NAMES.heatmap]):
            resolved = resolve_infer(model, InferRequest(
                encoded=None, x=x, requested=requested,
                explaining=NAMES.heatmap in requested, heatmap_size="model",
            ), MAX_PIXELS)
            outputs[len(requested)] = (resolved.graph, await service.infer(resolved, dict))
        await service.close()
        return outputs

    outputs = asyncio.run(scenario())
    assert outputs[1][0] is None and list(outputs[1][1]) == ["logits"]
    logits, heatmap = session.run(["logits", NAMES.heatmap],
                                  {"input": x, NAMES.target_class: np.full(2, -1, np.int64)})
    np.testing.assert_allclose(outputs[1][1]["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(outputs[2][1][NAMES.heatmap], heatmap, atol=1e-6)


def test_both_paths_resize_a_coarse_layers_map_as_pillow_resizes_the_graphs_heatmap(
    root: Path, repository,
) -> None:
    """A target layer a quarter of the input's size: the server resizes the graph's coarse map
    straight to the size asked for (`upsample.py`); the answer is the reference graph's
    heatmap resized by Pillow, on the typed path (each image's size) and on KServe's (a fixed
    size, smaller than the model's on one side)."""
    model = repository.get("strided")
    reference = ort.InferenceSession(
        augment_model(load_model(root / "strided" / "model.onnx")).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    images = [png(45, 30, 7), png(20, 50, 8)]
    x = np.random.default_rng(9).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)

    async def scenario():
        service = GradCamService(repository)
        typed = await service.explain(resolve_explain(model, ExplainRequest(images, top_k=1),
                                                      MAX_PIXELS))
        kserve = await service.infer(resolve_infer(model, InferRequest(
            encoded=None, x=x, requested=[NAMES.heatmap], explaining=True,
            heatmap_size="50x20",
        ), MAX_PIXELS), dict)
        await service.close()
        return typed, kserve

    def pillow(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.clip(np.asarray(Image.fromarray(heatmap).resize(size, Image.BILINEAR)), 0, 1)

    typed, kserve = asyncio.run(scenario())
    for data, explanation in zip(images, typed.explanations):
        expected = reference.run([NAMES.heatmap], {
            "input": preprocessed(model, data)[None], NAMES.target_class: np.array([-1])})[0]
        size = Image.open(io.BytesIO(data)).size
        np.testing.assert_allclose(explanation.maps[0].heatmap, pillow(expected[0], size),
                                   atol=2e-3)
    expected = reference.run([NAMES.heatmap], {"input": x, NAMES.target_class:
                                               np.full(2, -1, np.int64)})[0]
    for row in range(2):
        np.testing.assert_allclose(kserve[NAMES.heatmap][row], pillow(expected[row], (50, 20)),
                                   atol=1e-6)


def test_tritonclient_and_the_server_share_one_process(root: Path, session) -> None:
    """The server's KServe stubs and tritonclient's define the same protobuf messages; both
    load in one interpreter, so tests and tools can drive an in-process server."""
    import tritonclient.grpc as triton

    from gradcam_server.server import GradCamServer, ServerOptions

    x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)

    def call(port: int) -> np.ndarray:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("tiny", [tensor], outputs=[
            triton.InferRequestedOutput(NAMES.heatmap)], parameters={"heatmap_size": "model"})
        return result.as_numpy(NAMES.heatmap)

    async def scenario() -> np.ndarray:
        server = GradCamServer(ServerOptions(root, port=0, metrics_port=None, threads=1))
        port = await server.start()
        await server.wait_until_loaded()
        try:
            return await asyncio.to_thread(call, port)
        finally:
            await server.stop(grace=1)

    expected = session.run([NAMES.heatmap], {"input": x, NAMES.target_class:
                                             np.array([-1], np.int64)})[0]
    np.testing.assert_allclose(asyncio.run(scenario()), expected, atol=1e-6)


# -- responses written from the arrays' memory ---------------------------------------------------
def test_kserve_responses_parse_back_to_the_arrays_they_were_written_from() -> None:
    from gradcam_proto import grpc_service_pb2 as kserve_pb
    from gradcam_server.kserve import _response

    rng = np.random.default_rng(6)
    outputs = {
        "heatmap": rng.random((2, 300, 451)).astype(np.float32),
        "logits": rng.standard_normal((2, 7)).astype(np.float16),
        "index": np.array([3, -1], np.int64),
        "flags": np.array([True, False]),
        "empty": np.zeros((2, 0), np.float32),
        "strided": rng.random((4, 3)).astype(np.float32)[::2],
    }
    parsed = kserve_pb.ModelInferResponse.FromString(_response("m", "id-1", dict(outputs)))
    assert (parsed.model_name, parsed.id) == ("m", "id-1")
    assert [o.name for o in parsed.outputs] == list(outputs)
    for tensor, raw, (name, value) in zip(parsed.outputs, parsed.raw_output_contents,
                                          outputs.items()):
        assert list(tensor.shape) == list(value.shape)
        decoded = np.frombuffer(raw, dtype=value.dtype.newbyteorder("<")).reshape(value.shape)
        np.testing.assert_array_equal(decoded, value)


def test_typed_responses_parse_back_to_their_maps_gradients_and_predictions() -> None:
    from gradcam_proto import gradcam_pb2 as typed_pb
    from gradcam_server.explain_api import _response
    from gradcam_server.postprocess import ClassMap, Explained, ImageExplanation, Prediction

    rng = np.random.default_rng(7)
    maps = [ClassMap(c, f"class {c}", rng.random((5 + c, 9)).astype(np.float32), ((c, 0.5),),
                     rng.standard_normal((3, 4, 4)).astype(np.float32) if c else None)
            for c in range(3)]
    explained = Explained(
        (ImageExplanation(tuple(maps[:2]), (Prediction(1, "one", 0.9, 3.0),)),
         ImageExplanation((maps[2],), ())),
        "layer", "gradcam", {"layout": "nchw"}, 0.1, 0.2, 0.3)
    parsed = typed_pb.ExplainResponse.FromString(
        _response("m", explained, typed_pb.ExplainOptions(), 0.0))
    assert (parsed.model, parsed.layer, parsed.method) == ("m", "layer", typed_pb.METHOD_GRADCAM)
    assert parsed.timings.inference_seconds == pytest.approx(0.3)
    assert [p.label for p in parsed.explanations[0].predictions] == ["one"]
    sent = [m for e in explained.explanations for m in e.maps]
    received = [h for e in parsed.explanations for h in e.heatmaps]
    assert [len(e.heatmaps) for e in parsed.explanations] == [2, 1]
    for original, heatmap in zip(sent, received):
        assert (heatmap.class_index, heatmap.label) == (original.class_index, original.label)
        data = np.frombuffer(heatmap.data, "<f4").reshape(heatmap.height, heatmap.width)
        np.testing.assert_array_equal(data, original.heatmap)
        assert heatmap.HasField("pixel_gradients") == (original.pixel_gradients is not None)
        if original.pixel_gradients is not None:
            gradients = np.frombuffer(heatmap.pixel_gradients.data, "<f4")
            np.testing.assert_array_equal(
                gradients.reshape(tuple(heatmap.pixel_gradients.shape)), original.pixel_gradients)
