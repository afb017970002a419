"""The ``prompts`` stage: expand classes x attribute axes x templates into a table of prompts.

Plain functions, no framework and no file I/O: the caller writes the returned frame to parquet.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import string
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.config import ClassSpec, PromptsConfig

logger = logging.getLogger(__name__)

FIXED_COLUMNS = ["prompt_id", "class", "class_id", "phrase", "template", "prompt", "negative_prompt", "seed"]
_SEED_RANGE = 2**31  # 31-bit seeds fit every generator API (torch, numpy, int32 columns)


@dataclass
class _Cell:
    """One distinct rendered prompt of a class's grid, with the summed weight of the cells behind it."""

    prompt: str
    template: str
    values: dict[str, str]  # axis -> value as it appears in the prompt ("" if the template skips the axis)
    weight: float


def expand_prompts(cfg: PromptsConfig) -> pd.DataFrame:
    """Sample each class's quota of distinct prompts from its weighted grid.

    The grid of a class is every template combined with one value per axis it uses; a cell weighs the
    product of its values' weights, and cells rendering the same text merge (weights summed). Each
    class draws its quota without replacement, with probability proportional to weight
    (Efraimidis-Spirakis keys), from a generator keyed by ``cfg.seed`` and the class name, so adding a
    class leaves the other classes' prompts unchanged.

    Returns:
        One row per image to generate, ordered by ``class_id`` then draw order, with columns
        ``FIXED_COLUMNS`` followed by one string column per axis, in config order, holding the value
        in the prompt text ("" where the row's template skips that axis; ``template`` and the axis
        columns come from the first cell in config order when cells merge). ``seed`` is a distinct
        31-bit int64 per row; ``prompt_id`` is 16 hex chars of sha256 over prompt, negative prompt and
        seed.

    Raises:
        ValueError: a text holds a control character, a template renders empty, counts exceed
            ``total``, or a quota exceeds the grid while ``allow_repeats`` is off.
    """
    _check_text("prompts.negative_prompt", cfg.negative_prompt)
    for template in cfg.templates:
        _check_text(f"prompts.templates: {template!r}", template)
    for axis, values in cfg.axes.items():
        for value in values:
            _check_text(f"prompts.axes.{axis}: value {value!r}", value)
    quotas = _quotas(cfg)
    used_seeds: set[int] = set()
    rows: list[dict[str, object]] = []
    for class_id, (spec, quota) in enumerate(zip(cfg.classes, quotas, strict=True)):
        cells = _grid(cfg, spec)
        if quota > len(cells) and not cfg.allow_repeats:
            raise ValueError(
                f"prompts.classes[name={spec.name}]: quota {quota} exceeds the {len(cells)} distinct prompts "
                "its grid can make; add axis values or templates, lower the count, or set prompts.allow_repeats"
            )
        order = _draw(_rng(cfg.seed, "cells", spec.name), np.array([c.weight for c in cells]), quota)
        seeds = _draw_seeds(_rng(cfg.seed, "seeds", spec.name), quota, used_seeds)
        for index, seed in zip(order, seeds, strict=True):
            cell = cells[index]
            key = "\x1f".join([cell.prompt, cfg.negative_prompt, str(seed)])
            rows.append(
                {
                    "prompt_id": hashlib.sha256(key.encode()).hexdigest()[:16],
                    "class": spec.name,
                    "class_id": class_id,
                    "phrase": spec.text,
                    "template": cell.template,
                    "prompt": cell.prompt,
                    "negative_prompt": cfg.negative_prompt,
                    "seed": seed,
                    **cell.values,
                }
            )
    frame = pd.DataFrame(rows, columns=FIXED_COLUMNS + list(cfg.axes))
    return frame.astype({"class_id": "int64", "seed": "int64"}).reset_index(drop=True)


