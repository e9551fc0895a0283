"""Domain errors of the service; the gRPC layer maps each to a status code in one place.

Messages are written for the client: they say what was wrong with the request, never how the
server is built (no paths, no tracebacks).
"""


MAX_MESSAGE_CHARS = 1024  # a client-facing message is cut to this (gRPC caps metadata at 8 KiB)
MAX_TEXT_CHARS = 1024  # longest name or parameter text a request may send
SHOWN_CHARS = 64  # characters of a client's text echoed back in a message


def shown(text: str) -> str:
    """`text` quoted for a message, cut to SHOWN_CHARS characters."""
    return repr(text) if len(text) <= SHOWN_CHARS else repr(text[:SHOWN_CHARS]) + "..."


class ServiceError(Exception):
    """Base of every error a client is meant to see."""


class InvalidInput(ServiceError):
    """The request is malformed: bad image, tensor, class index, method or layer.

    `field` names the part of the request that is wrong, as ``google.rpc.BadRequest``'s field
    violations do ("images[3]", "target_class", "parameters.method"); None where the request
    as a whole is wrong (too many images, too large a response)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFound(ServiceError):
    """No model of that name is served."""


class ModelNotReady(ServiceError):
    """The model exists but is not loaded yet: worth retrying."""


class ModelFailed(ServiceError):
    """The model exists but failed to load: retrying will not help until it is fixed."""


class ExplainUnavailable(ServiceError):
    """The model serves inference but its graph cannot be explained."""


class QueueFull(ServiceError):
    """The model's batching queue is full; retry later."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could run."""


class ShuttingDown(ServiceError):
    """The server is draining and takes no new work."""


class RunStopped(Exception):
    """A run was stopped because no request waits for it any more; no client sees this."""
