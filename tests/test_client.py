"""The SDK and the asyncio SDK against real servers on port 0 (the `gradcam` command is tested
in test_cli.py).

One plain server and one that wants a bearer token serve a repository made of the shipped
EfficientNet-Lite0 (its files linked into a temporary folder); the sample photo is the input.
A third (`servers.ServerProcess`, with metrics) serves a folder that fails to load and a graph
that can only run inference, to count the attempts of calls that must not be retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from gradcam_client import (
    METHODS,
    AsyncGradCamClient,
    DeadlineError,
    Explanation,
    GradCamClient,
    GradCamError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
    colorize,
    gradient_image,
    overlay,
)
from gradcam_client import protocol
from gradcam_common.overlay import PANEL_GAP, caption_band
from servers import (
    BROKEN_MODEL,
    INFERENCE_ONLY_MODEL,
    ServerProcess,
    errors_counted,
    serving,
    unservable_repository,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "efficientnet_lite0"
MODEL = "efficientnet_lite0"
PHOTO = ROOT / "samples" / "chelsea.jpg"
WIDTH, HEIGHT = 451, 300
EGYPTIAN_CAT, TABBY = 285, 281
EARLIER_LAYER = "/_blocks.15/_swish/Clip_output_0"
TOKEN = "s3cret-token"
NO_SERVER = "127.0.0.1:1"  # nothing listens on port 1
MODEL_SIZE = 224  # the graph's input: what heatmap_size "model" gives
BROKEN, INFERENCE_ONLY = BROKEN_MODEL, INFERENCE_ONLY_MODEL


# --- servers --------------------------------------------------------------------------------


def _start_server(repository: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gradcam_server", "--model-repository", str(repository),
         "--port", "0", "--metrics-port", "-1", *extra],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}; see {log}")
    address = match.group(1)
    with GradCamClient(address) as client:
        client.wait_until_ready(timeout=60)
    return process, address


def _stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    folder = root / MODEL
    folder.mkdir()
    for name in ("model.onnx", "config.json", "labels.txt"):
        (folder / name).symlink_to(MODEL_DIR / name)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, address = _start_server(repository, tmp_path_factory.mktemp("log") / "server.log")
    yield address
    _stop_server(process)


@pytest.fixture(scope="module")
def token_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("log") / "token-server.log"
    process, address = _start_server(repository, log, "--token", TOKEN)
    yield address
    _stop_server(process)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[GradCamClient]:
    with GradCamClient(server) as opened:
        yield opened


@pytest.fixture(scope="module")
def by_path(client: GradCamClient) -> Explanation:
    return client.explain(PHOTO, model=MODEL)


def _photo() -> Image.Image:
    with Image.open(PHOTO) as opened:
        return opened.convert("RGB")


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as opened:
        return opened.size


def _preprocessed() -> np.ndarray:
    """The photo as models/efficientnet_lite0/config.json says: [3, 224, 224] float32."""
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["resize"] == "bilinear" and config["channel_order"] == "RGB"
    height, width = config["size"]
    pixels = np.asarray(_photo().resize((width, height), Image.Resampling.BILINEAR), np.float32)
    mean = np.asarray(config["mean"], np.float32)
    std = np.asarray(config["std"], np.float32)
    normalised = (pixels * np.float32(config["scale"]) - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def _assert_cat(result: Explanation, height: int = HEIGHT, width: int = WIDTH) -> None:
    assert result.model == MODEL and result.method == "gradcam"
    assert result.heatmap.shape == (height, width) and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert result.heatmap.max() > 0.5
    top = result.predictions[0]
    assert (top.class_index, top.label) == (EGYPTIAN_CAT, "Egyptian cat")
    assert top.score == pytest.approx(0.815, abs=0.01)
    assert result.heatmaps[0].class_index == EGYPTIAN_CAT


def _resized(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map resized bilinearly to (width, height), as the server resizes the graph's own."""
    resized = Image.fromarray(heatmap).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _assert_panels(
    canvas: Image.Image, pictures: list[Image.Image], captions: list[list[str]]
) -> None:
    """The canvas is `pictures` in a row, PANEL_GAP apart, each over the caption band of its
    own lines (as test_cli.py checks the pictures of `gradcam explain`)."""
    drawn = np.asarray(canvas)
    height = max(p.height for p in pictures)
    rows = max(len(lines) for lines in captions)
    band_height = caption_band([], 1, height, rows).height
    widths = [p.width for p in pictures]
    assert drawn.shape[:2] == (height + band_height, sum(widths) + PANEL_GAP * (len(widths) - 1))
    left = 0
    for picture, lines in zip(pictures, captions):
        width = picture.width
        np.testing.assert_array_equal(
            drawn[: picture.height, left : left + width], np.asarray(picture)
        )
        band = np.asarray(caption_band(lines, width, height, rows))
        assert (drawn[height:, left : left + width] == band).all(), (left, lines)
        left += width + PANEL_GAP


