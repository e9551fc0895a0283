"""The SDK's core, in process and without a server: requests built from images and options,
answers read into results, the retry policy's decisions, and the field violations of a rich
error status. The clients' shells run over stubs that answer from memory."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import typing
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from gradcam_client import (
    AsyncGradCamClient,
    DetectionTarget,
    ExplainKwargs,
    ExplainOptions,
    Explanation,
    FieldViolation,
    GradCamClient,
    InvalidInputError,
    ServerBusyError,
    UnavailableError,
    cli,
    protocol,
)
from gradcam_client.errors import error_from_rpc, images_counted_from
from gradcam_client.options import merged_options
from gradcam_client.retry import MAX_BACKOFF, CallAttempts, RetryPolicy
from gradcam_common.methods import METHOD_NAMES
from gradcam_proto import gradcam_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "samples" / "chelsea.jpg"
PER_REQUEST = protocol.IMAGES_PER_REQUEST
NO_SERVER = "127.0.0.1:1"  # never reached: the stubs are replaced
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _pictures(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (8 + i, 6), (i, 2 * i, 3 * i)) for i in range(count)]


class _Refusal(grpc.RpcError):
    """A failed call as a stub raises it: code, message and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing


def _bad_request(message: str, *fields: str, code: grpc.StatusCode = INVALID) -> _Refusal:
    """A refusal with a google.rpc.BadRequest detail naming `fields`, as the server sends."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        for field in fields
    ]))
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])
    )
    return _Refusal(status.code, status.details, status.trailing_metadata)


def _response(request: pb.ExplainRequest) -> pb.ExplainResponse:
    """An answer with one explanation per image of `request`, each image's index its class."""
    side = 3
    return pb.ExplainResponse(
        model=request.model, method=request.method or pb.METHOD_GRADCAM, layer="conv",
        explanations=[
            pb.Explanation(
                heatmaps=[pb.Heatmap(class_index=i, label=f"c{i}", width=side, height=side,
                                     data=np.full(side * side, 0.5, "<f4").tobytes())],
                predictions=[pb.Prediction(class_index=i, label=f"c{i}", score=0.9, logit=2.0)],
            )
            for i in range(len(request.images))
        ],
    )


class _Stub:
    """The GradCam stub, answering from memory and keeping what it was sent; `refuse` maps
    a request's number (0-based) to the error it raises instead."""

    def __init__(self, refuse: dict[int, grpc.RpcError] | None = None) -> None:
        self.requests: list[pb.ExplainRequest] = []
        self.refuse = refuse or {}

    def Explain(self, request, timeout=None, metadata=None):  # noqa: N802 - the stub's name
        self.requests.append(request)
        number = len(self.requests) - 1
        if number in self.refuse:
            raise self.refuse[number]
        return _response(request)


class _AsyncStub(_Stub):
    async def Explain(self, request, timeout=None, metadata=None):  # noqa: N802
        return _Stub.Explain(self, request, timeout, metadata)


def _sent(images, **keywords) -> list[pb.ExplainRequest]:
    """The requests the blocking client sends for explain(images, model="m", **keywords)."""
    with GradCamClient(NO_SERVER, retries=0) as client:
        client._stub = stub = _Stub()
        client.explain(images, model="m", **keywords)
    return stub.requests


# --- requests -------------------------------------------------------------------------------


def test_a_long_list_is_sent_in_chunks_with_its_rows() -> None:
    count = 2 * PER_REQUEST + 1
    call = protocol.explain_call(_pictures(count), model="m", options=ExplainOptions(
        reference_embedding=np.arange(count * 2, dtype=np.float32).reshape(count, 2),
        target_mask=np.ones((6, 8), np.float32),  # one mask for every image
        inputs={"scale": np.arange(count, dtype=np.int64)[:, None]},
        detections=[[DetectionTarget(index=i)] for i in range(count)],
    ))
    assert call.many and [len(p.request.images) for p in call.parts] == [16, 16, 1]
    assert [p.first_image for p in call.parts] == [0, PER_REQUEST, 2 * PER_REQUEST]
    for part in call.parts:
        first, size = part.first_image, len(part.request.images)
        request = part.request
        assert request.model == "m" and len(part.sources) == size
        embedding = np.frombuffer(request.reference_embedding.data, "<f4")
        assert list(request.reference_embedding.shape) == [size, 2]
        assert embedding[0] == 2 * first
        assert list(request.target_mask.shape) == [6, 8]  # whole, in every part
        scale = request.inputs["scale"]
        assert (scale.datatype, list(scale.shape)) == ("INT64", [size, 1])
        assert np.frombuffer(scale.data, "<i8")[0] == first
        assert [d.detections[0].index for d in request.detections] == list(
            range(first, first + size)
        )


