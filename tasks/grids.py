"""Contact sheets: a grid of images, each captioned, for people who would rather look than read."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def image_grid(
    paths: Sequence[Path | str], captions: Sequence[str], thumb: int = 128, columns: int = 8, caption_lines: int = 3
) -> Image.Image:
    """One RGB image with ``thumb``-pixel tiles, each above up to ``caption_lines`` lines of its caption."""
    if len(paths) != len(captions):
        raise ValueError(f"{len(paths)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_height = 11
    chars = max(8, thumb // 6)  # the default bitmap font is about 6 px per character
    columns = max(1, min(columns, len(paths)))
    rows = max(1, -(-len(paths) // columns))
    cell_h = thumb + caption_lines * line_height + 4
    sheet = Image.new("RGB", (columns * thumb, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        x, y = (i % columns) * thumb, (i // columns) * cell_h
        with Image.open(path) as image:
            sheet.paste(image.convert("RGB").resize((thumb, thumb)), (x, y))
        for n, line in enumerate(textwrap.wrap(caption, chars)[:caption_lines]):
            draw.text((x + 2, y + thumb + 2 + n * line_height), line, fill="black", font=font)
    return sheet


def histogram(
    values: Sequence[float],
    title: str,
    bins: int = 20,
    value_range: tuple[float, float] = (0.0, 1.0),
    size: tuple[int, int] = (500, 300),
) -> Image.Image:
    """A small bar chart of ``values`` as a PIL image, e.g. of the validator's confidence in the intended class.

    Drawn with PIL rather than matplotlib: importing pyplot cost 0.65-1.5 s per validate call
    (docs/benchmarks.md, orchestration overhead). Values outside ``value_range`` are left out.
    """
    import numpy as np

    counts, _ = np.histogram(np.asarray(list(values), dtype=float), bins=bins, range=value_range)
    width, height = size
    left, right, top, bottom = 56, 12, 26, 36  # margins for the title, the axes and their labels
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(1, int(counts.max()))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((left, 6), title, fill="black", font=font)
    bar_w = plot_w / bins
    for i, count in enumerate(counts):
        if count:
            x0 = left + i * bar_w
            y0 = top + plot_h * (1 - count / peak)
            draw.rectangle([x0 + 1, y0, x0 + bar_w - 1, top + plot_h], fill="#4878a8")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for value in (value_range[0], (value_range[0] + value_range[1]) / 2, value_range[1]):
        x = left + plot_w * (value - value_range[0]) / (value_range[1] - value_range[0])
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x, top + plot_h + 6), f"{value:g}", fill="black", font=font, anchor="ma")
    for count in (0, peak):
        y = top + plot_h * (1 - count / peak)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 7, y), str(count), fill="black", font=font, anchor="rm")
    draw.text((left + plot_w // 2, height - 4), "confidence", fill="black", font=font, anchor="md")
    draw.text((4, top + plot_h // 2), "images", fill="black", font=font, anchor="lm")
    return image
