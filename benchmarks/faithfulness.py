"""Faithfulness of every served method on the shipped model, and what Evaluate costs, in one run.

    python benchmarks/faithfulness.py [--methods gradcam,...] [--metrics deletion,...]
                                      [--photos N] [--road-photos N] [--threads 2]
                                      [--skip-speed] [--skip-metrics]

The shipped EfficientNet-Lite0 (models/, pretrained) is served in process (`GradCamService`,
the core both gRPC APIs call) on the bundled photo (samples/chelsea.jpg) and the photos that
ship inside the scikit-image wheel (read from its data folder, never downloaded).

1. Per method, each metric's mean over the photos (ROAD on the first `--road-photos` only: its
   sparse solves take about 0.7 s each on 224 x 224), beside a random map's (uniform noise at
   the target layer's size, upsampled bilinearly as a CAM is: its copies made by
   `gradcam_server.faithfulness` and scored by the plain forward session, the same math as
   Evaluate's): a faithful method should delete the class
   faster (lower deletion AUC) and restore it faster (higher insertion AUC) than noise.
2. Speed: 100 forward passes of the model through the service's engine at batch sizes 1..64
   (medians of three), the fastest size kept; then one Evaluate request for one photo,
   Grad-CAM, deletion only (101 copies at 100 steps, the map and the decoding included)
   against 100 forward passes at that size, and deletion and insertion (202 copies) against
   200. Medians of five, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gradcam_common.faithfulness import HIGHER_IS_BETTER
from gradcam_common.methods import METHOD_NAMES
from gradcam_server import faithfulness
from gradcam_server.postprocess import resize_heatmap
from gradcam_server.repository import ModelRepository
from gradcam_server.request import EvaluateRequest, resolve_evaluate
from gradcam_server.runtime import RuntimeOptions
from gradcam_server.service import GradCamService
from gradcam_server.validate import Feeds

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"
BUNDLED = ROOT / "samples" / "chelsea.jpg"
SKIMAGE_PHOTOS = ("coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
                  "chelsea.png")
REPEATS = 5


def photos(count: int) -> list[tuple[str, bytes]]:
    """The bundled photo, then scikit-image's, as encoded bytes."""
    found = [(BUNDLED.name, BUNDLED.read_bytes())]
    data = importlib.resources.files("skimage") / "data"
    for name in SKIMAGE_PHOTOS:
        found.append((f"skimage {name}", (data / name).read_bytes()))
    return found[:count]


async def random_map_metrics(service: GradCamService, model, image: bytes,
                             plan: faithfulness.Plan, seed: int) -> dict[str, float]:
    """A random map's metrics for one photo: uniform noise at the target layer's size,
    upsampled bilinearly as a CAM is (pixel noise would delete a scattered pattern, which
    destroys any photo faster than a region); its copies scored by the plain forward session,
    in runs of Evaluate's batch size."""
    (tensor,), _ = service._tensors(model, [image], lambda sizes: None)
    outputs = model.forward(tensor[None])[model.score_output]
    category = int(outputs[0].argmax())
    original = float(faithfulness.class_scores(outputs, np.array([category]), plan.score)[0])
    height, width = model.layer_shape[-2:]
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    noise = resize_heatmap(noise, tuple(tensor.shape[:0:-1]))  # (width, height)
    job = faithfulness.MapPerturbations(tensor, noise, plan, seed=0)
    batch = await service.evaluation_batch(model, tensor.shape)
    scores = []
    for start in range(0, job.count, batch):
        copies = job.make(start, min(job.count, start + batch))
        result = model.forward(copies)[model.score_output]
        scores.append(faithfulness.class_scores(result, np.full(len(copies), category),
                                                plan.score))
    values = job.metrics(np.concatenate(scores), original)
    return {name: value.value for name, value in values.items()}


