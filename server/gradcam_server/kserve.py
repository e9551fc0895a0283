"""KServe v2 / Open Inference Protocol servicer (``inference.GRPCInferenceService``).

Contract, for every model:

- inputs: the model's own image input by name (FP32 or FP16, preprocessed, as the graph expects;
  cast to the graph's type, so a float16 model takes either) or
  ``image`` (BYTES [N], one encoded JPEG/PNG/WebP/BMP per item, preprocessed by the server; all
  of one pixel size); the model's other inputs by name, if it has any; optional
  ``target_class`` (INT64 [N]; a class index, or -r: the image's r-th highest-scoring class;
  -1 or absent: the top-1 class); optional ``target_mask`` (FP32
  [h, w] or [N, h, w], any size: the region of the "region" score; absent: each class's
  predicted region);
- parameters: ``method`` (string, default the model's, "gradcam"; see `model.METHODS`),
  ``target_layer`` (a tensor name of the graph; default from the config or detected),
  ``target_layout`` ("nchw", "nhwc" or "tokens": how the layer is laid out), ``prefix_tokens``
  (INT64, tokens only: the tokens before the patch grid) and ``grid`` ("HxW", tokens only: the
  patch grid) (default: the model's, as `ServedModel.resolve` fills them in, else detected),
  ``counterfactual`` (bool: explain the negated score), ``eigen_smooth`` (bool: project the
  channel contributions on their first principal component), ``aug_smooth`` (bool: average the
  maps of flipped and rescaled copies), ``score`` ("logit", the default for class scores;
  "probability"; "similarity" of an embedding output to the FP32 input
  ``reference_embedding``, [D] or [N, D]; "region", the default for a segmentation output
  [N, classes, h, w]) and ``output`` (the output explained, a name or an INT64 index;
  default: the model's score output), ``heatmap_size`` ("image", the default: the pixel size of
  what was sent; "model": the graph's own map, at the model's input size; or "WIDTHxHEIGHT"),
  ``iou_threshold`` (double, detectors: the least IoU of a detection chosen by box);
- detectors (score "detection", docs/DETECTION.md): one detection per row, by the inputs
  ``detection_index`` (INT64 [N]: a pre-NMS box index; -1 or absent: chosen by box) and
  ``reference_box`` (FP32 [N, 4]: x1, y1, x2, y2 in the pixels of the image sent; zeros: none),
  with ``target_class`` the class (-1: any); to explain several detections of one image, send
  it once per detection. A row chosen by box that no anchor of its class overlaps enough is
  INVALID_ARGUMENT. Outputs ``explained_detection``, ``detection_class``, ``detection_score``,
  ``detection_box`` (in the image's pixels) and ``detection_iou``;
- faithfulness (docs/FAITHFULNESS.md): the parameter ``evaluate`` (a comma-separated list of
  metrics, e.g. "deletion,insertion"; "all": every metric but the pointing game) asks for the
  method's map of each image to be evaluated as the typed API's Evaluate does, with ``steps``
  (INT64, deletion and insertion's, default 100) and ``score`` ("probability", the default, or
  "logit"); ``target_class`` must then be one class for every row (or absent). The outputs are
  ``faithfulness_<metric>`` (FP32 [N]) and, for deletion, insertion and ROAD,
  ``faithfulness_<metric>_curve`` (FP32 [N, K]); requested outputs choose among them;
- outputs: the model's own outputs by name (in the graph's datatype, FP16 for a float16 model
  without float32 outputs; bfloat16 ones as FP32) and ``heatmap`` (FP32 [N, H, W] in [0, 1] at the
  ``heatmap_size``); when asked for by name, ``pixel_map`` (FP32 [N, C, H, W], the
  pixel-level methods' signed gradients) and ``concept_scores`` (FP32 [N, k], method "dff":
  each concept's score for the class, the heatmap being the concept scoring highest). No
  requested outputs means all of them (a detector's: with its detection outputs). A request
  for the model's own outputs only runs the plain forward graph.

Bounds, checked before the work they guard: a model's request places (RESOURCE_EXHAUSTED before
anything is decoded, `GradCamService.admit`), the number of encoded images (before the BYTES
tensor is split), every declared shape (exact arithmetic), and the response's size
(INVALID_ARGUMENT before the model runs, naming the limit).

Tensors may come as typed contents or as raw_input_contents (little-endian; BYTES elements with
a 4-byte length prefix, as tritonclient sends them); outputs go back as raw_output_contents.
"""

