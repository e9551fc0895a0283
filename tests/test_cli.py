"""The `gradcam` command against real servers on port 0 (`servers.ServerProcess`).

The servers serve the shipped EfficientNet-Lite0 (its files linked into a temporary folder) and
the sample photo is the input; one more serves a folder that fails to load and a graph that can
only run inference. Pictures are checked pixel by pixel: each panel against the map
it should show, drawn here from the heatmaps the same run saved, and each caption against the
band its expected text gives.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_client import METHODS, GradCamClient, cli
from gradcam_common.overlay import PANEL_GAP, caption_band, gradient_image, overlay
from servers import (
    BROKEN_MODEL,
    INFERENCE_ONLY_MODEL,
    ServerProcess,
    errors_counted,
    link_lite0,
    serving,
    unservable_repository,
)
from test_shipped_model import CAT_FACE

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"
PHOTO = ROOT / "samples" / "chelsea.jpg"
WIDTH, HEIGHT = 451, 300
EGYPTIAN_CAT, TABBY, GOLDFISH = 285, 281, 1
TOKEN = "s3cret-token"
SECOND_MODEL = "lite0_again"
NO_SERVER = "127.0.0.1:1"  # nothing listens on port 1
MODEL_SIZE = 224  # the graph's input: what --heatmap-size model gives
BROKEN, INFERENCE_ONLY = BROKEN_MODEL, INFERENCE_ONLY_MODEL


# --- servers --------------------------------------------------------------------------------


def _serve(root: Path, *args: str, models: tuple[str, ...] = (MODEL,)) -> Iterator[str]:
    for name in models:
        link_lite0(root / "repository" / name)
    with serving(root / "repository", root / "server.log", *args) as server:
        yield server.address


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Wants a bearer token, and serves the model under two names."""
    yield from _serve(tmp_path_factory.mktemp("token"), "--token", TOKEN,
                      models=(MODEL, SECOND_MODEL))


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The two folders of `servers.unservable_repository`."""
    root = tmp_path_factory.mktemp("broken")
    with serving(unservable_repository(root / "repository"), root / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def scores(server: str) -> dict[int, float]:
    """Every class's score for the photo, asked of the SDK."""
    with GradCamClient(server) as client:
        result = client.explain(PHOTO, model=MODEL, num_predictions=1000)
    return {p.class_index: p.score for p in result.predictions}


# --- helpers --------------------------------------------------------------------------------


def _gradcam(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradcam_client", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("GRADCAM_SERVER", "GRADCAM_TOKEN")},
    )


def _explain(server: str, *args: str | Path) -> subprocess.CompletedProcess:
    done = _gradcam("explain", *args, "--server", server, "--model", MODEL)
    assert done.returncode == 0, done.stderr
    return done


