"""An `Evaluation` made readable: a table of each method's metrics averaged over the images
(`metrics_table`), and a picture of the deletion and insertion curves (`curves_picture`), drawn
with Pillow alone: one panel per curve metric, the class score against the fraction of pixels
removed or inserted, one coloured line per method, its area under the curve in the legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gradcam_common.faithfulness import HIGHER_IS_BETTER

from .results import ImageEvaluation

PANEL_SIZE = (420, 320)  # width, height of one panel, in pixels
MARGIN = (56, 24, 16, 40)  # left, top, right, bottom of a panel's plot area
LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PLOTTED = ("deletion", "insertion")


def means(images: Sequence[ImageEvaluation]) -> dict[str, dict[str, float]]:
    """Each method's metrics averaged over `images`: {method: {metric: mean}}."""
    methods = list(images[0].methods)
    return {
        method: {
            metric: float(np.mean([image.methods[method][metric].value for image in images]))
            for metric in images[0].methods[method]
        }
        for method in methods
    }


def metrics_table(images: Sequence[ImageEvaluation]) -> str:
    """A plain-text table: one row per method, one column per metric (its mean over the
    images), the best value of each column marked with "*"; the header says which way each
    metric is better."""
    table = means(images)
    methods = list(table)
    metrics = list(table[methods[0]])
    best = {}
    for metric in metrics:
        column = [table[method][metric] for method in methods]
        best[metric] = max(column) if HIGHER_IS_BETTER.get(metric, True) else min(column)
    header = ["method", *(f"{m} {'(+)' if HIGHER_IS_BETTER.get(m, True) else '(-)'}"
                          for m in metrics)]
    rows = [header]
    for method in methods:
        cells = [method]
        for metric in metrics:
            value = table[method][metric]
            mark = "*" if len(methods) > 1 and value == best[metric] else " "
            cells.append(f"{value:.4f}{mark}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def curves_picture(images: Sequence[ImageEvaluation], score: str = "probability",
                   title: str = "") -> Image.Image:
    """The deletion and insertion curves averaged over `images`, one panel each (those that
    were measured), one line per method; ValueError when neither was."""
    methods = list(images[0].methods)
    plotted = [m for m in PLOTTED if m in images[0].methods[methods[0]]]
    if not plotted:
        raise ValueError("no deletion or insertion curve to plot (ask for either metric)")
    width, height = PANEL_SIZE
    title_height = 24 if title else 0
    picture = Image.new("RGB", (width * len(plotted), height + title_height), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    curves = {
        metric: {method: np.mean([image.methods[method][metric].curve for image in images],
                                 axis=0) for method in methods}
        for metric in plotted
    }
    top = max(float(np.max(c)) for by_method in curves.values() for c in by_method.values())
    bottom = min(0.0, min(float(np.min(c)) for by_method in curves.values()
                          for c in by_method.values()))
    top = top if top > bottom else bottom + 1.0
    if score == "probability":
        bottom, top = 0.0, 1.0
    for panel, metric in enumerate(plotted):
        _panel(draw, font, (panel * width, title_height), metric, curves[metric],
               {method: float(np.mean([image.methods[method][metric].value for image in images]))
                for method in methods},
               (bottom, top), score)
    return picture


def _panel(draw: ImageDraw.ImageDraw, font, origin: tuple[int, int], metric: str,
           curves: dict[str, np.ndarray], areas: dict[str, float],
           limits: tuple[float, float], score: str) -> None:
    left, top, right, bottom = MARGIN
    x0, y0 = origin[0] + left, origin[1] + top
    x1, y1 = origin[0] + PANEL_SIZE[0] - right, origin[1] + PANEL_SIZE[1] - bottom
    low, high = limits

    def point(fraction: float, value: float) -> tuple[float, float]:
        return (x0 + fraction * (x1 - x0), y1 - (value - low) / (high - low) * (y1 - y0))

    draw.rectangle((x0, y0, x1, y1), outline="black")
    for tick in np.linspace(0, 1, 5):
        x, _ = point(tick, low)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 8, y1 + 6), f"{tick:.2f}", fill="black", font=font)
        value = low + tick * (high - low)
        _, y = point(0, value)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((origin[0] + 4, y - 5), f"{value:.3g}", fill="black", font=font)
    verb = "removed" if metric == "deletion" else "inserted"
    draw.text((x0, y1 + 22), f"{metric}: {score} against the fraction of pixels {verb}",
              fill="black", font=font)
    for number, (method, curve) in enumerate(curves.items()):
        colour = LINE_COLOURS[number % len(LINE_COLOURS)]
        steps = len(curve) - 1
        draw.line([point(i / steps, float(v)) for i, v in enumerate(curve)], fill=colour,
                  width=2)
    legend_x = x1 - 156 if metric == "deletion" else x0 + 6  # where the curves are low
    legend_y = y0 + 6 if metric == "deletion" else y1 - 8 - 14 * len(curves)
    draw.rectangle((legend_x, legend_y - 2, legend_x + 150, legend_y + 14 * len(curves)),
                   fill="white", outline=(200, 200, 200))
    for number, method in enumerate(curves):
        colour = LINE_COLOURS[number % len(LINE_COLOURS)]
        row_y = legend_y + 14 * number
        draw.line((legend_x + 4, row_y + 5, legend_x + 20, row_y + 5), fill=colour, width=2)
        draw.text((legend_x + 24, row_y), f"{method}  AUC {areas[method]:.3f}", fill="black",
                  font=font)
