"""`gradcam`: the command line over the SDK.

    gradcam explain IMAGE --server HOST:PORT --model NAME [--method M] [--layer TENSOR]
                  [--target-class C | --top-k K] [-o PICTURE.png] [--save-npy MAP.npy]
                  [--heatmap-size image|model|WxH] [--side-by-side] [--grayscale]
                  [--summary SUMMARY.csv|.json]
    gradcam explain FOLDER_OR_IMAGES... --model NAME [-o OUT_FOLDER] [--save-npy NPY_FOLDER]
    gradcam eval FOLDER_OR_IMAGES... --model NAME [--methods gradcam,scorecam,...]
                 [--metrics deletion,insertion,...] [--steps N] [--plot CURVES.png]
                 [--json RESULTS.json]
    gradcam models [--server HOST:PORT]
    gradcam health [--server HOST:PORT] [--wait SECONDS]

Every explained image gets a line on stdout, ``samples/chelsea.jpg: Egyptian cat (0.81)``, and
``--summary`` writes them all to a CSV or JSON file. One image: ``-o`` is the picture (the
overlay at the image's pixel size; one overlay per class in a row with ``--top-k K``; with
``--side-by-side`` the image first, every picture captioned with what it shows), drawn by
`Explanation.overlay` as the SDK draws it, and ``--save-npy`` the raw heatmap, float32
[height, width] ([K, height, width] with ``--top-k K`` above 1). ``--heatmap-size`` sets the
maps' size: "image" (the default), "model" (the graph's own map, at the model's input size) or
WIDTHxHEIGHT; the picture is drawn at the image's size all the same. Pixel-level methods
(guided-backprop, guided-gradcam) are drawn on their own, not over the photo: the signed input
gradients as the Grad-CAM paper shows them, in colour around mid grey (``--grayscale``: their
magnitude in grayscale, as from a server too old to send the gradients); ``--save-npy MAP.npy``
also writes those gradients to ``MAP.gradients.npy``, float32 [3, H, W] at the model's input
size ([K, 3, H, W] with ``--top-k K`` above 1). A folder or several images: ``-o`` and ``--save-npy`` are folders that receive
``<image name>.png`` and ``<image name>.npy``, a progress bar is drawn on stderr, and a count
closes the run; an image that cannot be read or explained is reported and skipped. A request
still running after two seconds shows a spinner with the elapsed time on stderr (one "still
working" line when stderr is not a terminal); a Score-CAM request also shows the server's
progress (masked passes done and needed, and the time it estimates is left).

``gradcam eval`` asks the server how faithful each method's map is (docs/FAITHFULNESS.md): it
prints one row per method, each metric averaged over the images (the best of each column marked
with "*"), and ``--plot`` draws the deletion and insertion curves, averaged over the images,
into a PNG; ``--json`` writes every image's values and curves.

The server defaults to $GRADCAM_SERVER or 127.0.0.1:8001, the token to $GRADCAM_TOKEN, and
the model to the server's only one. Where nothing answers, the error says how to start a server.
Exit status: 0 on success, 1 when something failed (one line on stderr says what: the server's
own message, e.g. for a model that failed to load or serves inference only), 2 for a usage
error (a bad ``--heatmap-size`` too, refused before the server is asked).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .client import GradCamClient
from .errors import (
    DeadlineError,
    GradCamError,
    InvalidInputError,
    ModelNotFoundError,
    UnavailableError,
)
from .options import DetectionTarget
from .protocol import METRICS, heatmap_size_option
from .report import curves_picture, metrics_table
from .results import Explanation, ImageEvaluation, ModelInfo, Progress
from gradcam_common.methods import METHOD_NAMES
from gradcam_common.overlay import COLORMAPS

PROG = "gradcam"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SUMMARY_SUFFIXES = (".csv", ".json")
SUMMARY_PREDICTIONS = 5  # predictions per image in a JSON summary
PROGRESS_WIDTH = 24
TIMEOUT_SECONDS = 30.0  # the deadline of a call, as the SDK's
EXPLAIN_TIMEOUT_SECONDS = 600.0  # Score-CAM on ResNet-50 takes 89 s on 2 CPU threads
EVAL_IMAGES_PER_REQUEST = 4  # gradcam eval sends a folder a few images at a time
SIGN_OF_LIFE_SECONDS = 2.0  # a request running longer shows a spinner (or one line)
SPINNER_INTERVAL_SECONDS = 0.1
SPINNER = "|/-\\"
STEPPED_METHODS = ("scorecam",)  # run in steps by the server, which reports its progress

# Per image, ResNet-50, batch 1, 2 CPU threads, as docs/BENCHMARKS.md measured them.
METHOD_COSTS = """\
time per image against Grad-CAM's, measured on ResNet-50 (batch 1, 2 CPU threads;
docs/BENCHMARKS.md):
  gradcam                                          40.8 ms        1x
  gradcam++, xgradcam, hirescam, layercam,         41.0-42.1 ms   1.00-1.03x
    gradcam-elementwise, eigencam, eigengradcam,
    fem, seg-eigencam, kpcacam
  finercam, refinecam (one layer), randomcam,      44.9-45.9 ms   0.99-1.01x
    sobel, shapleycam (Grad-CAM: 45.5 ms then)
  guided-backprop, guided-gradcam                  143-146 ms     3.5-3.6x
  fullgrad                                         152 ms         3.3x
  ablationcam                                      0.92 s         about 23x
  scorecam (one pass per distinct channel map;     89 s at most   about 2200x
    89 s for 2048; the channels zero everywhere
    share one: 58% of the trained Lite0's)
  integrated-gradcam                               1.29 s         about 21x
  groupcam                                         2.45 s         about 40x
  dff                                              74 ms          1.6x
  sess                                             0.58 s         12.8x"""


def _count(number: int, noun: str) -> str:
    """'1 image', '3 images', '2 boxes'."""
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}" + ("es" if noun.endswith(("s", "x")) else "s")


class CommandError(Exception):
    """A failure worth one line to the user."""


class ImageError(CommandError):
    """One image could not be read or explained; with several, the others go on."""


@dataclass
class _Outcome:
    """One image of a run: what it gave, where it went, or why it was skipped."""

    image: Path
    result: Explanation | None = None
    overlay: Path | None = None
    heatmap: Path | None = None
    error: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _client(args) as client:
            return args.run(client, args)
    except UnavailableError as error:  # before OSError: it is a ConnectionError
        _fail(str(error) + _unreachable_hint(error))
    except OSError as error:
        _fail(_os_message(error))
    except (CommandError, GradCamError, ValueError) as error:  # ValueError: options refused
        _fail(str(error))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


# --- commands -------------------------------------------------------------------------------


def _explain(client: GradCamClient, args: argparse.Namespace) -> int:
    if not 0.0 <= args.opacity <= 1.0:
        raise CommandError(f"--opacity must be in [0, 1], got {args.opacity:g}")
    if args.mask is not None:
        args.mask = _read_mask(args.mask)
    images, many = _collect(args.images)
    if args.model is None:
        args.model = _only_model(client)
    args.num_predictions = _predictions_wanted(client, args)
    sign_of_life = _SignOfLife()
    if not many:
        if args.output is not None:
            _check_picture_path(args.output)
        with sign_of_life.watching(f"{images[0]} ({_method_shown(args)})"):
            outcome = _explain_one(client, args, images[0], args.output, args.save_npy,
                                   sign_of_life.progress)
        print(_summary_line(outcome))
        if args.summary is not None:
            _write_summary(args.summary, [outcome])
        return 0
    for folder in (args.output, args.save_npy):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise CommandError(f"{folder} is not a folder (several images were given)")
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    names = _output_names(images)
    outcomes: list[_Outcome] = []
    progress = _Progress(len(images))
    try:
        for done, image in enumerate(images):
            progress.draw(done, image.name)
            overlay_path = args.output / f"{names[image]}.png" if args.output else None
            heatmap_path = args.save_npy / f"{names[image]}.npy" if args.save_npy else None
            try:
                with sign_of_life.watching(
                    f"{image.name} ({_method_shown(args)})",
                    redraw=lambda text, done=done, image=image: progress.draw(
                        done, f"{image.name}  {text}"
                    ),
                    say=progress.note,
                ):
                    outcome = _explain_one(client, args, image, overlay_path, heatmap_path,
                                           sign_of_life.progress)
            except (ImageError, OSError) as error:  # this image only; the rest go on
                reason = str(error) if isinstance(error, ImageError) else _os_message(error)
                progress.note(f"{PROG}: skipped {reason}")
                outcome = _Outcome(image, error=reason)
            else:
                progress.line(_summary_line(outcome))
            outcomes.append(outcome)
    except BaseException:  # a failure of the whole run: its line goes below the bar
        progress.abandon()
        raise
    progress.finish()
    if args.summary is not None:
        _write_summary(args.summary, outcomes)
    failed = sum(outcome.error is not None for outcome in outcomes)
    explained = len(images) - failed
    print(f"{_count(explained, 'image')} explained, {failed} failed")
    return 1 if failed else 0


def _eval(client: GradCamClient, args: argparse.Namespace) -> int:
    methods = _names(args.methods, METHOD_NAMES, "--methods")
    metrics = _names(args.metrics, METRICS, "--metrics")
    if args.plot is not None:
        _check_picture_path(args.plot)
    images, _ = _collect(args.images)
    boxes = args.box or []
    if boxes and len(boxes) != len(images):
        raise CommandError(f"--box: one box per image, in image order; got "
                           f"{_count(len(boxes), 'box')} for {_count(len(images), 'image')}")
    if "pointing_game" in metrics and not boxes:
        raise CommandError("--metrics pointing_game needs the object's --box in each image")
    if args.model is None:
        args.model = _only_model(client)
    evaluated: list[ImageEvaluation] = []
    score = "probability"
    sign_of_life = _SignOfLife()
    for start in range(0, len(images), EVAL_IMAGES_PER_REQUEST):
        batch = images[start:start + EVAL_IMAGES_PER_REQUEST]
        with sign_of_life.watching(f"{batch[0].name} ... ({_count(len(batch), 'image')}, "
                                   f"{_count(len(methods) or 1, 'method')})"):
            try:
                result = client.evaluate(
                    [str(image) for image in batch], model=args.model, methods=methods,
                    metrics=metrics, target_class=args.target_class, steps=args.steps,
                    layer=args.layer, score=args.score,
                    pointing=boxes[start:start + EVAL_IMAGES_PER_REQUEST] or None,
                    pointing_tolerance=args.pointing_tolerance,
                )
            except ModelNotFoundError as error:
                raise CommandError(f"{error}{_served_models(client)}") from None
            except DeadlineError as error:
                raise CommandError(f"{error} (--timeout {args.timeout:g} s)") from None
        score = result.score
        for image, evaluation in zip(batch, result.images):
            print(f"{image}: {evaluation.name} ({evaluation.score:.2f})", file=sys.stderr)
        evaluated += result.images
    print(f"{args.model}, {_count(len(evaluated), 'image')}, score {score}; mean over the "
          "images:")
    print(metrics_table(evaluated))
    if args.plot is not None:
        try:
            picture = curves_picture(evaluated, score,
                                     f"{args.model}: {_count(len(evaluated), 'image')}")
        except ValueError as error:
            raise CommandError(str(error)) from None
        _save_picture(picture, args.plot)
        print(f"curves -> {args.plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([
            {"image": str(path), "class_index": e.class_index, "label": e.label,
             "score": e.score,
             "methods": {method: {name: {"value": value.value, "curve": value.curve.tolist()}
                                  for name, value in values.items()}
                         for method, values in e.methods.items()}}
            for path, e in zip(images, evaluated)
        ], indent=1))
    return 0


def _names(text: str | None, known: Sequence[str], option: str) -> list[str]:
    """A comma-separated list of names, each known; [] for none given."""
    if not text:
        return []
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise CommandError(f"{option}: unknown {name!r}; available: {', '.join(known)}")
    return names


def _read_mask(path: Path) -> np.ndarray:
    """A region mask from a picture: its non-black pixels, as float32 [h, w] of 0 and 1."""
    try:
        with Image.open(path) as picture:
            return (np.asarray(picture.convert("L")) > 0).astype(np.float32)
    except OSError as error:
        raise CommandError(f"cannot read the mask {path}: {_os_message(error)}") from None


def _explain_one(
    client: GradCamClient,
    args: argparse.Namespace,
    image: Path,
    overlay_path: Path | None,
    heatmap_path: Path | None,
    on_progress: Callable[[Progress], None] | None = None,
) -> _Outcome:
    if args.method not in STEPPED_METHODS:
        on_progress = None
    try:
        result = client.explain(
            image, model=args.model, method=args.method, target_class=args.target_class,
            top_k=args.top_k, layer=args.layer, counterfactual=args.counterfactual,
            eigen_smooth=args.eigen_smooth, aug_smooth=args.aug_smooth,
            target_mask=args.mask, output=args.score_output,
            num_predictions=args.num_predictions, heatmap_size=args.heatmap_size,
            detections=_detections(args), on_progress=on_progress,
        )
    except InvalidInputError as error:
        refused = _refused_image(error, [image])
        if refused is not None:  # about this image, not the whole request
            raise refused from None
        raise
    except ModelNotFoundError as error:
        raise CommandError(f"{error}{_served_models(client)}") from None
    except DeadlineError as error:
        raise CommandError(
            f"{error} (--timeout {args.timeout:g} s; `{PROG} explain --help` lists what each "
            "method costs)"
        ) from None
    if overlay_path is not None:
        try:
            picture = result.overlay(args.colormap, args.opacity, args.side_by_side,
                                     grayscale=args.grayscale)
        except OSError as error:
            raise ImageError(f"{image}: cannot decode the image: {error}") from None
        _save_picture(picture, overlay_path)
    if heatmap_path is not None:
        maps = [h.heatmap for h in result.heatmaps]
        heatmap_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(heatmap_path, maps[0] if len(maps) == 1 else np.stack(maps))
        gradients = [h.pixel_gradients for h in result.heatmaps]
        if all(g is not None for g in gradients):
            np.save(_gradients_path(heatmap_path),
                    gradients[0] if len(gradients) == 1 else np.stack(gradients))
    return _Outcome(image, result, overlay_path, heatmap_path)


def _refused_image(error: InvalidInputError, images: list[Path]) -> ImageError | None:
    """The `ImageError` naming the file of the first ``images[N]`` field violation of
    ``error``, ``images`` being the files given to that explain call in order; None when the
    server named no image (the request as a whole was refused)."""
    for violation in error.field_violations:
        index = violation.image_index
        if index is not None and 0 <= index < len(images):
            # The description starts by naming the image by its place in the request
            # ("image 0: "), which the file's name says better.
            reason = violation.description.removeprefix(f"image {index}: ")
            return ImageError(f"{images[index]}: {reason}")
    return None


def _gradients_path(heatmap_path: Path) -> Path:
    """Where ``--save-npy`` puts a pixel-level method's signed gradients beside its heatmap:
    ``map.npy`` (or ``map``, which np.save also writes as ``map.npy``) -> ``map.gradients.npy``."""
    name = heatmap_path.name
    stem = name[: -len(".npy")] if name.endswith(".npy") else name
    return heatmap_path.with_name(f"{stem}.gradients.npy")


def _models(client: GradCamClient, args: argparse.Namespace) -> int:
    statuses = client.list_models()
    if not statuses:
        print("no models")
    width = max((len(s.name) for s in statuses), default=0)
    for status in statuses:
        if not status.ready:
            print(f"{status.name:<{width}}  not ready: {status.reason}")
            continue
        info = client.model_info(status.name)
        shape = "[" + ",".join(str(d) for d in info.input_shape) + "]"
        explains = (
            f"layer {info.layer}{_layout_shown(info)}" if not info.explain_error
            else f"inference only: {' '.join(info.explain_error.split())}"
        )
        print(
            f"{status.name:<{width}}  ready  input {info.input} {shape}  "
            f"{info.num_classes} classes  {explains}"
        )
    return 0


def _layout_shown(info: ModelInfo) -> str:
    """`` (tokens, prefix 1, grid 14x14)``: how the default layer is laid out; "" from a
    server too old to say."""
    if not info.layout:
        return ""
    details = [info.layout]
    if info.prefix_tokens is not None:
        details.append(f"prefix {info.prefix_tokens}")
    if info.grid is not None:
        details.append(f"grid {info.grid[0]}x{info.grid[1]}")
    return f" ({', '.join(details)})"


def _health(client: GradCamClient, args: argparse.Namespace) -> int:
    if args.wait:
        client.wait_until_ready(args.wait, args.service)
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# --- helpers --------------------------------------------------------------------------------


def _collect(arguments: list[Path]) -> tuple[list[Path], bool]:
    """The image files to explain, and whether there are several (a folder counts as several)."""
    images: list[Path] = []
    many = len(arguments) > 1
    for argument in arguments:
        if argument.is_dir():
            many = True
            found = sorted(
                p for p in argument.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CommandError(
                    f"no images in folder {argument} (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            images.extend(found)
        elif argument.is_file():
            images.append(argument)
        else:
            raise CommandError(f"no such image file or folder: {argument}")
    return images, many


def _output_names(images: list[Path]) -> dict[Path, str]:
    """``cat`` for cat.jpg; the whole file name where two images share a stem."""
    stems: dict[str, int] = {}
    for image in images:
        stems[image.stem] = stems.get(image.stem, 0) + 1
    return {image: image.stem if stems[image.stem] == 1 else image.name for image in images}


def _check_picture_path(path: Path) -> None:
    """Refuse, before anything is asked of the server, a picture name Pillow cannot write."""
    if path.suffix.lower() not in Image.registered_extensions():
        raise CommandError(
            f"cannot write {path}: its suffix names no picture format; use .png or .jpg"
        )


def _save_picture(picture: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        picture.save(path)
    except ValueError as error:  # Pillow: unknown file extension
        raise CommandError(f"cannot write {path}: {error}") from None


def _predictions_wanted(client: GradCamClient, args: argparse.Namespace) -> int:
    """How many predictions to ask for: enough to know every explained class's score (all of
    them for a chosen class, which may rank anywhere)."""
    wanted = max(SUMMARY_PREDICTIONS, args.top_k or 0)
    if args.target_class is None:
        return wanted
    try:
        return max(wanted, client.model_info(args.model).num_classes)
    except ModelNotFoundError as error:
        raise CommandError(f"{error}{_served_models(client)}") from None


def _only_model(client: GradCamClient) -> str:
    """The model to explain with when ``--model`` is not given: the server's only one."""
    names = [status.name for status in client.list_models()]
    if len(names) != 1:
        served = f"it serves {', '.join(names)}" if names else "it serves none"
        raise CommandError(f"name the model with --model: {served}")
    return names[0]


