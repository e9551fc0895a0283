"""The shipped EfficientNet-Lite0: reproducible from its script, right on a real photo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from gradcam_server.augment import augment_model, explained_target

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "efficientnet_lite0"
SAMPLE = ROOT / "samples" / "chelsea.jpg"
# Boxes in the 451 x 300 photo (x0, y0, x1, y1): the cat's face, and a strip of background.
CAT_FACE = (60, 60, 350, 280)
BACKGROUND = (400, 0, 451, 300)


def load_export_script():
    spec = importlib.util.spec_from_file_location("lite0_export", MODEL_DIR / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocess(path: Path, config: dict) -> np.ndarray:
    height, width = config["size"]
    image = Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) * np.float32(config["scale"])
    x = (x - np.float32(config["mean"])) / np.float32(config["std"])
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


# BatchNorm folding in the exporter differs by ~2e-6 between processors, so the re-export is
# compared by value: the same graph, weights within WEIGHT_TOLERANCE of the committed ones
# (relative to each tensor's largest magnitude), and logits within LOGIT_TOLERANCE on the photo.
WEIGHT_TOLERANCE = 1e-5
LOGIT_TOLERANCE = 1e-3


def test_export_script_reproduces_the_committed_model(tmp_path: Path, config: dict) -> None:
    load_export_script().main([str(tmp_path)])
    exported = onnx.load(tmp_path / "model.onnx")
    committed = onnx.load(MODEL_DIR / "model.onnx")
    signature = lambda m: (  # noqa: E731
        [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node],
        [(v.name, v.type) for v in (*m.graph.input, *m.graph.output)],
        [(o.domain, o.version) for o in m.opset_import],
    )
    assert signature(exported) == signature(committed)
    weights = {i.name: numpy_helper.to_array(i) for i in committed.graph.initializer}
    assert sorted(i.name for i in exported.graph.initializer) == sorted(weights)
    for initializer in exported.graph.initializer:
        expected = weights[initializer.name]
        value = numpy_helper.to_array(initializer)
        assert value.dtype == expected.dtype and value.shape == expected.shape, initializer.name
        scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
        assert np.abs(value.astype(np.float64) - expected).max(initial=0.0) <= (
            WEIGHT_TOLERANCE * scale
        ), initializer.name
    x = preprocess(SAMPLE, config)
    logits = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        .run(None, {"input": x})[0]
        for m in (exported, committed)
    ]
    np.testing.assert_allclose(logits[0], logits[1], atol=LOGIT_TOLERANCE, rtol=0)
    for name in ("labels.txt", "config.json"):
        assert (tmp_path / name).read_text() == (MODEL_DIR / name).read_text()


def test_default_target_is_the_head_relu6(config: dict) -> None:
    augmented = augment_model(MODEL_DIR / "model.onnx")
    exposed = explained_target(augmented)["layer"]
    producer = next(n for n in augmented.graph.node if exposed in n.output)
    assert producer.op_type == "Clip"
    assert exposed == config["target_layer"]


def test_predicts_the_cat_and_grad_cam_lies_on_it(config: dict) -> None:
    labels = (MODEL_DIR / config["labels"]).read_text().splitlines()
    augmented = augment_model(MODEL_DIR / "model.onnx")
    session = ort.InferenceSession(
        augmented.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = preprocess(SAMPLE, config)
    logits, heatmap = session.run(
        ["logits", "heatmap"], {"input": x, "target_class": np.array([-1], dtype=np.int64)}
    )
    probabilities = np.exp(logits[0] - logits[0].max())
    probabilities /= probabilities.sum()
    top = int(probabilities.argmax())
    assert labels[top] == "Egyptian cat" and probabilities[top] > 0.7

    assert heatmap.shape == (1, 224, 224)
    assert heatmap.min() == 0.0 and heatmap.max() == pytest.approx(1.0, abs=1e-5)
    width, height = Image.open(SAMPLE).size
    on_photo = np.asarray(Image.fromarray(heatmap[0]).resize((width, height), Image.BILINEAR))
    peak_y, peak_x = np.unravel_index(on_photo.argmax(), on_photo.shape)
    x0, y0, x1, y1 = CAT_FACE
    assert x0 <= peak_x < x1 and y0 <= peak_y < y1
    face = on_photo[y0:y1, x0:x1].mean()
    bx0, by0, bx1, by1 = BACKGROUND
    background = on_photo[by0:by1, bx0:bx1].mean()
    assert face > 5 * background
