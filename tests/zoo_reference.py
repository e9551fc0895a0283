"""Any torchvision or timm classifier, exported and augmented, checked against independent
references: pytorch-grad-cam's GradCAM at the same layer, and torch autograd's gradients.

Shared by `benchmarks/zoo.py` (the whole zoo, one model per subprocess) and
`tests/test_transformer_zoo.py` (a CI subset); nothing here is written twice.

* `build_model(source, name)`: random weights from a seed derived from the name (nothing is
  downloaded), zero-initialised linear layers (torchvision's ViT heads) and tiny layer scales
  given small random values, BatchNorm statistics calibrated on the scikit-image photos
  (`zoo.calibrate_batch_norms`), eval mode.
* `export_model(model, exporter, path, size)`: TorchScript (opset 17) or dynamo, dynamic batch.
* `compare(model, onnx_path, size)`: augments the export with the defaults and compares it with
  the references (`Comparison`): the torch module whose output equals the ONNX target tensor
  (`explained_target(...)["layer"]`, exposed as an extra output) is found by forward hooks on
  every module; pytorch-grad-cam's GradCAM runs at that module with the reshape_transform the
  metadata describes (tokens: ``t[:, prefix:].reshape(N, h, w, C).permute(0, 3, 1, 2)``, nhwc:
  ``t.permute(0, 3, 1, 2)``); torch autograd gives d logit / d module output.
* `time_ratio(onnx_path, augmented, size)`: explain / forward time in onnxruntime, batch 1.

Outcomes: "match" (r >= R_MIN and gradient error <= GRADIENT_RTOL), "refused" (AugmentError),
"mismatch" (augmented but not matching, or every map flat: silently wrong or useless),
"no reference" (no torch module or function output holds the target), "error" (anything
else that broke on our side: a non-AugmentError exception in the augmenter, onnxruntime
rejecting the augmented graph). `ExportFailed` marks the exporter's failures.
"""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import EncodeError
from onnx import helper
from onnx.external_data_helper import load_external_data_for_model
from torch.overrides import TorchFunctionMode

import zoo
from gradcam_server.augment import AugmentError, augment_model, explained_target

SOURCES = ("torchvision", "timm")
EXPORTERS = ("torchscript", "dynamo")
OUTCOMES = ("match", "refused", "export failed", "mismatch", "no reference", "error")

# timm models covering the architectures; value: extra create_model arguments.
TIMM_MODELS: dict[str, dict] = {
    "vit_tiny_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},  # class and distillation tokens: 2 prefix tokens
    # class token and 4 registers (5 prefix tokens), layer scale; at 224 (16 x 16 patches)
    "vit_small_patch14_reg4_dinov2": {"img_size": 224, "num_classes": 1000},
    "beit_base_patch16_224": {},  # relative position bias, mean-pooled patches
    "deit3_small_patch16_224": {},  # layer scale
    "swin_tiny_patch4_window7_224": {},  # NHWC blocks, shifted windows
    "swinv2_tiny_window8_256": {},  # post-norm blocks
    "convnext_atto": {},  # LayerNorm on the pooled map in the head
    "efficientformer_l1": {},  # conv stages, then attention on tokens without prefix
    "mobilevit_xxs": {},  # convolutions around unfolded transformer patches
    "pvt_v2_b0": {},  # spatial-reduction attention, depthwise conv in the MLP
    "cait_xxs24_224": {},  # the class token joins late, in class-attention blocks
    "levit_128s": {},  # attention on tokens with BatchNorm, no LayerNorm
    "maxvit_tiny_tf_224": {},  # MBConv, block and grid attention
}
INPUT_SIZES = {("timm", "swinv2_tiny_window8_256"): 256, ("timm", "mobilevit_xxs"): 256}
DEFAULT_SIZE = 224

R_MIN = 0.99
GRADIENT_RTOL = 1e-2
LOGITS_RTOL = 1e-3  # the export against torch; beyond it the exporter is wrong, not us
VALUE_RTOL = 1e-3  # a torch module output "equals" the ONNX tensor within this rel L2
EXPLICIT_CLASS = 7  # image 0 is explained for its top-1 class, image 1 for this class
BATCH = 2
_ZERO_INIT_STD = 0.02
_TINY_SCALE = 1e-4  # a parameter filled with one value this small is a layer scale


class ExportFailed(Exception):
    """The exporter could not export the model, or exported a graph that differs from torch."""


def input_size(source: str, name: str) -> int:
    return INPUT_SIZES.get((source, name), DEFAULT_SIZE)