def test_one_image_gives_one_result_and_a_list_gives_a_list() -> None:
    one = protocol.explain_call(PHOTO, model="m", options=ExplainOptions())
    assert not one.many and len(one.parts) == 1
    assert one.parts[0].request.images[0].encoded == PHOTO.read_bytes()
    assert not protocol.explain_call(np.zeros((3, 4, 4), np.float32), model="m",
                                     options=ExplainOptions()).many
    batch = protocol.explain_call(np.zeros((2, 3, 4, 4), np.float32), model="m",
                                  options=ExplainOptions())
    assert batch.many and [list(i.tensor.shape) for i in batch.parts[0].request.images] == [
        [3, 4, 4], [3, 4, 4]
    ]
    results = [protocol.explanations(_response(p.request), p.sources, 0.0, False)
               for p in batch.parts]
    assert isinstance(batch.answer(results), list)
    assert isinstance(one.answer([protocol.explanations(_response(one.parts[0].request),
                                                        one.parts[0].sources, 0.0, False)]),
                      Explanation)


OPTION_SETS = [
    {},
    {"top_k": 3, "method": "GradCAM++", "heatmap_size": (64, 48)},
    {"target_class": 281, "layer": ["a", "b"], "counterfactual": True, "eigen_smooth": True,
     "aug_smooth": True, "num_predictions": 2, "num_channels": 1},
    {"layer": "blocks.3", "layout": "tokens", "prefix_tokens": 1, "grid": (14, 14),
     "score": "similarity", "reference_embedding": [0.5, 1.5], "output": "embedding"},
    {"target_mask": np.eye(4, dtype=np.float32), "heatmap_size": "model",
     "inputs": {"flag": np.array([[True], [False]])}},
    {"detections": [DetectionTarget(box=(1, 2, 3, 4), class_index=2)], "iou_threshold": 0.3},
]


@pytest.mark.parametrize("keywords", OPTION_SETS)
def test_options_and_keywords_send_the_same_requests(keywords: dict) -> None:
    images = [PHOTO, _pictures(1)[0]]
    by_keywords = _sent(images, **keywords)
    by_options = _sent(images, options=ExplainOptions(**keywords))
    assert by_keywords == by_options and len(by_keywords) == 1
    # A keyword replaces that field of the options, the others stay.
    base = ExplainOptions(top_k=7, num_channels=3)
    assert _sent(images, options=base, top_k=2) == _sent(images, top_k=2, num_channels=3)


def test_the_keywords_are_the_options_fields() -> None:
    fields = {f.name for f in dataclasses.fields(ExplainOptions)}
    assert set(typing.get_type_hints(ExplainKwargs)) == fields
    defaults = ExplainOptions()
    assert merged_options(None, {}) is not defaults  # a fresh value, equal field by field
    assert dataclasses.astuple(merged_options(None, {})) == dataclasses.astuple(defaults)
    assert merged_options(defaults, {}) is defaults
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        merged_options(None, {"topk": 3})
    with pytest.raises(TypeError, match="must be ExplainOptions"):
        merged_options({"top_k": 3}, {})  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.top_k = 3  # type: ignore[misc]


def test_method_names_are_the_common_tables() -> None:
    assert sorted(protocol.METHODS) == sorted(METHOD_NAMES)
    for name in METHOD_NAMES:
        assert protocol.method_name(protocol.method_enum(name.upper())) == name
    assert protocol.method_enum(None) == pb.METHOD_UNSPECIFIED
    assert protocol.method_name(9999) == "9999"  # a newer server's method