# --- the SDK --------------------------------------------------------------------------------


def test_client_imports_no_runtime_and_no_server() -> None:
    code = (
        "import sys, gradcam_client, gradcam_client.cli\n"
        "heavy = ('onnx', 'onnxruntime', 'torch', 'gradcam_server')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_explain_a_path(by_path: Explanation) -> None:
    _assert_cat(by_path)
    assert len(by_path.heatmaps) == 1 and len(by_path.predictions) == 5
    scores = [p.score for p in by_path.predictions]
    assert scores == sorted(scores, reverse=True)
    assert by_path.layer == "/_swish_1/Clip_output_0"
    channels = by_path.heatmaps[0].channels
    assert len(channels) == 10 and all(isinstance(c, int) for c, _ in channels)
    weights = [w for _, w in channels]
    assert weights == sorted(weights, reverse=True)
    t = by_path.timings
    assert 0 < t.inference_seconds <= t.total_seconds <= t.round_trip_seconds


@pytest.mark.parametrize(
    "kind", ["str path", "bytes", "PIL image", "HWC uint8 array", "grayscale array"]
)
def test_explain_each_image_kind(client: GradCamClient, by_path: Explanation, kind: str) -> None:
    image = {
        "str path": lambda: str(PHOTO),
        "bytes": PHOTO.read_bytes,
        "PIL image": _photo,
        "HWC uint8 array": lambda: np.asarray(_photo()),
        "grayscale array": lambda: np.asarray(_photo().convert("L")),
    }[kind]()
    result = client.explain(image, model=MODEL)
    assert result.heatmap.shape == (HEIGHT, WIDTH)
    if kind == "grayscale array":
        return  # another picture: only the size must hold
    _assert_cat(result)
    # The same pixels reach the graph (JPEG decoded by the same Pillow; PNG is lossless).
    assert result.predictions[0].score == pytest.approx(by_path.predictions[0].score, abs=1e-5)
    np.testing.assert_allclose(result.heatmap, by_path.heatmap, atol=1e-4)


def test_explain_preprocessed_tensors(client: GradCamClient, by_path: Explanation) -> None:
    tensor = _preprocessed()
    one = client.explain(tensor, model=MODEL)
    assert isinstance(one, Explanation)
    _assert_cat(one, 224, 224)
    assert one.predictions[0].score == pytest.approx(by_path.predictions[0].score, abs=1e-4)
    assert one.image is None

    batch = client.explain(np.stack([tensor, tensor]).astype(np.float64), model=MODEL)
    assert isinstance(batch, list) and len(batch) == 2
    for result in batch:
        _assert_cat(result, 224, 224)
        np.testing.assert_allclose(result.heatmap, one.heatmap, atol=1e-5)


def test_explain_many_keeps_order(client: GradCamClient) -> None:
    small = _photo().resize((96, 64))
    images = [PHOTO, small, _preprocessed()]
    results = client.explain(images, model=MODEL)
    assert [r.heatmap.shape for r in results] == [(HEIGHT, WIDTH), (64, 96), (224, 224)]
    assert isinstance(client.explain([PHOTO], model=MODEL), list)


def test_explain_more_images_than_one_request_holds(client: GradCamClient) -> None:
    count = protocol.IMAGES_PER_REQUEST + 1
    images = [_photo().resize((32 + i, 32)) for i in range(count)]
    results = client.explain(images, model=MODEL, num_predictions=1, num_channels=1)
    assert [r.heatmap.shape for r in results] == [(32, 32 + i) for i in range(count)]
    assert all(len(r.predictions) == 1 and len(r.heatmaps[0].channels) == 1 for r in results)


def test_top_k(client: GradCamClient, by_path: Explanation) -> None:
    result = client.explain(PHOTO, model=MODEL, top_k=3)
    explained = [h.class_index for h in result.heatmaps]
    assert explained == [p.class_index for p in by_path.predictions[:3]]
    assert explained[:2] == [EGYPTIAN_CAT, TABBY]
    assert [h.label for h in result.heatmaps][:2] == ["Egyptian cat", "tabby"]
    np.testing.assert_allclose(result.heatmaps[0].heatmap, by_path.heatmap, atol=1e-5)
    assert all(h.heatmap.shape == (HEIGHT, WIDTH) for h in result.heatmaps)


def test_target_class(client: GradCamClient, by_path: Explanation) -> None:
    result = client.explain(PHOTO, model=MODEL, target_class=TABBY)
    assert [(h.class_index, h.label) for h in result.heatmaps] == [(TABBY, "tabby")]
    assert result.predictions[0].class_index == EGYPTIAN_CAT  # predictions do not change
    assert not np.allclose(result.heatmap, by_path.heatmap, atol=1e-3)


def test_method_names_are_the_servers() -> None:
    from gradcam_server.explain_api import METHOD_NAMES  # the server's table, in this process

    assert {value: name for name, value in protocol.METHOD_OF_NAME.items()} == METHOD_NAMES
    assert METHODS[0] == "gradcam" and "gradcam++" in METHODS


def test_method_and_counterfactual(client: GradCamClient, by_path: Explanation) -> None:
    plus_plus = client.explain(PHOTO, model=MODEL, method="gradcam++")
    assert plus_plus.method == "gradcam++" and plus_plus.heatmap.shape == (HEIGHT, WIDTH)
    assert not np.allclose(plus_plus.heatmap, by_path.heatmap, atol=1e-3)
    against = client.explain(PHOTO, model=MODEL, counterfactual=True)
    assert against.heatmaps[0].class_index == EGYPTIAN_CAT
    assert not np.allclose(against.heatmap, by_path.heatmap, atol=1e-3)
    smooth = client.explain(PHOTO, model=MODEL, eigen_smooth=True)
    assert smooth.heatmap.shape == (HEIGHT, WIDTH) and smooth.heatmap.max() > 0.99
    assert not np.allclose(smooth.heatmap, by_path.heatmap, atol=1e-3)
    augmented = client.explain(PHOTO, model=MODEL, aug_smooth=True)
    assert augmented.heatmap.max() > 0.99
    assert not np.allclose(augmented.heatmap, by_path.heatmap, atol=1e-3)
    probability = client.explain(PHOTO, model=MODEL, score="probability")
    assert not np.allclose(probability.heatmap, by_path.heatmap, atol=1e-4)
    for method in ("ablationcam", "eigencam"):
        other = client.explain(PHOTO, model=MODEL, method=method)
        assert other.method == method and other.heatmap.shape == (HEIGHT, WIDTH)


def test_layer(client: GradCamClient, by_path: Explanation) -> None:
    result = client.explain(PHOTO, model=MODEL, layer=EARLIER_LAYER, method="gradcam")
    assert (result.layer, result.layout) == (EARLIER_LAYER, "nchw")
    assert result.heatmap.shape == (HEIGHT, WIDTH)
    assert not np.allclose(result.heatmap, by_path.heatmap, atol=1e-3)
    fused = client.explain(PHOTO, model=MODEL, layer=[EARLIER_LAYER, by_path.layer])
    assert fused.layer == EARLIER_LAYER and fused.heatmap.max() > 0.99
    assert not np.allclose(fused.heatmap, result.heatmap, atol=1e-3)
    assert not np.allclose(fused.heatmap, by_path.heatmap, atol=1e-3)


def test_overlays(by_path: Explanation) -> None:
    photo = np.asarray(_photo())
    picture = by_path.overlay()
    assert picture.mode == "RGB" and picture.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(by_path.overlay(opacity=0.0)), photo)
    np.testing.assert_array_equal(
        np.asarray(by_path.overlay("turbo", opacity=1.0)), colorize(by_path.heatmap, "turbo")
    )
    jet_picture, turbo_picture = by_path.overlay("jet"), by_path.overlay("turbo")
    assert not np.array_equal(np.asarray(jet_picture), np.asarray(turbo_picture))
    halfway = np.asarray(by_path.overlay(opacity=0.5), dtype=np.int16)
    jet = colorize(by_path.heatmap, "jet").astype(np.int16)
    assert np.abs(2 * halfway - photo.astype(np.int16) - jet).max() <= 1

    score = by_path.predictions[0].score
    _assert_panels(
        by_path.overlay(side_by_side=True),
        [_photo(), picture],
        [["chelsea.jpg", f"{MODEL}, gradcam"], [f"Egyptian cat  {score:.2f}"]],
    )
    with pytest.raises(ValueError, match="opacity"):
        by_path.overlay(opacity=1.5)
    with pytest.raises(ValueError, match="colormap"):
        by_path.overlay("viridis")


