"""A real `gradcam-server` process, driven through gRPC: KServe v2 with tritonclient, the typed
API through its generated stubs, health, reflection, metrics, errors, batching, deadlines,
authentication, TLS and shutdown.

The repository holds the shipped EfficientNet-Lite0 and small generated models:

======================  ==========================================================================
``efficientnet_lite0``  the shipped model (symbolic links to its files)
``tiny``                a small CNN with a fixed batch of 1 and no config.json (detected defaults)
``batched``             the same CNN with a dynamic batch, max_batch_size 4 and a 100 ms queue delay
``bounded``             a slow CNN with max_batch_size 1 and max_queue_size 1
``broken``              a model.onnx of garbage bytes (fails to load)
``norule``              a graph whose gradient path goes through Det, which has no rule (serves
                        plain inference only)
======================  ==========================================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

import servers
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from gradcam_server.augment import augment_model
from gradcam_server.preprocess import IMAGENET_MEAN, IMAGENET_STD
from gradcam_server.server import SERVICE_NAMES, GradCamServer, ServerOptions
from servers import LEAK, ServerProcess, expect_error, sample, status_of

LITE0 = "efficientnet_lite0"
CHELSEA = servers.SAMPLE.read_bytes()
CHELSEA_SIZE = (451, 300)  # width, height
EGYPTIAN_CAT = 285
LITE0_LAYER = "/_swish_1/Clip_output_0"
LITE0_FIRST_CLIP = "/_swish/Clip_output_0"
GOOD_MODELS = ("batched", "bounded", LITE0, "tiny")
INFERENCE_ONLY_MODELS = ("norule",)
FAILED_MODELS = ("broken",)
TOKEN = "secret"
CALL_TIMEOUT_S = 60.0  # only so that a broken server fails a test instead of hanging it
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    servers.link_lite0(root / LITE0)
    servers.export_torch(servers.tiny_cnn(), servers.TINY_SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=False)
    servers.export_torch(servers.tiny_cnn(), servers.TINY_SIZE, root / "batched" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "batched", max_batch_size=4, max_queue_delay_microseconds=100_000)
    servers.export_torch(servers.slow_cnn(), servers.SLOW_SIZE, root / "bounded" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "bounded", max_batch_size=1, max_queue_size=1)
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 8)
    servers.norule_model(root / "norule" / "model.onnx")
    return root


def _repository_of(root: Path, tmp_path_factory: pytest.TempPathFactory, *names: str) -> Path:
    """A repository holding some of `root`'s model folders, as symbolic links."""
    subset = tmp_path_factory.mktemp("-".join(names))
    for name in names:
        (subset / name).symlink_to(root / name, target_is_directory=True)
    return subset


