"""Cost of Grad-CAM inside the session, as ratios to the plain forward measured in one run.

    python benchmarks/bench_augment.py [--model resnet50] [--threads 2] [--seconds 20]

Exports a torchvision model (random weights: speed does not depend on them), augments it for
its default last-layer target, and times the plain and the augmented session on the same input,
interleaving the two so that machine noise hits both alike. Peak memory is measured in fresh
child processes, one per variant: the peak resident set of loading the session and running it,
over the resident set just before the session was created.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gradcam_server.augment import augment_model
from gradcam_server.augment.graph import save_model


def export(model_name: str, path: Path) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    example = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model, example, str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    if any(i.name == "target_class" for i in session.get_inputs()):
        feeds["target_class"] = np.full(batch, -1, dtype=np.int64)
    return feeds


def interleaved(variants: dict, seconds: float, minimum: int = 10) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run in turns (after one warm-up call
    each) for `seconds` and at least `minimum` times, so machine noise hits all alike."""
    for run in variants.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, samples.values())) < minimum:
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_interleaved(sessions: dict[str, ort.InferenceSession], batch: int, seconds: float):
    feeds = {name: feeds_for(s, batch) for name, s in sessions.items()}
    medians = interleaved(
        {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()},
        seconds,
    )
    return medians


def child_peak_memory(path: Path, threads: int, batch: int) -> dict[str, float]:
    """Run in a fresh interpreter: resident set before the session, its peak, and the resident
    set after the runs (the steady state the arena settles at)."""
    code = f"""
import json, resource, numpy as np, onnxruntime as ort, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_augment import make_session, feeds_for
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
before = rss_mb()
session = make_session({str(path)!r}, {threads})
feeds = feeds_for(session, {batch})
for _ in range(5):
    session.run(None, feeds)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"before_mb": before, "peak_mb": peak, "after_mb": rss_mb()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        plain_path, augmented_path = Path(tmp, "plain.onnx"), Path(tmp, "augmented.onnx")
        export(args.model, plain_path)
        save_model(augment_model(plain_path), augmented_path)
        sessions = {
            "plain": make_session(plain_path, args.threads),
            "gradcam": make_session(augmented_path, args.threads),
        }
        print(f"{args.model}, CPU, {args.threads} threads, onnxruntime {ort.__version__}")
        print("batch  forward ms  grad-cam ms  ratio  (medians of interleaved runs)")
        for batch in args.batches:
            medians = time_interleaved(sessions, batch, args.seconds)
            ratio = medians["gradcam"] / medians["plain"]
            print(f"{batch:5d}  {medians['plain'] * 1e3:10.1f}  {medians['gradcam'] * 1e3:11.1f}"
                  f"  {ratio:5.3f}")
        del sessions
        print("batch  measure  forward MB  grad-cam MB  ratio  (RSS over RSS before the session)")
        for batch in args.batches:
            plain = child_peak_memory(plain_path, args.threads, batch)
            gradcam = child_peak_memory(augmented_path, args.threads, batch)
            for measure in ("peak", "after"):
                plain_mb = plain[f"{measure}_mb"] - plain["before_mb"]
                gradcam_mb = gradcam[f"{measure}_mb"] - gradcam["before_mb"]
                print(f"{batch:5d}  {measure:7s}  {plain_mb:10.1f}  {gradcam_mb:11.1f}"
                      f"  {gradcam_mb / plain_mb:5.3f}")


if __name__ == "__main__":
    main()