def _assert_one_line_failure(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradcam: error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def _photo() -> Image.Image:
    with Image.open(PHOTO) as opened:
        return opened.convert("RGB")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as written:
        assert written.format == "PNG"
        return np.asarray(written.convert("RGB"))


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as opened:
        return opened.size


def _assert_panels(
    canvas: np.ndarray, pictures: list[np.ndarray], captions: list[list[str]]
) -> None:
    """The canvas is `pictures` in a row, PANEL_GAP apart, each over the caption band of its
    own lines."""
    height = max(p.shape[0] for p in pictures)
    rows = max(len(lines) for lines in captions)
    band_height = caption_band([], 1, height, rows).height
    widths = [p.shape[1] for p in pictures]
    assert canvas.shape[:2] == (height + band_height, sum(widths) + PANEL_GAP * (len(widths) - 1))
    left = 0
    for picture, lines in zip(pictures, captions):
        width = picture.shape[1]
        np.testing.assert_array_equal(canvas[: picture.shape[0], left : left + width], picture)
        band = np.asarray(caption_band(lines, width, height, rows))
        drawn = canvas[height:, left : left + width]
        assert (drawn == band).all(), f"the caption under panel at x={left} is not {lines}"
        left += width + PANEL_GAP


def _label(class_index: int) -> str:
    return (ROOT / "models" / MODEL / "labels.txt").read_text().splitlines()[class_index]


# --- one image ------------------------------------------------------------------------------


def test_one_image(server: str, tmp_path: Path) -> None:
    picture, heatmap = tmp_path / "overlay.png", tmp_path / "heatmap.npy"
    done = _explain(server, PHOTO, "-o", picture, "--save-npy", heatmap,
                    "--colormap", "turbo", "--opacity", "0.3")
    assert done.stdout == f"{PHOTO}: Egyptian cat (0.81) -> {picture}\n"
    saved = np.load(heatmap)
    assert saved.dtype == np.float32 and saved.shape == (HEIGHT, WIDTH)
    assert 0.0 <= saved.min() and saved.max() <= 1.0
    expected = np.asarray(overlay(_photo(), saved, "turbo", 0.3))
    np.testing.assert_array_equal(_pixels(picture), expected)


def test_without_output_the_prediction_is_printed(server: str) -> None:
    done = _explain(server, PHOTO, "--target-class", str(TABBY))
    assert done.stdout == f"{PHOTO}: Egyptian cat (0.81); heatmap of tabby\n"


def test_missing_output_folders_are_made(server: str, tmp_path: Path) -> None:
    picture, heatmap = tmp_path / "out" / "cat.png", tmp_path / "maps" / "deep" / "cat.npy"
    _explain(server, PHOTO, "-o", picture, "--save-npy", heatmap)
    assert _size(picture) == (WIDTH, HEIGHT) and np.load(heatmap).shape == (HEIGHT, WIDTH)


def test_top_k_side_by_side_draws_a_captioned_panel_per_class(
    server: str, tmp_path: Path, scores: dict[int, float]
) -> None:
    picture, heatmaps = tmp_path / "panel.png", tmp_path / "maps.npy"
    done = _explain(server, PHOTO, "--top-k", "3", "--side-by-side", "-o", picture,
                    "--save-npy", heatmaps)
    assert done.stdout == (
        f"{PHOTO}: Egyptian cat (0.81); heatmaps of Egyptian cat, tabby, tiger cat -> {picture}\n"
    )
    maps = np.load(heatmaps)
    assert maps.shape == (3, HEIGHT, WIDTH)
    photo = _photo()
    classes = [EGYPTIAN_CAT, TABBY, 282]
    _assert_panels(
        _pixels(picture),
        [np.asarray(photo), *(np.asarray(overlay(photo, m)) for m in maps)],
        [["chelsea.jpg", f"{MODEL}, gradcam"],
         *([f"{_label(c)}  {scores[c]:.2f}"] for c in classes)],
    )


def test_top_1_side_by_side_captions_the_one_class_explained(
    server: str, tmp_path: Path, scores: dict[int, float]
) -> None:
    picture, heatmap = tmp_path / "panel.png", tmp_path / "map.npy"
    _explain(server, PHOTO, "--top-k", "1", "--side-by-side", "--counterfactual",
             "-o", picture, "--save-npy", heatmap)
    photo = _photo()
    _assert_panels(
        _pixels(picture),
        [np.asarray(photo), np.asarray(overlay(photo, np.load(heatmap)))],
        [["chelsea.jpg", f"{MODEL}, gradcam, counterfactual"],
         [f"Egyptian cat  {scores[EGYPTIAN_CAT]:.2f}"]],
    )


def test_a_chosen_class_is_captioned_with_its_score_wherever_it_ranks(
    server: str, tmp_path: Path, scores: dict[int, float]
) -> None:
    assert sorted(scores, key=scores.get, reverse=True).index(GOLDFISH) >= 5
    picture, heatmap = tmp_path / "panel.png", tmp_path / "map.npy"
    done = _explain(server, PHOTO, "--target-class", str(GOLDFISH), "--side-by-side",
                    "-o", picture, "--save-npy", heatmap)
    assert "; heatmap of goldfish" in done.stdout
    photo = _photo()
    _assert_panels(
        _pixels(picture),
        [np.asarray(photo), np.asarray(overlay(photo, np.load(heatmap)))],
        [["chelsea.jpg", f"{MODEL}, gradcam"], [f"goldfish  {scores[GOLDFISH]:.2f}"]],
    )


def test_top_k_without_side_by_side_puts_the_overlays_in_a_row(
    server: str, tmp_path: Path
) -> None:
    picture, heatmaps = tmp_path / "row.png", tmp_path / "maps.npy"
    _explain(server, PHOTO, "--top-k", "2", "-o", picture, "--save-npy", heatmaps)
    canvas = _pixels(picture)
    assert canvas.shape == (HEIGHT, 2 * WIDTH + PANEL_GAP, 3)
    for index, heatmap in enumerate(np.load(heatmaps)):
        left = index * (WIDTH + PANEL_GAP)
        expected = np.asarray(overlay(_photo(), heatmap))
        np.testing.assert_array_equal(canvas[:, left : left + WIDTH], expected)


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam"])
def test_pixel_level_methods_are_drawn_as_gradient_images(
    server: str, tmp_path: Path, method: str, scores: dict[int, float]
) -> None:
    picture, heatmap, panel = tmp_path / "map.png", tmp_path / "map.npy", tmp_path / "panel.png"
    _explain(server, PHOTO, "--method", method, "-o", picture, "--save-npy", heatmap)
    # The heatmap as before, and beside it the signed gradients at the model's input.
    saved = np.load(heatmap)
    assert saved.dtype == np.float32 and saved.shape == (HEIGHT, WIDTH)
    gradients = np.load(tmp_path / "map.gradients.npy")
    assert gradients.dtype == np.float32 and gradients.shape == (3, MODEL_SIZE, MODEL_SIZE)
    assert (gradients > 0).any() and (gradients < 0).any()
    # Drawn as the Grad-CAM paper does: the gradients in colour, at the photo's size.
    drawn = _pixels(picture)
    np.testing.assert_array_equal(
        drawn, np.asarray(gradient_image(gradients, size=(WIDTH, HEIGHT)))
    )
    assert (drawn[..., 0] != drawn[..., 1]).any()
    _explain(server, PHOTO, "--method", method, "--side-by-side", "-o", panel)
    _assert_panels(
        _pixels(panel),
        [np.asarray(_photo()), drawn],
        [["chelsea.jpg", f"{MODEL}, {method}"], [f"Egyptian cat  {scores[EGYPTIAN_CAT]:.2f}"]],
    )

    gray, gray_panel = tmp_path / "gray.png", tmp_path / "gray-panel.png"
    _explain(server, PHOTO, "--method", method, "--grayscale", "-o", gray)
    drawn = _pixels(gray)
    np.testing.assert_array_equal(drawn, np.asarray(gradient_image(saved)))
    assert (drawn[..., 0] == drawn[..., 1]).all() and (drawn[..., 1] == drawn[..., 2]).all()
    # Not a faint tint over the photo: the strongest percent is white, and the median pixel
    # a visible grey, where scaling by the maximum left it near black.
    assert (drawn[..., 0] == 255).mean() >= 0.009
    assert np.median(drawn[..., 0]) > 2.5 * np.median(saved) * 255
    _explain(server, PHOTO, "--method", method, "--grayscale", "--side-by-side", "-o", gray_panel)
    _assert_panels(
        _pixels(gray_panel),
        [np.asarray(_photo()), drawn],
        [["chelsea.jpg", f"{MODEL}, {method}"], [f"Egyptian cat  {scores[EGYPTIAN_CAT]:.2f}"]],
    )


def test_save_npy_writes_gradients_for_pixel_level_methods_only(
    server: str, tmp_path: Path
) -> None:
    _explain(server, PHOTO, "--method", "guided-backprop", "--top-k", "2",
             "--save-npy", tmp_path / "top2")  # np.save adds .npy
    assert np.load(tmp_path / "top2.npy").shape == (2, HEIGHT, WIDTH)
    assert np.load(tmp_path / "top2.gradients.npy").shape == (2, 3, MODEL_SIZE, MODEL_SIZE)
    _explain(server, PHOTO, "--save-npy", tmp_path / "gradcam.npy")  # Grad-CAM: no gradients
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gradcam.npy", "top2.gradients.npy", "top2.npy"
    ]
    images, folder = tmp_path / "images", tmp_path / "maps"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(PHOTO, images / name)
    _explain(server, images, "--method", "guided-gradcam", "--save-npy", folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.gradients.npy", "a.npy", "b.gradients.npy", "b.npy"
    ]


