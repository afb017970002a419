"""dataset.restyle: real labelled images recoloured to the colours of a few real images of a rare condition.

A copy keeps its image's true boxes and takes the per-channel mean and spread (:mod:`tasks.colour`) of
the reference images of one attribute value, the values taken in turn. In the embedded world that turns
common scenes into scenes with the brightness and contrast of fog or night (not rain's streaks or the
noise condition's grain): the cheapest synthetic rare image there is, and so the baseline the generator's
images are measured against (docs/experiment.md, "Recoloured common images").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tasks.colour import Stats, colour_stats, rescaled
from tasks.config import Restyle


def restyle_stats(spec: Restyle, field: str = "dataset.restyle.images") -> dict[str, Stats]:
    """The colour statistics of each value's reference images, by value in sorted order.

    Raises:
        FileNotFoundError / ValueError: naming ``field``, as :func:`tasks.generation.images_by_value`.
    """
    from tasks.generation import images_by_value

    return {value: colour_stats(files) for value, files in sorted(images_by_value(spec, field).items())}


def values_in_turn(n: int, stats: dict[str, Stats]) -> list[str]:
    """The value each of ``n`` images is recoloured to: the values in turn, the first image to the first."""
    values = list(stats)
    return [values[i % len(values)] for i in range(n)]


def restyled_copies(paths: Sequence[Path | str], stats: dict[str, Stats], out_dir: Path) -> list[tuple[Path, str]]:
    """Each image recoloured to the next value's colours in turn (the first to the first value, ...).

    A copy is written once, under a name made of its source and the colours, so a re-run reuses it.

    Returns:
        (copy, value) per image, in order.
    """
    out = []
    for path, value in zip(paths, values_in_turn(len(paths), stats), strict=True):
        key = json.dumps([str(Path(path).resolve()), stats[value]])
        copy = out_dir / value / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.png"
        if not copy.is_file():
            from PIL import Image

            copy.parent.mkdir(parents=True, exist_ok=True)
            partial = copy.with_name(f".{copy.name}.{os.getpid()}.png")
            Image.fromarray(rescaled(Path(path), stats[value])).save(partial)
            partial.replace(copy)
        out.append((copy, value))
    return out