def _quotas(cfg: PromptsConfig) -> list[int]:
    """Prompts per class: ``count`` where set; the rest share ``total - sum(counts)`` by weight.

    Largest-remainder rounding: each weighted class gets the floor of its exact share, and the leftover
    prompts go one each to the largest fractional parts (ties to the earlier class), so the quotas sum
    to ``total`` exactly. A class with neither count nor weight weighs 1. With every class counted,
    ``total`` is not used.
    """
    quotas = [c.count or 0 for c in cfg.classes]
    weighted = [i for i, c in enumerate(cfg.classes) if c.count is None]
    if not weighted:
        return quotas
    share = cfg.total - sum(quotas)  # config guarantees total is set when some class has no count
    if share < 0:
        raise ValueError(f"prompts.total: {cfg.total} is less than the {sum(quotas)} prompts the counts ask for")
    weights = [cfg.classes[i].weight or 1.0 for i in weighted]
    exact = [share * w / sum(weights) for w in weights]
    floors = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weighted)), key=lambda j: floors[j] - exact[j])  # stable: ties keep order
    for j in by_remainder[: share - sum(floors)]:
        floors[j] += 1
    for i, quota in zip(weighted, floors, strict=True):
        quotas[i] = quota
        if quota == 0:
            logger.warning(
                "prompts.classes[name=%s]: weight too small, no prompts out of %d", cfg.classes[i].name, share
            )
    return quotas


def _grid(cfg: PromptsConfig, spec: ClassSpec) -> list[_Cell]:
    """The distinct rendered prompts of one class, in config order (templates, then axes, then values)."""
    where = f"prompts.classes[name={spec.name}]"
    _check_text(f"{where}: phrase {spec.text!r}", spec.text)
    cells: dict[str, _Cell] = {}
    for template in cfg.templates:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        used = [axis for axis in cfg.axes if axis in fields]
        # Axes the template skips multiply every cell alike; keeping their sums keeps templates equal-weight
        # without enumerating values that cannot change the text.
        skipped = math.prod(sum(cfg.axes[a].values()) for a in cfg.axes if a not in fields)
        for combo in itertools.product(*(cfg.axes[a].items() for a in used)):
            values = {axis: value for axis, (value, _) in zip(used, combo, strict=True)}
            try:
                prompt = _clean(template.format(phrase=spec.text, **{"class": spec.name}, **values))
            except (KeyError, IndexError, AttributeError) as exc:
                # tasks.config lets axis names like "a.b" or "0" pass, but str.format reads them as an
                # attribute or a position; name the template instead of failing with a bare KeyError.
                raise ValueError(
                    f"prompts.templates: {template!r} cannot be rendered ({exc!r}); an axis used in a "
                    "template needs a name that is not a number and has no '.' or '['"
                ) from None
            if not prompt:
                raise ValueError(f"{where}: template {template!r} renders an empty prompt with {values}")
            weight = skipped * math.prod(w for _, w in combo)
            if prompt in cells:
                cells[prompt].weight += weight
            else:
                cells[prompt] = _Cell(prompt, template, {a: values.get(a, "") for a in cfg.axes}, weight)
    return list(cells.values())


def _clean(text: str) -> str:
    """Collapse whitespace and the ", ," an empty axis value leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(?:\s*,)*", ",", text)
    return text.strip(" ,")


def _check_text(where: str, text: str) -> None:
    # Whitespace (newlines of a YAML block scalar, tabs) is collapsed by _clean; any other control,
    # format or unassigned character is invisible in logs and changes the text encoder's tokens.
    bad = [c for c in text if unicodedata.category(c).startswith("C") and not c.isspace()]
    if bad:
        raise ValueError(f"{where}: contains control character(s) {', '.join(f'U+{ord(c):04X}' for c in bad)}")


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator keyed by the config seed (any sign) and names, independent of draw order elsewhere."""
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _draw(rng: np.random.Generator, weights: np.ndarray, quota: int) -> list[int]:
    """Indices of ``quota`` cells, weighted, without replacement; past the grid size, whole passes repeat."""
    order: list[int] = []
    while len(order) < quota:
        # Efraimidis-Spirakis: the k smallest Exp(1)/w are a weighted sample without replacement.
        keys = rng.exponential(size=len(weights)) / weights
        order.extend(np.argsort(keys, kind="stable")[: quota - len(order)].tolist())
    return order


def _draw_seeds(rng: np.random.Generator, quota: int, used: set[int]) -> list[int]:
    """``quota`` seeds unused by earlier rows (adds them to ``used``), so no (prompt, seed) repeats."""
    seeds: list[int] = []
    while len(seeds) < quota:
        for seed in rng.integers(0, _SEED_RANGE, size=quota - len(seeds)).tolist():
            if seed not in used:
                used.add(seed)
                seeds.append(seed)
    return seeds