def test_overlay_of_a_tensor(client: GradCamClient) -> None:
    result = client.explain(_preprocessed(), model=MODEL)
    alone = result.overlay("turbo")
    np.testing.assert_array_equal(np.asarray(alone), colorize(result.heatmap, "turbo"))
    with pytest.raises(ValueError, match="image="):
        result.overlay(side_by_side=True)
    base = _photo().resize((224, 224))
    _assert_panels(  # no file name to caption the image with
        result.overlay(side_by_side=True, image=base),
        [base, overlay(base, result.heatmap)],
        [[f"{MODEL}, gradcam"], [f"Egyptian cat  {result.predictions[0].score:.2f}"]],
    )


def test_side_by_side_draws_a_captioned_panel_per_class(client: GradCamClient) -> None:
    result = client.explain(PHOTO, model=MODEL, top_k=3)
    assert [h.class_index for h in result.heatmaps][:2] == [EGYPTIAN_CAT, TABBY]
    scores = {p.class_index: p.score for p in result.predictions}
    photo = _photo()
    maps = [h.heatmap for h in result.heatmaps]
    _assert_panels(
        result.overlay("turbo", 0.3, side_by_side=True),
        [photo, *(overlay(photo, m, "turbo", 0.3) for m in maps)],
        [["chelsea.jpg", f"{MODEL}, gradcam"],
         *([f"{h.label}  {scores[h.class_index]:.2f}"] for h in result.heatmaps)],
    )
    # Without the image: the three overlays in a row, uncaptioned; `index` picks one.
    _assert_panels(result.overlay(), [overlay(photo, m) for m in maps], [[], [], []])
    np.testing.assert_array_equal(
        np.asarray(result.overlay(index=1)), np.asarray(overlay(photo, maps[1]))
    )
    _assert_panels(
        result.overlay(side_by_side=True, index=1),
        [photo, overlay(photo, maps[1])],
        [["chelsea.jpg", f"{MODEL}, gradcam"], [f"tabby  {scores[TABBY]:.2f}"]],
    )