def model_names(source: str) -> list[str]:
    if source == "torchvision":
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))
    if source == "timm":
        return list(TIMM_MODELS)
    raise ValueError(f"unknown source {source!r}; known: {SOURCES}")


def _construct(source: str, name: str) -> torch.nn.Module:
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **TIMM_MODELS.get(name, {}))
    raise ValueError(f"unknown source {source!r}; known: {SOURCES}")


def parameter_count(source: str, name: str) -> int:
    """Parameters of the architecture: torchvision's weights metadata (nothing downloaded), or
    counted on the meta device (no memory, no init)."""
    if source == "torchvision":
        import torchvision

        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    with torch.device("meta"):
        model = _construct(source, name)
    return sum(p.numel() for p in model.parameters())


def build_model(source: str, name: str) -> torch.nn.Module:
    """The model with seeded random weights, calibrated BatchNorm, in eval mode.

    Two initialisations would make the comparison vacuous and are replaced (listed in
    `model.revived`): all-zero linear layers (torchvision's ViT heads: constant logits, zero
    gradients) get trunc-normal weights (std 0.02), and layer scales initialised to a tiny
    constant (ConvNeXt 1e-6, DeiT III 1e-6, CaiT 1e-5: every block then adds ~1e-6 of its
    branch, so the network is its shortcuts and an error inside a block could not show) are set
    to N(0.1, 0.02) per channel."""
    torch.manual_seed(zoo.model_seed(f"{source}/{name}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init warnings (googlenet, inception)
        model = _construct(source, name)
    revived = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and weight is not None and not weight.any():
                torch.nn.init.trunc_normal_(weight, std=_ZERO_INIT_STD)
                revived.append(f"{module_name}.weight (zero)")
        for parameter_name, parameter in model.named_parameters():
            first = parameter.reshape(-1)[0]
            if (parameter.numel() > 1 and 0 < abs(float(first)) <= _TINY_SCALE
                    and bool((parameter == first).all())):
                revived.append(f"{parameter_name} ({float(first):.0e})")
                parameter.normal_(0.1, 0.02)
    zoo.calibrate_batch_norms(model, input_size(source, name))
    model.revived = revived
    return model


# -- export ------------------------------------------------------------------------------------
def export_model(
    model: torch.nn.Module, exporter: str, path: str | Path, size: int, dynamic_batch: bool = True
) -> Path:
    """Export `model` (input "input", output "logits") from a batch of BATCH photos; dynamo may
    put the weights in ``<file>.data``. Raises ExportFailed with the exporter's message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(zoo.sample_batch(BATCH, size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes=axes)
            elif exporter == "dynamo":
                shapes = ({0: torch.export.Dim("N", min=1, max=64)},) if dynamic_batch else None
                torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=shapes)
            else:
                raise ValueError(f"unknown exporter {exporter!r}; known: {EXPORTERS}")
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - every exporter failure is recorded as such
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        cause = f" (caused by {one_line(root, 300)})" if root is not error else ""
        raise ExportFailed(one_line(error, 200) + cause) from error
    with torch.no_grad():
        expected = model(x).numpy()
    try:
        (logits,) = session(path).run(["logits"], {"input": x.numpy()})
    except Exception as error:  # noqa: BLE001
        raise ExportFailed(f"onnxruntime cannot run the export: {one_line(error)}") from error
    error = zoo.rel_l2(logits, expected)
    if not error <= LOGITS_RTOL:
        raise ExportFailed(f"the export's logits differ from torch's: rel L2 {error:.3g}")
    return path


# -- onnxruntime -------------------------------------------------------------------------------
def session(
    model: str | Path | onnx.ModelProto, threads: int | None = None, scratch: Path | None = None
) -> ort.InferenceSession:
    """A CPU session from a path or a proto (saved to `scratch` with external data when too
    large to serialise)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        try:  # ByteSize() cannot tell: it overflows past 2 GiB
            source = model.SerializeToString()
        except EncodeError:  # over 2 GiB
            if scratch is None:
                raise ValueError("a model over 2 GiB needs a scratch folder") from None
            target = Path(tempfile.mkdtemp(dir=scratch)) / "model.onnx"
            onnx.save(model, str(target), save_as_external_data=True, location="model.onnx.data")
            # saving moved the weights out of the proto: read them back for the caller
            load_external_data_for_model(model, str(target.parent))
            source = str(target)
    else:
        source = str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def time_ratio(
    original: str | Path,
    augmented: onnx.ModelProto,
    size: int,
    batch: int = 1,
    threads: int = 1,
    budget_s: float = 12.0,
    pairs: tuple[int, int] = (3, 9),
    scratch: Path | None = None,
) -> dict[str, float]:
    """Explain / forward time: the augmented and the original session, `threads` intra-op
    threads each, run alternately on the same batch (one warm-up each, then at least
    pairs[0] and at most pairs[1] pairs, stopping once `budget_s` is spent); medians."""
    plain = session(original, threads)
    explain = session(augmented, threads, scratch)
    x = zoo.sample_batch(batch, size)
    image = plain.get_inputs()[0].name
    variants = {
        "forward": (plain, {image: x}),
        "explain": (explain, {image: x, "target_class": np.full(batch, -1, np.int64)}),
    }
    times: dict[str, list[float]] = {key: [] for key in variants}
    for sess, feeds in variants.values():
        sess.run(None, feeds)
    started = time.perf_counter()
    while True:
        for key, (sess, feeds) in variants.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[key].append(time.perf_counter() - t0)
        done = len(times["forward"])
        if done >= pairs[1] or (done >= pairs[0] and time.perf_counter() - started > budget_s):
            break
    forward, explain_time = (statistics.median(times[k]) for k in ("forward", "explain"))
    return {"ratio": explain_time / forward, "forward_ms": 1e3 * forward,
            "explain_ms": 1e3 * explain_time, "pairs": len(times["forward"]), "batch": batch}


# -- the comparison ----------------------------------------------------------------------------
@dataclass
class Comparison:
    """One augmented export against the references."""

    outcome: str
    message: str = ""
    layer: str | None = None  # the raw ONNX tensor explained
    layout: str | None = None
    prefix_tokens: int | None = None
    grid: str | None = None
    module: str | None = None  # the torch module whose output the layer is
    candidates: list[str] = field(default_factory=list)  # every module holding that value
    r: float | None = None  # heatmap Pearson r vs pytorch-grad-cam (the lowest of the images)
    flat_maps: int = 0  # images whose reference map is flat (ReLU of all-negative sums)
    gradient_error: float | None = None  # rel L2 vs torch autograd, [N, C, h, w] views
    activation_error: float | None = None
    classes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Hooked:
    """One tensor the torch forward produced with as many elements as the target: a module
    call's output (`call` None) or the `call`-th matching torch function output."""

    module: str
    output: torch.Tensor
    version: int
    value: torch.Tensor
    call: int | None = None

    def error(self, raw: np.ndarray) -> float:
        return zoo.rel_l2(self.value.reshape(raw.shape).numpy(), raw)

    def intact(self) -> bool:
        """Not rewritten in place after it was produced (the gradient would be the later
        value's)."""
        return self.output._version == self.version


def one_line(error: BaseException, limit: int = 400) -> str:
    """`error` as one line of at most `limit` characters, without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(error).__name__}: {error}")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare(
    model: torch.nn.Module,
    onnx_path: str | Path,
    size: int,
    augmented: onnx.ModelProto | None = None,
    scratch: Path | None = None,
) -> tuple[Comparison, onnx.ModelProto | None]:
    """Augment `onnx_path` with the defaults (unless `augmented` is given) and compare it with
    pytorch-grad-cam and torch autograd on BATCH photos; returns the comparison and the
    augmented model (None where it was refused or broke)."""
    if augmented is None:
        try:
            augmented = augment_model(onnx_path)
        except AugmentError as error:
            return Comparison("refused", one_line(error, 1000)), None
        except Exception as error:  # noqa: BLE001 - not a clear refusal: our bug
            return Comparison("error", f"augment_model raised {one_line(error)}"), None
    meta = explained_target(augmented)
    result = Comparison("error", layer=meta.get("layer"), layout=meta.get("layout"),
                        grid=meta.get("grid"))
    if "prefix_tokens" in meta:
        result.prefix_tokens = int(meta["prefix_tokens"])
    try:
        outputs, raw = _run_probe(augmented, result.layer, size, scratch)
    except Exception as error:  # noqa: BLE001
        result.message = f"onnxruntime cannot run the augmented model: {one_line(error)}"
        return result, augmented
    result.classes = [int(outputs["logits"][0].argmax()), EXPLICIT_CLASS]
    for name in ("activations", "gradients", "heatmap"):
        if not np.all(np.isfinite(outputs[name])):
            result.outcome = "mismatch"
            result.message = f"the augmented model's {name} output is not finite"
            return result, augmented
    view = _torch_view(result, raw.shape, outputs["activations"].shape)
    try:
        _against_torch(model, size, result, raw, view, outputs)
    except Exception as error:  # noqa: BLE001 - the reference broke, not the augmented model
        result.outcome = "no reference"
        result.message = f"the torch reference failed: {one_line(error)}"
        traceback.print_exc()
    return result, augmented


def _run_probe(
    augmented: onnx.ModelProto, layer: str, size: int, scratch: Path | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The augmented model's outputs on BATCH photos, with the raw target tensor exposed as
    one more output (added to the proto for this session, then removed)."""
    graph = augmented.graph
    names = [o.name for o in graph.output]
    added = layer not in names
    if added:
        graph.output.append(helper.make_empty_tensor_value_info(layer))
    try:
        sess = session(augmented, scratch=scratch)
    finally:
        if added:
            graph.output.pop()
    image = sess.get_inputs()[0].name
    feeds = {image: zoo.sample_batch(BATCH, size),
             "target_class": np.asarray([-1, EXPLICIT_CLASS], np.int64)}
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    outputs = {name: values[name] for name in ("activations", "gradients", "heatmap")}
    outputs["logits"] = values[names[0]]
    return outputs, values[layer]


def _torch_view(result: Comparison, raw_shape: tuple, view_shape: tuple):
    """The metadata's view of the layer as a torch function (the reshape_transform given to
    pytorch-grad-cam): the module output is first reshaped to the ONNX tensor's shape."""
    raw_shape = (-1, *raw_shape[1:])
    if result.layout == "nchw":
        return lambda t: t.reshape(raw_shape)
    if result.layout == "nhwc":
        return lambda t: t.reshape(raw_shape).permute(0, 3, 1, 2)
    if result.layout != "tokens":
        raise ValueError(f"unknown layout {result.layout!r}")
    channels, height, width = view_shape[1:]
    prefix = result.prefix_tokens
    if prefix is None:  # run-time grid: T - h * w
        prefix = raw_shape[1] - height * width

    def tokens(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(raw_shape)[:, prefix:]
        return t.reshape(t.shape[0], height, width, channels).permute(0, 3, 1, 2)

    return tokens


def _against_torch(model, size, result: Comparison, raw, view, outputs) -> None:
    """Find the torch tensor equal to the ONNX target: a module's output (forward hooks), or,
    where none is, the output of a torch function called inside some module's forward
    (DenseNet's F.relu after `features`), tapped through an identity module for
    pytorch-grad-cam. Then compare gradients and maps."""
    x = torch.from_numpy(zoo.sample_batch(BATCH, size))
    modules = dict(model.named_modules())
    logits, hooked, calls = _module_outputs(model, modules, x, raw.size)
    equal = [h for h in hooked if h.error(raw) <= VALUE_RTOL and calls[h.module] == 1
             and h.intact()]
    if not equal:
        closest = [(h.error(raw), h.module) for h in hooked]
        logits, hooked, _ = _op_outputs(model, modules, x, raw.size)
        equal = [h for h in hooked if h.error(raw) <= VALUE_RTOL and h.intact()]
        if not equal:
            result.outcome = "no reference"
            closest += [(h.error(raw), h.module) for h in hooked]
            result.message = _why_no_match(result.layer, raw.shape, closest, calls)
            return
    result.candidates = [h.module for h in equal]
    score = logits[torch.arange(BATCH), torch.as_tensor(result.classes)].sum()
    grads = torch.autograd.grad(score, [h.output for h in equal], allow_unused=True)
    errors = []
    for h, grad in zip(equal, grads):
        grad = torch.zeros_like(h.output) if grad is None else grad
        errors.append(zoo.rel_l2(outputs["gradients"], view(grad).detach().numpy()))
    best = min(errors)
    chosen = next(h for h, e in zip(equal, errors) if e <= best * (1 + 1e-9) + 1e-30)
    del logits, score, grads, hooked, equal
    result.module = chosen.module
    result.gradient_error = best
    result.activation_error = zoo.rel_l2(outputs["activations"], view(chosen.value).numpy())
    if chosen.call is None:
        maps = grad_cam_maps(model, modules[chosen.module], view, x, result.classes)
    else:  # the function's output passes through an identity module pytorch-grad-cam hooks
        tap = torch.nn.Identity()
        with _ModuleStack(modules) as stack, _OpOutputs(raw.size, stack, chosen.call, tap):
            maps = grad_cam_maps(model, tap, view, x, result.classes)
    result.r, result.flat_maps = map_agreement(outputs["heatmap"], maps)
    matched = result.r >= R_MIN and result.gradient_error <= GRADIENT_RTOL
    result.outcome = "match" if matched else "mismatch"
    if not matched:
        result.message = (f"r {result.r:.4f} (>= {R_MIN}), gradient rel L2 "
                          f"{result.gradient_error:.3g} (<= {GRADIENT_RTOL:g})")
    if result.flat_maps == BATCH:  # agreeing on nothing: a constant map explains nothing
        result.outcome = "mismatch"
        zero = not np.any(outputs["gradients"])
        result.message = ("every map is flat, ours and pytorch-grad-cam's at the same layer"
                          + (": the layer's gradient is zero at every grid cell" if zero else ""))


def _module_outputs(model, modules, x, numel):
    """(logits, every module call's output of `numel` elements, calls per module)."""
    hooked: list[_Hooked] = []
    calls: Counter[str] = Counter()

    def hook(name):
        def record(module, inputs, output):
            calls[name] += 1
            if isinstance(output, torch.Tensor) and output.numel() == numel:
                hooked.append(_Hooked(name, output, output._version, output.detach().clone()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, hooked, calls


def _op_outputs(model, modules, x, numel):
    """(logits, every torch function output of `numel` elements inside the forward, {})."""
    with _ModuleStack(modules) as stack, _OpOutputs(numel, stack) as ops:
        logits = model(x)
    return logits, ops.records, Counter()


class _ModuleStack:
    """The names of the modules whose forward is running (innermost last)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules, self.names, self.handles = modules, [], []

    def __enter__(self) -> list[str]:
        for name, module in self.modules.items():
            shown = name or f"{type(module).__name__}.forward"
            self.handles.append(module.register_forward_pre_hook(
                lambda m, i, shown=shown: self.names.append(shown)))
            self.handles.append(module.register_forward_hook(self._leave))
        return self.names

    def _leave(self, module, inputs, output) -> None:  # a hook returning a value replaces
        self.names.pop()

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class _OpOutputs(TorchFunctionMode):
    """Records (or, with `tap`, passes through `tap`) the floating-point tensors of `numel`
    elements that torch functions return while a module of the model runs, numbered in call
    order: the same numbers in every forward of the same input."""

    def __init__(self, numel: int, stack: list[str], tap_call: int | None = None,
                 tap: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.numel, self.stack, self.tap_call, self.tap = numel, stack, tap_call, tap
        self.count = 0
        self.records: list[_Hooked] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self.stack and isinstance(out, torch.Tensor) and out.numel() == self.numel
                and out.is_floating_point()):
            call, self.count = self.count, self.count + 1
            if self.tap is not None:
                return self.tap(out) if call == self.tap_call else out
            name = getattr(func, "__name__", str(func))
            self.records.append(_Hooked(f"{name}() in {self.stack[-1]}", out, out._version,
                                        out.detach().clone(), call))
        return out


def _why_no_match(layer, shape, closest, calls) -> str:
    if not closest:
        return (f"no torch module or function outputs a tensor of {math.prod(shape)} "
                f"elements like {layer!r} {list(shape)}")
    error, name = min(closest)
    shared = f" (called {calls[name]} times per forward)" if calls.get(name, 0) > 1 else ""
    if error <= VALUE_RTOL:
        return (f"{layer!r} {list(shape)} equals the output of {name!r}{shared}, which "
                "pytorch-grad-cam cannot target alone (or an in-place op rewrites it)")
    return (f"no torch module or function output equals {layer!r} {list(shape)}; closest: "
            f"{name!r}{shared}, rel L2 {error:.3g}")


def grad_cam_maps(model, module, view, x: torch.Tensor, classes) -> np.ndarray:
    """pytorch-grad-cam's GradCAM maps [N, H, W] at `module`, seen through `view`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[module], reshape_transform=view) as cam:
        return cam(x, targets=[ClassifierOutputTarget(c) for c in classes])


def map_agreement(heatmaps: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """(lowest Pearson r over the images, number of flat reference maps). A flat reference
    counts as r = 1 where ours is flat too, r = 0 otherwise."""
    lowest, flat = 1.0, 0
    for ours, theirs in zip(heatmaps, reference):
        if np.ptp(theirs) == 0:
            flat += 1
            lowest = min(lowest, 1.0 if np.ptp(ours) <= 1e-6 else 0.0)
            continue
        if np.ptp(ours) == 0:
            lowest = min(lowest, 0.0)
            continue
        lowest = min(lowest, float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]))
    return lowest, flat
