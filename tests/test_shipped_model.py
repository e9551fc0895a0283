"""The shipped EfficientNet-Lite0: reproducible from its script, right on a real photo."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from gradcam_server.augment import augment_model

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


def test_export_script_reproduces_the_committed_model(tmp_path: Path) -> None:
    load_export_script().main([str(tmp_path)])
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "model.onnx") == digest(MODEL_DIR / "model.onnx")
    for name in ("labels.txt", "config.json"):
        assert (tmp_path / name).read_text() == (MODEL_DIR / name).read_text()


def test_default_target_is_the_head_relu6(config: dict) -> None:
    augmented = augment_model(MODEL_DIR / "model.onnx")
    exposed = next(n for n in augmented.graph.node if n.output == ["activations"]).input[0]
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
