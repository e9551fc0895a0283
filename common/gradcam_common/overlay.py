"""Heatmaps made visible: colour maps, blending onto the image, and a captioned comparison.

Everything here is numpy and Pillow. A heatmap is a float array [H, W] with values in [0, 1]
(what the service returns); values outside are clipped and NaN counts as 0. Like
``cv2.applyColorMap`` on ``uint8(255 * heatmap)``, a value is quantised to one of 256 levels,
``round(255 * value)``, and looked up in a 256-entry table per colour map:

* ``jet``: MATLAB's jet as OpenCV's ``COLORMAP_JET`` tabulates it, piecewise linear from dark
  blue (0, 0, 128) through blue, cyan, yellow and red to dark red (128, 0, 0):
  channel = clip(1.5 - |4 t - c|, 0, 1) with c = 3, 2, 1 for red, green, blue, at t = level / 255.
* ``turbo``: Google's Turbo (Anton Mikhailov, 2019), the published 256-entry table rounded to
  8 bits. Its degree-5 polynomial approximation is not used: it strays from the table by up to
  32 levels near the ends (turbo(0) would be (35, 23, 27) instead of (48, 18, 59)).

Pixel-level maps (Guided Backpropagation, Guided Grad-CAM) are drawn on their own, not over the
photo, by `gradient_image`: signed gradients [3, H, W] as the Grad-CAM paper shows them (each
image standardised, scaled by 0.1 and centred on grey; the service's ``pixel_gradients``), or
their magnitude in grayscale (the service's heatmap for these methods); ``size=`` draws a map
of another size at its image's. `panels` puts pictures in a row, each with its own caption.
`draw_box` outlines a detector's explained box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORMAPS = ("jet", "turbo")

LEVELS = 256
PANEL_GAP = 8  # white pixels between the pictures of `panels`
GRAYSCALE_PERCENTILE = 99.0  # the magnitude drawn white by `gradient_image`
_GRADIENT_EPSILON = 1e-5  # as pytorch-grad-cam's deprocess_image


def _jet_table() -> np.ndarray:
    """OpenCV's jet: 255 * clip(1.5 - |4 t - c|) at t = i / 255, rounded half up, exactly.

    In units of 1/255 the value is (765 - 2 |4 i - 255 c|) / 2, so it is computed in integers.
    """
    level = np.arange(LEVELS)[:, None]
    centre = np.array([3, 2, 1])[None, :]  # red, green, blue
    twice = 765 - 2 * np.abs(4 * level - 255 * centre)
    return np.clip((twice + 1) // 2, 0, 255).astype(np.uint8)


# Turbo colormap, Copyright 2019 Google LLC, Apache-2.0 (Anton Mikhailov): the 256 RGB entries
# of the published float table (gist.github.com/mikhailov-work/ee72ba4191942acecc03fe6da94fc73f),
# times 255, rounded half up. Six levels per line.
# fmt: off
_TURBO_TABLE = np.array([
     48,  18,  59,   50,  21,  67,   51,  24,  74,   52,  27,  81,   53,  30,  88,   54,  33,  95,
     55,  36, 102,   56,  39, 109,   57,  42, 115,   58,  45, 121,   59,  47, 128,   60,  50, 134,
     61,  53, 139,   62,  56, 145,   63,  59, 151,   63,  62, 156,   64,  64, 162,   65,  67, 167,
     65,  70, 172,   66,  73, 177,   66,  75, 181,   67,  78, 186,   68,  81, 191,   68,  84, 195,
     68,  86, 199,   69,  89, 203,   69,  92, 207,   69,  94, 211,   70,  97, 214,   70, 100, 218,
     70, 102, 221,   70, 105, 224,   70, 107, 227,   71, 110, 230,   71, 113, 233,   71, 115, 235,
     71, 118, 238,   71, 120, 240,   71, 123, 242,   70, 125, 244,   70, 128, 246,   70, 130, 248,
     70, 133, 250,   70, 135, 251,   69, 138, 252,   69, 140, 253,   68, 143, 254,   67, 145, 254,
     66, 148, 255,   65, 150, 255,   64, 153, 255,   62, 155, 254,   61, 158, 254,   59, 160, 253,
     58, 163, 252,   56, 165, 251,   55, 168, 250,   53, 171, 248,   51, 173, 247,   49, 175, 245,
     47, 178, 244,   46, 180, 242,   44, 183, 240,   42, 185, 238,   40, 188, 235,   39, 190, 233,
     37, 192, 231,   35, 195, 228,   34, 197, 226,   32, 199, 223,   31, 201, 221,   30, 203, 218,
     28, 205, 216,   27, 208, 213,   26, 210, 210,   26, 212, 208,   25, 213, 205,   24, 215, 202,
     24, 217, 200,   24, 219, 197,   24, 221, 194,   24, 222, 192,   24, 224, 189,   25, 226, 187,
     25, 227, 185,   26, 228, 182,   28, 230, 180,   29, 231, 178,   31, 233, 175,   32, 234, 172,
     34, 235, 170,   37, 236, 167,   39, 238, 164,   42, 239, 161,   44, 240, 158,   47, 241, 155,
     50, 242, 152,   53, 243, 148,   56, 244, 145,   60, 245, 142,   63, 246, 138,   67, 247, 135,
     70, 248, 132,   74, 248, 128,   78, 249, 125,   82, 250, 122,   85, 250, 118,   89, 251, 115,
     93, 252, 111,   97, 252, 108,  101, 253, 105,  105, 253, 102,  109, 254,  98,  113, 254,  95,
    117, 254,  92,  121, 254,  89,  125, 255,  86,  128, 255,  83,  132, 255,  81,  136, 255,  78,
    139, 255,  75,  143, 255,  73,  146, 255,  71,  150, 254,  68,  153, 254,  66,  156, 254,  64,
    159, 253,  63,  161, 253,  61,  164, 252,  60,  167, 252,  58,  169, 251,  57,  172, 251,  56,
    175, 250,  55,  177, 249,  54,  180, 248,  54,  183, 247,  53,  185, 246,  53,  188, 245,  52,
    190, 244,  52,  193, 243,  52,  195, 241,  52,  198, 240,  52,  200, 239,  52,  203, 237,  52,
    205, 236,  52,  208, 234,  52,  210, 233,  53,  212, 231,  53,  215, 229,  53,  217, 228,  54,
    219, 226,  54,  221, 224,  55,  223, 223,  55,  225, 221,  55,  227, 219,  56,  229, 217,  56,
    231, 215,  57,  233, 213,  57,  235, 211,  57,  236, 209,  58,  238, 207,  58,  239, 205,  58,
    241, 203,  58,  242, 201,  58,  244, 199,  58,  245, 197,  58,  246, 195,  58,  247, 193,  58,
    248, 190,  57,  249, 188,  57,  250, 186,  57,  251, 184,  56,  251, 182,  55,  252, 179,  54,
    252, 177,  54,  253, 174,  53,  253, 172,  52,  254, 169,  51,  254, 167,  50,  254, 164,  49,
    254, 161,  48,  254, 158,  47,  254, 155,  45,  254, 153,  44,  254, 150,  43,  254, 147,  42,
    254, 144,  41,  253, 141,  39,  253, 138,  38,  252, 135,  37,  252, 132,  35,  251, 129,  34,
    251, 126,  33,  250, 123,  31,  249, 120,  30,  249, 117,  29,  248, 114,  28,  247, 111,  26,
    246, 108,  25,  245, 105,  24,  244, 102,  23,  243,  99,  21,  242,  96,  20,  241,  93,  19,
    240,  91,  18,  239,  88,  17,  237,  85,  16,  236,  83,  15,  235,  80,  14,  234,  78,  13,
    232,  75,  12,  231,  73,  12,  229,  71,  11,  228,  69,  10,  226,  67,  10,  225,  65,   9,
    223,  63,   8,  221,  61,   8,  220,  59,   7,  218,  57,   7,  216,  55,   6,  214,  53,   6,
    212,  51,   5,  210,  49,   5,  208,  47,   5,  206,  45,   4,  204,  43,   4,  202,  42,   4,
    200,  40,   3,  197,  38,   3,  195,  37,   3,  193,  35,   2,  190,  33,   2,  188,  32,   2,
    185,  30,   2,  183,  29,   2,  180,  27,   1,  178,  26,   1,  175,  24,   1,  172,  23,   1,
    169,  22,   1,  167,  20,   1,  164,  19,   1,  161,  18,   1,  158,  16,   1,  155,  15,   1,
    152,  14,   1,  149,  13,   1,  146,  11,   1,  142,  10,   1,  139,   9,   2,  136,   8,   2,
    133,   7,   2,  129,   6,   2,  126,   5,   2,  122,   4,   3,
], dtype=np.uint8).reshape(LEVELS, 3)
# fmt: on

_TABLES: dict[str, np.ndarray] = {"jet": _jet_table(), "turbo": _TURBO_TABLE}


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """RGB colours of a heatmap: float [H, W] in [0, 1] -> uint8 [H, W, 3].

    Values are clipped to [0, 1], NaN becomes 0, and each value is quantised to the nearest of
    256 levels. Raises ValueError for an unknown colour map or a heatmap that is not 2-D.
    """
    table = _table(colormap)
    levels = np.floor(_clean(heatmap) * (LEVELS - 1) + 0.5).astype(np.intp)
    return table[levels]


def overlay(
    image: Image.Image | np.ndarray,
    heatmap: np.ndarray,
    colormap: str = "jet",
    opacity: float = 0.5,
) -> Image.Image:
    """The image with the colourised heatmap blended over it, as an RGB image of the same size.

    ``image`` is a PIL image (any mode; converted to RGB) or a uint8 array [H, W], [H, W, 3] or
    [H, W, 4] (alpha dropped). A heatmap of another size is resized bilinearly to the image's size
    first. Each pixel is ``(1 - opacity) * image + opacity * colour``, rounded: opacity 0 gives
    the image back unchanged, 1 the colourised heatmap alone.
    """
    opacity = _check_opacity(opacity)
    table = _table(colormap)
    base = _as_rgb(image)
    values = _clean(heatmap)
    values = np.clip(_resized(values, base.size), 0.0, 1.0)
    levels = np.floor(values * (LEVELS - 1) + 0.5).astype(np.intp)
    colours = table[levels].astype(np.float64)
    pixels = np.asarray(base, dtype=np.float64)
    blended = (1.0 - opacity) * pixels + opacity * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")


BOX_COLOUR = (255, 255, 255)


def draw_box(
    image: Image.Image, box: Sequence[float], colour: tuple[int, int, int] = BOX_COLOUR
) -> Image.Image:
    """A copy of `image` (RGB) with the box x1, y1, x2, y2 (pixels) outlined, the explained
    detection of a detector's map; the line is about 1/200 of the image's longer side."""
    drawn = _as_rgb(image).copy()
    width = max(1, round(max(drawn.size) / 200))
    ImageDraw.Draw(drawn).rectangle([float(v) for v in box], outline=colour, width=width)
    return drawn


def side_by_side(
    image: Image.Image | np.ndarray,
    overlay_image: Image.Image | np.ndarray,
    captions: Sequence[str] = (),
) -> Image.Image:
    """The image and its overlay next to each other, with one caption line each in a band below.

    Typical captions are the top predictions ("0.91  tabby cat"). The canvas is as wide as both
    images together and as tall as the taller one plus the caption band (no band without
    captions); text is black on white in Pillow's default font, sized to the images, and a line
    longer than the canvas is cut off at its right edge.
    """
    left = _as_rgb(image)
    right = _as_rgb(overlay_image)
    width = left.width + right.width
    pictures_height = max(left.height, right.height)
    lines = [str(caption) for caption in captions]
    band = caption_band(lines, width, pictures_height)

    canvas = Image.new("RGB", (width, pictures_height + band.height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    canvas.paste(band, (0, pictures_height))
    return canvas


def panels(
    pictures: Sequence[Image.Image | np.ndarray],
    captions: Sequence[Sequence[str]] = (),
    gap: int = PANEL_GAP,
) -> Image.Image:
    """Pictures in a row, left to right and top-aligned, ``gap`` white pixels apart, each with
    its own caption lines in a band below it.

    ``captions`` holds one list of lines per picture (fewer lists: the last pictures have none).
    Every band is as tall as the one with the most lines (no band when no picture has a
    caption), drawn as `caption_band` draws it at the tallest picture's height, and cut off at
    its own picture's right edge, so a long caption never runs into the next picture.
    """
    if not pictures:
        raise ValueError("panels needs at least one picture")
    if len(captions) > len(pictures):
        raise ValueError(f"{len(captions)} captions for {len(pictures)} pictures")
    drawn = [_as_rgb(picture) for picture in pictures]
    lines = [[str(line) for line in caption] for caption in captions]
    lines += [[] for _ in range(len(drawn) - len(lines))]
    rows = max(len(caption) for caption in lines)
    pictures_height = max(picture.height for picture in drawn)
    band_height = caption_band([], 1, pictures_height, rows).height
    width = sum(picture.width for picture in drawn) + gap * (len(drawn) - 1)

    canvas = Image.new("RGB", (width, pictures_height + band_height), "white")
    left = 0
    for picture, caption in zip(drawn, lines):
        canvas.paste(picture, (left, 0))
        if rows:
            band = caption_band(caption, picture.width, pictures_height, rows)
            canvas.paste(band, (left, pictures_height))
        left += picture.width + gap
    return canvas


def caption_band(
    lines: Sequence[str], width: int, picture_height: int, rows: int | None = None
) -> Image.Image:
    """The white band of caption text drawn below a picture ``picture_height`` pixels tall:
    ``width`` wide, room for ``rows`` lines (default: as many as given; 0 rows: no band, 0 tall),
    each line black in Pillow's default font sized to the picture, cut off at the right edge."""
    rows = len(lines) if rows is None else rows
    if rows < len(lines):
        raise ValueError(f"{len(lines)} caption lines do not fit in {rows} rows")
    font = _caption_font(picture_height)
    line_height, padding = _line_metrics(font)
    band = Image.new("RGB", (width, 2 * padding + line_height * rows if rows else 0), "white")
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        draw.text((padding, padding + index * line_height), str(line), fill="black", font=font)
    return band


