"""What can go wrong in a call, as exceptions; gRPC status codes are mapped to them here only.

Every error the SDK raises for a call is a `GradCamError`; its ``message`` is the server's own
message (what was wrong with the request), ``code`` the gRPC status code (None when the SDK
refused the input before sending anything), and ``attempts`` how many times the call was tried.
Catch the base class to handle everything, or a subclass for one situation::

    try:
        result = client.explain("photo.jpg", model="resnet50")
    except ModelNotFoundError:
        ...
"""

from __future__ import annotations

import grpc


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


class InvalidInputError(GradCamError, ValueError):
    """The request was refused as malformed: a bad image or tensor, class index, method, layer
    or option (INVALID_ARGUMENT, or refused by the SDK before sending)."""


class ModelNotFoundError(GradCamError, LookupError):
    """No model of that name is served (NOT_FOUND)."""


class UnavailableError(GradCamError, ConnectionError):
    """The server could not be reached, is shutting down, or the model is not ready
    (UNAVAILABLE), still so after the retries."""


class UnauthenticatedError(GradCamError):
    """The server wants a valid bearer token (UNAUTHENTICATED) or refused the caller
    (PERMISSION_DENIED)."""


class DeadlineError(GradCamError, TimeoutError):
    """The call's deadline passed before the answer came (DEADLINE_EXCEEDED)."""


class ServerBusyError(GradCamError):
    """The model's queue is full (RESOURCE_EXHAUSTED); try again later or send less at once."""


ERROR_OF_STATUS: dict[grpc.StatusCode, type[GradCamError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
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
    return kind(message, code=code, attempts=attempts, description=description)