@pytest.fixture(scope="module")
def tiny_repository(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _repository_of(repository, tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory):
    """``start(repository, *args) -> ServerProcess``; every server is stopped at the end."""
    started: list[ServerProcess] = []

    def start(repository: Path, *args: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server-log") / "server.log"
        server = ServerProcess(repository, log, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            server.stop()
        finally:
            server.kill()


@pytest.fixture(scope="module")
def server(repository: Path, start_server) -> ServerProcess:
    server = start_server(repository)
    with grpc.insecure_channel(server.address) as channel:
        server.wait_serving(channel)
    return server


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.GradCamStub:
    return pb_grpc.GradCamStub(channel)


# -- helpers -------------------------------------------------------------------------------------


def image_input(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def tensor_input(name: str, value: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def target_input(*classes: int) -> triton.InferInput:
    return tensor_input("target_class", np.array(classes, dtype=np.int64), "INT64")


def outputs(*names: str) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name) for name in names]


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def resized_chelsea(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(CHELSEA)).resize((width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small PNG whose header claims `width` x `height` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def lite0_tensor(seed: int, count: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def infer_heatmap(client, model: str, inputs, **options) -> np.ndarray:
    result = client.infer(model, inputs, outputs=outputs("heatmap"),
                          client_timeout=CALL_TIMEOUT_S, **options)
    return result.as_numpy("heatmap")


def assert_still_serving(client) -> None:
    logits = client.infer("tiny", [tensor_input("input", np.zeros((1, 3, 32, 32), np.float32))],
                          outputs=outputs("logits"), client_timeout=CALL_TIMEOUT_S)
    assert logits.as_numpy("logits").shape == (1, servers.TINY_CLASSES)


def batch_counts(server: ServerProcess, model: str, graph: str) -> tuple[float, float]:
    """(batches run, batches of one row) for one model and graph, from /metrics."""
    metrics = server.metrics()
    labels = {"model": model, "graph": graph}
    return (
        sample(metrics, "gradcam_batch_size_count", **labels),
        sample(metrics, "gradcam_batch_size_bucket", le="1.0", **labels),
    )


def run_concurrently(calls: list[Callable[[], object]]) -> list[tuple[object, float]]:
    """Run the calls at once, one thread each: [(result or exception, seconds)] in call order."""
    barrier = threading.Barrier(len(calls))

    def timed(call):
        barrier.wait()
        started = time.monotonic()
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - returned to the test to inspect
            result = error
        return result, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(timed, calls))


# -- 1. start and readiness ----------------------------------------------------------------------


def test_server_prints_its_ports_and_serves(server: ServerProcess) -> None:
    assert server.port > 0 and server.scheme == "plaintext"
    assert server.metrics_url.startswith("http://127.0.0.1:")
    assert "gradcam_requests_total" in server.metrics_text()


# -- 2. KServe v2 with tritonclient --------------------------------------------------------------


def test_liveness_and_readiness(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in GOOD_MODELS:
        assert client.is_model_ready(name), name
    for name in (*FAILED_MODELS, "no_such_model", "../tiny"):
        assert not client.is_model_ready(name), name


def test_server_and_model_metadata(client) -> None:
    assert client.get_server_metadata().name == "gradcam"
    metadata = client.get_model_metadata(LITE0)
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {
        "input": ("FP32", [-1, 3, 224, 224]),
        "image": ("BYTES", [-1]),
        "target_class": ("INT64", [-1]),
        "reference_embedding": ("FP32", [-1, -1]),
        "target_mask": ("FP32", [-1, -1, -1]),
    }
    assert [(t.name, t.datatype) for t in metadata.outputs] == [
        ("logits", "FP32"), ("heatmap", "FP32")
    ]
    tiny = client.get_model_metadata("tiny")
    assert [list(t.shape) for t in tiny.inputs][0] == [1, 3, 32, 32]


def test_infer_image_gives_a_heatmap_at_the_image_size(client) -> None:
    result = client.infer(LITE0, [image_input(CHELSEA)], client_timeout=CALL_TIMEOUT_S)
    heatmap, logits = result.as_numpy("heatmap"), result.as_numpy("logits")
    assert heatmap.shape == (1, CHELSEA_SIZE[1], CHELSEA_SIZE[0])
    assert heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1 and heatmap.max() > 0.9
    assert logits.shape == (1, 1000) and int(logits.argmax()) == EGYPTIAN_CAT


def test_infer_tensor_gives_heatmaps_at_the_input_size(client) -> None:
    result = client.infer(LITE0, [tensor_input("input", lite0_tensor(1, 2))],
                          client_timeout=CALL_TIMEOUT_S)
    assert result.as_numpy("heatmap").shape == (2, 224, 224)
    assert result.as_numpy("logits").shape == (2, 1000)


def test_explicit_target_class_changes_the_heatmap(client) -> None:
    top1 = infer_heatmap(client, LITE0, [image_input(CHELSEA)])
    same = infer_heatmap(client, LITE0, [image_input(CHELSEA), target_input(EGYPTIAN_CAT)])
    other = infer_heatmap(client, LITE0, [image_input(CHELSEA), target_input(0)])
    np.testing.assert_allclose(same, top1, atol=1e-5)
    assert np.abs(other - top1).max() > 0.1


def test_requesting_only_model_outputs_runs_the_forward_graph(client, server) -> None:
    forward_before, _ = batch_counts(server, LITE0, "forward")
    explain_before, _ = batch_counts(server, LITE0, "gradcam")
    result = client.infer(LITE0, [image_input(CHELSEA)], outputs=outputs("logits"),
                          client_timeout=CALL_TIMEOUT_S)
    assert result.as_numpy("heatmap") is None
    assert int(result.as_numpy("logits").argmax()) == EGYPTIAN_CAT
    assert batch_counts(server, LITE0, "forward")[0] == forward_before + 1
    assert batch_counts(server, LITE0, "gradcam")[0] == explain_before


def test_method_and_target_layer_parameters(client) -> None:
    default = infer_heatmap(client, LITE0, [image_input(CHELSEA)])
    named = infer_heatmap(client, LITE0, [image_input(CHELSEA)],
                          parameters={"method": "gradcam", "target_layer": LITE0_LAYER})
    np.testing.assert_allclose(named, default, atol=1e-5)
    early = infer_heatmap(client, LITE0, [image_input(CHELSEA)],
                          parameters={"target_layer": LITE0_FIRST_CLIP})
    assert early.shape == default.shape
    assert early.min() >= 0 and early.max() <= 1
    assert np.abs(early - default).mean() > 0.05


def test_fixed_batch_model_serves_several_images_in_chunks(client) -> None:
    images = [png(48, 40, seed) for seed in range(3)]
    together = client.infer("tiny", [image_input(*images)], client_timeout=CALL_TIMEOUT_S)
    assert together.as_numpy("heatmap").shape == (3, 40, 48)
    for index, image in enumerate(images):
        alone = client.infer("tiny", [image_input(image)], client_timeout=CALL_TIMEOUT_S)
        np.testing.assert_allclose(together.as_numpy("logits")[index],
                                   alone.as_numpy("logits")[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(together.as_numpy("heatmap")[index],
                                   alone.as_numpy("heatmap")[0], atol=1e-5)


def test_model_without_config_uses_detected_defaults(client, stub, repository) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny"), timeout=CALL_TIMEOUT_S)
    assert list(info.input_size) == [32, 32]
    np.testing.assert_allclose(info.mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(info.std, IMAGENET_STD, rtol=1e-6)
    assert list(info.layer_shape) == [-1, 16, 32, 32]  # the second ReLU
    assert info.max_batch_size == 1 and info.num_classes == 10 and not info.has_labels

    image = png(48, 40, seed=5)
    resized = Image.open(io.BytesIO(image)).convert("RGB").resize((32, 32), Image.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32)
    x = ((pixels / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
    session = ort.InferenceSession(str(repository / "tiny" / "model.onnx"))
    expected = session.run(["logits"], {"input": x[None].astype(np.float32)})[0]
    served = client.infer("tiny", [image_input(image)], outputs=outputs("logits"),
                          client_timeout=CALL_TIMEOUT_S).as_numpy("logits")
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


def test_similarity_score_to_a_reference_embedding(client, repository) -> None:
    """The tiny model's 10 outputs taken as an embedding: the served heatmap is the one of the
    augmented graph for score "similarity", run here on the same tensor and reference."""
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    reference = np.random.default_rng(4).standard_normal(10).astype(np.float32)
    served = infer_heatmap(
        client, "tiny", [tensor_input("input", x), tensor_input("reference_embedding", reference)],
        parameters={"score": "similarity"},
    )
    augmented = augment_model(repository / "tiny" / "model.onnx", score="similarity")
    session = ort.InferenceSession(augmented.SerializeToString())
    (expected,) = session.run(["heatmap"], {"input": x, "reference_embedding": reference[None],
                                            "target_class": np.array([-1])})
    np.testing.assert_allclose(served, expected, atol=1e-5)
    logit = infer_heatmap(client, "tiny", [tensor_input("input", x)])
    assert not np.allclose(served, logit, atol=1e-3)
    expect_error(
        lambda: infer_heatmap(client, "tiny", [tensor_input("input", x)],
                              parameters={"score": "similarity"}),
        grpc.StatusCode.INVALID_ARGUMENT, "needs a reference embedding",
    )
    expect_error(
        lambda: infer_heatmap(
            client, "tiny",
            [tensor_input("input", x), tensor_input("reference_embedding", reference[:4])],
            parameters={"score": "similarity"},
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "has 4 values per image", "has 10",
    )
    expect_error(
        lambda: infer_heatmap(client, "tiny", [tensor_input("input", x)],
                              parameters={"score": "region"}),
        grpc.StatusCode.INVALID_ARGUMENT, "the region score needs a segmentation output",
    )


# -- 3. the typed API ----------------------------------------------------------------------------


def heatmap_array(heatmap: pb.Heatmap) -> np.ndarray:
    return np.frombuffer(heatmap.data, dtype="<f4").reshape(heatmap.height, heatmap.width)


def test_explain_images_of_different_sizes_top_k(stub) -> None:
    small = resized_chelsea(200, 133)
    request = pb.ExplainRequest(
        model=LITE0,
        images=[pb.Image(encoded=CHELSEA), pb.Image(encoded=small)],
        target=pb.Target(top_k=3),
    )
    response = stub.Explain(request, timeout=CALL_TIMEOUT_S)
    assert response.model == LITE0 and response.layer == LITE0_LAYER
    assert response.method == pb.METHOD_GRADCAM
    assert len(response.explanations) == 2
    for explanation, (width, height) in zip(response.explanations, [CHELSEA_SIZE, (200, 133)]):
        assert len(explanation.heatmaps) == 3
        assert len(explanation.predictions) == 5  # the default
        top3 = [p.class_index for p in explanation.predictions[:3]]
        assert [h.class_index for h in explanation.heatmaps] == top3
        assert explanation.predictions[0].class_index == EGYPTIAN_CAT
        assert explanation.predictions[0].label == "Egyptian cat"
        scores = [p.score for p in explanation.predictions]
        assert scores == sorted(scores, reverse=True)
        for heatmap, prediction in zip(explanation.heatmaps, explanation.predictions):
            assert (heatmap.width, heatmap.height) == (width, height)
            assert heatmap.label == prediction.label and heatmap.label
            values = heatmap_array(heatmap)
            assert values.min() >= 0 and values.max() <= 1
        first, second = (heatmap_array(h) for h in explanation.heatmaps[:2])
        assert np.abs(first - second).max() > 0.05
    assert response.timings.total_seconds > 0


def test_explain_class_index_and_options(stub) -> None:
    request = pb.ExplainRequest(
        model=LITE0,
        images=[pb.Image(encoded=CHELSEA)],
        target=pb.Target(class_index=0),
        options=pb.ExplainOptions(num_predictions=7, num_channels=4, overlay=True),
    )
    explanation = stub.Explain(request, timeout=CALL_TIMEOUT_S).explanations[0]
    (heatmap,) = explanation.heatmaps
    assert heatmap.class_index == 0 and heatmap.label == "tench"
    assert len(explanation.predictions) == 7
    assert explanation.predictions[0].class_index == EGYPTIAN_CAT
    weights = [c.weight for c in heatmap.channels]
    assert len(weights) == 4 and weights == sorted(weights, reverse=True)
    assert len({c.channel for c in heatmap.channels}) == 4
    assert all(0 <= c.channel < 1280 for c in heatmap.channels)
    overlay = Image.open(io.BytesIO(explanation.overlay_png))
    assert overlay.format == "PNG" and overlay.size == CHELSEA_SIZE


def test_explain_negative_class_index_is_a_rank(stub) -> None:
    def explain(target: pb.Target) -> pb.Explanation:
        request = pb.ExplainRequest(model=LITE0, images=[pb.Image(encoded=CHELSEA)], target=target)
        return stub.Explain(request, timeout=CALL_TIMEOUT_S).explanations[0]

    second = explain(pb.Target(class_index=-2))
    ranked = explain(pb.Target(top_k=2))
    (heatmap,) = second.heatmaps
    assert heatmap.class_index == second.predictions[1].class_index
    assert heatmap.label == second.predictions[1].label
    np.testing.assert_allclose(heatmap_array(heatmap), heatmap_array(ranked.heatmaps[1]),
                               atol=1e-4)


def test_explain_tensor_matches_kserve(stub, client) -> None:
    x = lite0_tensor(7)
    request = pb.ExplainRequest(
        model=LITE0,
        images=[pb.Image(tensor=pb.Tensor(shape=[3, 224, 224], data=x[0].tobytes()))],
    )
    explanation = stub.Explain(request, timeout=CALL_TIMEOUT_S).explanations[0]
    typed = heatmap_array(explanation.heatmaps[0])
    kserve = client.infer(LITE0, [tensor_input("input", x)], client_timeout=CALL_TIMEOUT_S)
    assert typed.shape == (224, 224)
    np.testing.assert_allclose(typed, kserve.as_numpy("heatmap")[0], atol=1e-5)
    assert explanation.heatmaps[0].class_index == int(kserve.as_numpy("logits").argmax())


def test_list_models(stub) -> None:
    statuses = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(),
                                                    timeout=CALL_TIMEOUT_S).models}
    assert sorted(statuses) == sorted((*GOOD_MODELS, *INFERENCE_ONLY_MODELS, *FAILED_MODELS))
    for name in GOOD_MODELS:
        assert statuses[name].ready and not statuses[name].reason
    for name in FAILED_MODELS:
        assert not statuses[name].ready and statuses[name].reason
        assert not LEAK.search(statuses[name].reason), statuses[name].reason
    norule = statuses["norule"]
    assert norule.ready and "inference only" in norule.reason and "Det" in norule.reason


def test_get_model_info(stub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=LITE0), timeout=CALL_TIMEOUT_S)
    assert info.name == LITE0 and info.input == "input"
    assert list(info.input_shape) == [-1, 3, 224, 224]
    assert list(info.input_size) == [224, 224]
    assert list(info.outputs) == ["logits"]
    assert info.layer == LITE0_LAYER and list(info.layer_shape) == [-1, 1280, 7, 7]
    assert (info.layout, info.grid, info.HasField("prefix_tokens")) == ("nchw", "", False)
    assert info.num_classes == 1000 and info.has_labels and info.max_batch_size == 8
    assert pb.METHOD_GRADCAM in info.methods


# -- 4. bad input --------------------------------------------------------------------------------

class Bad:
    """A KServe request that must be refused with `code` and a message holding `fragments`."""

    def __init__(self, inputs: Callable[[], list], code: grpc.StatusCode, *fragments: str,
                 model: str = LITE0, parameters: dict[str, str] | None = None) -> None:
        self.inputs, self.code, self.fragments = inputs, code, fragments
        self.model, self.parameters = model, parameters


def chelsea() -> list[triton.InferInput]:
    return [image_input(CHELSEA)]


def lite0_input(dtype=np.float32, fill: float = 0.0, shape=(1, 3, 224, 224), datatype="FP32"):
    return [tensor_input("input", np.full(shape, fill, dtype), datatype)]


BAD_KSERVE_REQUESTS = {
    "undecodable bytes": Bad(lambda: [image_input(b"not an image at all")],
                             INVALID, "image 0", "not an image"),
    "truncated jpeg": Bad(lambda: [image_input(CHELSEA[: len(CHELSEA) // 2])],
                          INVALID, "image 0", "truncated"),
    "empty image": Bad(lambda: [image_input(b"")], INVALID, "image 0", "empty"),
    "decompression bomb": Bad(lambda: [image_input(png_bomb())],
                              INVALID, "20000x20000", "over the limit"),
    "tensor of wrong rank": Bad(lambda: lite0_input(shape=(1, 3, 224)), INVALID, "rank 4"),
    "tensor of wrong shape": Bad(lambda: lite0_input(shape=(1, 3, 100, 100)),
                                 INVALID, "[1,3,100,100]", "expects"),
    "tensor of wrong dtype": Bad(lambda: lite0_input(np.int64, datatype="INT64"),
                                 INVALID, "must be FP32"),
    "nan values": Bad(lambda: lite0_input(fill=np.nan), INVALID, "NaN"),
    "class index out of range": Bad(lambda: [*chelsea(), target_input(1000)],
                                    INVALID, "target_class 1000", "out of range"),
    "unknown method": Bad(chelsea, INVALID, "unknown method 'nonsense'",
                          parameters={"method": "nonsense"}),
    "unknown target layer": Bad(chelsea, INVALID, "target layer", "no/such",
                                parameters={"target_layer": "no/such"}),
    "missing inputs": Bad(lambda: [target_input(1)], INVALID, "exactly one of"),
    "both inputs": Bad(lambda: [*chelsea(), *lite0_input()], INVALID, "exactly one of"),
    "mixed image sizes": Bad(lambda: [image_input(CHELSEA, png(40, 30))],
                             INVALID, "one pixel size"),
    "unknown model": Bad(chelsea, NOT_FOUND, "unknown model", model="no_such_model"),
    "path traversal up": Bad(chelsea, NOT_FOUND, "unknown model", model="../efficientnet_lite0"),
    "path traversal down": Bad(chelsea, NOT_FOUND, "unknown model",
                               model="efficientnet_lite0/../../etc"),
    "broken model": Bad(chelsea, FAILED_PRECONDITION, "'broken'", "failed to load",
                        model="broken"),
    "model without a rule": Bad(chelsea, FAILED_PRECONDITION, "'norule'", "inference only",
                                "Det", model="norule"),
}


@pytest.mark.parametrize("case", list(BAD_KSERVE_REQUESTS))
def test_bad_kserve_request_is_refused_with_a_reason(client, case: str) -> None:
    bad = BAD_KSERVE_REQUESTS[case]
    started = time.monotonic()
    expect_error(
        lambda: client.infer(bad.model, bad.inputs(), parameters=bad.parameters,
                             client_timeout=CALL_TIMEOUT_S),
        bad.code, *bad.fragments,
    )
    assert time.monotonic() - started < 10  # refused, not decoded (the bomb) or hung
    assert_still_serving(client)


def test_unknown_output_is_refused(client) -> None:
    expect_error(
        lambda: client.infer(LITE0, [image_input(CHELSEA)], outputs=outputs("logits", "saliency"),
                             client_timeout=CALL_TIMEOUT_S),
        INVALID, "unknown output 'saliency'",
    )
    assert_still_serving(client)


def test_bad_typed_requests_are_refused_with_a_reason(stub, client) -> None:
    def explain(model: str = LITE0, **fields):
        request = pb.ExplainRequest(model=model, **fields)
        return lambda: stub.Explain(request, timeout=CALL_TIMEOUT_S)

    encoded = [pb.Image(encoded=CHELSEA)]
    expect_error(explain(images=[pb.Image(encoded=b"")]), INVALID, "empty")
    expect_error(explain(images=[pb.Image()]), INVALID, "image 0", "empty")
    expect_error(explain(), INVALID, "no image")
    expect_error(explain(images=[pb.Image(encoded=png_bomb())]), INVALID, "over the limit")
    flat = pb.Tensor(shape=[3, 224], data=bytes(4 * 3 * 224))
    expect_error(explain(images=[pb.Image(tensor=flat)]), INVALID, "[C, H, W]")
    expect_error(explain(images=encoded, target=pb.Target(class_index=1000)),
                 INVALID, "out of range")
    expect_error(explain(images=encoded, target=pb.Target(top_k=50)), INVALID, "top_k")
    expect_error(explain(images=encoded, layer="no/such"), INVALID, "no/such")
    expect_error(explain(images=encoded, method=99), INVALID, "unknown method")
    for name in ("no_such_model", "../efficientnet_lite0", "efficientnet_lite0/../../etc"):
        expect_error(explain(name, images=encoded), NOT_FOUND, "unknown model")
        expect_error(
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model=name), timeout=CALL_TIMEOUT_S),
            NOT_FOUND, "unknown model",
        )
    expect_error(explain("broken", images=encoded), FAILED_PRECONDITION, "failed to load")
    expect_error(explain("norule", images=encoded), FAILED_PRECONDITION, "Det")
    assert_still_serving(client)


def test_a_bad_image_is_named_by_a_field_violation(stub) -> None:
    """INVALID_ARGUMENT for one image carries a google.rpc.BadRequest detail naming it."""
    images = [pb.Image(encoded=CHELSEA), pb.Image(encoded=b"\xff\xd8 truncated")]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Explain(pb.ExplainRequest(model=LITE0, images=images), timeout=CALL_TIMEOUT_S)
    error = raised.value
    assert error.code() == INVALID and error.details().startswith("image 1: ")
    status = rpc_status.from_call(error)  # its code and message are the call's, or ValueError
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    violations = [(v.field, v.description) for v in bad_request.field_violations]
    assert violations == [("images[1]", error.details())]

    with pytest.raises(grpc.RpcError) as raised:  # the request as a whole: no field to name
        too_many = [pb.Image(encoded=CHELSEA)] * 65
        stub.Explain(pb.ExplainRequest(model=LITE0, images=too_many), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == INVALID and rpc_status.from_call(raised.value) is None


# -- 5. dynamic batching -------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    client, server, repository
) -> None:
    requests = 8
    rng = np.random.default_rng(42)
    inputs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(requests)]
    classes = [index % servers.TINY_CLASSES for index in range(requests)]
    batches_before, singles_before = batch_counts(server, "batched", "gradcam")

    def call(index: int):
        return lambda: client.infer(
            "batched", [tensor_input("input", inputs[index]), target_input(classes[index])],
            outputs=outputs("logits", "heatmap"), client_timeout=CALL_TIMEOUT_S,
        )

    results = run_concurrently([call(index) for index in range(requests)])

    session = ort.InferenceSession(
        augment_model(repository / "batched" / "model.onnx").SerializeToString()
    )
    for index, (result, _) in enumerate(results):
        assert not isinstance(result, Exception), result
        logits, heatmap = session.run(
            ["logits", "heatmap"],
            {"input": inputs[index], "target_class": np.array([classes[index]], np.int64)},
        )
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("heatmap"), heatmap, atol=1e-4)
    batches, singles = batch_counts(server, "batched", "gradcam")
    assert batches - batches_before < requests  # some requests shared a batch
    assert (batches - batches_before) - (singles - singles_before) >= 1  # a batch of > 1 row


# -- 6. deadlines and the queue bound ------------------------------------------------------------


def slow_input(rows: int) -> list[triton.InferInput]:
    size = servers.SLOW_SIZE
    return [tensor_input("input", np.ones((rows, 3, size, size), np.float32))]


def test_short_deadline_is_exceeded_and_the_server_keeps_serving(client) -> None:
    expect_error(
        lambda: client.infer(LITE0, [image_input(*[CHELSEA] * 8)], client_timeout=0.001),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert_still_serving(client)


def test_request_whose_deadline_passes_in_the_queue_never_runs(client, server) -> None:
    batches_before, _ = batch_counts(server, "bounded", "gradcam")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.infer, "bounded", slow_input(8),
                              client_timeout=CALL_TIMEOUT_S)
        time.sleep(0.3)  # the slow request is running; the next one waits behind it
        expect_error(
            lambda: client.infer("bounded", slow_input(1), client_timeout=0.3),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        assert running.result().as_numpy("heatmap").shape == (8, 256, 256)
    assert batch_counts(server, "bounded", "gradcam")[0] == batches_before + 1
    assert_still_serving(client)


def test_full_queue_refuses_requests_at_once(client) -> None:
    calls = [
        (lambda: client.infer("bounded", slow_input(1), client_timeout=CALL_TIMEOUT_S))
        for _ in range(8)
    ]
    results = run_concurrently(calls)
    succeeded = [seconds for result, seconds in results if not isinstance(result, Exception)]
    refused = []
    for result, seconds in results:
        if isinstance(result, Exception):
            code, message = status_of(result)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
            assert "queue is full" in message
            refused.append(seconds)
    assert len(succeeded) >= 2  # one running and one queued
    assert refused  # max_queue_size 1: the others are refused
    assert max(refused) < 5.0


# -- 7. authentication ---------------------------------------------------------------------------


def test_bearer_token(tiny_repository: Path, start_server) -> None:
    secured = start_server(tiny_repository, "--token", TOKEN)
    with grpc.insecure_channel(secured.address) as channel:
        secured.wait_serving(channel)  # health checks need no token
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        typed = pb_grpc.GradCamStub(channel)
        client = triton.InferenceServerClient(secured.address)
        x = [tensor_input("input", np.zeros((1, 3, 32, 32), np.float32))]
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            expect_error(lambda: client.infer("tiny", x, headers=headers),
                         grpc.StatusCode.UNAUTHENTICATED, "bearer token")
            expect_error(lambda: client.is_server_live(headers=headers),
                         grpc.StatusCode.UNAUTHENTICATED)
            metadata = list(headers.items()) if headers else None
            expect_error(lambda: typed.ListModels(pb.ListModelsRequest(), metadata=metadata,
                                                  timeout=CALL_TIMEOUT_S),
                         grpc.StatusCode.UNAUTHENTICATED, "bearer token")
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_live(headers=good)
        result = client.infer("tiny", x, headers=good, client_timeout=CALL_TIMEOUT_S)
        assert result.as_numpy("heatmap").shape == (1, 32, 32)
        models = typed.ListModels(pb.ListModelsRequest(), metadata=list(good.items()),
                                  timeout=CALL_TIMEOUT_S).models
        assert [(m.name, m.ready) for m in models] == [("tiny", True)]
        client.close()


# -- 8. TLS --------------------------------------------------------------------------------------


def explain_tiny(channel: grpc.Channel) -> pb.ExplainResponse:
    request = pb.ExplainRequest(model="tiny", images=[pb.Image(encoded=png(40, 30))])
    return pb_grpc.GradCamStub(channel).Explain(request, timeout=CALL_TIMEOUT_S)


def test_tls(tiny_repository: Path, start_server, tmp_path: Path) -> None:
    pem = servers.self_signed_server_cert()
    (tmp_path / "cert.pem").write_bytes(pem.cert)
    (tmp_path / "key.pem").write_bytes(pem.key)
    secured = start_server(tiny_repository, "--tls-cert", str(tmp_path / "cert.pem"),
                           "--tls-key", str(tmp_path / "key.pem"))
    assert secured.scheme == "tls"
    credentials = grpc.ssl_channel_credentials(root_certificates=pem.cert)
    with grpc.secure_channel(secured.address, credentials) as channel:
        secured.wait_serving(channel)
        heatmap = explain_tiny(channel).explanations[0].heatmaps[0]
        assert (heatmap.width, heatmap.height) == (40, 30)
    client = triton.InferenceServerClient(secured.address, ssl=True,
                                          root_certificates=str(tmp_path / "cert.pem"))
    assert client.is_model_ready("tiny")
    client.close()
    with grpc.insecure_channel(secured.address) as plaintext:
        with pytest.raises(grpc.RpcError) as refused:
            explain_tiny(plaintext)
        assert refused.value.code() == UNAVAILABLE


def test_mutual_tls(tiny_repository: Path, start_server, tmp_path: Path) -> None:
    server_pem = servers.self_signed_server_cert()
    ca_pem, ca_key = servers.client_ca()
    client_pem = servers.client_cert(ca_key)
    _, stranger_key = servers.client_ca()
    stranger_pem = servers.client_cert(stranger_key)  # signed by a CA the server does not trust
    for name, data in (("cert.pem", server_pem.cert), ("key.pem", server_pem.key),
                       ("ca.pem", ca_pem.cert)):
        (tmp_path / name).write_bytes(data)
    secured = start_server(tiny_repository, "--tls-cert", str(tmp_path / "cert.pem"),
                           "--tls-key", str(tmp_path / "key.pem"),
                           "--tls-client-ca", str(tmp_path / "ca.pem"))

    def credentials(identity: servers.Pem | None) -> grpc.ChannelCredentials:
        if identity is None:
            return grpc.ssl_channel_credentials(root_certificates=server_pem.cert)
        return grpc.ssl_channel_credentials(root_certificates=server_pem.cert,
                                            private_key=identity.key,
                                            certificate_chain=identity.cert)

    with grpc.secure_channel(secured.address, credentials(client_pem)) as channel:
        secured.wait_serving(channel)
        assert len(explain_tiny(channel).explanations) == 1
    for identity in (None, stranger_pem):
        with grpc.secure_channel(secured.address, credentials(identity)) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                explain_tiny(channel)
            assert refused.value.code() == UNAVAILABLE


# -- 9. shutdown ---------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests(
    repository: Path, tmp_path_factory: pytest.TempPathFactory, start_server
) -> None:
    draining = start_server(_repository_of(repository, tmp_path_factory, "bounded"))
    with grpc.insecure_channel(draining.address) as channel:
        draining.wait_serving(channel)
    client = triton.InferenceServerClient(draining.address)
    assert client.is_server_ready()  # connected: the request below reaches the server at once
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            lambda: (client.infer("bounded", slow_input(8), client_timeout=CALL_TIMEOUT_S),
                     time.monotonic())
        )
        time.sleep(0.5)
        assert not in_flight.done()
        draining.terminate()
        signalled = time.monotonic()
        time.sleep(0.2)
        late = triton.InferenceServerClient(draining.address)
        expect_error(lambda: late.infer("bounded", slow_input(1), client_timeout=CALL_TIMEOUT_S),
                     UNAVAILABLE)
        late.close()
        result, finished = in_flight.result()
    assert finished > signalled  # it really was in flight when the signal came
    assert result.as_numpy("heatmap").shape == (8, 256, 256)
    assert draining.process.wait(10) == 0
    assert time.monotonic() - finished < 10
    assert "draining in-flight requests" in draining.log()
    client.close()


# -- 10. health and reflection -------------------------------------------------------------------


HEALTH_TIMEOUT_S = 60.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
EXPECTED_SERVICES = ("inference.GRPCInferenceService", "gradcam.v1.GradCam")


def test_health_follows_loading_and_shutdown(tiny_repository: Path) -> None:
    """`GradCamServer` in this process (beside tritonclient): NOT_SERVING right after start()
    while loading (held until the first check is answered), SERVING once loaded, NOT_SERVING
    after stop()."""
    asyncio.run(_health_scenario(tiny_repository))


async def _health_scenario(repository: Path) -> None:
    assert set(SERVICE_NAMES) == set(EXPECTED_SERVICES), SERVICE_NAMES
    server = GradCamServer(ServerOptions(repository, port=0, metrics_port=None))
    release = threading.Event()
    load_all = server.repository.load_all

    def held_load_all() -> None:
        release.wait(HEALTH_TIMEOUT_S)
        load_all()

    server.repository.load_all = held_load_all
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def statuses() -> list[int]:
                return [
                    (await health.Check(health_pb2.HealthCheckRequest(service=name),
                                        timeout=HEALTH_TIMEOUT_S)).status
                    for name in ("", *EXPECTED_SERVICES)
                ]

            assert await statuses() == [NOT_SERVING] * 3, "not NOT_SERVING while loading"
            release.set()
            await asyncio.wait_for(server.wait_until_loaded(), HEALTH_TIMEOUT_S)
            assert server.repository.ready()
            assert await statuses() == [SERVING] * 3, "not SERVING once loaded"
    finally:
        release.set()
        await server.stop(0)
    for name in ("", *EXPECTED_SERVICES):
        after = await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
        assert after.status == NOT_SERVING, f"{name!r} not NOT_SERVING after stop()"


def test_reflection_lists_and_describes_the_services(channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    pool = DescriptorPool(database)
    for name, method in (("inference.GRPCInferenceService", "ModelInfer"),
                         ("gradcam.v1.GradCam", "Explain"), ("grpc.health.v1.Health", "Check")):
        assert name in services
        assert method in pool.FindServiceByName(name).methods_by_name


# -- 11. metrics ---------------------------------------------------------------------------------


def test_metrics_endpoint(client, server) -> None:
    before = server.metrics()
    assert_still_serving(client)
    expect_error(lambda: client.infer("tiny", [target_input(1)], client_timeout=CALL_TIMEOUT_S),
                 INVALID)
    after = server.metrics()
    requests = {"model": "tiny", "api": "kserve", "method": "gradcam"}
    assert sample(after, "gradcam_requests_total", **requests) == (
        sample(before, "gradcam_requests_total", **requests) + 2
    )
    errors = {"model": "tiny", "api": "kserve", "code": "INVALID_ARGUMENT"}
    assert sample(after, "gradcam_request_errors_total", **errors) == (
        sample(before, "gradcam_request_errors_total", **errors) + 1
    )
    duration = {"model": "tiny", "api": "kserve"}
    assert sample(after, "gradcam_request_duration_seconds_count", **duration) == (
        sample(before, "gradcam_request_duration_seconds_count", **duration) + 2
    )
    assert sample(after, "gradcam_queue_duration_seconds_count", model="tiny") == (
        sample(before, "gradcam_queue_duration_seconds_count", model="tiny") + 1
    )
    text = server.metrics_text()
    for name in ("gradcam_requests_total", "gradcam_request_errors_total",
                 "gradcam_request_duration_seconds", "gradcam_queue_duration_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in text