def gradient_image(
    gradients: np.ndarray, grayscale: bool = False, *, size: tuple[int, int] | None = None
) -> Image.Image:
    """A pixel-level map (Guided Backpropagation, Guided Grad-CAM) as a picture of its own size,
    or of ``size`` (width, height): the map is then resized bilinearly first, each channel of
    signed gradients on its own, as `overlay` resizes a heatmap to its image.

    * Signed gradients [3, H, W] (the augmented graph's ``pixel_map`` for one image, channels
      in the model's order), as the Grad-CAM paper and its released code show them: the array
      standardised (mean 0, standard deviation 1, over all its values), times 0.1, plus 0.5,
      clipped to [0, 1]: zero gradient is mid grey and three standard deviations land at
      0.2 and 0.8 (pytorch-grad-cam's ``deprocess_image``). With ``grayscale``, their magnitude
      (the maximum of |value| over channels) is drawn as below instead.
    * A magnitude [H, W] (what the service returns for these methods: that maximum,
      normalised to [0, 1]) in grayscale, black for none: its values divided by their 99th
      percentile and clipped, so the strongest 1 % are white (captum's outlier clipping);
      a map of zeros stays black.

    Returns an RGB image. Raises ValueError for another shape.
    """
    values = np.nan_to_num(np.asarray(gradients, dtype=np.float64), nan=0.0)
    if size is not None and values.ndim == 2:
        values = _resized(values, size)
    elif size is not None and values.ndim == 3 and values.shape[0] == 3:
        values = np.stack([_resized(channel, size) for channel in values])
    if values.ndim == 3 and values.shape[0] == 3 and not grayscale:
        spread = values.std()
        standard = (values - values.mean()) / (spread + _GRADIENT_EPSILON)
        pixels = np.clip(standard * 0.1 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
        return Image.fromarray(_to_uint8(pixels), mode="RGB")
    if values.ndim == 3 and values.shape[0] == 3:
        values = np.abs(values).max(axis=0)
    if values.ndim != 2:
        raise ValueError(
            f"a pixel-level map must be [3, H, W] gradients or an [H, W] magnitude, "
            f"got shape {values.shape}"
        )
    magnitude = np.abs(values)
    top = np.percentile(magnitude, GRAYSCALE_PERCENTILE)
    if top <= 0:
        top = magnitude.max()
    scaled = np.clip(magnitude / top, 0.0, 1.0) if top > 0 else np.zeros_like(magnitude)
    return Image.fromarray(_to_uint8(scaled), mode="L").convert("RGB")


# --- helpers --------------------------------------------------------------------------------


def _table(colormap: str) -> np.ndarray:
    if colormap not in _TABLES:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    return _TABLES[colormap]


def _resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float [H, W] array resized bilinearly to ``size`` (width, height), as float64; the
    array itself when it already has that size."""
    width, height = size
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(values.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float64)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255, rounded to the nearest level."""
    return np.floor(values * 255 + 0.5).astype(np.uint8)


def _clean(heatmap: np.ndarray) -> np.ndarray:
    """float64 [H, W] in [0, 1]: NaN -> 0, everything else clipped."""
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [H, W], got shape {values.shape}")
    return np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)


def _check_opacity(opacity: float) -> float:
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float, np.floating)):
        raise ValueError(f"opacity must be a number in [0, 1], got {opacity!r}")
    if not 0.0 <= float(opacity) <= 1.0:  # NaN fails too
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    return float(opacity)


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            return Image.fromarray(image, mode="L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), mode="RGB")
        raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got {image.shape}")
    raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")


def _caption_font(image_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = min(48, max(12, image_height // 16))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has no size; its bitmap font is fixed at 11 px
        return ImageFont.load_default()


def _line_metrics(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    """(line height, padding) in pixels for the caption band."""
    left, top, right, bottom = font.getbbox("Ag")
    text_height = int(math.ceil(bottom - min(top, 0)))
    padding = max(4, text_height // 3)
    return text_height + padding // 2, padding