def test_side_by_side_captions_what_was_explained(client: GradCamClient) -> None:
    photo = _photo()
    against = client.explain(photo, model=MODEL, counterfactual=True, num_predictions=1)
    assert against.counterfactual
    _assert_panels(  # a PIL image has no file name; "counterfactual" follows the method
        against.overlay(side_by_side=True),
        [photo, overlay(photo, against.heatmap)],
        [[f"{MODEL}, gradcam, counterfactual"],
         [f"Egyptian cat  {against.predictions[0].score:.2f}"]],
    )
    goldfish = client.explain(PHOTO, model=MODEL, target_class=1, num_predictions=1)
    _assert_panels(  # a class outside the predictions returned has no score to show
        goldfish.overlay(side_by_side=True),
        [photo, overlay(photo, goldfish.heatmap)],
        [["chelsea.jpg", f"{MODEL}, gradcam"], ["goldfish"]],
    )


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam"])
def test_pixel_level_maps_are_drawn_as_gradient_images(client: GradCamClient, method: str) -> None:
    result = client.explain(PHOTO, model=MODEL, method=method, heatmap_size="model")
    assert result.method == method and result.heatmap.shape == (MODEL_SIZE, MODEL_SIZE)
    # The signed gradients at the model's input, of which the heatmap is the normalised
    # per-pixel magnitude.
    gradients = result.pixel_gradients
    assert gradients is result.heatmaps[0].pixel_gradients
    assert gradients.dtype == np.float32 and gradients.shape == (3, MODEL_SIZE, MODEL_SIZE)
    assert (gradients > 0).any() and (gradients < 0).any()
    magnitude = np.abs(gradients).max(axis=0)
    low, high = magnitude.min(), magnitude.max()
    np.testing.assert_allclose(result.heatmap, (magnitude - low) / (high - low), atol=1e-5)

    drawn = result.overlay("turbo", opacity=1.0)  # neither plays a part
    assert drawn.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(
        np.asarray(drawn), np.asarray(gradient_image(gradients, size=(WIDTH, HEIGHT)))
    )
    pixels = np.asarray(drawn).astype(int)
    assert (pixels[..., 0] != pixels[..., 1]).any()  # in colour, around mid grey
    assert abs(np.median(pixels) - 128) <= 2
    _assert_panels(
        result.overlay(side_by_side=True),
        [_photo(), drawn],
        [["chelsea.jpg", f"{MODEL}, {method}"],
         [f"Egyptian cat  {result.predictions[0].score:.2f}"]],
    )

    gray = result.overlay(grayscale=True)  # the magnitude, as before
    np.testing.assert_array_equal(
        np.asarray(gray), np.asarray(gradient_image(result.heatmap, size=(WIDTH, HEIGHT)))
    )
    pixels = np.asarray(gray)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    _assert_panels(
        result.overlay(side_by_side=True, grayscale=True),
        [_photo(), gray],
        [["chelsea.jpg", f"{MODEL}, {method}"],
         [f"Egyptian cat  {result.predictions[0].score:.2f}"]],
    )

    alone = client.explain(_preprocessed(), model=MODEL, method=method)  # no image: own size
    np.testing.assert_array_equal(
        np.asarray(alone.overlay()), np.asarray(gradient_image(alone.pixel_gradients))
    )
    np.testing.assert_array_equal(
        np.asarray(alone.overlay(grayscale=True)), np.asarray(gradient_image(alone.heatmap))
    )


