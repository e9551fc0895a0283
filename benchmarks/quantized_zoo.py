"""Quantized models against their float originals; writes docs/ZOO.md's "Quantized" section.

    python benchmarks/quantized_zoo.py [--images 4]

The shipped efficientnet_lite0 (trained weights) and torchvision's resnet18 (random weights,
BatchNorm calibrated as tests/zoo.py does), quantized by onnxruntime's quantize_static (QDQ, per
tensor and per channel) and quantize_dynamic, calibrated on all of tests/zoo.py's photos; each
augmented with the defaults and run on the first `--images` photos for the float model's top-1
class. Per model and format: the top-1 agreement, the Pearson r of each method's map with the
float model's (mean and least over the photos), and the relative error of the target layer's
gradients against finite differences of the quantized graph's continuous relaxation
(tests/quantized.py) on two mirrored photos. tests/test_quantized.py asserts bounds on them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "server"), str(ROOT / "client"),
                str(ROOT / "proto"), str(ROOT / "common")]

import quantized  # noqa: E402  (tests/quantized.py)
import test_quantized as checks  # noqa: E402
import zoo  # noqa: E402
from gradcam_server.augment import augment_model, explained_target  # noqa: E402

REPORT = ROOT / "docs" / "ZOO.md"
HEADING = "## Quantized"
FORMAT_NAMES = {
    "qdq": "quantize_static, QDQ, per tensor",
    "qdq-per-channel": "quantize_static, QDQ, per channel",
    "dynamic": "quantize_dynamic",
}


def layer_gradient_error(path: Path) -> float:
    """The check of test_layer_gradients_match_the_relaxation, returning its error."""
    model = onnx.load(str(path))
    x = zoo.sample_batch(len(zoo.PHOTOS) + 2)[-2:]
    classes = np.array([3, 7])
    augmented = augment_model(model)
    layer = explained_target(augmented)["layer"]
    out = checks.run(augmented, x, classes)
    relaxed = onnx.shape_inference.infer_shapes(quantized.relax(model, at={"input": x}))
    head = onnx.utils.Extractor(relaxed).extract_model([layer, "input"],
                                                        [checks.score_tensor(model)])
    session = zoo.ort_session(head.SerializeToString())
    score = checks.score_of(session, {"input": x}, layer, classes)
    return checks.directional_error(out["gradients"], score, out["activations"])


def pixel_maps(path: Path, classes: tuple[int, ...], images: int) -> np.ndarray:
    augmented = augment_model(path, method="guided-backprop")
    return checks.run(augmented, zoo.sample_batch(images), np.array(classes))["pixel_map"]


def measure(images: int, folder: Path) -> list[str]:
    checks.IMAGES = images
    calibration = zoo.sample_batch(len(zoo.PHOTOS))
    x = zoo.sample_batch(images)
    sources = {"efficientnet_lite0": checks.LITE0,
               "resnet18": zoo.export_onnx("resnet18", "torchscript", folder / "resnet18.onnx")}
    rows = []
    for name, source in sources.items():
        classes = tuple(int(c) for c in checks.float_classes(source))
        for fmt in quantized.FORMATS:
            path = quantized.quantize(source, folder / f"{name}-{fmt}.onnx", fmt, calibration)
            logits = zoo.ort_session(str(path)).run(None, {"input": x})[0]
            agree = int((logits.argmax(1) == np.array(classes)).sum())
            cells = []
            for method in checks.METHODS:
                r = checks.correlations(checks.maps(path, method, classes),
                                        checks.maps(source, method, classes))
                cells.append(f"{r.mean():.3f} ({r.min():.3f})")
            r = checks.correlations(pixel_maps(path, classes, images),
                                    pixel_maps(source, classes, images))
            cells.append(f"{r.mean():.3f} ({r.min():.3f})")
            error = layer_gradient_error(path)
            rows.append(f"| {name} | {FORMAT_NAMES[fmt]} | {agree}/{images} | "
                        + " | ".join(cells) + f" | {error:.1e} |")
            print(rows[-1], flush=True)
    return rows


def section(rows: list[str], images: int) -> str:
    methods = " | ".join(f"r {method}" for method in (*checks.METHODS, "guided-backprop"))
    return "\n".join([
        HEADING,
        "",
        "Quantized models, written by `python benchmarks/quantized_zoo.py` (checked by "
        "tests/test_quantized.py): onnxruntime's quantize_static (QDQ) and quantize_dynamic, "
        "calibrated on the scikit-image photos, augmented with the defaults. Gradients pass "
        "Q/DQ pairs and integer ops straight through, stopped where the quantizer saturates. "
        f"**top-1**: the quantized model's top-1 class equals the float model's, of {images} "
        "photos; **r**: Pearson r of the map with the float model's for the float model's top-1 "
        "class, mean (least) over the photos: the difference is the quantization's own error "
        "(for guided-backprop, of the pixel maps, the signed input gradients); "
        "**gradient error**: relative error of d score / d layer against central finite "
        "differences of the quantized graph's continuous relaxation (round replaced by its "
        "offset, saturation kept), along four directions, on two photos not calibrated on.",
        "",
        f"| model | quantization | top-1 | {methods} | gradient error |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in range(len(checks.METHODS) + 1))
        + " | ---: |",
        *rows,
        "",
        "The default layer is the float model's, read after the Q/DQ pair that stands in for "
        "its dropped ReLU (the DequantizeLinear output); a float layer name given by a config "
        "or a request is read there too. The backward pass starts in front of the output's own "
        "Q/DQ pair, so a logit beyond the range calibrated for it keeps its map (differentiated, "
        "its saturation would blank the map). Guided backprop treats a pair that stands for a "
        "removed ReLU (saturating at 0 after an op that can go negative) as that ReLU; input "
        "gradients through EfficientNet-Lite0's 16 quantized blocks drift far from the float "
        "model's in every format, dynamic included, which keeps its ReLU6s: its pixel-level "
        "maps do not carry over to the quantized model. The QOperator format (QLinearConv, "
        "com.microsoft.QGemm) and onnxruntime's fused kernels (com.microsoft "
        "DynamicQuantizeMatMul, MatMulIntegerToFloat) are refused by name.",
        "",
    ])


def write_section(text: str, path: Path = REPORT) -> None:
    """Replace the report's Quantized section (up to the next "## " heading), or append it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = text.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    else:
        lines += ["", *text.rstrip("\n").splitlines()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=checks.IMAGES)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(args.images, Path(folder))
    write_section(section(rows, args.images))
    print(f"wrote the {HEADING[3:]} section of {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