async def metrics_section(service: GradCamService, model, methods: list[str],
                          metrics: list[str], count: int, road_count: int) -> None:
    road = [m for m in metrics if m.startswith("road")]
    others = [m for m in metrics if not m.startswith("road")]
    images = photos(count)
    print(f"1. {MODEL} on {len(images)} photos ({', '.join(n for n, _ in images)}); score: "
          f"the class probability; means over the photos (ROAD over the first {road_count})")
    table: dict[str, dict[str, list[float]]] = {}
    for label, plan_metrics, used in (("", others, images), ("ROAD ", road, images[:road_count])):
        if not plan_metrics or not used:
            continue
        for method in methods:
            started = time.perf_counter()
            evaluated = await service.evaluate(resolve_evaluate(model, EvaluateRequest(
                images=[data for _, data in used], methods=[method], metrics=plan_metrics)))
            for image in evaluated.images:
                for name, value in image.methods[0][1].items():
                    table.setdefault(method, {}).setdefault(name, []).append(value.value)
            print(f"   {label}{method}: {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        plan = faithfulness.Plan(tuple(plan_metrics))
        for seed, (_, data) in enumerate(used):
            for name, value in (await random_map_metrics(service, model, data, plan,
                                                         seed)).items():
                table.setdefault("random map", {}).setdefault(name, []).append(value)
    columns = [m for m in metrics if m in table[methods[0]]]
    header = "| method | " + " | ".join(
        f"{m} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)" for m in columns
    ) + " |"
    print(header)
    print("| --- |" + " ---: |" * len(columns))
    for method, values in table.items():
        print(f"| `{method}` | " + " | ".join(
            f"{np.mean(values[m]):.3f}" for m in columns) + " |")
    random_row = table["random map"]
    for metric in ("deletion", "insertion"):
        if metric not in columns:
            continue
        better = [m for m in methods if (np.mean(table[m][metric]) > np.mean(random_row[metric]))
                  == HIGHER_IS_BETTER[metric]]
        print(f"   {metric}: {len(better)} of {len(methods)} methods beat the random map"
              f"{'' if len(better) == len(methods) else ' (not: ' + ', '.join(sorted(set(methods) - set(better))) + ')'}")


async def speed_section(service: GradCamService, model) -> None:
    image = BUNDLED.read_bytes()
    (tensor,), _ = service._tensors(model, [image], lambda sizes: None)
    chosen = await service.evaluation_batch(model, tensor.shape)

    async def forwards(rows: int, batch: int) -> float:
        copies = np.repeat(tensor[None], batch, axis=0)
        started = time.perf_counter()
        for start in range(0, rows, batch):
            await service.engine.run(model, None, Feeds(copies[:min(batch, rows - start)]))
        return time.perf_counter() - started

    async def evaluation(metrics: list[str]) -> float:
        started = time.perf_counter()
        await service.evaluate(resolve_evaluate(model, EvaluateRequest(
            images=[image], methods=["gradcam"], metrics=metrics, steps=100)))
        return time.perf_counter() - started

    sizes = [2 ** k for k in range(7)]
    for size in sizes:
        await forwards(size, size)  # allocates for the shape
    per_size = {size: statistics.median([await forwards(100, size) for _ in range(3)])
                for size in sizes}
    best = min(per_size, key=per_size.get)
    print(f"\n2. speed, {MODEL}, one photo, Grad-CAM, 100 steps")
    print("   100 forward passes by batch size: " + ", ".join(
        f"{size}: {seconds * 1000:.0f} ms" for size, seconds in per_size.items())
        + f"; the best: {best}; Evaluate's measured choice: {chosen}")
    print(f"   medians of {REPEATS}, interleaved")
    for metrics, rows in ((["deletion"], 100), (["deletion", "insertion"], 200)):
        await evaluation(metrics)  # warm: the graph
        timed_eval, timed_forward = [], []
        for _ in range(REPEATS):
            timed_eval.append(await evaluation(metrics))
            timed_forward.append(await forwards(rows, best))
        spent, forward = statistics.median(timed_eval), statistics.median(timed_forward)
        print(f"   Evaluate {' + '.join(metrics)} ({(100 + 1) * len(metrics)} copies, with the "
              f"map and decoding): {spent * 1000:.0f} ms; {rows} forward passes at batch "
              f"{best}: {forward * 1000:.0f} ms; ratio {spent / forward:.2f}x")


async def run(args: argparse.Namespace) -> None:
    repository = ModelRepository(ROOT / "models", RuntimeOptions("cpu", args.threads))
    repository.load_all()
    service = GradCamService(repository)
    model = repository.get(MODEL)
    try:
        if not args.skip_speed:
            await speed_section(service, model)
        if not args.skip_metrics:
            print()
            await metrics_section(service, model, args.methods.split(","),
                                  args.metrics.split(","), args.photos, args.road_photos)
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--metrics", default=",".join(
        m for m in faithfulness.METRICS if m != "pointing_game"))
    parser.add_argument("--photos", type=int, default=4, help="1 + scikit-image's (1..6)")
    parser.add_argument("--road-photos", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-metrics", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
