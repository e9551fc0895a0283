"""The Python SDK: `GradCamClient` (blocking) and `AsyncGradCamClient` (asyncio) over the typed
explain API (``gradcam.v1.GradCam``) and ``grpc.health.v1``.

    from gradcam_client import ExplainOptions, GradCamClient

    with GradCamClient("127.0.0.1:8001") as client:
        result = client.explain("samples/chelsea.jpg", model="efficientnet_lite0")
        result.heatmap                  # float32 [300, 451] in [0, 1], at the photo's size
        result.predictions[0].label     # 'Egyptian cat'
        result.overlay("turbo", opacity=0.4).save("out/chelsea-turbo.png")
        guided = client.explain("samples/chelsea.jpg", model="efficientnet_lite0",
                                method="guided-backprop")
        guided.pixel_gradients.shape    # (3, 224, 224): signed input gradients, model's input size
        guided.overlay().save("out/chelsea-guided.png")  # the paper's RGB gradient image
        small = client.explain("samples/chelsea.jpg", model="efficientnet_lite0",
                               options=ExplainOptions(heatmap_size="model"))
        small.heatmap.shape             # (224, 224): the graph's own map, at the model's input

`explain` takes one image or a list (a list gives a list of results): paths, encoded bytes, PIL
images, uint8 arrays, or float tensors [C, H, W] already preprocessed ([N, C, H, W]: N of them);
see `images`. What is explained is an `ExplainOptions` (`options`), or its fields as keywords,
which replace the options' fields. Heatmaps come back at the image's own size (a tensor's own H
and W), or at the size ``heatmap_size`` asks for. Calls carry a deadline (30 s unless
``timeout`` says otherwise), are retried with exponential backoff only when the server is
UNAVAILABLE (not reachable, shutting down, model still loading; `retry`), and raise the
`GradCamError` subclasses of `gradcam_client.errors` (a model that failed to load, or serves
inference only, raises `ModelUnavailableError` at once).

Both clients are shells over one core that does no I/O: `protocol` builds the requests and reads
the answers, `options` merges the keywords, `retry` decides on retries and waits, `connection`
holds the settings and opens the channel. A shell opens its channel, calls the stubs, and
sleeps or awaits. Nothing here imports onnx, onnxruntime, torch or the server.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union, overload

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc

from . import protocol
from .connection import DEFAULT_TARGET, Connection, PemInput
from .errors import DeadlineError, GradCamError, ModelNotFoundError, UnavailableError
from .images import ImageInput
from .options import ExplainOptions, merged_options
from .protocol import RequestPart
from .results import Evaluation, Explanation, ModelInfo, ModelStatus, Progress
from .retry import DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, ReadinessWait

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import EvaluateKwargs, ExplainKwargs

OneImage = Union[str, os.PathLike[str], bytes, bytearray, memoryview, Image.Image]
"""An input that is one image whatever it holds (an array may be a batch)."""

Response = TypeVar("Response")


class _Client:
    """What both clients share: the connection settings, one channel, the stubs."""

    _grpc: Any = grpc  # the module whose channels the client opens (grpc or grpc.aio)

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: PemInput | None = None,
        client_certificate: PemInput | None = None,
        client_key: PemInput | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._connection = Connection.make(
            target, tls=tls, root_certificates=root_certificates,
            client_certificate=client_certificate, client_key=client_key, token=token,
            timeout=timeout, retries=retries, backoff=backoff, options=options,
        )
        self._channel = self._connection.open_channel(self._grpc)
        self._stub = pb_grpc.GradCamStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        return self._connection.target


class GradCamClient(_Client):
    """A blocking client; use it in a ``with`` block or call `close`. Safe to share between
    threads.

    ``target`` is "host:port", or several replicas: a list of "host:port" (or one string of
    them, comma-separated) or a resolver name such as "dns:///gradcam.example:8001", balanced
    round-robin over the replicas that pass their health check (`channel_target`).
    ``timeout`` (seconds, None: none) is every call's default deadline, retries included;
    ``retries`` is how many times a call that found the server (or its replica) UNAVAILABLE is
    tried again, after ``backoff`` seconds doubling each time (with jitter).
    ``token`` sends ``authorization: Bearer <token>``. TLS is on with ``tls=True`` or when
    certificates are given: ``root_certificates`` (PEM bytes or a file; default: the system's
    roots), and ``client_certificate`` with ``client_key`` for mutual TLS. ``options`` are
    extra gRPC channel options, e.g. ``("grpc.ssl_target_name_override", "gradcam.local")``.
    """

    def __enter__(self) -> GradCamClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @overload
    def explain(
        self, images: OneImage, *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> Explanation: ...

    @overload
    def explain(
        self, images: np.ndarray, *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> Explanation | list[Explanation]: ...

    @overload
    def explain(
        self, images: Sequence[ImageInput], *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> list[Explanation]: ...

    def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        options: ExplainOptions | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **overrides: Unpack[ExplainKwargs],
    ) -> Explanation | list[Explanation]:
        """Explain one image (gives an `Explanation`) or many (a list or a 4-D tensor batch:
        gives a list, in order) with ``model``.

        ``on_progress``, where given, is called with a `Progress` after each step of a long
        request (Score-CAM runs in steps of a few seconds), from the calling thread; the
        request then goes through the streamed ``ExplainStream`` (the plain ``Explain`` on a
        server without it).

        What is explained is ``options`` (`ExplainOptions`; None: the model's defaults, the
        top-1 class with its default method and layer), whose fields may also be given as
        keywords (``top_k=3``, ``method="gradcam++"``, ``heatmap_size="model"``, ...): each
        keyword replaces that field of ``options``. `ExplainOptions` says what each one does.
        A long list is sent as several requests of at most `protocol.IMAGES_PER_REQUEST`.

        ``timeout`` overrides the client's deadline for each request. Raises a `GradCamError`
        subclass: `InvalidInputError` (a ValueError) for an option or image refused, before
        anything is sent for what the SDK can check (``code`` None), else by the server, its
        ``field_violations`` naming a bad image as ``images[N]``, N its place in ``images``;
        `ModelUnavailableError`, never retried, for a model that failed to load or serves
        inference only. FileNotFoundError for a missing path, TypeError for something that is
        not an image or a keyword that is no option.
        """
        merged = merged_options(options, overrides)
        call = protocol.explain_call(images, model=model, options=merged)
        return call.answer([self._send(part, timeout, on_progress, index)
                            for index, part in enumerate(call.parts)])

    def evaluate(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EvaluateKwargs],
    ) -> Evaluation:
        """How faithful each method's map of each image is to ``model``
        (docs/FAITHFULNESS.md): the server makes the maps, scores perturbed copies of each
        image and returns, per image, method and metric, a value and (deletion, insertion,
        ROAD) its curve.

        ``methods``: the names compared (empty: the model's default); ``metrics``: names of
        `protocol.METRICS` (empty: all but the pointing game, which needs ``pointing``: one
        box (x1, y1, x2, y2) or mask [H, W] per image, in its pixels, hit within
        ``pointing_tolerance`` pixels, 15 by default). ``target_class``: as `explain`'s (-r:
        each image's r-th class; None: the top-1). ``steps``: deletion and insertion's (100),
        ``road_percentiles``: ROAD's (10, ..., 90); ``score``: "probability" (default) or
        "logit". One request: at most 64 images, and the server bounds images x methods x
        copies (INVALID_ARGUMENT naming the limit). Long: give ``timeout`` accordingly.
        """
        request = protocol.evaluate_request(images, model=model, **options)
        started = time.perf_counter()
        response = self._call(self._stub.Evaluate, request, timeout)
        return protocol.evaluation(response, time.perf_counter() - started)

    def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """Every model of the server's repository, with its readiness."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return protocol.model_statuses(response)

    def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """A model's input, preprocessing, labels and default target layer, and
        ``explain_error``: why it serves inference only ("" when it explains)."""
        request = pb.GetModelInfoRequest(model=model)
        return protocol.model_info(self._call(self._stub.GetModelInfo, request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status: "SERVING", "NOT_SERVING" (models still loading, or
        shutting down) or "SERVICE_UNKNOWN". ``service`` "" is the whole server."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = self._call(self._health.Check, request, timeout)
        except ModelNotFoundError:  # NOT_FOUND: a service the server does not know
            return protocol.SERVICE_UNKNOWN
        return protocol.health_status(reply)

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING; DeadlineError after ``timeout`` seconds."""
        waiting = ReadinessWait(self.target, timeout)
        while True:
            try:
                answer: str | GradCamError = self.health(service, timeout=waiting.check_timeout())
            except (UnavailableError, DeadlineError) as error:
                answer = error
            if waiting.ready(answer):
                return
            time.sleep(waiting.pause)

    def _send(
        self, part: RequestPart, timeout: float | None,
        on_progress: Callable[[Progress], None] | None = None, index: int = 0,
    ) -> list[Explanation]:
        started = time.perf_counter()
        method: Callable[..., Any] = self._stub.Explain
        if on_progress is not None:
            method = functools.partial(self._streamed, on_progress=on_progress, index=index)
        with part.images_counted_in_call():
            response = self._call(method, part.request, timeout)
        return part.explanations(response, time.perf_counter() - started)

    def _streamed(
        self, request: pb.ExplainRequest, *, on_progress: Callable[[Progress], None],
        index: int, **kwargs: Any,
    ) -> pb.ExplainResponse:
        """ExplainStream's response, each progress message told first; the plain Explain
        where the server has no ExplainStream."""
        try:
            for update in self._stub.ExplainStream(request, **kwargs):
                if update.WhichOneof("kind") == "response":
                    return update.response
                on_progress(protocol.progress(update.progress, index))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return self._stub.Explain(request, **kwargs)
        raise UnavailableError("the server closed the explain stream without a response")

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None
    ) -> Response:
        attempts = self._connection.attempts(timeout)
        while True:
            try:
                return method(
                    request, timeout=attempts.seconds_left(), metadata=self._connection.metadata
                )
            except grpc.RpcError as error:
                wait = attempts.wait_after(error)  # raises when no attempt follows
            time.sleep(wait)


class AsyncGradCamClient(_Client):
    """The asyncio client: the same calls as `GradCamClient`, awaited. Use it in an
    ``async with`` block or await `close`. Inputs are read and encoded off the event loop, and
    the requests of a long list run concurrently (the server batches them). Its arguments are
    those of `GradCamClient`.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncGradCamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @overload
    async def explain(
        self, images: OneImage, *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> Explanation: ...

    @overload
    async def explain(
        self, images: np.ndarray, *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> Explanation | list[Explanation]: ...

    @overload
    async def explain(
        self, images: Sequence[ImageInput], *, model: str, options: ExplainOptions | None = ...,
        timeout: float | None = ..., **overrides: Unpack[ExplainKwargs],
    ) -> list[Explanation]: ...

    async def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        options: ExplainOptions | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **overrides: Unpack[ExplainKwargs],
    ) -> Explanation | list[Explanation]:
        """As `GradCamClient.explain`; the requests of a long list run concurrently
        (``on_progress`` is called on the event loop, `Progress.request` telling them apart)."""
        merged = merged_options(options, overrides)
        call = await asyncio.to_thread(protocol.explain_call, images, model=model, options=merged)
        return call.answer(await asyncio.gather(*(
            self._send(p, timeout, on_progress, index) for index, p in enumerate(call.parts)
        )))

    async def evaluate(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        timeout: float | None = None,
        **options: Unpack[EvaluateKwargs],
    ) -> Evaluation:
        """As `GradCamClient.evaluate`."""
        request = await asyncio.to_thread(
            lambda: protocol.evaluate_request(images, model=model, **options))
        started = time.perf_counter()
        response = await self._call(self._stub.Evaluate, request, timeout)
        return protocol.evaluation(response, time.perf_counter() - started)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """As `GradCamClient.list_models`."""
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return protocol.model_statuses(response)

    async def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """As `GradCamClient.model_info`."""
        request = pb.GetModelInfoRequest(model=model)
        return protocol.model_info(await self._call(self._stub.GetModelInfo, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As `GradCamClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._call(self._health.Check, request, timeout)
        except ModelNotFoundError:  # NOT_FOUND: a service the server does not know
            return protocol.SERVICE_UNKNOWN
        return protocol.health_status(reply)

    async def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """As `GradCamClient.wait_until_ready`."""
        waiting = ReadinessWait(self.target, timeout)
        while True:
            try:
                answer: str | GradCamError = await self.health(
                    service, timeout=waiting.check_timeout()
                )
            except (UnavailableError, DeadlineError) as error:
                answer = error
            if waiting.ready(answer):
                return
            await asyncio.sleep(waiting.pause)

    async def _send(
        self, part: RequestPart, timeout: float | None,
        on_progress: Callable[[Progress], None] | None = None, index: int = 0,
    ) -> list[Explanation]:
        started = time.perf_counter()
        method: Callable[..., Any] = self._stub.Explain
        if on_progress is not None:
            method = functools.partial(self._streamed, on_progress=on_progress, index=index)
        with part.images_counted_in_call():
            response = await self._call(method, part.request, timeout)
        return part.explanations(response, time.perf_counter() - started)

    async def _streamed(
        self, request: pb.ExplainRequest, *, on_progress: Callable[[Progress], None],
        index: int, **kwargs: Any,
    ) -> pb.ExplainResponse:
        """As `GradCamClient._streamed`, awaited."""
        try:
            async for update in self._stub.ExplainStream(request, **kwargs):
                if update.WhichOneof("kind") == "response":
                    return update.response
                on_progress(protocol.progress(update.progress, index))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return await self._stub.Explain(request, **kwargs)
        raise UnavailableError("the server closed the explain stream without a response")

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        attempts = self._connection.attempts(timeout)
        while True:
            try:
                return await method(
                    request, timeout=attempts.seconds_left(), metadata=self._connection.metadata
                )
            except grpc.RpcError as error:
                wait = attempts.wait_after(error)  # raises when no attempt follows
            await asyncio.sleep(wait)