from __future__ import annotations

import struct

import numpy as np

from gradcam_common.faithfulness import CURVES
from gradcam_common.methods import METHOD_NAMES as METHODS
from gradcam_common.methods import PIXEL_METHODS
from gradcam_proto import grpc_service_pb2 as pb
from gradcam_proto import grpc_service_pb2_grpc as pb_grpc

from . import __version__, faithfulness, wire
from .augment.names import NAMES
from .datatypes import DATATYPES, carried_datatype, datatype_of, element_count, from_bytes
from .detections import DETECTION_OUTPUTS
from .errors import MAX_TEXT_CHARS, InvalidInput, shown
from .metrics import Metrics
from .model import Explaining, ServedModel, request_grid
from .request import EvaluateRequest, InferRequest, resolve_evaluate, resolve_infer
from .service import GradCamService
from .validate import MAX_IMAGES_PER_REQUEST
from .transport import deadline_of, rpc

IMAGE_INPUT = "image"
HEATMAP_OUTPUT = NAMES.heatmap
PIXEL_MAP_OUTPUT = NAMES.pixel_map  # guided-backprop and guided-gradcam only, when asked for
CONCEPT_SCORES_OUTPUT = NAMES.concept_scores  # dff only, when asked for: [N, concepts]
TARGET_CLASS_INPUT = NAMES.target_class
REFERENCE_INPUT = NAMES.reference_embedding
MASK_INPUT = NAMES.target_mask
INDEX_INPUT = NAMES.detection_index
BOX_INPUT = NAMES.reference_box
SERVER_NAME = "gradcam"
RAW_OUTPUT_CONTENTS = pb.ModelInferResponse.RAW_OUTPUT_CONTENTS_FIELD_NUMBER

_CONTENTS_FIELD = {  # FP16 has none: it comes as raw_input_contents only
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT16": "int_contents",
    "INT8": "int_contents",
    "UINT16": "uint_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
}
_KNOWN_PARAMETERS = {  # the kinds each may come as
    "method": ("string_param",),
    "target_layer": ("string_param",),
    "target_layout": ("string_param",),
    "prefix_tokens": ("int64_param",),
    "grid": ("string_param",),
    "counterfactual": ("bool_param",),
    "eigen_smooth": ("bool_param",),
    "aug_smooth": ("bool_param",),
    "score": ("string_param",),
    "output": ("string_param", "int64_param"),
    "heatmap_size": ("string_param",),
    "iou_threshold": ("double_param",),
    "evaluate": ("string_param",),
    "steps": ("int64_param",),
}
EVALUATION_PREFIX = "faithfulness_"  # the outputs of the "evaluate" parameter
CURVE_SUFFIX = "_curve"


