"""Cost of every CAM method inside the session, as ratios measured in one run.

    python benchmarks/bench_methods.py [--model resnet50] [--threads 2] [--seconds 10]
                                       [--without-references] [--methods M,M,...]
                                       [--layers TENSOR,TENSOR,...] [--score probability]

1. each gradient-weighted, pixel-level and path method and Group-CAM against the plain forward,
   batch 1, interleaved (the same ResNet-50, default last-layer target);
2. Ablation-CAM in the session against pytorch-grad-cam's AblationCAM on the same weights and
   threads, batch 1 (the reference runs the whole network once per 32 ablated channels; ours
   re-runs only the layers after the target layer);
3. Score-CAM likewise against its ScoreCAM (both run the whole network on every masked copy of
   the image, in chunks).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_augment import export, interleaved, make_session
from gradcam_common.methods import METHOD_NAMES
from gradcam_server.augment import augment_model
from gradcam_server.augment.graph import save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--without-references", action="store_true",
                        help="section 1 only (pytorch-grad-cam's Score-CAM alone takes minutes)")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=METHOD_NAMES,
                        help="section 1 for these methods only, beside Grad-CAM and the "
                             "forward (comma-separated; implies --without-references)")
    parser.add_argument("--layers", type=lambda text: text.split(","),
                        help="the target layers of every method (comma-separated tensor names, "
                             "e.g. /layer3/layer3.5/relu_2/Relu_output_0 for ResNet-50's "
                             "layer3; default: the model's default layer)")
    parser.add_argument("--score", default="logit",
                        help="the score explained in section 1 (default: logit)")
    args = parser.parse_args()
    unknown = set(args.methods) - set(METHOD_NAMES)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.methods != METHOD_NAMES:
        args.without_references = True
        args.methods = list(dict.fromkeys(["gradcam", *args.methods]))

    import torch
    import torchvision
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {"input": x, "target_class": np.array([-1], dtype=np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp, "plain.onnx")
        export(args.model, plain_path)
        plain = make_session(plain_path, args.threads)
        sessions = {}
        timed_alone = ("ablationcam", "scorecam")
        for method in (*(m for m in args.methods if m not in timed_alone),
                       *(m for m in timed_alone if m in args.methods)):
            path = Path(tmp, f"{method}.onnx")
            score = args.score if method not in timed_alone else "logit"
            save_model(augment_model(plain_path, method=method, layer=args.layers, score=score),
                       path)
            sessions[method] = make_session(path, args.threads)

        print(f"{args.model}, CPU, {args.threads} threads, batch 1, score {args.score}; medians")
        print("\n1. method / plain forward (interleaved rounds)")
        variants = {"forward": lambda: plain.run(None, {"input": x})}
        variants |= {
            m: (lambda s=s: s.run(None, feeds)) for m, s in sessions.items()
            if m not in timed_alone
        }
        medians = interleaved(variants, args.seconds * len(variants), minimum=5)
        for name, value in medians.items():
            print(f"   {name:20s} {value * 1e3:8.1f} ms  ratio {value / medians['forward']:.3f}")
        if args.without_references:
            return

        torch.manual_seed(0)
        model = getattr(torchvision.models, args.model)(weights=None).eval()
        category = int(plain.run(None, {"input": x})[0].argmax())
        for number, (method, reference) in enumerate(
            [("ablationcam", AblationCAM), ("scorecam", ScoreCAM)], start=2
        ):
            print(f"\n{number}. pytorch-grad-cam {reference.__name__} / {method} in the session")
            ours = interleaved({method: lambda: sessions[method].run(None, feeds)}, 0, 1)[method]
            with reference(model=model, target_layers=[model.layer4]) as cam:
                start = time.perf_counter()
                cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(category)])
                theirs = time.perf_counter() - start
            print(f"   {theirs:.2f} s vs {ours:.3f} s  speed-up {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
