"""Python client for the gradcam gRPC service: the SDK (sync and asyncio), the `gradcam`
command, and overlays drawn with numpy and Pillow only.

    from gradcam_client import GradCamClient

    with GradCamClient("127.0.0.1:8001") as client:
        result = client.explain("samples/chelsea.jpg", model="efficientnet_lite0", top_k=3)
        result.overlay(side_by_side=True).save("out/chelsea-top3.png")

Modules: `client` (the two clients, thin shells doing the I/O), `options` (`ExplainOptions`),
`images` (inputs made messages), `protocol` (requests built and answers read, no I/O),
`results` (what comes back), `report` (an evaluation's table and curves), `retry` (deadlines
and retries), `connection` (address, TLS, channel), `errors` (status codes as exceptions),
`cli` (the `gradcam` command).
"""

from .client import AsyncGradCamClient, GradCamClient
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
from .images import ImageInput
from .options import DetectionTarget, ExplainKwargs, ExplainOptions, HeatmapSize
from .protocol import METHODS, METRICS
from .results import (
    ClassHeatmap,
    DetectedBox,
    Evaluation,
    Explanation,
    ImageEvaluation,
    MetricResult,
    ModelInfo,
    ModelStatus,
    Prediction,
    Progress,
    Timings,
)
from gradcam_common.methods import PIXEL_METHODS
from gradcam_common.overlay import (
    COLORMAPS,
    colorize,
    gradient_image,
    overlay,
    panels,
    side_by_side,
)

__all__ = [
    "COLORMAPS",
    "METHODS",
    "METRICS",
    "PIXEL_METHODS",
    "AsyncGradCamClient",
    "ClassHeatmap",
    "DetectedBox",
    "DetectionTarget",
    "DeadlineError",
    "Evaluation",
    "ExplainKwargs",
    "ExplainOptions",
    "Explanation",
    "FieldViolation",
    "GradCamClient",
    "GradCamError",
    "HeatmapSize",
    "ImageEvaluation",
    "ImageInput",
    "InvalidInputError",
    "MetricResult",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStatus",
    "ModelUnavailableError",
    "Prediction",
    "Progress",
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