def test_heatmap_size_sets_the_saved_maps_and_not_the_picture(
    server: str, tmp_path: Path, scores: dict[int, float]
) -> None:
    picture, heatmap = tmp_path / "small.png", tmp_path / "small.npy"
    _explain(server, PHOTO, "--heatmap-size", "64x48", "-o", picture, "--save-npy", heatmap)
    saved = np.load(heatmap)
    assert saved.dtype == np.float32 and saved.shape == (48, 64)
    np.testing.assert_array_equal(_pixels(picture), np.asarray(overlay(_photo(), saved)))

    panel, heatmaps = tmp_path / "panel.png", tmp_path / "maps.npy"
    _explain(server, PHOTO, "--heatmap-size", "model", "--top-k", "3", "--side-by-side",
             "-o", panel, "--save-npy", heatmaps)
    maps = np.load(heatmaps)
    assert maps.shape == (3, MODEL_SIZE, MODEL_SIZE)
    photo = _photo()
    _assert_panels(
        _pixels(panel),
        [np.asarray(photo), *(np.asarray(overlay(photo, m)) for m in maps)],
        [["chelsea.jpg", f"{MODEL}, gradcam"],
         *([f"{_label(c)}  {scores[c]:.2f}"] for c in (EGYPTIAN_CAT, TABBY, 282))],
    )
    # The graph's own map, at the model's input size: the image-size map is that, resized.
    image_size = tmp_path / "image.npy"
    _explain(server, PHOTO, "--heatmap-size", "image", "--save-npy", image_size)
    resized = Image.fromarray(maps[0]).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(np.load(image_size), np.clip(resized, 0, 1), atol=1e-6)