_DETECTION_METADATA = (  # a detector's outputs beside the heatmap: (name, datatype, shape)
    (NAMES.explained_detection, "INT64", [-1]), (NAMES.detection_class, "INT64", [-1]),
    (NAMES.detection_score, "FP32", [-1]), (NAMES.detection_box, "FP32", [-1, 4]),
    (NAMES.detection_iou, "FP32", [-1]),
)


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: GradCamService, metrics: Metrics) -> None:
        self.service = service
        self.repository = service.repository
        self.metrics = metrics

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.ready())

    async def ModelReady(self, request, context):
        try:
            self.repository.get(request.name)
        except Exception:  # noqa: BLE001 - not found or not loaded: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    @rpc("kserve")
    async def ModelMetadata(self, request, context, labels):
        model = self.service.model(request.name)
        labels["model"] = model.name
        return model_metadata(model)

    @rpc("kserve")
    async def ModelInfer(self, request, context, labels):
        model = self.service.model(request.model_name)
        labels["model"] = model.name
        parameters = _parameters(request.parameters)
        method = parameters.get("method") or model.config.method
        if method not in METHODS:
            raise InvalidInput(f"unknown method {shown(method)}; available: {', '.join(METHODS)}")
        labels["method"] = method
        with self.service.admit(model):
            if "evaluate" in parameters:
                return await self._evaluate(model, request, parameters, deadline_of(context))
            return await self._infer(model, request, parameters, method, deadline_of(context))

    async def _evaluate(self, model: ServedModel, request, parameters: dict,
                        deadline: float | None) -> bytes:
        """The parameter ``evaluate``: the faithfulness metrics of the method's map of each
        image, as outputs (the module's contract)."""
        asked = str(parameters["evaluate"])
        metrics = [] if asked == "all" else [m.strip() for m in asked.split(",") if m.strip()]
        for tensor in request.inputs:
            if tensor.name not in (model.input.name, IMAGE_INPUT, TARGET_CLASS_INPUT):
                raise InvalidInput(f"input {shown(tensor.name)} is not used by 'evaluate': send "
                                   f"{model.input.name!r} or {IMAGE_INPUT!r}, and optionally "
                                   f"{TARGET_CLASS_INPUT!r}")
        inputs = decode_inputs(request, max_bytes_elements=MAX_IMAGES_PER_REQUEST)
        images = inputs.get(IMAGE_INPUT, inputs.get(model.input.name))
        if images is None:
            raise InvalidInput(f"send {model.input.name!r} (FP32 tensor) or {IMAGE_INPUT!r} "
                               "(BYTES, encoded images)")
        if not isinstance(images, list):
            if images.dtype != np.float32 or images.ndim != 4:
                raise InvalidInput(f"input {model.input.name!r} must be FP32 [N, C, H, W]")
            images = list(images)
        classes = inputs.get(TARGET_CLASS_INPUT)
        class_index = None
        if classes is not None:
            values = np.unique(np.asarray(classes))
            if isinstance(classes, list) or len(values) != 1:
                raise InvalidInput("with 'evaluate', target_class is one class for every row "
                                   "(INT64)", field="target_class")
            class_index = int(values[0])
        resolved = resolve_evaluate(model, EvaluateRequest(
            images=images, methods=[parameters.get("method")], layer=parameters.get("target_layer"),
            class_index=class_index, metrics=metrics, steps=parameters.get("steps"),
            score=parameters.get("score"),
        ))
        available = [f"{EVALUATION_PREFIX}{m}" for m in resolved.plan.metrics] + [
            f"{EVALUATION_PREFIX}{m}{CURVE_SUFFIX}" for m in resolved.plan.metrics
            if m in CURVES]
        requested = [o.name for o in request.outputs] or available
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise InvalidInput(f"unknown output {shown(unknown[0])}; with 'evaluate' the "
                               f"outputs are {', '.join(available)}")

        def encode(evaluated: faithfulness.Evaluated) -> bytes:
            outputs = {}
            for metric in resolved.plan.metrics:
                values = [image.methods[0][1][metric] for image in evaluated.images]
                outputs[f"{EVALUATION_PREFIX}{metric}"] = np.array(
                    [v.value for v in values], np.float32)
                if metric in CURVES:
                    outputs[f"{EVALUATION_PREFIX}{metric}{CURVE_SUFFIX}"] = np.array(
                        [v.curve for v in values], np.float32)
            return _response(model.name, request.id,
                             {name: outputs[name] for name in requested})

        return await self.service.evaluate(resolved, encode, deadline)

    async def _infer(
        self, model: ServedModel, request, parameters: dict[str, str], method: str,
        deadline: float | None,
    ) -> bytes:
        """The serialized response to a request for `model` with `method` (the model's
        default filled in); the request's place is held by the caller."""
        explain = Explaining(
            method=parameters.get("method"),
            layer=parameters.get("target_layer"),
            counterfactual=bool(parameters.get("counterfactual", False)),
            eigen_smooth=bool(parameters.get("eigen_smooth", False)),
            aug_smooth=bool(parameters.get("aug_smooth", False)),
            score=parameters.get("score"),
            output=parameters.get("output"),
            layout=parameters.get("target_layout"),
            prefix_tokens=parameters.get("prefix_tokens"),
            grid=request_grid(parameters.get("grid")),
            iou_threshold=parameters.get("iou_threshold"),
        )
        detector = (model.is_detector and model.explain_error is None
                    and parameters.get("score") in (None, "detection"))
        available = [o.name for o in model.outputs] + [HEATMAP_OUTPUT]
        if detector:
            available += DETECTION_OUTPUTS
        requested = [o.name for o in request.outputs] or available
        if PIXEL_MAP_OUTPUT in requested and PIXEL_MAP_OUTPUT not in available:
            if method not in PIXEL_METHODS:
                raise InvalidInput(
                    f"output {PIXEL_MAP_OUTPUT!r} comes with the pixel-level methods only "
                    f"({', '.join(PIXEL_METHODS)}), not {method!r}"
                )
            available.append(PIXEL_MAP_OUTPUT)
        if CONCEPT_SCORES_OUTPUT in requested and CONCEPT_SCORES_OUTPUT not in available:
            if method != "dff":
                raise InvalidInput(
                    f"output {CONCEPT_SCORES_OUTPUT!r} comes with the method 'dff' only, not "
                    f"{method!r}"
                )
            available.append(CONCEPT_SCORES_OUTPUT)
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise InvalidInput(
                f"unknown output {shown(unknown[0])}; the model has {', '.join(available)}"
            )
        others = [i.name for i in model.other_inputs]
        expected = {model.input.name, IMAGE_INPUT, TARGET_CLASS_INPUT, REFERENCE_INPUT,
                    MASK_INPUT, INDEX_INPUT, BOX_INPUT, *others}
        for tensor in request.inputs:  # names first: nothing is decoded for a wrong one
            name = tensor.name
            if name not in expected:
                also = f", the model's other input(s) {', '.join(others)}" if others else ""
                raise InvalidInput(
                    f"unknown input {shown(name)}; send {model.input.name!r} (FP32 or FP16 "
                    "tensor) or "
                    f"{IMAGE_INPUT!r} (BYTES, encoded images){also}, and optionally "
                    f"{TARGET_CLASS_INPUT!r} (INT64), {REFERENCE_INPUT!r} or {MASK_INPUT!r} "
                    f"(FP32), and for detectors {INDEX_INPUT!r} (INT64) and {BOX_INPUT!r} (FP32)"
                )
        inputs = decode_inputs(request, max_bytes_elements=MAX_IMAGES_PER_REQUEST)
        for name in (TARGET_CLASS_INPUT, REFERENCE_INPUT, MASK_INPUT, INDEX_INPUT, BOX_INPUT,
                     *others):
            if isinstance(inputs.get(name), list):
                raise InvalidInput(f"input {name!r} must be a numeric tensor, got BYTES")
        # A model whose image input is itself named "image" takes both under that name, told
        # apart by datatype: BYTES are encoded images, numbers the tensor.
        encoded = inputs.get(IMAGE_INPUT)
        if not isinstance(encoded, list):
            if encoded is not None and model.input.name != IMAGE_INPUT:
                raise InvalidInput(f"input {IMAGE_INPUT!r} must be BYTES holding encoded images")
            encoded = None
        x = inputs.get(model.input.name)
        if isinstance(x, list):
            if model.input.name != IMAGE_INPUT:
                raise InvalidInput(
                    f"input {model.input.name!r} must be FP32 or FP16, got BYTES"
                )
            x = None
        if x is not None and x.dtype not in (np.float32, np.float16):
            raise InvalidInput(
                f"input {model.input.name!r} must be FP32 or FP16, got {datatype_of(x.dtype)}"
            )
        if x is not None and x.dtype == np.float16:  # exactly representable in FP32
            x = x.astype(np.float32)
        if (x is None) == (encoded is None):
            raise InvalidInput(
                f"send exactly one of {model.input.name!r} (FP32 or FP16 tensor) and "
                f"{IMAGE_INPUT!r} (BYTES, encoded images)"
            )
        if encoded is not None and not encoded:
            raise InvalidInput(f"input {IMAGE_INPUT!r} must hold at least one image")
        resolved = resolve_infer(model, InferRequest(
            encoded=encoded, x=x, requested=requested,
            explaining=bool(set(requested) & {HEATMAP_OUTPUT, PIXEL_MAP_OUTPUT,
                                              CONCEPT_SCORES_OUTPUT, *DETECTION_OUTPUTS}),
            graph=explain, target_class=inputs.get(TARGET_CLASS_INPUT),
            reference=inputs.get(REFERENCE_INPUT), mask=inputs.get(MASK_INPUT),
            others={name: inputs[name] for name in others if name in inputs},
            detection_index=inputs.get(INDEX_INPUT), reference_box=inputs.get(BOX_INPUT),
            heatmap_size=parameters.get("heatmap_size"),
        ), self.service.max_pixels)
        return await self.service.infer(
            resolved, lambda outputs: _response(model.name, request.id, outputs), deadline,
        )


