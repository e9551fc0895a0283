"""Python client for the gradcam gRPC service: the SDK (sync and asyncio), the `gradcam`
command, and overlays drawn with numpy and Pillow only.

    from gradcam_client import GradCamClient

    with GradCamClient("127.0.0.1:8001") as client:
        result = client.explain("photo.jpg", model="efficientnet_lite0")
        result.overlay().save("overlay.png")
"""

from .client import (
    METHODS,
    AsyncGradCamClient,
    ClassHeatmap,
    Explanation,
    GradCamClient,
    ImageInput,
    ModelInfo,
    ModelStatus,
    Prediction,
    Timings,
)
from .errors import (
    DeadlineError,
    GradCamError,
    InvalidInputError,
    ModelNotFoundError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
)
from .overlay import COLORMAPS, colorize, overlay, side_by_side

__all__ = [
    "COLORMAPS",
    "METHODS",
    "AsyncGradCamClient",
    "ClassHeatmap",
    "DeadlineError",
    "Explanation",
    "GradCamClient",
    "GradCamError",
    "ImageInput",
    "InvalidInputError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStatus",
    "Prediction",
    "ServerBusyError",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "colorize",
    "overlay",
    "side_by_side",
]