def test_a_pixel_level_map_of_another_size_is_drawn_at_the_images(
    server: str, tmp_path: Path
) -> None:
    picture, heatmap = tmp_path / "map.png", tmp_path / "map.npy"
    _explain(server, PHOTO, "--method", "guided-backprop", "--heatmap-size", "model",
             "-o", picture, "--save-npy", heatmap)
    saved = np.load(heatmap)
    assert saved.shape == (MODEL_SIZE, MODEL_SIZE)
    # The gradients come at the model's input size whatever --heatmap-size says.
    gradients = np.load(tmp_path / "map.gradients.npy")
    expected = gradient_image(gradients, size=(WIDTH, HEIGHT))
    np.testing.assert_array_equal(_pixels(picture), np.asarray(expected))
    _explain(server, PHOTO, "--method", "guided-backprop", "--heatmap-size", "model",
             "--grayscale", "-o", picture)
    expected = gradient_image(saved, size=(WIDTH, HEIGHT))
    np.testing.assert_array_equal(_pixels(picture), np.asarray(expected))


@pytest.mark.parametrize("bad", ["big", "0x48", "64x", "64*48", "64x48x3"])
def test_a_bad_heatmap_size_is_a_usage_error(bad: str) -> None:
    done = _gradcam("explain", PHOTO, "--server", NO_SERVER, "--model", MODEL,
                    "--heatmap-size", bad)  # refused before the (unreachable) server is asked
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "gradcam explain: error: argument --heatmap-size: image, model or WIDTHxHEIGHT with "
        f"positive sides (e.g. 224x224), not {bad!r}"
    )