def _response(model: str, request_id: str, outputs: dict[str, np.ndarray]) -> bytes:
    """The serialized ModelInferResponse holding `outputs` as raw little-endian contents,
    written straight from the arrays' memory (`wire`). Blocking: it runs in the service's
    post-processing thread."""
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    contents = []
    for name, value in outputs.items():
        datatype = datatype_of(value.dtype)
        response.outputs.append(
            pb.ModelInferResponse.InferOutputTensor(
                name=name, datatype=datatype, shape=list(value.shape)
            )
        )
        contents += wire.field(RAW_OUTPUT_CONTENTS, [wire.array_bytes(value, DATATYPES[datatype])])
    return wire.join([response.SerializeToString(), *contents])


def model_metadata(model: ServedModel) -> pb.ModelMetadataResponse:
    TensorMetadata = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=["1"],
        platform="onnxruntime_onnx",
        inputs=[
            TensorMetadata(name=model.input.name,  # what ModelInfer takes: FP16 or FP32
                           datatype="FP16" if model.input.dtype == np.float16 else "FP32",
                           shape=list(model.input.shape)),
            TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=TARGET_CLASS_INPUT, datatype="INT64", shape=[-1]),
            TensorMetadata(name=REFERENCE_INPUT, datatype="FP32", shape=[-1, -1]),
            TensorMetadata(name=MASK_INPUT, datatype="FP32", shape=[-1, -1, -1]),
            *([TensorMetadata(name=INDEX_INPUT, datatype="INT64", shape=[-1]),
               TensorMetadata(name=BOX_INPUT, datatype="FP32", shape=[-1, 4])]
              if model.is_detector else []),
            *[TensorMetadata(name=i.name, datatype=datatype_of(i.dtype), shape=list(i.shape))
              for i in model.other_inputs],
        ],
        outputs=[
            *[TensorMetadata(name=o.name, datatype=carried_datatype(o.dtype), shape=list(o.shape))
              for o in model.outputs],
            TensorMetadata(name=HEATMAP_OUTPUT, datatype="FP32", shape=[-1, -1, -1]),
            *([TensorMetadata(name=name, datatype=datatype, shape=shape)
               for name, datatype, shape in _DETECTION_METADATA] if model.is_detector else []),
        ],
    )