def _unreachable_hint(error: UnavailableError) -> str:
    """Where nothing answers at all, how to start a server there."""
    if "failed to connect" not in error.message.lower():
        return ""
    return (
        "; is gradcam-server running there? From the repository root: "
        "gradcam-server --model-repository models --port 8001"
    )


def _method_shown(args: argparse.Namespace) -> str:
    return args.method or "the model's default method"


def _summary_line(outcome: _Outcome) -> str:
    """``samples/chelsea.jpg: Egyptian cat (0.81) -> out/chelsea.png``, naming the explained
    classes where they are not just the top one."""
    result = outcome.result
    assert result is not None
    top = result.predictions[0] if result.predictions else None
    image = outcome.image
    line = f"{image}: {top.name} ({top.score:.2f})" if top else f"{image}:"
    explained = [h.name for h in result.heatmaps]
    if len(explained) > 1:
        line += f"; heatmaps of {', '.join(explained)}"
    elif top is None or result.heatmaps[0].class_index != top.class_index:
        line += f"; heatmap of {explained[0]}"
    if outcome.overlay is not None:
        line += f" -> {outcome.overlay}"
    return line


def _summary_path(text: str) -> Path:
    """``--summary``: a .csv or .json path."""
    path = Path(text)
    if path.suffix.lower() not in SUMMARY_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"{text}: the summary is written as CSV or JSON; end its name with .csv or .json"
        )
    return path