def test_an_answer_over_the_size_limit_is_refused_as_the_server_says(server: str) -> None:
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", MODEL,
                 "--heatmap-size", "5000x4000"),
        "the response would hold 76.3 MiB, over the limit of 63 MiB per response",
        "heatmap_size",
    )


# --- several images -------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(PHOTO.read_bytes())
    _photo().resize((120, 80)).save(folder / "small.png")
    _photo().convert("L").save(folder / "gray.bmp")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder(server: str, tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    done = _explain(server, images, "-o", out, "--save-npy", tmp_path / "maps")
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [
        str(images / name) for name in ("cat.jpg", "gray.bmp", "small.png")
    ]
    assert lines[0] == f"{images / 'cat.jpg'}: Egyptian cat (0.81) -> {out / 'cat.png'}"
    assert lines[-1] == "3 images explained, 0 failed"
    assert "] 1/3 " in done.stderr and f"[{'#' * 24}] 3/3" in done.stderr  # the progress bar
    sizes = {path.name: _size(path) for path in out.iterdir()}
    assert sizes == {
        "cat.png": (WIDTH, HEIGHT), "small.png": (120, 80), "gray.png": (WIDTH, HEIGHT)
    }
    assert np.load(tmp_path / "maps" / "small.npy").shape == (80, 120)


def test_folder_without_output_prints_each_top_prediction(server: str, images: Path) -> None:
    done = _explain(server, images)
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "3 images explained, 0 failed"
    assert lines[0] == f"{images / 'cat.jpg'}: Egyptian cat (0.81)"
    for line, name in zip(lines[1:3], ("gray.bmp", "small.png")):
        assert re.fullmatch(rf"{re.escape(str(images / name))}: [^()]+ \(\d\.\d\d\)", line), line


def test_summary_csv(server: str, tmp_path: Path, images: Path) -> None:
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    summary = tmp_path / "reports" / "summary.csv"
    done = _gradcam("explain", images, "--server", server, "--model", MODEL, "--top-k", "2",
                    "--summary", summary, "-o", tmp_path / "out")
    assert done.returncode == 1 and "skipped" in done.stderr
    with summary.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [Path(row["image"]).name for row in rows] == [
        "broken.jpg", "cat.jpg", "gray.bmp", "small.png"
    ]
    broken, cat = rows[0], rows[1]
    assert broken["error"] and broken["label"] == "" and broken["overlay"] == ""
    assert (cat["class_index"], cat["label"]) == (str(EGYPTIAN_CAT), "Egyptian cat")
    assert float(cat["score"]) == pytest.approx(0.815, abs=0.01)
    assert cat["explained_classes"] == f"{EGYPTIAN_CAT};{TABBY}"
    assert cat["explained_labels"] == "Egyptian cat;tabby"
    assert (cat["model"], cat["method"], cat["error"]) == (MODEL, "gradcam", "")
    assert cat["overlay"] == str(tmp_path / "out" / "cat.png") and cat["heatmap"] == ""
    assert all(row["error"] == "" and row["label"] for row in rows[1:])


def test_summary_json(server: str, tmp_path: Path, scores: dict[int, float]) -> None:
    summary = tmp_path / "summary.json"
    _explain(server, PHOTO, "--target-class", str(GOLDFISH), "--summary", summary,
             "--save-npy", tmp_path / "map.npy")
    (record,) = json.loads(summary.read_text())["images"]
    assert record["image"] == str(PHOTO)
    assert (record["model"], record["method"], record["error"]) == (MODEL, "gradcam", None)
    assert [p["label"] for p in record["predictions"]][:3] == ["Egyptian cat", "tabby", "tiger cat"]
    assert len(record["predictions"]) == 5
    (explained,) = record["explained"]
    assert (explained["class_index"], explained["label"]) == (GOLDFISH, "goldfish")
    assert explained["score"] == pytest.approx(scores[GOLDFISH], rel=1e-6)
    assert record["overlay"] is None and record["heatmap"] == str(tmp_path / "map.npy")


def test_summary_needs_a_csv_or_json_name(tmp_path: Path) -> None:
    done = _gradcam("explain", PHOTO, "--model", MODEL, "--summary", tmp_path / "summary.txt")
    assert done.returncode == 2 and "end its name with .csv or .json" in done.stderr


def test_several_files_with_a_bad_one(server: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    done = _gradcam("explain", PHOTO, broken, "--server", server, "--model", MODEL, "-o", out)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{PHOTO}: Egyptian cat (0.81) -> {out / 'chelsea.png'}", "1 image explained, 1 failed"
    ]
    assert f"skipped {broken}" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir()] == ["chelsea.png"]