@pytest.mark.parametrize("keywords, fragment", [
    ({"target_class": 1, "top_k": 2}, "not both"),
    ({"method": "nosuchcam"}, "unknown method"),
    ({"heatmap_size": "big"}, "heatmap_size must be"),
    ({"grid": (14,)}, "grid must be"),
    ({"prefix_tokens": 1.5}, "prefix_tokens must be an integer"),
    ({"detections": "box"}, "detections must be"),
    ({"detections": [DetectionTarget(index=1), (1, 2, 3, 4)]}, "must be a DetectionTarget"),
    ({"inputs": {"text": np.array(["a"])}}, "numeric dtype"),
    ({"inputs": {"scalar": np.float32(1)}}, "one row per image"),
])
def test_options_are_checked_before_anything_is_sent(keywords: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as caught:
        protocol.explain_call(PHOTO, model="m", options=ExplainOptions(**keywords))
    assert caught.value.code is None and caught.value.field_violations == ()


# --- responses ------------------------------------------------------------------------------


def test_a_response_is_read_into_explanations() -> None:
    gradients = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    heatmap = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    response = pb.ExplainResponse(
        model="lite0", method=pb.METHOD_GUIDED_GRADCAM, layer="/block/out",
        layout="tokens", prefix_tokens=1, grid="14x14",
        timings=pb.Timings(preprocess_seconds=0.1, queue_seconds=0.2, inference_seconds=0.3,
                           total_seconds=0.7),
        explanations=[pb.Explanation(
            heatmaps=[pb.Heatmap(
                class_index=7, label="", width=3, height=2, data=heatmap.tobytes(),
                channels=[pb.ChannelImportance(channel=4, weight=0.25)],
                pixel_gradients=pb.Tensor(shape=[3, 2, 2], data=gradients.tobytes()),
                detection=pb.Detection(index=12, box=[1, 2, 3, 4], score=0.8, iou=0.6),
                concept_scores=[0.5, 0.25],
            )],
            predictions=[pb.Prediction(class_index=7, label="", score=0.75, logit=1.5)],
        )],
    )
    call = protocol.explain_call(_pictures(1)[0], model="lite0", options=ExplainOptions())
    (result,) = call.parts[0].explanations(response, round_trip=1.25)
    assert (result.model, result.method, result.layer) == ("lite0", "guided-gradcam", "/block/out")
    assert (result.layout, result.prefix_tokens, result.grid) == ("tokens", 1, (14, 14))
    assert not result.counterfactual
    np.testing.assert_array_equal(result.heatmap, heatmap)
    assert result.heatmap.flags.writeable and result.heatmap.dtype == np.float32
    np.testing.assert_array_equal(result.pixel_gradients, gradients)
    (explained,) = result.heatmaps
    assert (explained.class_index, explained.name, explained.channels) == (7, "class 7",
                                                                           [(4, 0.25)])
    assert explained.concept_scores == (0.5, 0.25)
    assert explained.detection.index == 12 and explained.detection.box == (1, 2, 3, 4)
    assert explained.detection.score == pytest.approx(0.8)
    (top,) = result.predictions
    assert (top.class_index, top.score, top.logit) == (7, 0.75, 1.5)
    assert result.timings.total_seconds == pytest.approx(0.7)
    assert result.timings.round_trip_seconds == 1.25
    assert result.image.size == (8, 6)  # the picture sent, kept to draw on


def test_an_older_servers_response_leaves_the_new_fields_empty() -> None:
    response = pb.ExplainResponse(model="m", method=pb.METHOD_GRADCAM, explanations=[
        pb.Explanation(heatmaps=[pb.Heatmap(width=1, height=1, data=b"\0\0\0\0")])
    ])
    (result,) = protocol.explanations(response, [None], 0.0, True)
    assert (result.layout, result.prefix_tokens, result.grid) == ("", None, None)
    assert result.pixel_gradients is None and result.heatmaps[0].detection is None
    assert result.counterfactual and result.image is None


def test_model_info_and_statuses_are_read() -> None:
    info = protocol.model_info(pb.ModelInfo(
        name="m", input="x", input_shape=[-1, 3, 224, 224], input_size=[224, 224],
        methods=[pb.METHOD_GRADCAM, pb.METHOD_SCORECAM], grid="7x7",
    ))
    assert (info.input_shape, info.methods) == ((-1, 3, 224, 224), ("gradcam", "scorecam"))
    assert (info.grid, info.prefix_tokens) == ((7, 7), None)
    statuses = protocol.model_statuses(pb.ListModelsResponse(models=[
        pb.ModelStatus(name="a", ready=True), pb.ModelStatus(name="b", reason="loading"),
    ]))
    assert [(s.name, s.ready, s.reason) for s in statuses] == [("a", True, ""),
                                                               ("b", False, "loading")]


# --- the retry policy -----------------------------------------------------------------------


def test_only_unavailable_is_retried_with_a_doubling_backoff() -> None:
    policy = RetryPolicy(retries=3, backoff=0.5)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0)]:
        wait = policy.delay(retry, UNAVAILABLE, deadline=None)
        assert 0.8 * base <= wait <= 1.2 * base
    assert policy.delay(4, UNAVAILABLE, deadline=None) is None  # no retry left
    for code in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, None):
        assert policy.delay(1, code, deadline=None) is None
    assert RetryPolicy(retries=20, backoff=1.0).delay(10, UNAVAILABLE, None) <= 1.2 * MAX_BACKOFF
    soon = time.monotonic() + 0.1  # a wait that would end past the deadline is not made
    assert policy.delay(1, UNAVAILABLE, deadline=soon) is None
    assert RetryPolicy(retries=0).delay(1, UNAVAILABLE, deadline=None) is None
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(retries=-1)


