"""A contact sheet of the world: rows = classes (two scenes each), columns = conditions.

Each row is one scene (same seed) under every condition; the first column shows its labels.

    python -m bench.world_preview            # writes docs/world-preview.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.world import CLASSES, CONDITIONS, render_scene

OUT = Path(__file__).resolve().parents[1] / "docs" / "world-preview.png"
TILE, HEADER, LABEL = 128, 16, 64
BOX_COLOURS = {"circle": (255, 0, 255), "square": (0, 255, 255), "triangle": (255, 128, 0), "star": (255, 255, 255)}


def preview(scenes_per_class: int = 2) -> Image.Image:
    font = ImageFont.load_default()
    columns = ["labels", *CONDITIONS]
    used: set[int] = set()
    rows = [(name, seed) for name in CLASSES for seed in _seeds_showing(name, scenes_per_class, used)]
    sheet = Image.new("RGB", (LABEL + TILE * len(columns), HEADER + TILE * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, column in enumerate(columns):
        draw.text((LABEL + c * TILE + 4, 2), column, fill="black", font=font)
    for r, (name, seed) in enumerate(rows):
        y = HEADER + r * TILE
        draw.text((4, y + TILE // 2 - 6), name, fill="black", font=font)
        for c, condition in enumerate(columns):
            scene = render_scene(np.random.default_rng(seed), "plain" if condition == "labels" else condition)
            tile = scene.image.resize((TILE, TILE), Image.Resampling.NEAREST)
            if condition == "labels":
                pen = ImageDraw.Draw(tile)
                for class_id, cx, cy, w, h in scene.boxes:
                    x0, y0, x1, y1 = (np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * TILE).tolist()
                    pen.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOURS[CLASSES[int(class_id)]])
            sheet.paste(tile, (LABEL + c * TILE, y))
    return sheet


def _seeds_showing(name: str, n: int, used: set[int]) -> list[int]:
    """The first ``n`` unused seeds whose scene holds a ``name``: the first alone, the others in company."""
    found: list[int] = []
    for seed in range(10_000):
        if seed in used:
            continue
        objects = render_scene(np.random.default_rng(seed), "plain").attributes["objects"]
        alone = len(objects) == 1
        if any(o["class"] == name for o in objects) and alone == (not found):
            found.append(seed)
            used.add(seed)
            if len(found) == n:
                break
    return found


def main(argv: list[str] | None = None) -> Path:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    preview().save(tmp, format="PNG")
    tmp.replace(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