# --- signs of life --------------------------------------------------------------------------


def _run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_quick_request_shows_nothing(server: str, capsys) -> None:
    code, out, err = _run_in_process(
        ["explain", str(PHOTO), "--server", server, "--model", MODEL], capsys
    )
    assert code == 0 and err == "" and out.startswith(f"{PHOTO}: Egyptian cat")


# Integrated Grad-CAM runs 20 copies of the image: a few tenths of a second here, the
# slow requests of these tests (the CLI waits SIGN_OF_LIFE_SECONDS, 2 s, before showing them).
SLOW_METHOD = "integrated-gradcam"


def test_a_slow_request_says_it_is_still_working(server: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "SIGN_OF_LIFE_SECONDS", 0.05)
    code, out, err = _run_in_process(
        ["explain", str(PHOTO), str(PHOTO), "--server", server, "--model", MODEL,
         "--method", SLOW_METHOD],
        capsys,
    )
    assert code == 0 and out.splitlines()[-1] == "2 images explained, 0 failed"
    said = [line for line in err.replace("\r", "\n").splitlines() if "still working" in line]
    assert len(said) == 1, err  # once for the whole run
    assert re.fullmatch(
        rf"gradcam: still working on chelsea\.jpg \({SLOW_METHOD}\), \d+ s so far",
        said[0].rstrip(),
    )


class _Terminal:
    """A pseudo-terminal standing in for stderr, drained while the CLI writes to it.

    The kernel buffers only about 15 KB between a pty's two ends; a spinner on a long request
    writes more than that, and would block on a full buffer if nobody read it as it went.
    """

    def __init__(self) -> None:
        self._master, slave = os.openpty()
        self.stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), write_through=True)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the other end is closed and everything was read
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def close(self) -> str:
        """Closes the terminal and returns everything written to it."""
        self.stream.close()
        self._reader.join(timeout=10)
        os.close(self._master)
        return b"".join(self._chunks).decode()


@pytest.fixture
def terminal() -> Iterator[_Terminal]:
    """A drained pseudo-terminal; the test puts it in as stderr (capture would undo a fixture's)."""
    term = _Terminal()
    yield term
    if not term.stream.closed:
        term.close()


def test_a_slow_request_spins_on_a_terminal(server: str, monkeypatch, capsys, terminal) -> None:
    monkeypatch.setattr(cli, "SIGN_OF_LIFE_SECONDS", 0.0)
    monkeypatch.setattr(cli, "SPINNER_INTERVAL_SECONDS", 0.005)
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    assert sys.stderr.isatty()
    code = cli.main(["explain", str(PHOTO), "--server", server, "--model", MODEL,
                     "--method", SLOW_METHOD])
    written = terminal.close()
    assert code == 0
    assert capsys.readouterr().out == f"{PHOTO}: Egyptian cat (0.81)\n"
    frames = [frame for frame in written.split("\r") if frame.strip()]
    assert len(frames) >= 3, written
    for frame in frames:
        assert re.fullmatch(
            rf"[|/\\-] explaining {re.escape(str(PHOTO))} \({SLOW_METHOD}\)  \d+ s *", frame
        ), frame
    assert len({frame[0] for frame in frames}) > 1  # it turns
    assert written.endswith("\r" + " " * len(frames[-1].rstrip()) + "\r")  # and is wiped


