"""The embedded world: seeded, labelled 64x64 scenes of shapes under common and rare conditions.

A stand-in for real photographs, so the pipeline can be run and measured without downloads. Each scene
holds 1-3 objects of the classes circle, square, triangle and star, in one of six named colours, on a
named background (gray, gradient, grass, brick, gravel), with clutter and 0-2 distractors that are not
classes (ellipse, cross, bar, blob). Shapes are drawn as masks at 4x and averaged down (anti-aliasing).

Conditions are camera and weather models applied to the finished scene, not random corruption:
``plain`` (daylight, the common condition, with natural exposure and white-balance spread) and the
rare ``fog`` (Koschmieder haze, thicker towards the horizon), ``night`` (moonlight plus a sodium lamp,
auto-gain that amplifies shot and read noise), ``rain`` (overcast veil, bright streaks, drops on the
lens) and ``noise`` (high-ISO sensor noise: Poisson-Gaussian, chroma blotches, row banding, hot pixels).

Labels: the tight box of each object's *visible* pixels (occluders subtracted), from the 4x mask, so
exact to a quarter pixel. Occlusion rule: placement never lets an item hide more than 20% of an earlier
object (``MIN_VISIBLE``), nor lets two shapes of one colour touch when either is an object (they would
merge into one silhouette), so every object drawn is labelled and named in the caption; none is dropped.

Captions use the prompt vocabulary (``"a {colour} {phrase}, {condition}"``): one object gives exactly
that form, "a red circle, night"; several objects are joined with " and " from left to right, "a red
circle and a blue star, night". Splitting on the last ", " gives the objects and the condition. Layout
captions add each object's size and place in the words of ``tasks.layout`` (``"a {size} {colour}
{phrase} at {position}, {condition}"``): "a small red circle at top left and a large blue star at right,
night".
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw

from tasks.layout import position_word, size_word

log = logging.getLogger(__name__)

SIZE = 64  # output side, pixels
SCALE = 4  # masks are drawn at SCALE x SIZE and averaged down
CLASSES = ("circle", "square", "triangle", "star")  # dataset class ids follow this order (as params.yaml)
COLOURS = {
    "red": (0.80, 0.14, 0.12), "green": (0.15, 0.68, 0.22), "blue": (0.14, 0.30, 0.85),
    "yellow": (0.92, 0.80, 0.16), "white": (0.93, 0.93, 0.91), "purple": (0.56, 0.22, 0.72),
}  # fmt: skip
# Distractors also wear these, so colour alone never tells an object from a distractor.
EXTRA_COLOURS = ((0.55, 0.35, 0.18), (0.95, 0.50, 0.10), (0.45, 0.45, 0.45), (0.10, 0.10, 0.10))
COMMON_CONDITIONS = ("plain",)
RARE_CONDITIONS = ("fog", "night", "rain", "noise")
CONDITIONS = COMMON_CONDITIONS + RARE_CONDITIONS
BACKGROUNDS = ("gray", "gradient", "grass", "brick", "gravel")
DISTRACTORS = ("ellipse", "cross", "bar", "blob")
OBJECT_SIZE = (20.0, 34.0)  # extent of a shape before rotation, pixels at SIZE
MIN_VISIBLE = 0.8  # share of an object's area that later items must leave visible
_Y, _X = np.mgrid[0:SIZE, 0:SIZE] / SIZE  # pixel coordinates in [0, 1), for ramps and light fields


@dataclass(frozen=True)
class Scene:
    """One rendered scene.

    Attributes:
        image: SIZE x SIZE RGB.
        boxes: (n, 5) float array of ``class_id, cx, cy, w, h``, normalised to [0, 1], left to right.
        caption: the scene in prompt vocabulary, e.g. "a red circle and a blue star, night".
        layout_caption: the same with sizes and places, e.g. "a small red circle at left and a large blue
            star at top right, night".
        attributes: condition, background, distractors and one dict per object (class, colour, size_px,
            angle, visible share, box), in the order of ``boxes``.
        masks: (n, SIZE*SCALE, SIZE*SCALE) bool, each object's visible pixels at 4x, in the order of ``boxes``.
    """

    image: Image.Image
    boxes: np.ndarray
    caption: str
    layout_caption: str
    attributes: dict
    masks: np.ndarray


@dataclass
class _Item:
    kind: str  # a class or a distractor name
    colour: tuple[float, float, float]
    mask: np.ndarray  # bool, (SIZE*SCALE, SIZE*SCALE)
    alpha: np.ndarray  # coverage of each output pixel, (SIZE, SIZE, 1) float
    info: dict


def render_scene(
    rng: np.random.Generator, condition: str, n_objects: int | None = None, background: str | None = None
) -> Scene:
    """Draw one labelled scene.

    The layout and the condition draw from two generators seeded from ``rng``, so the same ``rng`` state
    gives the same objects and boxes under every condition.

    Args:
        rng: the only source of randomness.
        condition: one of ``CONDITIONS``.
        n_objects: objects wanted (1-3); None draws it uniformly. Fewer are drawn if they cannot be
            placed without hiding each other.
        background: one of ``BACKGROUNDS``; None draws it.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} is not one of {BACKGROUNDS}")
    if n_objects is not None and not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects}")
    layout, weather = (np.random.default_rng(s) for s in rng.integers(2**63, size=2))
    background = background or str(layout.choice(BACKGROUNDS))
    image = _background(layout, background)
    _scatter_clutter(layout, image)
    kinds = [str(layout.choice(CLASSES)) for _ in range(n_objects or int(layout.integers(1, 4)))]
    kinds += [str(layout.choice(DISTRACTORS)) for _ in range(int(layout.choice(3, p=[0.3, 0.45, 0.25])))]
    items = _place(layout, [kinds[i] for i in layout.permutation(len(kinds))])
    for item in items:
        _paint(layout, image, item)
    image = _apply_condition(weather, image, condition)

    visible = _visible_masks(items)
    objects, masks = [], []
    for item, mask in zip(items, visible, strict=True):
        if item.kind not in CLASSES:
            continue
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, x1, y0, y1 = xs[0] / SCALE, (xs[-1] + 1) / SCALE, ys[0] / SCALE, (ys[-1] + 1) / SCALE
        box = [(x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE]
        share = round(float(np.count_nonzero(mask) / np.count_nonzero(item.mask)), 3)
        objects.append({"class": item.kind, **item.info, "visible": share, "box": [round(float(v), 6) for v in box]})
        masks.append(mask)
    order = sorted(range(len(objects)), key=lambda i: objects[i]["box"][0])
    objects, masks = [objects[i] for i in order], np.stack([masks[i] for i in order])
    boxes = np.array([[CLASSES.index(o["class"]), *o["box"]] for o in objects], dtype=float).reshape(-1, 5)
    caption = " and ".join(f"a {o['colour']} {o['class']}" for o in objects) + f", {condition}"
    layout_caption = (
        " and ".join(
            f"a {size_word(*o['box'][2:])} {o['colour']} {o['class']} at {position_word(*o['box'][:2])}"
            for o in objects
        )
        + f", {condition}"
    )
    attributes = {"condition": condition, "background": background, "objects": objects,
                  "distractors": [i.kind for i in items if i.kind in DISTRACTORS]}  # fmt: skip
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return Scene(Image.fromarray(pixels, "RGB"), boxes, caption, layout_caption, attributes, masks)


# --- layout ---------------------------------------------------------------------------------------------
def _place(rng: np.random.Generator, kinds: Sequence[str]) -> list[_Item]:
    """Items in drawing order, each on top of the earlier ones; each is redrawn elsewhere until it fits
    (up to 20 times, then dropped). Only objects constrain, so the first object always fits."""
    items: list[_Item] = []
    for kind in kinds:
        visible = _visible_masks(items)
        for _ in range(20):
            candidate = _shape(rng, kind)
            if _fits(candidate, items, visible):
                items.append(candidate)
                break
    return items


def _fits(candidate: _Item, items: Sequence[_Item], visible: Sequence[np.ndarray]) -> bool:
    """False if ``candidate`` would leave an earlier object less than ``MIN_VISIBLE`` of its area, or would
    touch an item of its own colour where either is an object: two red shapes that merge into one
    silhouette cannot be boxed apart, by people or by detectors."""
    for item, seen in zip(items, visible, strict=True):
        if item.kind in CLASSES and np.count_nonzero(seen & ~candidate.mask) < MIN_VISIBLE * item.mask.sum():
            return False
        if (
            CLASSES.count(item.kind) + CLASSES.count(candidate.kind)
            and item.colour == candidate.colour
            and np.any(_grow(item.mask) & candidate.mask)
        ):
            return False
    return True


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one output pixel (SCALE sub-pixels) in every direction."""
    grown = mask.copy()
    for axis in (0, 1):
        for shift in (-SCALE, SCALE):
            grown |= np.roll(mask, shift, axis=axis)
    return grown


def _visible_masks(items: Sequence[_Item]) -> list[np.ndarray]:
    """Each item's mask less everything drawn after it."""
    above, visible = np.zeros((SIZE * SCALE,) * 2, bool), []
    for item in reversed(items):
        visible.append(item.mask & ~above)
        above |= item.mask
    return visible[::-1]


def _shape(rng: np.random.Generator, kind: str) -> _Item:
    """A shape's mask at 4x, its colour and attributes; ``kind`` is a class or a distractor."""
    s = rng.uniform(*OBJECT_SIZE) if kind in CLASSES else rng.uniform(8.0, 26.0)
    half = s / 2 + 1
    cx, cy = rng.uniform(half, SIZE - half, size=2)
    angle = 0.0
    if kind == "circle":
        points = _ngon(cx, cy, s / 2, 96, 0.0)
    elif kind == "square":
        angle = rng.uniform(-20, 20)
        points = _ngon(cx, cy, s * 0.8 / np.sqrt(2), 4, 45 + angle)
    elif kind == "triangle":
        angle = rng.uniform(-15, 15)
        points = _ngon(cx, cy + s * 0.1, s / 2, 3, -90 + angle)
    elif kind == "star":
        angle = rng.uniform(-20, 20)
        outer = _ngon(cx, cy, s / 2, 5, -90 + angle)
        inner = _ngon(cx, cy, s / 2 * rng.uniform(0.45, 0.55), 5, -54 + angle)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif kind == "ellipse":  # elongated enough never to pass for a circle
        t, phi = np.linspace(0, 2 * np.pi, 64, endpoint=False), rng.uniform(0, np.pi)
        a, b = s / 2, s / 2 * rng.uniform(0.3, 0.55)
        points = list(zip(cx + a * np.cos(t) * np.cos(phi) - b * np.sin(t) * np.sin(phi),
                          cy + a * np.cos(t) * np.sin(phi) + b * np.sin(t) * np.cos(phi), strict=True))  # fmt: skip
    elif kind in ("cross", "bar"):
        w, phi = s * rng.uniform(0.15, 0.3), rng.uniform(0, np.pi)
        arms = [phi, phi + np.pi / 2] if kind == "cross" else [phi]
        points = [_bar(cx, cy, s, w, a) for a in arms]
    elif kind == "blob":  # a lumpy potato: two low harmonics, never round, never pointed
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = s / 2 * (1 + 0.28 * np.cos(2 * t + rng.uniform(0, 6.3)) + 0.15 * np.cos(3 * t + rng.uniform(0, 6.3))) / 1.43
        points = list(zip(cx + r * np.cos(t), cy + r * np.sin(t), strict=True))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    canvas = Image.new("L", (SIZE * SCALE,) * 2, 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in points if kind in ("cross", "bar") else [points]:
        draw.polygon([(x * SCALE, y * SCALE) for x, y in polygon], fill=255)
    alpha = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32)[..., None] / 255
    if kind in CLASSES:
        name = str(rng.choice(list(COLOURS)))
        colour, info = COLOURS[name], {"colour": name, "size_px": round(float(s), 2), "angle": round(float(angle), 1)}
    else:
        palette = list(COLOURS.values()) + list(EXTRA_COLOURS)
        colour, info = palette[int(rng.integers(len(palette)))], {}
    return _Item(kind, colour, np.asarray(canvas) > 0, alpha, info)


def _ngon(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    t = np.deg2rad(start_deg) + np.arange(n) * 2 * np.pi / n
    return list(zip(cx + r * np.cos(t), cy + r * np.sin(t), strict=True))


def _bar(cx: float, cy: float, length: float, width: float, phi: float) -> list[tuple[float, float]]:
    u, v = np.array([np.cos(phi), np.sin(phi)]), np.array([-np.sin(phi), np.cos(phi)])
    corners = ((-1, -1), (1, -1), (1, 1), (-1, 1))
    return [tuple(np.array([cx, cy]) + su * length / 2 * u + sv * width / 2 * v) for su, sv in corners]


# --- appearance -----------------------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, cells: int | tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-ish noise: a grid of ``cells`` (rows, columns) stretched bicubically to SIZE x SIZE."""
    rows, cols = (cells, cells) if isinstance(cells, int) else cells
    grid = Image.fromarray(rng.standard_normal((rows, cols)).astype(np.float32))
    return np.asarray(grid.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32)


def _background(rng: np.random.Generator, name: str) -> np.ndarray:
    """A SIZE x SIZE x 3 float image in [0, 1]."""
    y, x = _Y, _X
    if name == "gray":
        level = rng.uniform(0.35, 0.65) + 0.03 * _smooth(rng, 4)
        image = np.repeat(level[..., None], 3, axis=2)
    elif name == "gradient":
        a, b = rng.uniform(0.25, 0.7, 3), rng.uniform(0.25, 0.7, 3)
        phi = rng.uniform(0, 2 * np.pi)
        t = np.clip((x - 0.5) * np.cos(phi) + (y - 0.5) * np.sin(phi) + 0.5, 0, 1)[..., None]
        image = a * (1 - t) + b * t
    elif name == "grass":  # blades: noise stretched vertically, over patches of light and dry soil
        base = np.array([0.22, 0.36, 0.14]) * rng.uniform(0.8, 1.3)
        blades = _smooth(rng, (8, 48)) * 0.5 + _smooth(rng, 6) * 0.6
        image = base * (1 + 0.35 * blades[..., None]) + np.array([0.06, 0.03, 0.0]) * _smooth(rng, 3)[..., None]
    elif name == "brick":
        h = int(rng.integers(6, 11))
        row = np.arange(SIZE)[:, None] // h
        col = (np.arange(SIZE)[None, :] + (row % 2) * h) // (2 * h)
        tone = np.random.default_rng(int(rng.integers(2**32))).uniform(0.75, 1.15, (SIZE, SIZE + 1))
        brick = np.array([0.52, 0.30, 0.22]) * rng.uniform(0.7, 1.2) * tone[row, col][..., None]
        mortar = (np.arange(SIZE)[:, None] % h == 0) | ((np.arange(SIZE)[None, :] + (row % 2) * h) % (2 * h) == 0)
        image = np.where(mortar[..., None], rng.uniform(0.55, 0.7), brick)
    elif name == "gravel":
        base = rng.uniform(0.4, 0.6) * np.array([1.0, 0.95, 0.85])
        image = base * (1 + 0.18 * rng.standard_normal((SIZE, SIZE, 1)) + 0.1 * _smooth(rng, 20)[..., None])
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(image + 0.01 * rng.standard_normal((SIZE, SIZE, 3)), 0, 1).astype(np.float32)


def _scatter_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Pebbles and twigs: 1-2 px specks and short strokes, in place."""
    for _ in range(int(rng.integers(0, 16))):
        x, y = rng.integers(0, SIZE - 2, size=2)
        w, h = (int(rng.integers(1, 3)), int(rng.integers(1, 3))) if rng.random() < 0.7 else (
            (int(rng.integers(3, 7)), 1) if rng.random() < 0.5 else (1, int(rng.integers(3, 7))))  # fmt: skip
        image[y : y + h, x : x + w] = rng.uniform(0.1, 0.9) * rng.uniform(0.8, 1.0, 3)


def _paint(rng: np.random.Generator, image: np.ndarray, item: _Item) -> None:
    """Composite one item in place: its colour with jitter, a light shading ramp and material grain."""
    colour = np.clip(np.array(item.colour) * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    phi, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.25)
    rows, cols = np.flatnonzero(item.alpha.any(axis=(1, 2))), np.flatnonzero(item.alpha.any(axis=(0, 2)))
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)  # work only where the shape is
    ramp = 1 + strength * ((_X[box] - 0.5) * np.cos(phi) + (_Y[box] - 0.5) * np.sin(phi))
    layer = np.clip(colour * (ramp + 0.03 * rng.standard_normal(ramp.shape))[..., None], 0, 1)
    alpha = item.alpha[box]
    image[box] = image[box] * (1 - alpha) + layer * alpha


def _apply_condition(rng: np.random.Generator, image: np.ndarray, condition: str) -> np.ndarray:
    """The scene as a camera sees it under ``condition``; float in, float out, clipped to [0, 1]."""
    y = (np.arange(SIZE) / SIZE)[:, None, None]
    if condition == "plain":  # daylight: exposure and white balance vary from shot to shot
        image = image * rng.uniform(0.85, 1.15) * (1 + rng.uniform(-0.05, 0.05, 3))
        return _sensor(rng, image, read=rng.uniform(0.005, 0.02), shot=0.0)
    if condition == "fog":  # Koschmieder: I = J t + A (1 - t), t = exp(-beta d), denser towards the horizon
        depth = 0.6 + 0.4 * (1 - y) + 0.12 * _smooth(rng, 3)[..., None]
        t = np.exp(-rng.uniform(1.0, 1.8) * depth)
        airlight = rng.uniform(0.72, 0.88) * np.array([0.98, 1.0, 1.03])
        image = _blur(image * t + airlight * (1 - t), rng.uniform(0.4, 0.8))  # forward scatter softens edges
        return _sensor(rng, image, read=0.01, shot=0.0)
    if condition == "night":  # faint blue moonlight, often a warm sodium lamp; auto-gain lifts the noise too
        yy, xx = _Y * SIZE, _X * SIZE
        light = rng.uniform(0.07, 0.14) * np.array([0.7, 0.85, 1.2])
        if rng.random() < 0.7:
            lx, ly, radius = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(16, 40)
            falloff = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * radius**2))[..., None]
            light = light + rng.uniform(0.15, 0.4) * np.array([1.0, 0.75, 0.4]) * falloff
        gain = rng.uniform(1.5, 2.5)
        return _sensor(rng, image * light * gain, read=0.012 * gain, shot=0.012 * gain)
    if condition == "rain":  # overcast veil, bright refracting streaks, a few drops on the lens
        image = image * rng.uniform(0.5, 0.7)
        t = rng.uniform(0.3, 0.5)  # the rain curtain scatters like a thin fog
        image = image * t + rng.uniform(0.45, 0.6) * (1 - t)
        image = _streaks(rng, image)
        image = _lens_drops(rng, image)
        return _sensor(rng, image, read=0.015, shot=0.0)
    if condition == "noise":  # high ISO: a short exposure amplified, and its read and shot noise with it
        sigma = rng.uniform(0.15, 0.25)
        image = _sensor(rng, image, read=sigma, shot=sigma / 3)
        image = image + 0.04 * np.stack([_smooth(rng, 24) for _ in range(3)], axis=2)  # chroma blotches
        image = image + 0.02 * rng.standard_normal((SIZE, 1, 1))  # row banding
        hot = rng.random((SIZE, SIZE)) < 0.005
        image[hot] = rng.uniform(0.8, 1.0, (int(hot.sum()), 3))
        return np.clip(image, 0, 1)
    raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")


def _sensor(rng: np.random.Generator, image: np.ndarray, read: float, shot: float) -> np.ndarray:
    """Poisson-Gaussian noise: sigma^2 = read^2 + shot^2 * signal, per pixel and channel."""
    image = np.clip(image, 0, 1)
    sigma = np.sqrt(read**2 + shot**2 * image)
    return np.clip(image + sigma * rng.standard_normal(image.shape), 0, 1).astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, edges replicated."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(r, r) if a == axis else (0, 0) for a in range(image.ndim)], mode="edge")
        image = sum(w * np.take(padded, np.arange(i, i + SIZE), axis=axis) for i, w in enumerate(k))
    return image


def _streaks(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Falling drops caught by the exposure: thin bright lines, near-vertical, one wind tilt per image."""
    canvas = Image.new("L", (SIZE * SCALE,) * 2, 0)
    draw = ImageDraw.Draw(canvas)
    tilt = rng.uniform(-0.35, 0.35)
    for _ in range(int(rng.integers(200, 400))):
        x, y = rng.uniform(-20, SIZE * SCALE), rng.uniform(-40, SIZE * SCALE)
        length, a = rng.uniform(16, 48), tilt + rng.normal(0, 0.05)
        end = (x + length * np.sin(a), y + length * np.cos(a))
        draw.line([(x, y), end], fill=int(rng.integers(90, 255)), width=int(rng.integers(1, 3)))
    alpha = np.asarray(canvas, np.float32).reshape(SIZE, SCALE, SIZE, SCALE).mean(axis=(1, 3))[..., None] / 255
    return image * (1 - 0.8 * alpha) + 0.85 * 0.8 * alpha


def _lens_drops(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Water on the lens: out-of-focus discs that blur (and slightly brighten) what lies behind them."""
    blurred = _blur(image, 2.0) * 1.05
    yy, xx = _Y * SIZE, _X * SIZE
    for _ in range(int(rng.integers(2, 7))):
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(4, 10)
        w = np.clip(r + 1 - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]
        image = image * (1 - w) + blurred * w
    return image


# --- data sets ------------------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of image ``index`` of a split seeded ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(2, np.uint64)[0] >> 1)


def write_split(
    out_dir: Path, n: int, conditions: Sequence[str], seed: int, n_objects: int | None = None, val: str = "images"
) -> Path:
    """Render ``n`` scenes into a YOLO folder; image ``i`` has condition ``conditions[i % len]``.

    So the first ``k * len(conditions)`` files hold ``k`` images of each condition: nested subsets.
    Image ``i`` is ``render_scene(np.random.default_rng(seed_i), condition, n_objects)`` with ``seed_i``
    from ``image_seed(seed, i)``, recorded in the ``seed`` column.
    Written into ``.<name>.partial`` beside ``out_dir`` and renamed over it at the end, so a crash never
    leaves a complete-looking split.

    Writes:
        ``images/<i:06d>.png``, ``labels/<i:06d>.txt`` (``class cx cy w h`` per line),
        ``captions.parquet`` (file, caption, layout_caption, condition, background, n_objects, n_distractors, classes,
        colours, seed, objects as JSON) and ``data.yaml`` (names; train ``images``, val ``val``,
        relative to the file).

    Returns:
        ``out_dir``.
    """
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown or not conditions:
        raise ValueError(f"conditions {list(conditions)} must be a non-empty subset of {CONDITIONS}")
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    (partial / "labels").mkdir()
    rows = []
    for i in range(n):
        seed_i = image_seed(seed, i)
        scene = render_scene(np.random.default_rng(seed_i), conditions[i % len(conditions)], n_objects)
        name = f"{i:06d}"
        scene.image.save(partial / "images" / f"{name}.png")
        lines = [f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in scene.boxes]
        (partial / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        attrs = scene.attributes
        rows.append({
            "file": f"images/{name}.png", "caption": scene.caption, "layout_caption": scene.layout_caption,
            "condition": attrs["condition"],
            "background": attrs["background"], "n_objects": len(attrs["objects"]),
            "n_distractors": len(attrs["distractors"]), "classes": " ".join(o["class"] for o in attrs["objects"]),
            "colours": " ".join(o["colour"] for o in attrs["objects"]), "seed": seed_i,
            "objects": json.dumps(attrs["objects"]),
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=["file", "caption", "layout_caption", "condition", "background", "n_objects", "n_distractors",
                                        "classes", "colours", "seed", "objects"])  # fmt: skip
    frame.to_parquet(partial / "captions.parquet", index=False)
    data = {"names": dict(enumerate(CLASSES)), "train": "images", "val": val}
    (partial / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


DEFAULT_SIZES = {
    "common_train": 2000, "common_val": 200, "rare_scarce": 30, "test": 200, "captioned": 20000, "reference_train": 2000,
}  # fmt: skip


def build_world(out_dir: Path, seed: int = 0, sizes: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Write the world's "real" data sets under ``out_dir``; a size of 0 skips that set.

    Sets (``sizes`` keys, defaults in ``DEFAULT_SIZES``):
        ``common_train``: common conditions only; its data.yaml validates on ``common_val``.
        ``common_val``: common conditions only.
        ``rare_scarce``: this many images *per rare condition*, interleaved (first ``k * 4`` files =
            ``k`` of each), for the scarce-real arms.
        ``test/<condition>``: this many held-out images for every condition.
        ``captioned``: every condition in equal shares, for training the generator on captions.
        ``test/rare.yaml``: (with the test sets) every rare test set as one evaluation set.
        ``reference_train``: every condition in equal shares, labelled: for the *reference* detector
            that judges generated images of rare conditions (the default validator never saw them).

    Each set has its own seed derived from ``seed`` and its name, so no two sets share a scene.

    Returns:
        set name (``"test/fog"`` for a test set) -> its folder, which holds ``data.yaml``.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
    if unknown:
        raise ValueError(f"unknown world sets {unknown}; known: {sorted(DEFAULT_SIZES)}")
    plan: dict[str, tuple[int, Sequence[str], str]] = {
        "common_train": (sizes["common_train"], COMMON_CONDITIONS, "../common_val/images"),
        "common_val": (sizes["common_val"], COMMON_CONDITIONS, "images"),
        "rare_scarce": (sizes["rare_scarce"] * len(RARE_CONDITIONS), RARE_CONDITIONS, "images"),
        **{f"test/{c}": (sizes["test"], (c,), "images") for c in CONDITIONS},
        "captioned": (sizes["captioned"], CONDITIONS, "images"),
        "reference_train": (sizes["reference_train"], CONDITIONS, "images"),
    }
    out: dict[str, Path] = {}
    for name, (n, conditions, val) in plan.items():
        if n:
            split_seed = zlib.crc32(f"{seed}:{name}".encode())
            out[name] = write_split(Path(out_dir) / name, n, conditions, split_seed, val=val)
            log.info("world: %s, %d images", name, n)
    if sizes["test"]:
        # All rare test sets as one evaluation set: ultralytics takes a list of image folders. Its
        # `train` entry is required by the format and never used for evaluation.
        rare = [f"{c}/images" for c in RARE_CONDITIONS]
        data = {"names": dict(enumerate(CLASSES)), "train": rare[0], "val": rare}
        (Path(out_dir) / "test" / "rare.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out
