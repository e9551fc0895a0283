"""What can go wrong in a call, as exceptions; gRPC status codes are mapped to them here only.

Every error the SDK raises for a call is a `GradCamError`; its ``message`` is the server's own
message (what was wrong with the request), ``code`` the gRPC status code (None when the SDK
refused the input before sending anything), and ``attempts`` how many times the call was tried.
Catch the base class to handle everything, or a subclass for one situation::

    try:
        result = client.explain("samples/chelsea.jpg", model="efficientnet_lite0")
    except ModelNotFoundError:
        ...

Only `UnavailableError` (no server at the address, the model still loading, the server
shutting down) is retried by the clients; every other error is raised at its first attempt.

An `InvalidInputError` from the server names the parts of the request that were wrong where
the server knows them: ``field_violations``, read from the ``google.rpc.BadRequest`` detail of
the call's rich status (the ``grpc-status-details-bin`` trailer). A bad image is
``images[N]``, N its place in the list given to `explain` (a long list is sent as several
requests; `images_counted_from` renumbers each request's images to the call's)::

    except InvalidInputError as error:
        bad = [v.image_index for v in error.field_violations if v.image_index is not None]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

_IMAGE_FIELD = re.compile(r"images\[(\d+)\]")


class GradCamError(Exception):
    """Base of every error of a call to the server."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        attempts: int = 1,
        description: str | None = None,
    ) -> None:
        super().__init__(description or message)
        self.message = message
        self.code = code
        self.attempts = attempts


class FieldViolation(NamedTuple):
    """A part of the request the server refused (a ``google.rpc.BadRequest`` field violation):
    ``field`` names it ("images[3]", "target_class", ...), ``description`` says what is wrong."""

    field: str
    description: str

    @property
    def image_index(self) -> int | None:
        """N of ``images[N]``, the image's place in the list given to `explain`; None for a
        violation of another field."""
        match = _IMAGE_FIELD.fullmatch(self.field)
        return int(match[1]) if match else None


class InvalidInputError(GradCamError, ValueError):
    """The request was refused as malformed: a bad image or tensor, class index, method, layer
    or option, or an answer that would be over the server's size limit (the message names the
    limit; ask for a smaller ``heatmap_size``, fewer classes or fewer images) (INVALID_ARGUMENT,
    or refused by the SDK before sending). ``field_violations`` names the parts of the request
    that were wrong, where the server said (empty otherwise)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        attempts: int = 1,
        description: str | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message, code=code, attempts=attempts, description=description)
        self.field_violations = tuple(field_violations)


class ModelNotFoundError(GradCamError, LookupError):
    """No model of that name is served (NOT_FOUND)."""


class UnavailableError(GradCamError, ConnectionError):
    """The server could not be reached, is shutting down, or the model is still loading
    (UNAVAILABLE), still so after the retries."""


class ModelUnavailableError(GradCamError):
    """The model is served by name but cannot answer this request, and retrying will not
    help (FAILED_PRECONDITION): its folder failed to load ("model 'x' failed to load: ..."),
    or its graph cannot be explained, so it serves plain inference only and refuses explain
    requests ("... serves inference only ..."; `ModelInfo.explain_error` says why). Never
    retried; the message is the server's reason."""


class UnauthenticatedError(GradCamError):
    """The server wants a valid bearer token (UNAUTHENTICATED) or refused the caller
    (PERMISSION_DENIED)."""


class DeadlineError(GradCamError, TimeoutError):
    """The call's deadline passed before the answer came (DEADLINE_EXCEEDED)."""


class ServerBusyError(GradCamError):
    """Overload, queue full: retry later (RESOURCE_EXHAUSTED). The model's queue, or the calls
    the server takes at once, are at their bound; send again after a pause, or less at once.
    The SDK does not retry it itself: only the caller knows how long it can wait."""


ERROR_OF_STATUS: dict[grpc.StatusCode, type[GradCamError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ModelUnavailableError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
}


def error_from_rpc(error: grpc.RpcError, *, target: str, attempts: int) -> GradCamError:
    """The `GradCamError` subclass for a failed call (`grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: grpc.StatusCode | None = error.code() if hasattr(error, "code") else None
    message = " ".join(str(error.details() if hasattr(error, "details") else error).split())
    kind = ERROR_OF_STATUS.get(code, GradCamError) if code is not None else GradCamError
    if kind is UnavailableError:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        description = f"server {target} unavailable{tries}: {message}"
    elif kind is DeadlineError:
        description = f"no answer from {target} before the deadline: {message}"
    elif kind is GradCamError:
        name = code.name if code is not None else "error"
        description = f"{name}: {message}"
    else:
        description = message
    if kind is InvalidInputError:
        return InvalidInputError(message, code=code, attempts=attempts, description=description,
                                 field_violations=field_violations(error))
    return kind(message, code=code, attempts=attempts, description=description)


def field_violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """The ``google.rpc.BadRequest`` field violations of a failed call's rich status; () where
    the server sent none (or a status that does not match the call's)."""
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, TypeError, ValueError, DecodeError):  # no call, or no rich status
        return ()
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return tuple(violations)


@contextmanager
def images_counted_from(first: int) -> Iterator[None]:
    """Around the call of a request whose images[0] is image ``first`` of the list given to
    `explain`: an `InvalidInputError` raised within has its images' field violations
    renumbered to the list's (its message is the server's, as it was)."""
    try:
        yield
    except InvalidInputError as error:
        if not first or not any(v.image_index is not None for v in error.field_violations):
            raise
        renumbered = [
            v if v.image_index is None else v._replace(field=f"images[{v.image_index + first}]")
            for v in error.field_violations
        ]
        raise InvalidInputError(
            error.message, code=error.code, attempts=error.attempts, description=str(error),
            field_violations=renumbered,
        ) from None
