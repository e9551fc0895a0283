"""Python client for the gradcam gRPC service: the SDK (sync and asyncio), the `gradcam`
command, and overlays drawn with numpy and Pillow only.

    from gradcam_client import GradCamClient

    with GradCamClient("127.0.0.1:8001") as client:
        result = client.explain("samples/chelsea.jpg", model="efficientnet_lite0", top_k=3)
        result.overlay(side_by_side=True).save("out/chelsea-top3.png")
"""

from .client import (
    METHODS,
    PIXEL_METHODS,
    AsyncGradCamClient,
    ClassHeatmap,
    DetectedBox,
    DetectionTarget,
    Explanation,
    GradCamClient,
    HeatmapSize,
    ImageInput,
    ModelInfo,
    ModelStatus,
    Prediction,
    Timings,
)
from .errors import (
    DeadlineError,
    FieldViolation,
    GradCamError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
)
from gradcam_common.overlay import COLORMAPS, colorize, gradient_image, overlay, panels, side_by_side

__all__ = [
    "COLORMAPS",
    "METHODS",
    "PIXEL_METHODS",
    "AsyncGradCamClient",
    "ClassHeatmap",
    "DetectedBox",
    "DetectionTarget",
    "DeadlineError",
    "Explanation",
    "FieldViolation",
    "GradCamClient",
    "GradCamError",
    "HeatmapSize",
    "ImageInput",
    "InvalidInputError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStatus",
    "ModelUnavailableError",
    "Prediction",
    "ServerBusyError",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "colorize",
    "gradient_image",
    "overlay",
    "panels",
    "side_by_side",
]