def test_score_cam_spins_with_the_servers_progress(server: str, monkeypatch, capsys,
                                                  terminal) -> None:
    monkeypatch.setattr(cli, "SIGN_OF_LIFE_SECONDS", 0.0)
    monkeypatch.setattr(cli, "SPINNER_INTERVAL_SECONDS", 0.05)
    monkeypatch.setattr(sys, "stderr", terminal.stream)
    code = cli.main(["explain", str(PHOTO), "--server", server, "--model", MODEL,
                     "--method", "scorecam"])
    written = terminal.close()
    assert code == 0, capsys.readouterr().err
    told = [re.fullmatch(rf"[|/\\-] explaining {re.escape(str(PHOTO))} \(scorecam\)  \d+ s"
                         r"  (\d+)/(\d+) masked passes, about \d+ s left *", frame)
            for frame in written.split("\r") if frame.strip()]
    passes = [(int(m[1]), int(m[2])) for m in told if m]
    assert passes, written
    assert [done for done, _ in passes] == sorted(done for done, _ in passes)
    assert all(0 < done <= total for done, total in passes)


def test_help_states_each_methods_cost_as_measured() -> None:
    done = _gradcam("explain", "--help")
    assert done.returncode == 0
    costs = done.stdout[done.stdout.index("time per image against Grad-CAM's"):]
    for method in METHODS:
        assert re.search(rf"(^|[ ,]){re.escape(method)}([ ,]|$)", costs, re.M), method
    benchmarks = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for measured, shown in [("| gradcam | 40.8 ms |", "40.8 ms"),
                            ("| guided-backprop | 145.9 ms |", "143-146 ms"),
                            ("| guided-gradcam | 143.2 ms |", "143-146 ms"),
                            ("| 0.923 s |", "0.92 s"), ("| 89.0 s |", "89 s")]:
        assert measured in benchmarks and shown in costs, (measured, shown)


def test_eval_prints_a_table_and_writes_curves_and_values(server: str, tmp_path: Path) -> None:
    face = ",".join(str(v) for v in CAT_FACE)
    done = _gradcam("eval", PHOTO, "--server", server, "--model", MODEL,
                    "--methods", "gradcam,layercam", "--steps", "10",
                    "--metrics", "deletion,insertion,pointing_game", "--box", face,
                    "--json", tmp_path / "values.json", "--plot", tmp_path / "curves.png")
    assert done.returncode == 0, done.stderr
    header, rule, *rows = done.stdout.splitlines()[1:5]
    assert header.split() == ["method", "deletion", "(-)", "insertion", "(+)",
                              "pointing_game", "(+)"]
    assert [row.split()[0] for row in rows] == ["gradcam", "layercam"]
    (image,) = json.loads((tmp_path / "values.json").read_text())
    assert image["class_index"] == EGYPTIAN_CAT
    for method in ("gradcam", "layercam"):
        values = image["methods"][method]
        assert values["pointing_game"]["value"] == 1.0  # the map's peak lies on the cat's face
        assert len(values["deletion"]["curve"]) == len(values["insertion"]["curve"]) == 11
        # taking the map's pixels away first loses the class sooner than adding them gains it
        assert values["deletion"]["value"] < values["insertion"]["value"]
        shown = [row.split()[1:] for row in rows if row.split()[0] == method][0]
        assert [float(v.rstrip("*")) for v in shown] == pytest.approx(
            [values[m]["value"] for m in ("deletion", "insertion", "pointing_game")], abs=1e-4)
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width > 200


def test_eval_takes_one_box_per_image(server: str) -> None:
    done = _gradcam("eval", PHOTO, PHOTO, "--server", server, "--model", MODEL,
                    "--box", "0,0,10,10")
    _assert_one_line_failure(done, "--box", "one box per image", "1 box for 2 images")
    done = _gradcam("eval", PHOTO, "--server", server, "--model", MODEL,
                    "--metrics", "pointing_game")
    _assert_one_line_failure(done, "pointing_game", "--box")


