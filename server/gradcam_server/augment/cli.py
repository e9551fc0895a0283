"""`gradcam-augment MODEL.onnx -o OUT.onnx [--layer TENSOR ...] [--method M] [--score S]
[--score-output NAME|INDEX] [--input NAME|INDEX] [--layout L] [--prefix-tokens K] [--grid HxW]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from .detection import BOX_FORMATS, DEFAULT_IOU_THRESHOLD, DETECTION_FORMATS
from .errors import AugmentError
from .graph import model_bytes
from .layout import LAYOUTS
from .passes import ALL_METHODS, NAMES, augment_model, explained_target
from .targets import SCORES

# Protobuf cannot serialize 2 GiB; larger models keep their weights in a data file beside them.
_SINGLE_FILE_LIMIT_BYTES = 1_800_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradcam-augment",
        description="Add Grad-CAM outputs (activations, gradients, heatmap) to an ONNX model.",
    )
    parser.add_argument("model", type=Path, help="exported ONNX model (external data allowed)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="augmented model path")
    parser.add_argument("--layer", action="append",
                        help="target layer tensor name (default: detected); repeat to fuse")
    parser.add_argument("--method", choices=ALL_METHODS, default="gradcam",
                        help="the CAM method computing the heatmap")
    parser.add_argument("--score", choices=SCORES, default="logit", help="what is explained")
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
    args = parser.parse_args(argv)
    try:
        augmented = augment_model(
            args.model,
            layer=args.layer,
            method=args.method,
            score=args.score,
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
        )
    except AugmentError as error:
        print(f"gradcam-augment: {error}", file=sys.stderr)
        return 1
    save(augmented, args.output)
    target = explained_target(augmented)
    details = ", ".join(f"{key} {value}" for key, value in target.items() if key != "layer")
    print(f"wrote {args.output} (target layer {target['layer']!r}: {details})")
    return 0


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


def save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if model_bytes(model) < _SINGLE_FILE_LIMIT_BYTES:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


if __name__ == "__main__":
    sys.exit(main())