def test_a_calls_attempts_end_with_its_error() -> None:
    attempts = CallAttempts(RetryPolicy(retries=2, backoff=0.01), "host:1", timeout=10.0)
    assert 9.0 < attempts.seconds_left() <= 10.0
    assert attempts.wait_after(_Refusal(UNAVAILABLE, "down")) > 0
    assert attempts.wait_after(_Refusal(UNAVAILABLE, "down")) > 0
    with pytest.raises(UnavailableError) as caught:
        attempts.wait_after(_Refusal(UNAVAILABLE, "still down"))
    assert caught.value.attempts == 3 and "host:1 unavailable after 3 attempts" in str(caught.value)
    once = CallAttempts(RetryPolicy(retries=2), "host:1", timeout=None)
    assert once.seconds_left() is None
    with pytest.raises(ServerBusyError) as caught:
        once.wait_after(_Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
    assert caught.value.attempts == 1


def test_both_clients_retry_through_the_same_policy() -> None:
    down = _Refusal(UNAVAILABLE, "down")
    with GradCamClient(NO_SERVER, retries=1, backoff=0.01) as client:
        client._stub = stub = _Stub(refuse={0: down})
        assert client.explain(PHOTO, model="m").heatmaps[0].class_index == 0
        assert len(stub.requests) == 2

    async def scenario() -> int:
        async with AsyncGradCamClient(NO_SERVER, retries=1, backoff=0.01) as client:
            client._stub = _AsyncStub(refuse={0: down, 1: down})
            with pytest.raises(UnavailableError) as caught:
                await client.explain(PHOTO, model="m")
            return caught.value.attempts

    assert asyncio.run(scenario()) == 2


# --- field violations -----------------------------------------------------------------------


def test_a_bad_request_detail_becomes_field_violations() -> None:
    message = "image 1: cannot decode the image"
    error = error_from_rpc(_bad_request(message, "images[1]"), target="t", attempts=1)
    assert isinstance(error, InvalidInputError) and error.code == INVALID
    assert str(error) == error.message == message
    assert error.field_violations == (FieldViolation("images[1]", message),)
    assert error.field_violations[0].image_index == 1
    assert FieldViolation("target_class", "out of range").image_index is None
    assert FieldViolation("images[1].tensor", "bad").image_index is None


def test_errors_without_a_matching_detail_have_no_violations() -> None:
    assert error_from_rpc(_Refusal(INVALID, "bad"), target="t", attempts=1).field_violations == ()
    rich = _bad_request("what the status says", "images[0]")
    mismatched = _Refusal(INVALID, "another message", rich.trailing_metadata())
    assert error_from_rpc(mismatched, target="t", attempts=1).field_violations == ()
    garbage = _Refusal(INVALID, "bad", [("grpc-status-details-bin", b"\xff not a status")])
    assert error_from_rpc(garbage, target="t", attempts=1).field_violations == ()


def test_image_violations_are_counted_in_the_whole_call() -> None:
    refused = error_from_rpc(_bad_request("image 2: bad", "images[2]", "layer"), target="t",
                             attempts=1)
    with pytest.raises(InvalidInputError) as caught:
        with images_counted_from(PER_REQUEST):
            raise refused
    assert [v.field for v in caught.value.field_violations] == [f"images[{PER_REQUEST + 2}]",
                                                                 "layer"]
    assert caught.value.message == "image 2: bad"  # the server's words, as they were

    # Through the client: the second request's third image is the call's image 18.
    with GradCamClient(NO_SERVER, retries=0) as client:
        client._stub = _Stub(refuse={1: _bad_request("image 2: bad", "images[2]")})
        with pytest.raises(InvalidInputError) as caught:
            client.explain(_pictures(PER_REQUEST + 3), model="m")
    assert [v.image_index for v in caught.value.field_violations] == [PER_REQUEST + 2]


def test_the_asyncio_client_reads_violations_from_its_own_errors() -> None:
    rich = _bad_request("image 0: bad", "images[0]")
    refusal = grpc.aio.AioRpcError(  # what grpc.aio raises, its trailer an aio.Metadata
        rich.code(), grpc.aio.Metadata(), grpc.aio.Metadata(*rich.trailing_metadata()),
        rich.details(),
    )

    async def scenario() -> InvalidInputError:
        async with AsyncGradCamClient(NO_SERVER, retries=0) as client:
            client._stub = _AsyncStub(refuse={1: refusal})
            with pytest.raises(InvalidInputError) as caught:
                await client.explain(_pictures(PER_REQUEST + 1), model="m")
            return caught.value

    error = asyncio.run(scenario())
    assert error.field_violations == (FieldViolation(f"images[{PER_REQUEST}]", "image 0: bad"),)


def test_the_cli_skips_the_image_a_violation_names(tmp_path: Path) -> None:
    files = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    named = error_from_rpc(_bad_request("image 1: cannot decode", "images[1]"), target="t",
                           attempts=1)
    skipped = cli._refused_image(named, files)
    assert str(skipped) == f"{files[1]}: cannot decode"
    whole = error_from_rpc(_Refusal(INVALID, "image 1: no field"), target="t", attempts=1)
    assert cli._refused_image(whole, files) is None  # no violation: the whole request failed
