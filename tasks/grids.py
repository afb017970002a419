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


def histogram(values: Sequence[float], title: str, bins: int = 20, value_range: tuple[float, float] = (0.0, 1.0)):
    """A small histogram as a PIL image, e.g. of the validator's confidence in the intended class."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display here; and never pick an interactive back end in a worker
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3), dpi=100)
    axes.hist(list(values), bins=bins, range=value_range, color="#4878a8", edgecolor="white")
    axes.set(title=title, xlabel="confidence", ylabel="images")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
