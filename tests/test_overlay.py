"""Colour maps, blending and the side-by-side picture of the client."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from gradcam_client.overlay import COLORMAPS, colorize, overlay, side_by_side


def hues(colours: np.ndarray) -> np.ndarray:
    """Hue in degrees of each uint8 RGB colour of [N, 3]."""
    return np.array([colorsys.rgb_to_hsv(*(colour / 255.0))[0] * 360 for colour in colours])


def ramp(levels: int = 256) -> np.ndarray:
    """[1, levels] heatmap from 0 to 1."""
    return np.linspace(0.0, 1.0, levels)[None, :]


def photo(height: int = 12, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_close(colour: np.ndarray, expected: tuple[int, int, int], tolerance: int) -> None:
    difference = np.abs(colour.astype(int) - np.array(expected))
    assert difference.max() <= tolerance, (colour.tolist(), expected)


# --- colorize -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, (0, 0, 128)),  # dark blue
        (0.125, (0, 0, 255)),  # blue
        (0.375, (0, 255, 255)),  # cyan
        (0.5, (130, 255, 126)),  # the green middle, as cv2.applyColorMap(128, COLORMAP_JET)
        (0.625, (255, 255, 0)),  # yellow
        (0.875, (255, 0, 0)),  # red
        (1.0, (128, 0, 0)),  # dark red
    ],
)
def test_jet_anchors(value: float, expected: tuple[int, int, int]) -> None:
    # The pure colours fall between two of the 256 levels, hence the tolerance.
    assert_close(colorize(np.array([[value]]), "jet")[0, 0], expected, tolerance=3)


def test_jet_matches_the_opencv_table() -> None:
    # A few entries of OpenCV's float jet table (colormap.cpp), times 255.
    colours = colorize(ramp(), "jet")[0]
    assert colours[96, 0] == pytest.approx(0.00588235294117645 * 255, abs=0.51)
    assert colours[32, 1] == pytest.approx(0.001960784313725483 * 255, abs=0.51)
    assert colours[1, 2] == pytest.approx(0.5156862745098039 * 255, abs=0.51)
    assert colours[224, 0] == pytest.approx(0.9862745098039216 * 255, abs=0.51)
    assert colours[160, 2] == pytest.approx(0.0, abs=0.51)


def test_jet_is_piecewise_linear_with_its_slope() -> None:
    # Each channel is flat or moves by 4 levels per level (slope 4), less at the clip points.
    colours = colorize(ramp(), "jet")[0].astype(int)
    steps = np.abs(np.diff(colours, axis=0))
    assert steps.max() == 4
    moving = steps[steps > 0]
    assert (moving == 4).mean() > 0.95


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, (48, 18, 59)),
        (0.25, (40, 188, 235)),
        (0.5, (164, 252, 60)),
        (0.75, (251, 129, 34)),
        (1.0, (122, 4, 3)),
    ],
)
def test_turbo_anchors(value: float, expected: tuple[int, int, int]) -> None:
    assert_close(colorize(np.array([[value]]), "turbo")[0, 0], expected, tolerance=3)


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_hue_runs_from_blue_to_red(colormap: str) -> None:
    colours = colorize(ramp(), colormap)[0]
    hue = hues(colours)
    hue[hue > 359.5] = 0.0  # pure red may come back as 360
    assert np.all(np.diff(hue) <= 1e-6)
    assert 200 <= hue[10] <= 290  # blue side
    assert hue[-1] <= 15  # red side


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_shape_dtype_and_clipping(colormap: str) -> None:
    heatmap = np.array([[-3.0, 0.0, np.nan], [1.0, 7.5, np.inf]], dtype=np.float32)
    colours = colorize(heatmap, colormap)
    assert colours.shape == (2, 3, 3)
    assert colours.dtype == np.uint8
    low, high = colorize(np.array([[0.0, 1.0]]), colormap)[0]
    for position in [(0, 0), (0, 1), (0, 2)]:
        np.testing.assert_array_equal(colours[position], low)
    for position in [(1, 0), (1, 1), (1, 2)]:
        np.testing.assert_array_equal(colours[position], high)


def test_values_round_to_the_nearest_level() -> None:
    table = colorize(ramp(), "jet")[0]
    np.testing.assert_array_equal(colorize(np.array([[0.5]]), "jet")[0, 0], table[128])
    np.testing.assert_array_equal(colorize(np.array([[0.5 / 255]]), "jet")[0, 0], table[1])
    np.testing.assert_array_equal(colorize(np.array([[0.49 / 255]]), "jet")[0, 0], table[0])


def test_unknown_colormap_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'viridis'.*jet, turbo"):
        colorize(np.zeros((2, 2)), "viridis")


def test_heatmap_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(1, 2, 2\)"):
        colorize(np.zeros((1, 2, 2)))


# --- overlay --------------------------------------------------------------------------------


def test_opacity_zero_returns_the_image() -> None:
    pixels = photo()
    result = overlay(Image.fromarray(pixels), np.random.default_rng(1).random((12, 20)), opacity=0)
    assert result.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(result), pixels)


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_opacity_one_returns_the_colorized_heatmap(colormap: str) -> None:
    heatmap = np.random.default_rng(2).random((12, 20))
    result = overlay(photo(), heatmap, colormap=colormap, opacity=1.0)
    np.testing.assert_array_equal(np.asarray(result), colorize(heatmap, colormap))


def test_blend_is_the_weighted_mean() -> None:
    pixels = photo()
    heatmap = np.random.default_rng(3).random((12, 20))
    result = np.asarray(overlay(pixels, heatmap, opacity=0.25)).astype(float)
    expected = 0.75 * pixels + 0.25 * colorize(heatmap)
    assert np.abs(result - expected).max() <= 0.5 + 1e-9


def test_smaller_heatmap_is_resized_bilinearly_to_the_image() -> None:
    heatmap = np.random.default_rng(4).random((7, 7)).astype(np.float32)
    result = overlay(photo(56, 84), heatmap, opacity=1.0)
    assert result.size == (84, 56)
    resized = Image.fromarray(heatmap, mode="F").resize((84, 56), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(result), colorize(np.asarray(resized)))


def test_constant_heatmap_stays_constant_when_resized() -> None:
    result = overlay(photo(30, 40), np.full((3, 5), 0.5), opacity=1.0)
    colours = np.asarray(result).reshape(-1, 3)
    assert (colours == colorize(np.array([[0.5]]))[0, 0]).all()


@pytest.mark.parametrize(
    "pixels",
    [
        photo(),
        photo()[:, :, 0],
        photo()[:, :, :1],
        np.concatenate([photo(), np.full((12, 20, 1), 9, np.uint8)], axis=2),
    ],
    ids=["rgb", "gray", "gray-1-channel", "rgba"],
)
def test_numpy_images(pixels: np.ndarray) -> None:
    result = overlay(pixels, np.zeros((12, 20)), opacity=0.0)
    assert result.mode == "RGB" and result.size == (20, 12)
    expected = pixels[:, :, :3] if pixels.ndim == 3 and pixels.shape[2] >= 3 else pixels
    if expected.ndim == 3 and expected.shape[2] == 1:
        expected = expected[:, :, 0]
    if expected.ndim == 2:
        expected = np.repeat(expected[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(result), expected)


def test_pil_images_of_other_modes_become_rgb() -> None:
    gray = Image.fromarray(photo()[:, :, 0], mode="L")
    result = overlay(gray, np.zeros((12, 20)), opacity=0.0)
    np.testing.assert_array_equal(np.asarray(result), np.asarray(gray.convert("RGB")))
    rgba = Image.fromarray(photo()).convert("RGBA")
    assert overlay(rgba, np.zeros((12, 20))).mode == "RGB"


@pytest.mark.parametrize("opacity", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_invalid_opacity(opacity: object) -> None:
    with pytest.raises(ValueError, match="opacity"):
        overlay(photo(), np.zeros((12, 20)), opacity=opacity)  # type: ignore[arg-type]


def test_invalid_colormap() -> None:
    with pytest.raises(ValueError, match="jet, turbo"):
        overlay(photo(), np.zeros((12, 20)), colormap="hot")


@pytest.mark.parametrize(
    "pixels",
    [photo().astype(np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 3), np.uint8)],
    ids=["float", "two-channels", "four-dims"],
)
def test_invalid_numpy_images(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image array"):
        overlay(pixels, np.zeros((4, 4)))


def test_image_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        overlay([[0, 0], [0, 0]], np.zeros((2, 2)))  # type: ignore[arg-type]


# --- side_by_side ---------------------------------------------------------------------------


def test_side_by_side_with_captions() -> None:
    image = Image.fromarray(photo(64, 48))
    blended = overlay(image, np.random.default_rng(5).random((4, 4)))
    picture = side_by_side(image, blended, ["0.91  tabby cat", "0.05  tiger cat"])
    assert picture.mode == "RGB"
    assert picture.width == 2 * image.width
    assert picture.height > image.height
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels[:64, :48], np.asarray(image))
    np.testing.assert_array_equal(pixels[:64, 48:], np.asarray(blended))
    band = pixels[64:]
    assert (band == 255).any() and (band < 128).any()  # white band with dark text on it


def test_more_captions_make_a_taller_band() -> None:
    image = Image.fromarray(photo(64, 48))
    one = side_by_side(image, image, ["a"])
    three = side_by_side(image, image, ["a", "b", "c"])
    assert three.height > one.height > image.height


def test_side_by_side_without_captions_has_no_band() -> None:
    image = photo(30, 40)
    picture = side_by_side(image, image)
    assert picture.size == (80, 30)


def test_side_by_side_of_different_sizes() -> None:
    picture = side_by_side(photo(30, 40), photo(20, 10), ["caption"])
    assert picture.width == 50
    assert picture.height > 30
