"""Colour maps, blending and the side-by-side picture of the client."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from gradcam_common.overlay import (
    COLORMAPS,
    PANEL_GAP,
    caption_band,
    colorize,
    gradient_image,
    overlay,
    panels,
    side_by_side,
)


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


def test_side_by_side_band_is_the_caption_band() -> None:
    image = photo(64, 48)
    picture = np.asarray(side_by_side(image, image, ["0.91  tabby cat"]))
    band = caption_band(["0.91  tabby cat"], 96, 64)
    np.testing.assert_array_equal(picture[64:], np.asarray(band))


# --- caption_band ---------------------------------------------------------------------------


def test_caption_band_draws_its_text_in_black_on_white() -> None:
    band = np.asarray(caption_band(["Egyptian cat  0.81"], 300, 300))
    assert band.shape[1] == 300 and band.shape[2] == 3
    assert (band[0] == 255).all() and (band[-1] == 255).all()  # padding above and below
    ink = (band < 128).any(axis=2)
    assert ink.any()
    columns = np.flatnonzero(ink.any(axis=0))
    assert 0 < columns[0] < columns[-1] < 250  # starts after the padding, fits the band
    other = np.asarray(caption_band(["tabby  0.08"], 300, 300))
    assert other.shape == band.shape and (other != band).any()


def test_caption_band_rows_set_its_height() -> None:
    one = caption_band(["a"], 50, 100)
    three = caption_band(["a"], 50, 100, rows=3)
    assert three.height > one.height
    np.testing.assert_array_equal(  # the same line, at the same place
        np.asarray(three)[: one.height - 4], np.asarray(one)[: one.height - 4]
    )
    assert caption_band([], 50, 100).height == 0
    with pytest.raises(ValueError, match="do not fit"):
        caption_band(["a", "b"], 50, 100, rows=1)


def test_caption_text_grows_with_the_picture() -> None:
    small = caption_band(["cat"], 400, 100)
    large = caption_band(["cat"], 400, 600)
    assert large.height > small.height


# --- panels ---------------------------------------------------------------------------------


def test_panels_put_each_picture_with_its_own_caption() -> None:
    pictures = [photo(60, 40, seed) for seed in range(3)]
    captions = [["chelsea.jpg", "efficientnet_lite0, gradcam"], ["Egyptian cat  0.81"],
                ["tabby  0.08"]]
    canvas = np.asarray(panels(pictures, captions))
    assert canvas.shape[1] == 3 * 40 + 2 * PANEL_GAP
    band_height = caption_band([], 1, 60, rows=2).height
    assert canvas.shape[0] == 60 + band_height
    for index, (picture, lines) in enumerate(zip(pictures, captions)):
        left = index * (40 + PANEL_GAP)
        np.testing.assert_array_equal(canvas[:60, left : left + 40], picture)
        band = np.asarray(caption_band(lines, 40, 60, rows=2))
        np.testing.assert_array_equal(canvas[60:, left : left + 40], band)
    gap = canvas[:, 40 : 40 + PANEL_GAP]
    assert (gap == 255).all()


def test_a_long_caption_stops_at_its_picture() -> None:
    pictures = [photo(40, 30, 1), photo(40, 30, 2)]
    canvas = np.asarray(panels(pictures, [["a very long caption " * 5], []]))
    assert (canvas[40:, 30:] == 255).all()  # nothing under the gap or the second picture
    assert (canvas[40:, :30] < 128).any()


def test_panels_of_different_heights_align_at_the_top() -> None:
    tall, short = photo(50, 20, 1), photo(30, 20, 2)
    canvas = np.asarray(panels([tall, short], [["x"], ["y"]]))
    np.testing.assert_array_equal(canvas[30:50, 20 + PANEL_GAP :], 255)  # under the short one
    np.testing.assert_array_equal(canvas[:30, 20 + PANEL_GAP :], short)


def test_panels_without_captions_have_no_band() -> None:
    canvas = panels([photo(30, 40), photo(30, 40)], gap=0)
    assert canvas.size == (80, 30)
    assert panels([photo(30, 40)]).size == (40, 30)


def test_panels_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="at least one"):
        panels([])
    with pytest.raises(ValueError, match="2 captions for 1 pictures"):
        panels([photo()], [["a"], ["b"]])


# --- gradient_image -------------------------------------------------------------------------


def test_signed_gradients_are_drawn_as_the_paper_does() -> None:
    from pytorch_grad_cam.utils.image import deprocess_image

    gradients = np.random.default_rng(3).normal(0.0, 1e-3, (3, 20, 30)).astype(np.float32)
    gradients[0, :5] += 0.01  # a strong positive red patch
    picture = gradient_image(gradients)
    assert picture.mode == "RGB" and picture.size == (30, 20)
    expected = deprocess_image(gradients.transpose(1, 2, 0))  # truncates where we round
    difference = np.asarray(picture).astype(int) - expected.astype(int)
    assert difference.min() >= 0 and difference.max() <= 1
    pixels = np.asarray(picture).astype(int)
    assert pixels[:5, :, 0].mean() > 200 and abs(pixels[10:, :].mean() - 128) < 20


def test_zero_gradients_are_grey_and_a_blank_magnitude_is_black() -> None:
    assert (np.asarray(gradient_image(np.zeros((3, 4, 5)))) == 128).all()
    assert (np.asarray(gradient_image(np.zeros((4, 5)))) == 0).all()


def test_magnitudes_are_grayscale_with_the_top_percent_white() -> None:
    magnitude = np.linspace(0.0, 1.0, 1000).reshape(20, 50)
    picture = np.asarray(gradient_image(magnitude))
    assert picture.shape == (20, 50, 3)
    assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
    gray = picture[..., 0].ravel().astype(int)
    assert gray[0] == 0
    top = np.percentile(magnitude, 99)
    assert (gray[magnitude.ravel() >= top] == 255).all()
    assert (gray[magnitude.ravel() < 0.99 * top] < 255).all()
    assert gray[500] == round(255 * magnitude.ravel()[500] / top)
    assert (np.diff(gray) >= 0).all()


def test_a_few_strong_pixels_leave_the_rest_visible() -> None:
    # Guided gradients are heavy-tailed: scaled by the maximum, the bulk would be near black.
    magnitude = np.full((100, 100), 0.05)
    magnitude[0, 0] = 1.0
    assert np.asarray(gradient_image(magnitude)).mean() > 250


def test_grayscale_gradients_show_the_channel_maximum_of_their_magnitude() -> None:
    gradients = np.random.default_rng(4).normal(size=(3, 10, 12))
    np.testing.assert_array_equal(
        np.asarray(gradient_image(gradients, grayscale=True)),
        np.asarray(gradient_image(np.abs(gradients).max(axis=0))),
    )


@pytest.mark.parametrize("shape", [(5,), (4, 10, 12), (1, 2, 3, 4)])
def test_gradient_image_of_another_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\] gradients or an \[H, W\] magnitude"):
        gradient_image(np.zeros(shape))


def _bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    resized = Image.fromarray(values.astype(np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR
    )
    return np.asarray(resized)


def test_a_map_of_another_size_is_drawn_at_the_size_asked() -> None:
    # A map returned at heatmap_size "model" or WxH, drawn beside its image: resized bilinearly
    # first, as `overlay` resizes a heatmap, then drawn as at its own size.
    magnitude = np.random.default_rng(5).random((7, 9))
    picture = gradient_image(magnitude, size=(36, 21))
    assert picture.size == (36, 21)
    np.testing.assert_array_equal(
        np.asarray(picture), np.asarray(gradient_image(_bilinear(magnitude, (36, 21))))
    )
    np.testing.assert_array_equal(
        np.asarray(gradient_image(magnitude, size=(9, 7))), np.asarray(gradient_image(magnitude))
    )


def test_signed_gradients_are_resized_channel_by_channel() -> None:
    gradients = np.random.default_rng(6).normal(size=(3, 6, 8))
    picture = gradient_image(gradients, size=(16, 12))
    assert picture.size == (16, 12)
    resized = np.stack([_bilinear(channel, (16, 12)) for channel in gradients])
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(gradient_image(resized)))
    np.testing.assert_array_equal(
        np.asarray(gradient_image(gradients, grayscale=True, size=(16, 12))),
        np.asarray(gradient_image(resized, grayscale=True)),
    )
