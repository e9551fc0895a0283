"""Random requests against a live server: every one is answered, or refused with a clear
status; none breaks the server or comes back silently wrong.

Each request, a KServe v2 `ModelInfer` or a typed `Explain` for one of two small models (a
classifier whose map is resized from a coarse one, and a segmenter), is built from one seed
that hypothesis draws: any method, layer, score, layout, heatmap size, flags of the right and
of the wrong kind, faithfulness metrics, encoded images good and broken, tensors of good and
wrong shapes and datatypes (NaN included), target classes in and out of range, masks and
embeddings of any shape, outputs that exist and that do not. Half the requests are built of
fitting values only, half are hostile (their values misfit now and then). Each answer must be
one of:

- OK, with every heatmap finite and within [0, 1] (KServe's of [N, h, w], the typed API's of
  height x width floats);
- a refusal naming what was wrong: INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION with a
  message; never INTERNAL, UNKNOWN or UNAVAILABLE.

Afterwards the server still answers a good request and has logged no traceback. Bounded and
deterministic like tests/test_fuzz.py: hypothesis derandomized, ``GRADCAM_FUZZ_EXAMPLES``
examples per API (default 200), no example database.
"""

from __future__ import annotations

import io
import math
import random

import grpc
import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import servers
from gradcam_common.methods import METHOD_NAMES
from gradcam_proto import gradcam_pb2 as gpb
from gradcam_proto import gradcam_pb2_grpc as gpb_grpc
from gradcam_proto import grpc_service_pb2 as pb
from gradcam_proto import grpc_service_pb2_grpc as pb_grpc
from test_fuzz import FUZZ

CLASSIFIER, SEGMENTER = "strided", "segmenter"
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION}
SIZE = servers.TINY_SIZE


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    data = io.BytesIO()
    Image.new(mode, (width, height), 100).save(data, "PNG")
    return data.getvalue()


GOOD_IMAGE = _png(48, 40)
GOOD_IMAGES = [GOOD_IMAGE, _png(1, 1), _png(300, 2), _png(20, 20, "L"), _png(20, 20, "RGBA"),
               servers.SAMPLE.read_bytes()]
BAD_IMAGES = [b"", b"\x89PNG\r\n\x1a\nnot a png", GOOD_IMAGE[:60]]
GOOD_SHAPES = [[1, 3, SIZE, SIZE], [2, 3, SIZE, SIZE], [3, 3, SIZE, SIZE]]
BAD_SHAPES = [[1, 3, SIZE + 1, SIZE], [1, SIZE, SIZE, 3], [3, SIZE, SIZE], [0, 3, SIZE, SIZE],
              [1, 1, SIZE, SIZE]]
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "FP64": np.float64}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("random-requests")
    path = servers.export_torch(servers.strided_cnn(), SIZE, root / CLASSIFIER / "model.onnx",
                                dynamic_batch=True)
    servers.export_segmenter(root / SEGMENTER / "model.onnx")
    layers = [node.output[0] for node in onnx.load(str(path)).graph.node]
    return root, layers


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory: pytest.TempPathFactory):
    root, _ = repository
    with servers.serving(root, tmp_path_factory.mktemp("log") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
    ) as channel:
        yield channel