def _box(text: str) -> tuple[float, ...]:
    """--box X1,Y1,X2,Y2: four numbers (the server checks them against the image)."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"a box is X1,Y1,X2,Y2 in the image's pixels, got "
                                         f"{text!r}")
    return box


def _detections(args: argparse.Namespace) -> list[DetectionTarget] | None:
    """The detections of --box and --detection-index (boxes first), each with its --class:
    one --class for all, or one per detection in that order."""
    boxes, indices = args.box or [], args.detection_index or []
    classes = args.detection_class or []
    if not boxes and not indices:
        if classes:
            raise CommandError("--class goes with --box or --detection-index (detectors); "
                               "for a classifier use --target-class")
        return None
    wanted = [DetectionTarget(box=box) for box in boxes] + [
        DetectionTarget(index=index) for index in indices
    ]
    if len(classes) not in (0, 1, len(wanted)):
        raise CommandError(f"give one --class for all {len(wanted)} detections, or one per "
                           f"detection (--box first, then --detection-index), not {len(classes)}")
    if classes:
        per_detection = classes * len(wanted) if len(classes) == 1 else classes
        wanted = [DetectionTarget(w.index, w.box, c) for w, c in zip(wanted, per_detection)]
    return wanted


def _heatmap_size(text: str) -> str:
    """``--heatmap-size``: image, model or WIDTHxHEIGHT, checked as the SDK checks it."""
    try:
        return heatmap_size_option(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image, model or WIDTHxHEIGHT with positive sides (e.g. 224x224), not {text!r}"
        ) from None


def _write_summary(path: Path, outcomes: list[_Outcome]) -> None:
    """One record per image, in order: its top prediction, the explained classes with their
    scores, the files written, or the reason it was skipped. JSON also holds the top
    predictions; CSV has one row per image, the explained classes joined with ";"."""
    records = [_record(outcome) for outcome in outcomes]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"images": records}, indent=2) + "\n", encoding="utf-8")
        return
    columns = ("image", "class_index", "label", "score", "explained_classes",
               "explained_labels", "model", "method", "overlay", "heatmap", "error")
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for record in records:
            top = record["predictions"][0] if record["predictions"] else {}
            explained = record["explained"]
            writer.writerow({
                "image": record["image"],
                "class_index": top.get("class_index", ""),
                "label": top.get("label", ""),
                "score": "" if not top else f"{top['score']:.6f}",
                "explained_classes": ";".join(str(e["class_index"]) for e in explained),
                "explained_labels": ";".join(e["label"] for e in explained),
                "model": record["model"] or "",
                "method": record["method"] or "",
                "overlay": record["overlay"] or "",
                "heatmap": record["heatmap"] or "",
                "error": record["error"] or "",
            })


def _record(outcome: _Outcome) -> dict[str, object]:
    result = outcome.result
    predictions = result.predictions if result is not None else []
    scores = {p.class_index: p.score for p in predictions}
    return {
        "image": str(outcome.image),
        "model": result.model if result is not None else None,
        "method": result.method if result is not None else None,
        "predictions": [
            {"class_index": p.class_index, "label": p.label, "score": p.score}
            for p in predictions[:SUMMARY_PREDICTIONS]
        ],
        "explained": [
            {"class_index": h.class_index, "label": h.label,
             "score": scores.get(h.class_index)}
            for h in (result.heatmaps if result is not None else [])
        ],
        "overlay": str(outcome.overlay) if outcome.overlay is not None else None,
        "heatmap": str(outcome.heatmap) if outcome.heatmap is not None else None,
        "error": outcome.error,
    }


def _served_models(client: GradCamClient) -> str:
    try:
        names = [s.name for s in client.list_models()]
    except GradCamError:
        return ""
    return f"; served: {', '.join(names)}" if names else "; the server has no models"


def _os_message(error: OSError) -> str:
    """``photo.jpg: Permission denied``."""
    return f"{error.filename}: {error.strerror}" if error.filename else str(error)


def _fail(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


class _Progress:
    """``[#######.........]  3/10  name`` on one stderr line, redrawn with carriage returns."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._width = 0

    def draw(self, done: int, name: str) -> None:
        filled = PROGRESS_WIDTH * done // self.total
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        self._write(f"[{bar}] {done}/{self.total} {name}")

    def note(self, line: str) -> None:
        """A line of its own on stderr, above the bar."""
        self._write(line)
        sys.stderr.write("\n")
        self._width = 0

    def line(self, text: str) -> None:
        """A line on stdout; on a terminal the bar is wiped first so that the line stands
        alone (the next `draw` puts the bar back)."""
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0
        print(text, flush=True)

    def abandon(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()

    def finish(self) -> None:
        self._write(f"[{'#' * PROGRESS_WIDTH}] {self.total}/{self.total}")
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _write(self, text: str) -> None:
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)


class _SignOfLife:
    """Shows that a request is still running once it has taken `after` seconds: a spinner with
    the elapsed seconds, redrawn on stderr when stderr is a terminal; otherwise one plain
    "still working" line for the whole run. Drawn from a helper thread while the request
    blocks; stopped and joined before the request's caller writes anything again."""

    def __init__(self, after: float | None = None) -> None:
        self.after = SIGN_OF_LIFE_SECONDS if after is None else after
        self._said = False
        self.status = ""  # the server's latest progress, shown beside the elapsed seconds

    def progress(self, progress: Progress) -> None:
        """`on_progress` of a request: the spinner shows it from its next redraw."""
        self.status = (f"{progress.passes_done}/{progress.passes_total} masked passes, "
                       f"about {progress.remaining_seconds:.0f} s left")

    @contextmanager
    def watching(
        self,
        what: str,
        redraw: Callable[[str], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Iterator[None]:
        """Around one request about `what`. `redraw(text)` draws the spinner's text (default:
        on a line of its own, wiped afterwards) and `say(line)` writes the plain line."""
        own_line = redraw is None
        width = [0]

        def draw(text: str) -> None:
            sys.stderr.write("\r" + text.ljust(width[0]))
            sys.stderr.flush()
            width[0] = len(text)

        def plain(line: str) -> None:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

        stop = threading.Event()
        started = time.monotonic()
        self.status = ""
        thread = threading.Thread(
            target=self._run,
            args=(what, redraw or draw, say or plain, stop, started, own_line),
            daemon=True,
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if own_line and width[0]:
                sys.stderr.write("\r" + " " * width[0] + "\r")
                sys.stderr.flush()

    def _run(
        self, what: str, redraw: Callable[[str], None], say: Callable[[str], None],
        stop: threading.Event, started: float, own_line: bool,
    ) -> None:
        if stop.wait(self.after):
            return
        if not sys.stderr.isatty():
            if not self._said:
                self._said = True
                say(f"{PROG}: still working on {what}, {time.monotonic() - started:.0f} s so far")
            return
        tick = 0
        while not stop.is_set():
            seconds = time.monotonic() - started
            symbol = SPINNER[tick % len(SPINNER)]
            status = f"  {self.status}" if self.status else ""
            redraw(f"{symbol} explaining {what}  {seconds:.0f} s{status}" if own_line
                   else f"{symbol} {seconds:.0f} s{status}")
            tick += 1
            stop.wait(SPINNER_INTERVAL_SECONDS)


# --- arguments ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> GradCamClient:
    if args.timeout is None:
        args.timeout = (EXPLAIN_TIMEOUT_SECONDS if args.run in (_explain, _eval)
                        else TIMEOUT_SECONDS)
    return GradCamClient(
        args.server,
        timeout=args.timeout,
        retries=args.retries,
        token=args.token,
        tls=args.tls or None,
        root_certificates=args.root_cert,
        client_certificate=args.client_cert,
        client_key=args.client_key,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Grad-CAM heatmaps from a gradcam server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--server", default=os.environ.get("GRADCAM_SERVER", "127.0.0.1:8001"),
                       metavar="HOST:PORT",
                       help="the server (default: $GRADCAM_SERVER or 127.0.0.1:8001); several "
                       "replicas comma-separated, or dns:///NAME:PORT, are balanced round-robin")
    group.add_argument("--token", default=os.environ.get("GRADCAM_TOKEN"),
                       help="bearer token (default: $GRADCAM_TOKEN)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--root-cert", type=Path, metavar="PEM",
                       help="CA certificate to verify the server with (implies --tls)")
    group.add_argument("--client-cert", type=Path, metavar="PEM",
                       help="client certificate, for mutual TLS")
    group.add_argument("--client-key", type=Path, metavar="PEM",
                       help="client private key, for mutual TLS")
    group.add_argument("--timeout", type=float, metavar="SECONDS",
                       help=f"deadline of each call (default {EXPLAIN_TIMEOUT_SECONDS:g} for "
                            f"explain, where a slow method runs for minutes; "
                            f"{TIMEOUT_SECONDS:g} otherwise)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries while the server is unavailable (default 3)")

    explain = commands.add_parser(
        "explain", parents=[connection], help="explain images, write overlays and heatmaps",
        description="Explain one image, several, or the images of a folder: one line per "
                    "image on stdout with its top prediction.",
        epilog=METHOD_COSTS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                         help="an image file, several, or a folder of images")
    explain.add_argument("--model", help="the model's name on the server (default: its only "
                                          "model, when it serves one)")
    explain.add_argument("--method", choices=METHOD_NAMES, metavar="METHOD",
                         help=f"{', '.join(METHOD_NAMES)} (default: the model's); their cost "
                              "is listed below")
    target = explain.add_mutually_exclusive_group()
    target.add_argument("--target-class", type=int, metavar="C",
                        help="explain this class index (default: the top-1 class)")
    target.add_argument("--top-k", type=int, metavar="K",
                        help="explain the K highest-scoring classes")
    explain.add_argument("--layer", metavar="TENSOR",
                         help="target layer, a tensor name of the graph (default: the model's)")
    explain.add_argument("--counterfactual", action="store_true",
                         help="explain the negated score: what speaks against the class")
    explain.add_argument("--aug-smooth", action="store_true",
                         help="average the maps of flipped and rescaled copies of the image")
    explain.add_argument("--eigen-smooth", action="store_true",
                         help="project the channel contributions on their first principal "
                              "component instead of summing them")
    explain.add_argument("--mask", type=Path, metavar="PICTURE",
                         help="segmentation models: explain the class over this region, the "
                              "picture's non-black pixels (default: its predicted region)")
    explain.add_argument("--box", type=_box, action="append", metavar="X1,Y1,X2,Y2",
                         help="detectors: explain the detection of --class that overlaps this "
                              "box (image pixels) most, as NMS would keep it; repeat for more "
                              "maps")
    explain.add_argument("--class", dest="detection_class", type=int, action="append",
                         metavar="C", help="detectors: the class of each --box (one for all, "
                                           "or one each; default: any class)")
    explain.add_argument("--detection-index", type=int, action="append", metavar="I",
                         help="detectors: explain the pre-NMS box I of the raw head; repeat "
                              "for more maps")
    explain.add_argument("--score-output", metavar="NAME",
                         help="the graph output explained (default: the model's)")
    explain.add_argument("-o", "--output", type=Path, metavar="PATH",
                         help="picture file (one image; one map per explained class, in a "
                              "row) or folder (several images); missing folders are made")
    explain.add_argument("--save-npy", type=Path, metavar="PATH",
                         help="raw float32 heatmap file (one image) or folder (several); "
                              "pixel-level methods also write their signed input gradients "
                              "beside it, NAME.gradients.npy ([3, H, W] at the model's input "
                              "size)")
    explain.add_argument("--heatmap-size", type=_heatmap_size, metavar="image|model|WxH",
                         help="the size of the maps --save-npy writes: image (the default: "
                              "the image's own), model (the graph's own map, at the model's "
                              "input size) or WIDTHxHEIGHT; pictures are drawn at the image's "
                              "size all the same")
    explain.add_argument("--summary", type=_summary_path, metavar="PATH",
                         help="also write every image's predictions, explained classes and "
                              "files to PATH, CSV or JSON by its suffix (.csv, .json)")
    explain.add_argument("--colormap", choices=COLORMAPS, default="jet",
                         help="heatmap colours (default jet); pixel-level methods "
                              "(guided-backprop, guided-gradcam) are drawn as the Grad-CAM "
                              "paper does instead: the signed input gradients in colour, "
                              "around mid grey")
    explain.add_argument("--grayscale", action="store_true",
                         help="pixel-level methods: draw the gradient magnitude in grayscale "
                              "instead (black for none, the strongest 1%% white); a model fed "
                              "BGR (config channel_order) otherwise shows red and blue swapped")
    explain.add_argument("--opacity", type=float, default=0.5,
                         help="heatmap opacity over the image, 0..1 (default 0.5)")
    explain.add_argument("--side-by-side", action="store_true",
                         help="the image, then one map per explained class, each captioned "
                              "(the image with the model and method, a map with its class "
                              "and score)")
    explain.set_defaults(run=_explain)

    evaluate = commands.add_parser(
        "eval", parents=[connection],
        help="measure how faithful each method's map is: deletion, insertion, ROAD, ...",
        description="Evaluate the maps of several methods on one image, several, or the "
                    "images of a folder: the server makes each map and scores perturbed "
                    "copies of the image (docs/FAITHFULNESS.md). Prints one row per method, "
                    "each metric averaged over the images, the best marked with '*'.",
    )
    evaluate.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                          help="an image file, several, or a folder of images")
    evaluate.add_argument("--model", help="the model's name on the server (default: its only "
                                           "model, when it serves one)")
    evaluate.add_argument("--methods", metavar="M1,M2,...",
                          help=f"the methods compared, of {', '.join(METHOD_NAMES)} (default: "
                               "the model's)")
    evaluate.add_argument("--metrics", metavar="M1,M2,...",
                          help=f"of {', '.join(METRICS)} (default: all; pointing_game "
                               "needs --box)")
    evaluate.add_argument("--steps", type=int, metavar="N",
                          help="deletion and insertion steps (default 100)")
    evaluate.add_argument("--target-class", type=int, metavar="C",
                          help="evaluate the maps of this class (default: the top-1 class)")
    evaluate.add_argument("--layer", metavar="TENSOR",
                          help="target layer, a tensor name of the graph (default: the model's)")
    evaluate.add_argument("--score", choices=("probability", "logit"),
                          help="what is measured of the class (default: its probability)")
    evaluate.add_argument("--box", type=_box, action="append", metavar="X1,Y1,X2,Y2",
                          help="the pointing game: the object's box in the image's pixels, "
                               "repeated once per image in image order (folders sorted by "
                               "name); with it, pointing_game is among the default metrics")
    evaluate.add_argument("--pointing-tolerance", type=float, metavar="PIXELS",
                          help="the pointing game's tolerance around the box (default 15)")
    evaluate.add_argument("--plot", type=Path, metavar="PICTURE",
                          help="draw the deletion and insertion curves into this PNG")
    evaluate.add_argument("--json", type=Path, metavar="PATH",
                          help="write every image's values and curves as JSON")
    evaluate.set_defaults(run=_eval)

    models = commands.add_parser("models", parents=[connection], help="list the served models")
    models.set_defaults(run=_models)

    health = commands.add_parser("health", parents=[connection],
                                 help="print the server's health; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="a gRPC service name (default: the server)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for SERVING")
    health.set_defaults(run=_health)
    return parser


if __name__ == "__main__":
    sys.exit(main())