def test_dff_returns_each_concepts_score_for_the_class(client: GradCamClient) -> None:
    """The concept scores the graph computes (``concept_scores``) reach the client with the
    map of the concept scoring highest; other methods send none."""
    from gradcam_server.augment import augment_model
    from gradcam_server.augment.names import NAMES
    import zoo

    x = _preprocessed()
    result = client.explain(x, model=MODEL, method="dff", heatmap_size="model")
    session = zoo.ort_session(augment_model(MODEL_DIR / "model.onnx", method="dff")
                              .SerializeToString())
    heatmap, scores = session.run([NAMES.heatmap, NAMES.concept_scores],
                                  {"input": x[None], NAMES.target_class: np.array([-1])})
    (explained,) = result.heatmaps
    assert result.method == "dff" and len(explained.concept_scores) == 5
    np.testing.assert_allclose(explained.concept_scores, scores[0], rtol=1e-4)
    np.testing.assert_allclose(explained.heatmap, heatmap[0], atol=1e-4)
    plain = client.explain(x, model=MODEL, method="gradcam")
    assert plain.heatmaps[0].concept_scores == ()


def test_pixel_level_gradients_per_class(client: GradCamClient) -> None:
    result = client.explain(PHOTO, model=MODEL, method="guided-backprop", top_k=2)
    first, second = (h.pixel_gradients for h in result.heatmaps)
    assert first.shape == second.shape == (3, MODEL_SIZE, MODEL_SIZE)
    assert not np.array_equal(first, second)  # each class's own gradients
    np.testing.assert_array_equal(
        np.asarray(result.overlay(index=1)),
        np.asarray(gradient_image(second, size=(WIDTH, HEIGHT))),
    )


def test_a_server_without_gradients_gets_the_grayscale_magnitude(
    client: GradCamClient, by_path: Explanation
) -> None:
    assert by_path.method == "gradcam" and by_path.pixel_gradients is None  # not pixel-level
    assert all(h.pixel_gradients is None for h in by_path.heatmaps)
    guided = client.explain(PHOTO, model=MODEL, method="guided-backprop")
    older = dataclasses.replace(  # as an older server answers: the magnitude alone
        guided, heatmaps=[dataclasses.replace(h, pixel_gradients=None) for h in guided.heatmaps]
    )
    assert older.pixel_gradients is None
    np.testing.assert_array_equal(
        np.asarray(older.overlay()), np.asarray(guided.overlay(grayscale=True))
    )


# --- heatmap_size ---------------------------------------------------------------------------


def test_heatmap_size(client: GradCamClient, by_path: Explanation) -> None:
    own = client.explain(PHOTO, model=MODEL, heatmap_size="model")
    _assert_cat(own, MODEL_SIZE, MODEL_SIZE)
    assert own.predictions == by_path.predictions
    # The graph's own map: a preprocessed tensor's, whose own size is the model's input size.
    tensor = client.explain(_preprocessed(), model=MODEL)
    np.testing.assert_allclose(own.heatmap, tensor.heatmap, atol=1e-3)
    # Every other size is that map resized, the image's own (the default) too.
    np.testing.assert_allclose(by_path.heatmap, _resized(own.heatmap, (WIDTH, HEIGHT)), atol=1e-6)
    image = client.explain(PHOTO, model=MODEL, heatmap_size="image")
    np.testing.assert_array_equal(image.heatmap, by_path.heatmap)
    for asked in [(64, 48), [64, 48], (np.int64(64), 48), "64x48", " 64 X 48 "]:
        small = client.explain(PHOTO, model=MODEL, heatmap_size=asked)
        assert small.heatmap.shape == (48, 64) and small.heatmap.dtype == np.float32, asked
        np.testing.assert_allclose(small.heatmap, _resized(own.heatmap, (64, 48)), atol=1e-6)
    # Overlays are still drawn at the image's size.
    for result in (own, small):
        np.testing.assert_array_equal(
            np.asarray(result.overlay()), np.asarray(overlay(_photo(), result.heatmap))
        )
    # Every class of every image.
    several = client.explain([PHOTO, _photo().resize((96, 64))], model=MODEL, top_k=2,
                             heatmap_size=(40, 30))
    assert [h.heatmap.shape for r in several for h in r.heatmaps] == [(30, 40)] * 4
    modelled = client.explain([PHOTO, _photo().resize((96, 64))], model=MODEL,
                              heatmap_size="model")
    assert [r.heatmap.shape for r in modelled] == [(MODEL_SIZE, MODEL_SIZE)] * 2