class _Draws(random.Random):
    """Half the requests are built of fitting values only; the other half are hostile: each
    of their values is a misfit about once in `odds / 2` draws."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.hostile = self.random() < 0.5


def _either(rng: _Draws, good: list, bad: list, odds: int = 6):
    """One of `good`, or in a hostile request now and then one of `bad`."""
    return rng.choice(bad if rng.hostile and _sometimes(rng, max(odds // 2, 2)) else good)


def _sometimes(rng: _Draws, odds: int) -> bool:
    return rng.randrange(odds) == 0


def kserve_request(rng: _Draws, layers: list[str]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=_either(rng, [CLASSIFIER, CLASSIFIER, SEGMENTER], ["nope", ""], 12))
    parameters = request.parameters
    strings = {  # (the values that fit, those that do not)
        "method": (list(METHOD_NAMES), ["nope", "Grad-CAM"]),
        "target_layer": (layers, ["input", "logits", "nope"]),
        "score": (["logit", "probability", "region"], ["similarity", "detection", "nope"]),
        "heatmap_size": (["model", "image", "1x1", "64x48", "5000x1"], ["0x5", "abc", "-1x2"]),
        "target_layout": (["nchw"], ["nhwc", "tokens", "nope"]),
        "grid": (["8x8"], ["0x0", "x", "99999999x99999999"]),
        "evaluate": (["deletion", "insertion,deletion", "all"], ["nope", ","]),
        "output": (["logits", "scores"], ["nope"]),
    }
    asked = {"method": 2, "target_layer": 3, "score": 5, "heatmap_size": 3,
             "target_layout": 12, "grid": 15, "evaluate": 12, "output": 10}
    for key, (good, bad) in strings.items():
        if _sometimes(rng, asked[key]):
            parameters[key].string_param = _either(rng, good, bad)
    for key in ("counterfactual", "eigen_smooth", "aug_smooth"):
        if _sometimes(rng, 5):
            if _sometimes(rng, 8):
                parameters[key].string_param = "true"  # the wrong kind
            else:
                parameters[key].bool_param = rng.random() < 0.5
    for key, (good, bad) in {"prefix_tokens": ([0], [-1, 65]), "steps": ([1, 2], [0, -1])}.items():
        if _sometimes(rng, 12):
            parameters[key].int64_param = _either(rng, good, bad)
    if _sometimes(rng, 12):
        parameters["iou_threshold"].double_param = _either(rng, [0.5], [-1.0, 2.0, math.nan])

    if rng.random() < 0.5:
        count = _either(rng, [1, 1, 2], [0])
        tensor = request.inputs.add(name="image", shape=[count],
                                    datatype=_either(rng, ["BYTES"], ["FP32"], 12))
        for _ in range(count):
            tensor.contents.bytes_contents.append(_either(rng, GOOD_IMAGES, BAD_IMAGES))
        typed_contents = True
    else:
        shape = _either(rng, GOOD_SHAPES, BAD_SHAPES)
        datatype = _either(rng, ["FP32", "FP32", "FP16"], ["INT64", "FP64"], 10)
        values = np.random.default_rng(rng.randrange(10)).standard_normal(
            math.prod(shape)).astype(NUMPY[datatype])
        if values.size and datatype in ("FP32", "FP16") and _sometimes(rng, 12):
            values[0] = np.nan
        request.inputs.add(name=_either(rng, ["input"], ["x"], 12), datatype=datatype,
                           shape=shape)
        request.raw_input_contents.append(values.tobytes())
        typed_contents = False
    if _sometimes(rng, 3):
        classes = [_either(rng, [-1, -2, 0, 3, 9], [10, -11, 10**12], 4)
                   for _ in range(rng.randint(1, 3))]
        if typed_contents:
            tensor = request.inputs.add(name="target_class", datatype="INT64",
                                        shape=[len(classes)])
            tensor.contents.int64_contents.extend(classes)
        else:
            request.inputs.add(name="target_class", datatype="INT64", shape=[len(classes)])
            request.raw_input_contents.append(np.array(classes, np.int64).tobytes())
    if _sometimes(rng, 8):
        name = rng.choice(["target_mask", "reference_embedding"])
        shape = rng.choice([[1, SIZE, SIZE], [SIZE, SIZE], [1, 8, 8], [1, 10], [5]])
        values = np.ones(math.prod(shape), np.float32)
        if typed_contents:
            tensor = request.inputs.add(name=name, datatype="FP32", shape=shape)
            tensor.contents.fp32_contents.extend(values.tolist())
        else:
            request.inputs.add(name=name, datatype="FP32", shape=shape)
            request.raw_input_contents.append(values.tobytes())
    scores = "scores" if request.model_name == SEGMENTER else "logits"
    outputs = rng.choice([[], ["heatmap"], [scores, "heatmap"], [scores]])
    if _sometimes(rng, 8):
        outputs = [_either(rng, ["pixel_map", "concept_scores", "faithfulness_deletion"],
                           ["nope"])]
    for name in outputs:
        request.outputs.add(name=name)
    return request


def typed_request(rng: _Draws, layers: list[str]) -> gpb.ExplainRequest:
    request = gpb.ExplainRequest(
        model=_either(rng, [CLASSIFIER, CLASSIFIER, SEGMENTER], ["nope"], 12))
    for _ in range(_either(rng, [1, 1, 2, 3], [0], 12)):
        image = request.images.add()
        if not _sometimes(rng, 5):
            image.encoded = _either(rng, GOOD_IMAGES, BAD_IMAGES)
        else:
            shape = _either(rng, [[3, SIZE, SIZE]], [[1, 3, SIZE, SIZE], [3, 10, 10]])
            image.tensor.shape.extend(shape)
            image.tensor.data = np.zeros(math.prod(shape), np.float32).tobytes()
    request.method = rng.choice(gpb.Method.values())
    if _sometimes(rng, 3):
        request.layer = _either(rng, layers, ["nope", "input"])
    if _sometimes(rng, 8):
        request.layers.extend(rng.sample(layers, rng.randint(1, 2)))
    request.counterfactual = _sometimes(rng, 6)
    request.eigen_smooth = _sometimes(rng, 6)
    request.aug_smooth = _sometimes(rng, 10)
    if _sometimes(rng, 5):
        request.score = _either(rng, ["logit", "probability", "region"],
                                ["similarity", "nope"])
    if _sometimes(rng, 12):
        request.layout = _either(rng, ["nchw"], ["nhwc", "tokens", "nope"])
    if _sometimes(rng, 4):
        request.target.class_index = _either(rng, [-1, -3, 0, 9], [10, 10**12])
    elif _sometimes(rng, 4):
        request.target.top_k = _either(rng, [1, 3], [0, 21, -1])
    if _sometimes(rng, 4):
        options = request.options
        options.num_predictions = _either(rng, [0, 3], [-1, 10**6])
        options.num_channels = _either(rng, [0, 2], [-1])
        options.overlay = rng.random() < 0.5
        options.colormap = _either(rng, ["", "jet", "turbo"], ["nope"])
        options.overlay_opacity = _either(rng, [0.0, 0.5], [-1.0, math.nan])
        options.heatmap_size = _either(rng, ["", "model", "image", "7x3"], ["0x0", "abc"])
    if _sometimes(rng, 8):
        shape = rng.choice([[SIZE, SIZE], [8, 8], [2, 8, 8], [3]])
        request.target_mask.shape.extend(shape)
        request.target_mask.data = np.ones(math.prod(shape), np.float32).tobytes()
    if _sometimes(rng, 12):
        request.reference_embedding.shape.extend([10])
        request.reference_embedding.data = np.ones(10, np.float32).tobytes()
    return request


def _answered_or_refused(call) -> object | None:
    """The response, or None for a clear refusal; anything else fails the test."""
    try:
        return call()
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, (error.code(), error.details())
        assert error.details(), error.code()
        return None


def _assert_heatmap_values(values: np.ndarray) -> None:
    assert np.isfinite(values).all()
    assert values.min(initial=0.0) >= 0.0 and values.max(initial=0.0) <= 1.0


def test_random_kserve_requests_are_answered_or_refused(repository, channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    @FUZZ
    @given(st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        request = kserve_request(_Draws(seed), repository[1])
        response = _answered_or_refused(lambda: stub.ModelInfer(request, timeout=60))
        if response is None:
            return
        for index, output in enumerate(response.outputs):
            if output.name == "heatmap":
                assert output.datatype == "FP32" and len(output.shape) == 3
                values = np.frombuffer(response.raw_output_contents[index], "<f4")
                assert values.size == math.prod(output.shape)
                _assert_heatmap_values(values)

    check()


def test_random_typed_requests_are_answered_or_refused(repository, channel) -> None:
    stub = gpb_grpc.GradCamStub(channel)

    @FUZZ
    @given(st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        request = typed_request(_Draws(seed), repository[1])
        response = _answered_or_refused(lambda: stub.Explain(request, timeout=60))
        if response is None:
            return
        for explanation in response.explanations:
            for heatmap in explanation.heatmaps:
                values = np.frombuffer(heatmap.data, "<f4")
                assert values.size == heatmap.height * heatmap.width > 0
                _assert_heatmap_values(values)

    check()


def test_the_server_still_answers_and_logged_no_traceback(server, channel) -> None:
    """Runs after the random requests (pytest keeps a file's order)."""
    request = pb.ModelInferRequest(model_name=CLASSIFIER)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(GOOD_IMAGE)
    request.outputs.add(name="heatmap")
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert list(response.outputs[0].shape) == [1, 40, 48]
    assert "Traceback" not in server.log()
