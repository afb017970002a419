"""The pictures a run logs: contact sheets and the confidence histogram, drawn with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.grids import histogram, image_grid

BAR = (0x48, 0x78, 0xA8)


def _bar_columns(image: Image.Image) -> np.ndarray:
    """How many bar-coloured pixels each column of the chart holds."""
    pixels = np.asarray(image.convert("RGB"))
    return (pixels == BAR).all(axis=2).sum(axis=0)


def test_histogram_bars_follow_the_counts() -> None:
    values = [0.05] * 10 + [0.95] * 5  # bin 0 twice as tall as bin 9, nothing between
    chart = histogram(values, "confidence", bins=10, size=(500, 300))
    assert chart.size == (500, 300)
    columns = _bar_columns(chart)
    left, plot_w = 56, 500 - 56 - 12
    first = columns[left + plot_w // 20]  # the middle of bin 0
    last = columns[left + plot_w * 19 // 20]  # the middle of bin 9
    middle = columns[left + plot_w // 2]
    assert first > 0 and middle == 0
    assert abs(first / last - 2.0) < 0.05


def test_histogram_of_nothing_is_an_empty_chart() -> None:
    assert _bar_columns(histogram([], "no images")).sum() == 0


def test_image_grid_lays_out_tiles_with_captions(tmp_path: Path) -> None:
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), colour).save(paths[-1])
    sheet = image_grid(paths, ["a", "b", "c"], thumb=32, columns=2, caption_lines=1)
    assert sheet.size == (64, 2 * (32 + 11 + 4))
    assert sheet.getpixel((5, 5)) == (255, 0, 0) and sheet.getpixel((37, 5)) == (0, 0, 255)
