"""What both gRPC APIs share: domain errors mapped to status codes (the one place), request
metrics, deadlines, and how their methods are registered and their responses serialized.

An `InvalidInput` that names the request field that is wrong (``field``, e.g. "images[3]")
is refused with a rich status: the same code and message, and a ``google.rpc.BadRequest`` detail
holding one field violation (that field, the message as its description), which clients read
from the ``grpc-status-details-bin`` trailer (``grpc_status.rpc_status.from_call``).

Responses of the methods that can be large (heatmaps, tensors: tens of MiB) are built and
serialized by the servicers in a worker thread, not on the event loop, where serializing took a
tenth of a second per 16 MiB heatmap; `add_servicer` registers a servicer whose methods may
therefore return pre-serialized bytes. gRPC's own copy of a response does happen on the loop:
large ones take turns (`_paced`), so that health checks are answered between them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref

import grpc
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import (
    MAX_MESSAGE_CHARS,
    DeadlineExceeded,
    ExplainUnavailable,
    InvalidInput,
    ModelFailed,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
)
from .metrics import Metrics

log = logging.getLogger(__name__)

STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ModelFailed: grpc.StatusCode.FAILED_PRECONDITION,
    ExplainUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
UNKNOWN_MODEL = "unknown"
INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_of(error: ServiceError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a `time.monotonic()` value, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def add_servicer(server: grpc.aio.Server, servicer, service: ServiceDescriptor) -> None:
    """Register `servicer`'s methods for `service` (unary, or streaming the responses), as
    the generated ``add_*Servicer_to_server`` would, except that a method may return (or
    write) bytes already serialized (`rpc` does for its large responses)."""
    handlers = {
        method.name: (grpc.unary_stream_rpc_method_handler if method.server_streaming
                      else grpc.unary_unary_rpc_method_handler)(
            getattr(servicer, method.name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=_serialize,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def rpc(api: str, streaming: bool = False):
    """Wrap a servicer method: count it, time it, and turn errors into statuses. A
    `streaming` one (responses streamed) writes its own messages but the last, which it
    returns, like a unary one, and the wrapper writes.

    The servicer has a ``metrics`` attribute (`Metrics`). The wrapped method takes
    (self, request, context, labels) and fills ``labels`` (a dict with
    "model" and "method") as soon as it knows them, for the metrics; requests naming no served
    model are counted under the model label "unknown", so clients cannot grow the label set.
    Service errors become their status with their message (an `InvalidInput` naming its
    field with a `bad_request` detail too); anything else becomes INTERNAL
    with a generic message and a logged traceback. A response serialized already (bytes)
    over ``metrics.max_message_bytes``, which gRPC could not send, becomes INVALID_ARGUMENT
    naming the limit. A message is cut to MAX_MESSAGE_CHARS. A
    call the client abandoned (cancelled, or past its deadline) is counted with the code
    CANCELLED. Every failure is counted in ``gradcam_request_errors_total``.
    """

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            metrics: Metrics = self.metrics
            labels = {"model": "", "method": ""}
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            field = None
            try:
                response = await method(self, request, context, labels)
                _check_size(response, metrics.max_message_bytes)
                await _paced(response)
                if not streaming:
                    return response
                await context.write(response)
                return None
            except ServiceError as error:
                code, message = status_of(error), _cut(str(error))
                field = error.field if isinstance(error, InvalidInput) else None
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:  # noqa: BLE001 - never leak internals to a client
                log.exception("%s failed", method.__qualname__)
                code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            finally:
                model = labels["model"] or UNKNOWN_MODEL
                metrics.requests.labels(model, api, labels["method"]).inc()
                metrics.latency.labels(model, api).observe(time.perf_counter() - started)
                if code != grpc.StatusCode.OK:
                    metrics.errors.labels(model, api, code.name).inc()
            _set_status(context, code, message, field)
            return None

        return wrapper

    return decorate


def _set_status(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                field: str | None) -> None:
    """The error status gRPC sends when the handler returns (with the `bad_request` detail
    where `field` is known). Not `context.abort`, which raises through the handler: a refused
    call costs 2.0 ms of CPU, client and server together, against 2.4 ms aborted."""
    context.set_code(code)
    context.set_details(message)
    if field is not None:
        context.set_trailing_metadata(bad_request(code, message, field).trailing_metadata)


def bad_request(code: grpc.StatusCode, message: str, field: str) -> grpc.Status:
    """The rich status of a refused request field: ``code`` and ``message`` as a plain
    refusal sends them, and a ``google.rpc.BadRequest`` detail with one field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(status)


def _cut(message: str) -> str:
    """A message within MAX_MESSAGE_CHARS: whatever a request echoed, it reaches the client."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 12] + " ... (cut)"


LARGE_RESPONSE_BYTES = 4 * 2**20
"""Responses from this size up are handed to gRPC one at a time (`_paced`)."""
_large_response_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def _paced(response) -> None:
    """Wait, if `response` is large, for its turn to be handed to gRPC. gRPC copies a response
    into its own buffer on the event loop, holding the GIL (tens of ms per 48 MiB on small
    machines): large answers finishing together would block the loop, and the health checks
    it answers, for the sum of their copies. A large one is handed over only once the previous
    one was copied and the loop has run twice as long since, so copies take at most a third of
    the loop. (With a pause only as long as the copy, health checks took up to 99 ms in a 60 s
    run of docs/RELIABILITY.md's scenario; with this one, up to 77 ms.)"""
    if not isinstance(response, bytes) or len(response) < LARGE_RESPONSE_BYTES:
        return
    loop = asyncio.get_running_loop()
    turn = _large_response_turns.get(loop)
    if turn is None:
        turn = _large_response_turns[loop] = asyncio.Lock()
    await turn.acquire()
    handed = time.perf_counter()

    def copied() -> None:  # the loop's next pass: gRPC has copied the response by now
        loop.call_later(2 * (time.perf_counter() - handed), turn.release)

    loop.call_soon(copied)


def _check_size(response, limit: int | None) -> None:
    if limit is None or not isinstance(response, bytes):  # small responses: never near it
        return
    size = len(response)
    if size > limit:
        raise InvalidInput(
            f"the response would be {size / 2**20:.1f} MiB, over the limit of "
            f"{limit / 2**20:.0f} MiB per message; ask for less per request"
        )
