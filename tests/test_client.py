"""The SDK and the asyncio SDK against real servers on port 0 (the `gradcam` command is tested
in test_cli.py).

One plain server and one that wants a bearer token serve a repository made of the shipped
EfficientNet-Lite0 (its files linked into a temporary folder); the sample photo is the input.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
    UnauthenticatedError,
    UnavailableError,
    colorize,
)
from gradcam_client import client as client_module

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "efficientnet_lite0"
MODEL = "efficientnet_lite0"
PHOTO = ROOT / "samples" / "chelsea.jpg"
WIDTH, HEIGHT = 451, 300
EGYPTIAN_CAT, TABBY = 285, 281
EARLIER_LAYER = "/_blocks.15/_swish/Clip_output_0"
TOKEN = "s3cret-token"
NO_SERVER = "127.0.0.1:1"  # nothing listens on port 1


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
    count = client_module.IMAGES_PER_REQUEST + 1
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

    assert {value: name for name, value in client_module.METHOD_OF_NAME.items()} == METHOD_NAMES
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
    assert result.layer == EARLIER_LAYER
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

    panel = by_path.overlay(side_by_side=True)
    assert panel.width == 2 * WIDTH and panel.height > HEIGHT  # a caption band below
    np.testing.assert_array_equal(np.asarray(panel)[:HEIGHT, :WIDTH], photo)
    np.testing.assert_array_equal(np.asarray(panel)[:HEIGHT, WIDTH:], np.asarray(picture))
    assert by_path._captions(0)[0] == f"{by_path.predictions[0].score:.2f}  Egyptian cat"
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
    assert result.overlay(side_by_side=True, image=base).width == 448


def test_models_and_health(client: GradCamClient) -> None:
    statuses = client.list_models()
    assert [(s.name, s.ready, s.reason) for s in statuses] == [(MODEL, True, "")]
    info = client.model_info(MODEL)
    assert info.input_size == (224, 224) and info.num_classes == 1000 and info.has_labels
    assert info.layer == "/_swish_1/Clip_output_0" and info.methods == METHODS
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
        client.explain(PHOTO, model=MODEL, method="fullgrad")
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


# --- the asyncio SDK ------------------------------------------------------------------------


def test_async_client(server: str, token_server: str) -> None:
    async def scenario() -> None:
        async with AsyncGradCamClient(server) as client:
            one = await client.explain(PHOTO, model=MODEL, top_k=2)
            _assert_cat(one)
            assert [h.class_index for h in one.heatmaps] == [EGYPTIAN_CAT, TABBY]
            assert one.overlay(side_by_side=True).width == 2 * WIDTH

            count = client_module.IMAGES_PER_REQUEST + 2  # two requests, run concurrently
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
