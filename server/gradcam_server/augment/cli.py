"""`gradcam-augment MODEL.onnx (-o OUT.onnx | --triton-repository DIR [--name N]
[--max-batch-size B]) [--layer TENSOR ...] [--method M] [--score S] [--score-output NAME|INDEX]
[--input NAME|INDEX] [--input-gradients] [--layout L] [--prefix-tokens K] [--grid HxW]
[--boxes-output NAME] [--detection-format F] [--box-format F] [--iou-threshold T]
[--background-class C] [--mean R,G,B] [--std R,G,B] [--scale S] [--channel-order O]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from .detection import BOX_FORMATS, DEFAULT_IOU_THRESHOLD, DETECTION_FORMATS
from .errors import AugmentError
from .graph import save_model
from .layout import LAYOUTS
from .methods import CAM_METHODS
from .names import NAMES
from .passes import augment_model, explained_target, load_model
from .scores import SCORES
from .sobel import PixelNormalisation
from .targets import default_score, score_output_name
from ..triton_repository import TritonConfigError, write_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradcam-augment",
        description="Add Grad-CAM outputs (activations, gradients, heatmap) to an ONNX model.",
    )
    parser.add_argument("model", type=Path, help="exported ONNX model (external data allowed)")
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("-o", "--output", type=Path, help="augmented model path")
    destination.add_argument(
        "--triton-repository", type=Path, metavar="DIR",
        help="write DIR/NAME/1/model.onnx and DIR/NAME/config.pbtxt, a model Triton serves",
    )
    parser.add_argument("--name", help="--triton-repository: the model's name (default: the "
                        "file's name without .onnx, or its folder's for a model.onnx)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                        help="--triton-repository: Triton's max_batch_size (default 8)")
    parser.add_argument("--layer", action="append",
                        help="target layer tensor name (default: detected); repeat to fuse")
    parser.add_argument("--method", choices=list(CAM_METHODS), default="gradcam",
                        help="the CAM method computing the heatmap")
    parser.add_argument(
        "--score", choices=SCORES,
        help='what is explained (default: "region" for a segmentation output, else "logit")',
    )
    parser.add_argument(
        "--score-output", type=name_or_index,
        help="graph output explained, by name or index (default: the first)",
    )
    parser.add_argument(
        "--input", type=name_or_index,
        help="the image input, by name or index among the inputs (needed when there are several)",
    )
    parser.add_argument(
        "--input-gradients",
        action="store_true",
        help=f"also output d score / d image as {NAMES.input_gradients!r}",
    )
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="the target layer's layout (default: detected from the graph)")
    parser.add_argument("--prefix-tokens", type=int, metavar="K",
                        help="tokens layout: class/distillation/register tokens before the patches")
    parser.add_argument("--grid", type=grid_size, metavar="HxW",
                        help="tokens layout: the patch grid, e.g. 14x14")
    parser.add_argument("--boxes-output", metavar="NAME",
                        help="score detection: the pre-NMS boxes output (--score-output names "
                             "the class scores; default: both detected from their shapes)")
    parser.add_argument("--detection-format", choices=DETECTION_FORMATS,
                        help="score detection: scores [N, A, C] (nac), [N, C, A] (nca), or one "
                             "YOLO output [N, 4 + C, A] (default: detected)")
    parser.add_argument("--box-format", choices=BOX_FORMATS,
                        help="score detection: x1, y1, x2, y2 (xyxy) or centre and size")
    parser.add_argument("--iou-threshold", type=float, default=DEFAULT_IOU_THRESHOLD,
                        help="score detection: least IoU of a detection chosen by box")
    parser.add_argument("--background-class", type=int, metavar="C",
                        help="score detection: the class that is no object, never explained "
                             "(default: 0 for a two-stage detector, none otherwise; -1: none)")
    defaults = PixelNormalisation()
    parser.add_argument("--mean", type=_triple, default=defaults.mean, metavar="R,G,B",
                        help="sobel: the image input's per-channel mean, as config.json's "
                             "(default: ImageNet's)")
    parser.add_argument("--std", type=_triple, default=defaults.std, metavar="R,G,B",
                        help="sobel: its per-channel deviation (default: ImageNet's)")
    parser.add_argument("--scale", type=float, default=defaults.scale, metavar="S",
                        help="sobel: the pixel scale before normalising (default: 1/255)")
    parser.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB",
                        help="sobel: the input's channel order (default: RGB)")
    args = parser.parse_args(argv)
    try:
        pixels = PixelNormalisation(mean=args.mean, std=args.std, scale=args.scale,
                                    channel_order=args.channel_order)
        model = load_model(args.model)
        score = args.score or default_score(_output_rank(model, args.score_output))
        augmented = augment_model(
            model,
            layer=args.layer,
            method=args.method,
            score=score,
            output=args.score_output,
            input_gradients=args.input_gradients,
            input=args.input,
            layout=args.layout,
            prefix_tokens=args.prefix_tokens,
            grid=args.grid,
            boxes=args.boxes_output,
            detection_format=args.detection_format,
            box_format=args.box_format,
            iou_threshold=args.iou_threshold,
            background_class=args.background_class,
            pixels=pixels,
        )
    except AugmentError as error:
        print(f"gradcam-augment: {error}", file=sys.stderr)
        return 1
    target = explained_target(augmented)
    if args.triton_repository is None:
        save_model(augmented, args.output)
        written = args.output
    else:
        name = args.name or (args.model.parent.name if args.model.name == "model.onnx"
                             else args.model.stem)
        parameters = {"gradcam.method": args.method, "gradcam.score": score,
                      **{f"gradcam.{key}": value for key, value in target.items()}}
        try:
            written = write_model(augmented, args.triton_repository, name,
                                  args.max_batch_size, parameters)
        except TritonConfigError as error:
            print(f"gradcam-augment: {error}", file=sys.stderr)
            return 1
    details = ", ".join(f"{key} {value}" for key, value in target.items() if key != "layer")
    print(f"wrote {written} ({score} score, target layer {target['layer']!r}: {details})")
    return 0


def _output_rank(model: onnx.ModelProto, output: str | int | None) -> int | None:
    """The rank of the explained output, None where the graph does not say."""
    name = score_output_name(model, output)
    info = next(o for o in model.graph.output if o.name == name)
    shape = info.type.tensor_type
    return len(shape.shape.dim) if shape.HasField("shape") else None


def grid_size(text: str) -> tuple[int, int]:
    """"14x14" -> (14, 14)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 14x14, got {text!r}") from None
    return height, width


def name_or_index(text: str) -> str | int:
    """A tensor's name, or its position when the text is a non-negative integer."""
    return int(text) if text.isdigit() else text


def _triple(text: str) -> tuple[float, float, float]:
    """"0.5,0.5,0.5" -> (0.5, 0.5, 0.5)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers such as 0.5,0.5,0.5, got "
                                         f"{text!r}")
    return values


if __name__ == "__main__":
    sys.exit(main())
