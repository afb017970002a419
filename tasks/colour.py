"""Colour statistics of images, and images rescaled to them.

``validate.standardise`` shows the validator each image rescaled to the colours of the common images it
was trained on; ``dataset.restyle`` rescales real common images to the colours of a few real images of a
rare condition. Both are one operation: shift and scale each channel of an image to a target mean and
spread (the spread of an image's pixels around its own mean, averaged over the reference images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Per channel (R, G, B): the mean over the reference images, and the mean of their per-image spreads.
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def colour_stats(paths: Sequence[Path]) -> Stats:
    """The colour statistics of ``paths`` (rounded to 3 decimals, so that they can key caches)."""
    from PIL import Image

    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).reshape(-1, 3) for p in paths]
    mean = np.mean([p.mean(axis=0) for p in pixels], axis=0)
    spread = np.mean([p.std(axis=0) for p in pixels], axis=0)
    return tuple(round(float(v), 3) for v in mean), tuple(round(float(v), 3) for v in spread)  # type: ignore[return-value]


def rescaled(path: Path, stats: Stats) -> np.ndarray:
    """The image at ``path`` as RGB uint8, each channel shifted and scaled to ``stats``' mean and spread."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    mean, spread = np.asarray(stats[0], np.float32), np.asarray(stats[1], np.float32)
    scaled = (image - image.mean(axis=(0, 1))) / (image.std(axis=(0, 1)) + 1e-3) * spread + mean
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