def test_a_deadline_names_the_timeout(server: str) -> None:
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", MODEL, "--timeout", "0.001"),
        "before the deadline", "--timeout 0.001 s", "gradcam explain --help",
    )


# --- other commands and failures ------------------------------------------------------------


def test_models_and_health(server: str) -> None:
    done = _gradcam("models", "--server", server)
    assert done.returncode == 0, done.stderr
    assert re.match(rf"{MODEL}\s+ready\s+input input \[-1,3,224,224\]\s+1000 classes", done.stdout)
    assert "  layer /_swish_1/Clip_output_0 (nchw)\n" in done.stdout
    done = _gradcam("health", "--server", server, "--wait", "5")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")


def test_token(token_server: str) -> None:
    _assert_one_line_failure(_gradcam("models", "--server", token_server), "bearer token")
    done = _gradcam("models", "--server", token_server, "--token", TOKEN)
    assert done.returncode == 0 and MODEL in done.stdout


def test_the_model_may_go_unnamed_when_the_server_has_one(
    server: str, token_server: str
) -> None:
    done = _gradcam("explain", PHOTO, "--server", server)
    assert done.returncode == 0 and done.stdout == f"{PHOTO}: Egyptian cat (0.81)\n"
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", token_server, "--token", TOKEN),
        f"name the model with --model: it serves {MODEL}, {SECOND_MODEL}",
    )


def test_a_model_that_cannot_answer_fails_in_one_line_at_once(
    broken_server: ServerProcess,
) -> None:
    address = broken_server.address
    for model, expected in [(BROKEN, (f"model '{BROKEN}' failed to load",)),
                            (INFERENCE_ONLY, ("serves inference only", "Det"))]:
        before = errors_counted(broken_server, "FAILED_PRECONDITION")
        _assert_one_line_failure(
            _gradcam("explain", PHOTO, "--server", address, "--model", model, "--retries", "3"),
            *expected,
        )
        assert errors_counted(broken_server, "FAILED_PRECONDITION") == before + 1  # asked once, not retried
    done = _gradcam("models", "--server", address)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    assert lines[BROKEN].startswith("not ready: ")
    assert re.fullmatch(
        r"ready  input input \[-1,3,32,32\]  10 classes  inference only: .*Det.*",
        lines[INFERENCE_ONLY],
    ), lines[INFERENCE_ONLY]


def test_failures(server: str, tmp_path: Path) -> None:
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", NO_SERVER, "--model", MODEL, "--retries", "1"),
        NO_SERVER, "unavailable", "is gradcam-server running there?",
        "gradcam-server --model-repository models",
    )
    _assert_one_line_failure(
        _gradcam("health", "--server", NO_SERVER, "--retries", "0"), NO_SERVER
    )
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", "nope", "-o", tmp_path / "x.png"),
        "unknown model 'nope'", f"served: {MODEL}",
    )
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", "nope", "--target-class", "3"),
        "unknown model 'nope'", f"served: {MODEL}",
    )
    _assert_one_line_failure(
        _gradcam("explain", tmp_path / "missing.jpg", "--server", server, "--model", MODEL),
        "missing.jpg",
    )
    not_an_image = tmp_path / "text.jpg"
    not_an_image.write_text("hello")
    _assert_one_line_failure(
        _gradcam("explain", not_an_image, "--server", server, "--model", MODEL), "text.jpg"
    )
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", MODEL, "--layer", "nope"), "nope"
    )
    _assert_one_line_failure(
        _gradcam("explain", PHOTO, "--server", server, "--model", MODEL, "--opacity", "2"),
        "--opacity",
    )
    for name in ("x", "x.npy"):
        _assert_one_line_failure(
            _gradcam("explain", PHOTO, "--server", NO_SERVER, "--model", MODEL, "-o",
                     tmp_path / name),
            f"cannot write {tmp_path / name}", "no picture format",
        )  # refused before the (unreachable) server is asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.jpg"]
    usage = _gradcam("explain", PHOTO, "--top-k", "2", "--target-class", "3", "--model", MODEL)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