@pytest.mark.parametrize(
    "asked, sent",
    [(None, ""), ("image", "image"), ("Model", "model"), ((224, 224), "224x224"),
     ([640, 480], "640x480"), ((np.int32(3), 2), "3x2"), ("64x48", "64x48"),
     (" 64 X 48 ", "64x48"), ("007x1", "7x1")],
)
def test_heatmap_size_as_sent(asked: object, sent: str) -> None:
    assert protocol.heatmap_size_option(asked) == sent  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    ["", "big", "0x5", "5x0", "5x", "x5", "-3x4", "3.5x4", "5x5x5", "5*5", (0, 5), (5, -1), (5,),
     (5, 5, 5), (1.5, 2), (True, 3), ("5", "5"), 224, {"width": 5, "height": 5}],
)
def test_bad_heatmap_sizes_are_refused_before_sending(bad: object) -> None:
    with GradCamClient(NO_SERVER, retries=0) as unreachable:
        with pytest.raises(InvalidInputError) as caught:
            unreachable.explain(PHOTO, model=MODEL, heatmap_size=bad)  # type: ignore[arg-type]
    assert str(caught.value).startswith("heatmap_size must be 'image', 'model', a (width, ")
    assert caught.value.code is None and isinstance(caught.value, ValueError)


def test_an_answer_over_the_size_limit_is_refused_as_the_server_says(
    client: GradCamClient,
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        client.explain(PHOTO, model=MODEL, heatmap_size=(5000, 4000))  # 76 MiB of float32
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.attempts == 1
    assert str(error) == error.message  # the server's words, as they are
    assert "76.3 MiB, over the limit of 63 MiB" in error.message
    assert "heatmap_size" in error.message
    with pytest.raises(InvalidInputError, match="over the limit of 50000000 pixels"):
        client.explain(PHOTO, model=MODEL, heatmap_size="10000x10000")


def test_models_and_health(client: GradCamClient) -> None:
    statuses = client.list_models()
    assert [(s.name, s.ready, s.reason) for s in statuses] == [(MODEL, True, "")]
    info = client.model_info(MODEL)
    assert info.input_size == (224, 224) and info.num_classes == 1000 and info.has_labels
    assert info.layer == "/_swish_1/Clip_output_0" and info.methods == METHODS
    assert (info.layout, info.prefix_tokens, info.grid) == ("nchw", None, None)
    assert info.explain_error == ""
    assert client.health() == "SERVING"
    assert client.health("gradcam.v1.GradCam") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model(client: GradCamClient) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'") as caught:
        client.explain(PHOTO, model="nope")
    assert isinstance(caught.value, GradCamError) and isinstance(caught.value, LookupError)
    assert caught.value.attempts == 1 and caught.value.code.name == "NOT_FOUND"
    with pytest.raises(ModelNotFoundError):
        client.model_info("nope")


def test_bad_input_from_the_server(client: GradCamClient) -> None:
    with pytest.raises(InvalidInputError, match="image 0") as caught:
        client.explain(b"this is not an image", model=MODEL)
    assert caught.value.code.name == "INVALID_ARGUMENT" and "image 0" in caught.value.message
    with pytest.raises(InvalidInputError, match="out of range"):
        client.explain(PHOTO, model=MODEL, target_class=1000)
    with pytest.raises(InvalidInputError, match="nope"):
        client.explain(PHOTO, model=MODEL, layer="nope")
    with pytest.raises(InvalidInputError):
        client.explain(np.zeros((3, 10, 10), np.float32), model=MODEL)  # not 224 x 224


def test_bad_input_refused_before_sending(client: GradCamClient) -> None:
    with pytest.raises(InvalidInputError, match="not both"):
        client.explain(PHOTO, model=MODEL, target_class=1, top_k=2)
    with pytest.raises(InvalidInputError, match="unknown method"):
        client.explain(PHOTO, model=MODEL, method="nosuchcam")
    with pytest.raises(InvalidInputError, match="uint8 image or a floating-point"):
        client.explain(np.zeros((8, 8, 3), np.int64), model=MODEL)
    with pytest.raises(InvalidInputError, match=r"\[H, W, 3\]"):
        client.explain(np.zeros((8, 8, 5), np.uint8), model=MODEL)
    with pytest.raises(InvalidInputError, match="no image"):
        client.explain([], model=MODEL)
    with pytest.raises(FileNotFoundError):
        client.explain(ROOT / "no-such-photo.jpg", model=MODEL)
    with pytest.raises(TypeError):
        client.explain(42, model=MODEL)  # type: ignore[call-overload]


def test_deadline(client: GradCamClient) -> None:
    with pytest.raises(DeadlineError):
        client.explain(PHOTO, model=MODEL, timeout=1e-4)


class _Refusal(grpc.RpcError):
    """What a stub raises for a failed call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, kind, retried",
    [(grpc.StatusCode.UNAVAILABLE, UnavailableError, True),
     (grpc.StatusCode.FAILED_PRECONDITION, ModelUnavailableError, False),
     (grpc.StatusCode.RESOURCE_EXHAUSTED, ServerBusyError, False),
     (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError, False),
     (grpc.StatusCode.NOT_FOUND, ModelNotFoundError, False),
     (grpc.StatusCode.INTERNAL, GradCamError, False)],
)
def test_only_unavailable_is_retried(
    code: grpc.StatusCode, kind: type[GradCamError], retried: bool
) -> None:
    tries = []

    def refuse(request: object, timeout: float | None, metadata: object) -> None:
        tries.append(timeout)
        raise _Refusal(code, "the server's reason")

    with GradCamClient(NO_SERVER, retries=2, backoff=0.01) as client:
        with pytest.raises(GradCamError) as caught:
            client._call(refuse, None, None)
    assert type(caught.value) is kind and caught.value.code == code
    assert len(tries) == caught.value.attempts == (3 if retried else 1)
    assert "the server's reason" in str(caught.value)


def test_a_full_queue_says_retry_later() -> None:
    assert "queue full: retry later" in " ".join(ServerBusyError.__doc__.split())


def test_no_server_is_unavailable_after_retries() -> None:
    with GradCamClient(NO_SERVER, retries=2, backoff=0.05) as unreachable:
        with pytest.raises(UnavailableError) as caught:
            unreachable.list_models()
        assert caught.value.attempts == 3 and NO_SERVER in str(caught.value)
        with pytest.raises(UnavailableError):
            unreachable.explain(PHOTO, model=MODEL)
        with pytest.raises(DeadlineError, match="not SERVING"):
            unreachable.wait_until_ready(timeout=0.3)
    with GradCamClient(NO_SERVER, retries=0) as once:
        with pytest.raises(UnavailableError) as caught:
            once.health()
        assert caught.value.attempts == 1


def test_token(token_server: str) -> None:
    with GradCamClient(token_server) as anonymous:
        assert anonymous.health() == "SERVING"  # health stays open
        with pytest.raises(UnauthenticatedError, match="bearer token"):
            anonymous.list_models()
        with pytest.raises(UnauthenticatedError):
            anonymous.explain(PHOTO, model=MODEL)
    with GradCamClient(token_server, token="wrong") as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.list_models()
    with GradCamClient(token_server, token=TOKEN) as authorised:
        _assert_cat(authorised.explain(PHOTO, model=MODEL))


def test_tls_options_are_checked() -> None:
    with pytest.raises(ValueError, match="client_certificate and client_key"):
        GradCamClient("127.0.0.1:1", client_certificate=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match="tls=False"):
        GradCamClient("127.0.0.1:1", tls=False, root_certificates=b"-----BEGIN CERTIFICATE-----")


# --- models that cannot answer --------------------------------------------------------------

RETRY_BACKOFF = 2.0  # seconds before a first retry (0.8 to 1.2 times it): were one made, seen


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The two folders of `servers.unservable_repository`."""
    root = tmp_path_factory.mktemp("broken")
    with serving(unservable_repository(root / "repository"), root / "server.log") as server:
        yield server


def _assert_not_retried(error: GradCamError, seconds: float, *fragments: str) -> None:
    assert isinstance(error, ModelUnavailableError) and not isinstance(error, UnavailableError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.attempts == 1
    assert str(error) == error.message
    for fragment in fragments:
        assert fragment in error.message, error.message
    assert seconds < 0.75 * RETRY_BACKOFF  # no retry waited for


def test_a_model_that_cannot_answer_raises_at_once(broken_server: ServerProcess) -> None:
    before = errors_counted(broken_server, "FAILED_PRECONDITION")
    with GradCamClient(broken_server.address, retries=3, backoff=RETRY_BACKOFF) as client:
        statuses = {s.name: s for s in client.list_models()}
        assert not statuses[BROKEN].ready and statuses[INFERENCE_ONLY].ready
        for model, fragments in [
            (BROKEN, (f"model '{BROKEN}' failed to load",)),
            (INFERENCE_ONLY, ("serves inference only", "Det")),
        ]:
            started = time.monotonic()
            with pytest.raises(GradCamError) as caught:
                client.explain(PHOTO, model=model)
            _assert_not_retried(caught.value, time.monotonic() - started, *fragments)
        started = time.monotonic()
        with pytest.raises(GradCamError) as caught:
            client.model_info(BROKEN)
        _assert_not_retried(caught.value, time.monotonic() - started, "failed to load")
        info = client.model_info(INFERENCE_ONLY)
        assert "Det" in info.explain_error and info.methods == ()
    assert errors_counted(broken_server, "FAILED_PRECONDITION") == before + 3  # one attempt each


def test_a_model_that_cannot_answer_raises_at_once_asyncio(broken_server: ServerProcess) -> None:
    async def scenario() -> None:
        address = broken_server.address
        async with AsyncGradCamClient(address, retries=3, backoff=RETRY_BACKOFF) as client:
            for model, fragment in [(BROKEN, "failed to load"),
                                    (INFERENCE_ONLY, "serves inference only")]:
                started = time.monotonic()
                with pytest.raises(GradCamError) as caught:
                    await client.explain(PHOTO, model=model)
                _assert_not_retried(caught.value, time.monotonic() - started, fragment)
            assert "Det" in (await client.model_info(INFERENCE_ONLY)).explain_error

    before = errors_counted(broken_server, "FAILED_PRECONDITION")
    asyncio.run(scenario())
    assert errors_counted(broken_server, "FAILED_PRECONDITION") == before + 2


# --- the asyncio SDK ------------------------------------------------------------------------


def test_async_client(server: str, token_server: str) -> None:
    async def scenario() -> None:
        async with AsyncGradCamClient(server) as client:
            one = await client.explain(PHOTO, model=MODEL, top_k=2)
            _assert_cat(one)
            assert [h.class_index for h in one.heatmaps] == [EGYPTIAN_CAT, TABBY]
            assert one.overlay(side_by_side=True).width == 3 * WIDTH + 2 * PANEL_GAP

            own = await client.explain(PHOTO, model=MODEL, top_k=2, heatmap_size="model")
            assert [h.heatmap.shape for h in own.heatmaps] == [(MODEL_SIZE, MODEL_SIZE)] * 2
            np.testing.assert_allclose(
                one.heatmap, _resized(own.heatmap, (WIDTH, HEIGHT)), atol=1e-6
            )
            small = await client.explain([PHOTO, PHOTO], model=MODEL, heatmap_size="64x48")
            assert [r.heatmap.shape for r in small] == [(48, 64)] * 2
            np.testing.assert_allclose(small[1].heatmap, _resized(own.heatmap, (64, 48)),
                                       atol=1e-6)
            assert small[0].overlay().size == (WIDTH, HEIGHT)
            with pytest.raises(InvalidInputError, match="heatmap_size") as caught:
                await client.explain(PHOTO, model=MODEL, heatmap_size=(0, 48))
            assert caught.value.code is None

            count = protocol.IMAGES_PER_REQUEST + 2  # two requests, run concurrently
            many = await client.explain(
                [PHOTO.read_bytes(), np.asarray(_photo()), _preprocessed()] * (count // 3 + 1),
                model=MODEL,
            )
            assert len(many) == 3 * (count // 3 + 1)
            shapes = [r.heatmap.shape for r in many[:3]]
            assert shapes == [(HEIGHT, WIDTH), (HEIGHT, WIDTH), (224, 224)]
            assert all(r.predictions[0].class_index == EGYPTIAN_CAT for r in many)

            assert [s.name for s in await client.list_models()] == [MODEL]
            assert (await client.model_info(MODEL)).num_classes == 1000
            assert await client.health() == "SERVING"
            await client.wait_until_ready(timeout=5)
            with pytest.raises(ModelNotFoundError):
                await client.explain(PHOTO, model="nope")
            with pytest.raises(InvalidInputError):
                await client.explain(b"not an image", model=MODEL)
            with pytest.raises(DeadlineError):
                await client.explain(PHOTO, model=MODEL, timeout=1e-4)

        async with AsyncGradCamClient(NO_SERVER, retries=1, backoff=0.05) as unreachable:
            with pytest.raises(UnavailableError) as caught:
                await unreachable.list_models()
            assert caught.value.attempts == 2

        async with AsyncGradCamClient(token_server) as anonymous:
            with pytest.raises(UnauthenticatedError):
                await anonymous.list_models()
        async with AsyncGradCamClient(token_server, token=TOKEN) as authorised:
            assert (await authorised.list_models())[0].ready

    asyncio.run(scenario())
