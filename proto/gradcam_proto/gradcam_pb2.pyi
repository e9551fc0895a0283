from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_GRADCAM: _ClassVar[Method]
    METHOD_GRADCAM_PLUS_PLUS: _ClassVar[Method]
    METHOD_XGRADCAM: _ClassVar[Method]
    METHOD_HIRESCAM: _ClassVar[Method]
    METHOD_GRADCAM_ELEMENTWISE: _ClassVar[Method]
    METHOD_LAYERCAM: _ClassVar[Method]
    METHOD_GUIDED_BACKPROP: _ClassVar[Method]
    METHOD_GUIDED_GRADCAM: _ClassVar[Method]
    METHOD_ABLATIONCAM: _ClassVar[Method]
    METHOD_EIGENCAM: _ClassVar[Method]
    METHOD_EIGENGRADCAM: _ClassVar[Method]
    METHOD_SCORECAM: _ClassVar[Method]
    METHOD_INTEGRATED_GRADCAM: _ClassVar[Method]
    METHOD_GROUPCAM: _ClassVar[Method]
    METHOD_FEM: _ClassVar[Method]
    METHOD_SEG_EIGENCAM: _ClassVar[Method]
    METHOD_KPCACAM: _ClassVar[Method]
    METHOD_FINERCAM: _ClassVar[Method]
    METHOD_RANDOMCAM: _ClassVar[Method]
    METHOD_SOBEL: _ClassVar[Method]
    METHOD_REFINECAM: _ClassVar[Method]
    METHOD_FULLGRAD: _ClassVar[Method]
    METHOD_SHAPLEYCAM: _ClassVar[Method]
    METHOD_SESS: _ClassVar[Method]
    METHOD_DFF: _ClassVar[Method]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_DELETION: _ClassVar[Metric]
    METRIC_INSERTION: _ClassVar[Metric]
    METRIC_ROAD_MORF: _ClassVar[Metric]
    METRIC_ROAD_LERF: _ClassVar[Metric]
    METRIC_ROAD_COMBINED: _ClassVar[Metric]
    METRIC_CONFIDENCE_CHANGE: _ClassVar[Metric]
    METRIC_AVERAGE_DROP: _ClassVar[Metric]
    METRIC_INCREASE_IN_CONFIDENCE: _ClassVar[Metric]
    METRIC_POINTING_GAME: _ClassVar[Metric]