def decode_inputs(
    request, max_bytes_elements: int = MAX_IMAGES_PER_REQUEST
) -> dict[str, np.ndarray | list[bytes]]:
    """Input tensors by name: numpy arrays, or lists of bytes for BYTES tensors (at most
    `max_bytes_elements` elements each, checked from the declared shape before splitting)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs"
        )
    decoded: dict[str, np.ndarray | list[bytes]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in decoded:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        shape = tuple(tensor.shape)
        count = element_count(shape, f"input {tensor.name!r}")
        if tensor.datatype == "BYTES":
            if count > max_bytes_elements:
                raise InvalidInput(
                    f"input {tensor.name!r} declares {count} BYTES elements; at most "
                    f"{max_bytes_elements} are accepted"
                )
            items = (
                _split_bytes(raw[index], tensor.name, count) if raw
                else list(tensor.contents.bytes_contents)
            )
            if len(items) != count:
                raise InvalidInput(
                    f"input {tensor.name!r} holds {len(items)} elements for shape {list(shape)}"
                )
            decoded[tensor.name] = items
            continue
        if raw:
            decoded[tensor.name] = from_bytes(
                raw[index], tensor.datatype, shape, f"input {tensor.name!r}"
            )
            continue
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(
                f"input {tensor.name!r} has unsupported datatype {tensor.datatype!r}"
            )
        if tensor.datatype not in _CONTENTS_FIELD:
            raise InvalidInput(
                f"input {tensor.name!r}: {tensor.datatype} tensors come as raw_input_contents"
            )
        values = getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype])
        if len(values) != count:
            raise InvalidInput(
                f"input {tensor.name!r} holds {len(values)} values for shape {list(shape)}"
            )
        if dtype.kind in "iu" and dtype.itemsize < 4 and values:  # carried in 32-bit fields
            low, high = min(values), max(values)
            limits = np.iinfo(dtype)
            if low < limits.min or high > limits.max:
                wrong = low if low < limits.min else high
                raise InvalidInput(
                    f"input {tensor.name!r}: value {wrong} is out of the range of "
                    f"{tensor.datatype} ({limits.min}..{limits.max})"
                )
        array = np.asarray(values, dtype=dtype)
        decoded[tensor.name] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    return decoded


def _split_bytes(data: bytes, name: str, count: int) -> list[bytes]:
    """The length-prefixed elements of `data`; stops past `count`, the declared number."""
    items, offset = [], 0
    while offset < len(data) and len(items) <= count:
        if offset + 4 > len(data):
            raise InvalidInput(f"input {name!r}: BYTES element length prefix is cut off")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInput(f"input {name!r}: BYTES element runs past the end of the data")
        items.append(data[offset:offset + length])
        offset += length
    return items


def _parameters(parameters) -> dict[str, str | bool | int]:
    """The request parameters this API reads (`_KNOWN_PARAMETERS`); others are ignored, as
    KServe servers do."""
    values: dict[str, str | bool | int] = {}
    for key, kinds in _KNOWN_PARAMETERS.items():
        if key not in parameters:
            continue
        parameter = parameters[key]
        kind = parameter.WhichOneof("parameter_choice")
        if kind not in kinds:
            raise InvalidInput(
                f"parameter {key!r} must be a " + " or ".join(k.split("_")[0] for k in kinds)
            )
        value = getattr(parameter, kind)
        if kind == "string_param" and len(value) > MAX_TEXT_CHARS:
            raise InvalidInput(
                f"parameter {key!r} is {len(value)} characters long; at most {MAX_TEXT_CHARS}"
            )
        if value or kind == "int64_param":
            values[key] = value
    return values