METHOD_UNSPECIFIED: Method
METHOD_GRADCAM: Method
METHOD_GRADCAM_PLUS_PLUS: Method
METHOD_XGRADCAM: Method
METHOD_HIRESCAM: Method
METHOD_GRADCAM_ELEMENTWISE: Method
METHOD_LAYERCAM: Method
METHOD_GUIDED_BACKPROP: Method
METHOD_GUIDED_GRADCAM: Method
METHOD_ABLATIONCAM: Method
METHOD_EIGENCAM: Method
METHOD_EIGENGRADCAM: Method
METHOD_SCORECAM: Method
METHOD_INTEGRATED_GRADCAM: Method
METHOD_GROUPCAM: Method
METHOD_FEM: Method
METHOD_SEG_EIGENCAM: Method
METHOD_KPCACAM: Method
METHOD_FINERCAM: Method
METHOD_RANDOMCAM: Method
METHOD_SOBEL: Method
METHOD_REFINECAM: Method
METHOD_FULLGRAD: Method
METHOD_SHAPLEYCAM: Method
METHOD_SESS: Method
METHOD_DFF: Method
METRIC_UNSPECIFIED: Metric
METRIC_DELETION: Metric
METRIC_INSERTION: Metric
METRIC_ROAD_MORF: Metric
METRIC_ROAD_LERF: Metric
METRIC_ROAD_COMBINED: Metric
METRIC_CONFIDENCE_CHANGE: Metric
METRIC_AVERAGE_DROP: Metric
METRIC_INCREASE_IN_CONFIDENCE: Metric
METRIC_POINTING_GAME: Metric

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TypedTensor(_message.Message):
    __slots__ = ("datatype", "shape", "data")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("class_index", "top_k")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    top_k: int
    def __init__(self, class_index: _Optional[int] = ..., top_k: _Optional[int] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("num_predictions", "num_channels", "overlay", "colormap", "overlay_opacity", "heatmap_size")
    NUM_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    COLORMAP_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_OPACITY_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_predictions: int
    num_channels: int
    overlay: bool
    colormap: str
    overlay_opacity: float
    heatmap_size: str
    def __init__(self, num_predictions: _Optional[int] = ..., num_channels: _Optional[int] = ..., overlay: _Optional[bool] = ..., colormap: _Optional[str] = ..., overlay_opacity: _Optional[float] = ..., heatmap_size: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "images", "method", "target", "layer", "options", "counterfactual", "eigen_smooth", "score", "reference_embedding", "layers", "aug_smooth", "target_mask", "output", "inputs", "layout", "prefix_tokens", "grid", "detections", "iou_threshold")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TypedTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TypedTensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_FIELD_NUMBER: _ClassVar[int]
    EIGEN_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    AUG_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_MASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    method: Method
    target: Target
    layer: str
    options: ExplainOptions
    counterfactual: bool
    eigen_smooth: bool
    score: str
    reference_embedding: Tensor
    layers: _containers.RepeatedScalarFieldContainer[str]
    aug_smooth: bool
    target_mask: Tensor
    output: str
    inputs: _containers.MessageMap[str, TypedTensor]
    layout: str
    prefix_tokens: int
    grid: str
    detections: _containers.RepeatedCompositeFieldContainer[ImageDetections]
    iou_threshold: float
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., method: _Optional[_Union[Method, str]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., layer: _Optional[str] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., counterfactual: _Optional[bool] = ..., eigen_smooth: _Optional[bool] = ..., score: _Optional[str] = ..., reference_embedding: _Optional[_Union[Tensor, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., aug_smooth: _Optional[bool] = ..., target_mask: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[str] = ..., inputs: _Optional[_Mapping[str, TypedTensor]] = ..., layout: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., grid: _Optional[str] = ..., detections: _Optional[_Iterable[_Union[ImageDetections, _Mapping]]] = ..., iou_threshold: _Optional[float] = ...) -> None: ...

class DetectionTarget(_message.Message):
    __slots__ = ("index", "box", "class_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: _containers.RepeatedScalarFieldContainer[float]
    class_index: int
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Iterable[float]] = ..., class_index: _Optional[int] = ...) -> None: ...

class ImageDetections(_message.Message):
    __slots__ = ("detections",)
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[DetectionTarget]
    def __init__(self, detections: _Optional[_Iterable[_Union[DetectionTarget, _Mapping]]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("index", "box", "score", "iou")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: _containers.RepeatedScalarFieldContainer[float]
    score: float
    iou: float
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., iou: _Optional[float] = ...) -> None: ...

class ChannelImportance(_message.Message):
    __slots__ = ("channel", "weight")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    channel: int
    weight: float
    def __init__(self, channel: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("class_index", "label", "height", "width", "data", "channels", "pixel_gradients", "detection", "concept_scores")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_SCORES_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    height: int
    width: int
    data: bytes
    channels: _containers.RepeatedCompositeFieldContainer[ChannelImportance]
    pixel_gradients: Tensor
    detection: Detection
    concept_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ..., channels: _Optional[_Iterable[_Union[ChannelImportance, _Mapping]]] = ..., pixel_gradients: _Optional[_Union[Tensor, _Mapping]] = ..., detection: _Optional[_Union[Detection, _Mapping]] = ..., concept_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "label", "score", "logit")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    score: float
    logit: float
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("heatmaps", "predictions", "overlay_png")
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    heatmaps: _containers.RepeatedCompositeFieldContainer[Heatmap]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    overlay_png: bytes
    def __init__(self, heatmaps: _Optional[_Iterable[_Union[Heatmap, _Mapping]]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("preprocess_seconds", "queue_seconds", "inference_seconds", "total_seconds")
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    total_seconds: float
    def __init__(self, preprocess_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "explanations", "layer", "method", "timings", "layers", "layout", "prefix_tokens", "grid")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    model: str
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    layer: str
    method: Method
    timings: Timings
    layers: _containers.RepeatedScalarFieldContainer[str]
    layout: str
    prefix_tokens: int
    grid: str
    def __init__(self, model: _Optional[str] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., layer: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., layout: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., grid: _Optional[str] = ...) -> None: ...

class ExplainProgress(_message.Message):
    __slots__ = ("passes_done", "passes_total", "elapsed_seconds", "remaining_seconds")
    PASSES_DONE_FIELD_NUMBER: _ClassVar[int]
    PASSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    passes_done: int
    passes_total: int
    elapsed_seconds: float
    remaining_seconds: float
    def __init__(self, passes_done: _Optional[int] = ..., passes_total: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., remaining_seconds: _Optional[float] = ...) -> None: ...

class ExplainUpdate(_message.Message):
    __slots__ = ("progress", "response")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    progress: ExplainProgress
    response: ExplainResponse
    def __init__(self, progress: _Optional[_Union[ExplainProgress, _Mapping]] = ..., response: _Optional[_Union[ExplainResponse, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "ready", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input", "input_shape", "input_size", "outputs", "layer", "layer_shape", "num_classes", "has_labels", "max_batch_size", "methods", "mean", "std", "default_score", "other_inputs", "explain_error", "layout", "prefix_tokens", "grid", "num_boxes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYER_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    HAS_LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCORE_FIELD_NUMBER: _ClassVar[int]
    OTHER_INPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    NUM_BOXES_FIELD_NUMBER: _ClassVar[int]
    name: str
    input: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    layer: str
    layer_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    has_labels: bool
    max_batch_size: int
    methods: _containers.RepeatedScalarFieldContainer[Method]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    default_score: str
    other_inputs: _containers.RepeatedScalarFieldContainer[str]
    explain_error: str
    layout: str
    prefix_tokens: int
    grid: str
    num_boxes: int
    def __init__(self, name: _Optional[str] = ..., input: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_size: _Optional[_Iterable[int]] = ..., outputs: _Optional[_Iterable[str]] = ..., layer: _Optional[str] = ..., layer_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., has_labels: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., default_score: _Optional[str] = ..., other_inputs: _Optional[_Iterable[str]] = ..., explain_error: _Optional[str] = ..., layout: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., grid: _Optional[str] = ..., num_boxes: _Optional[int] = ...) -> None: ...

class PointingTarget(_message.Message):
    __slots__ = ("box", "mask")
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    box: BoundingBox
    mask: Tensor
    def __init__(self, box: _Optional[_Union[BoundingBox, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "images", "methods", "target", "metrics", "steps", "road_percentiles", "pointing", "pointing_tolerance", "layer", "score")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ROAD_PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    POINTING_FIELD_NUMBER: _ClassVar[int]
    POINTING_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    methods: _containers.RepeatedScalarFieldContainer[Method]
    target: Target
    metrics: _containers.RepeatedScalarFieldContainer[Metric]
    steps: int
    road_percentiles: _containers.RepeatedScalarFieldContainer[float]
    pointing: _containers.RepeatedCompositeFieldContainer[PointingTarget]
    pointing_tolerance: float
    layer: str
    score: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[Metric, str]]] = ..., steps: _Optional[int] = ..., road_percentiles: _Optional[_Iterable[float]] = ..., pointing: _Optional[_Iterable[_Union[PointingTarget, _Mapping]]] = ..., pointing_tolerance: _Optional[float] = ..., layer: _Optional[str] = ..., score: _Optional[str] = ...) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("metric", "value", "curve")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    metric: Metric
    value: float
    curve: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, metric: _Optional[_Union[Metric, str]] = ..., value: _Optional[float] = ..., curve: _Optional[_Iterable[float]] = ...) -> None: ...

class MethodEvaluation(_message.Message):
    __slots__ = ("method", "metrics")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    method: Method
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValue]
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., metrics: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ...) -> None: ...

class ImageEvaluation(_message.Message):
    __slots__ = ("class_index", "label", "score", "methods")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    score: float
    methods: _containers.RepeatedCompositeFieldContainer[MethodEvaluation]
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., methods: _Optional[_Iterable[_Union[MethodEvaluation, _Mapping]]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("model", "images", "steps", "road_percentiles", "copies", "batch_size", "timings", "score")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ROAD_PERCENTILES_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[ImageEvaluation]
    steps: int
    road_percentiles: _containers.RepeatedScalarFieldContainer[float]
    copies: int
    batch_size: int
    timings: Timings
    score: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageEvaluation, _Mapping]]] = ..., steps: _Optional[int] = ..., road_percentiles: _Optional[_Iterable[float]] = ..., copies: _Optional[int] = ..., batch_size: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., score: _Optional[str] = ...) -> None: ...
