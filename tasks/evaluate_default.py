"""How good is the embedded default? The generator's fidelity, judged by detectors, beside real images.

Fidelity of an image = a detector finds the prompted class in it at ``conf`` or more. Each (class,
condition) cell gets the same number of images from three sources:

- ``generated``: the generator's images for prompts like "a red star, fog";
- ``real``: single-object world scenes of that class under that condition;
- ``roundtrip``: the same real scenes after the generator's autoencoder (encode, decode): the ceiling
  the latent space puts on what the diffusion model can draw.

Two judges: the default validator (trained on common conditions only) and a reference detector trained
on every condition. A cell is judged by the validator when its condition is common and by the reference
when it is rare, since the validator has never seen fog or night. Both verdicts are kept in the table.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from tasks.layout import POSITIONS, SIZES
from tasks.workspace import atomic_path
from tasks.world import COLOURS, COMMON_CONDITIONS, render_scene

SOURCES = ("generated", "real", "roundtrip")


def cell_seed(seed: int, cls: str, condition: str, i: int) -> int:
    """A stable per-image seed from the cell and the image's index in it."""
    return zlib.crc32(f"{seed}:{cls}:{condition}:{i}".encode())


def prompt_table(
    classes: Sequence[str], conditions: Sequence[str], per_cell: int, seed: int = 0, layout: bool = False
) -> pd.DataFrame:
    """``per_cell`` prompts per (class, condition), colours in turn, in the prompt expander's words.

    With ``layout``, each prompt also asks for a size and a place ("a small red star at top left, fog"),
    both in turn (places step by 4 of the 9, so sizes and places do not move in lockstep); the
    ``size`` and ``position`` columns hold them ("" without ``layout``).
    """
    colours = list(COLOURS)
    rows = []
    for cls in classes:
        for condition in conditions:
            for i in range(per_cell):
                colour = colours[i % len(colours)]
                size, position = (SIZES[i % len(SIZES)], POSITIONS[(4 * i) % len(POSITIONS)]) if layout else ("", "")
                words = f"a {size} {colour} {cls} at {position}" if layout else f"a {colour} {cls}"
                rows.append({
                    "class": cls, "condition": condition, "colour": colour, "size": size, "position": position,
                    "prompt": f"{words}, {condition}", "negative_prompt": "",
                    "seed": cell_seed(seed, cls, condition, i),
                })  # fmt: skip
    return pd.DataFrame(rows)


def render_real(
    classes: Sequence[str], conditions: Sequence[str], per_cell: int, out_dir: Path, seed: int = 0
) -> pd.DataFrame:
    """Render ``per_cell`` single-object world scenes per (class, condition) into ``out_dir``.

    Scenes are drawn per condition from a seeded stream and kept for the class they show, so the set is
    deterministic. Existing files are reused (the renderer is deterministic too).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for condition in conditions:
        wanted = {cls: 0 for cls in classes}
        for j in range(per_cell * len(classes) * 50):
            if all(n >= per_cell for n in wanted.values()):
                break
            rng = np.random.default_rng(cell_seed(seed, "real", condition, j))
            scene = render_scene(rng, condition, n_objects=1)
            cls = scene.attributes["objects"][0]["class"]
            if cls not in wanted or wanted[cls] >= per_cell:
                continue
            path = out_dir / f"{cls}-{condition}-{wanted[cls]:03d}.png"
            if not path.is_file():
                with atomic_path(path) as tmp:
                    scene.image.save(tmp, format="PNG")
            rows.append({"class": cls, "condition": condition, "caption": scene.caption, "path": str(path)})
            wanted[cls] += 1
        short = {cls: n for cls, n in wanted.items() if n < per_cell}
        if short:
            raise RuntimeError(f"the world drew too few single-object scenes for {short} under {condition}")
    return pd.DataFrame(rows)


def autoencoder_round_trip(vae_dir: Path, paths: Sequence[str], out_dir: Path, batch: int = 64) -> list[str]:
    """Encode and decode each image with the generator's ``AutoencoderKL`` (the posterior mean).

    Finished images in ``out_dir`` are reused; their names carry the autoencoder's digest, so a
    retrained one makes (and has detected) its own.
    """
    import torch
    from diffusers import AutoencoderKL

    from tasks.generation import hash_model_dir, pixels_to_tensor

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32, local_files_only=True).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hash_model_dir(vae_dir)
    outs = [
        out_dir / f"{Path(p).stem}-roundtrip-{digest}.png" for p in paths
    ]  # names of their own: detections are cached by name
    todo = [i for i, out in enumerate(outs) if not out.is_file()]
    for start in tqdm(range(0, len(todo), batch), desc="autoencoder round trip", unit="batch"):
        chunk = todo[start : start + batch]
        x = pixels_to_tensor(np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in chunk]))
        with torch.inference_mode():
            z = vae.encode(x).latent_dist.mean
            y = vae.decode(z).sample.clamp(-1, 1)
        pixels = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        for i, image in zip(chunk, pixels, strict=True):
            with atomic_path(outs[i]) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
    return [str(p) for p in outs]


def found(detections: Sequence[Sequence[dict]], intended: Sequence[str]) -> list[bool]:
    """Whether each image's detections include its intended class (they are already above ``conf``)."""
    return [any(d["name"] == cls for d in dets) for dets, cls in zip(detections, intended, strict=True)]


def judged(table: pd.DataFrame) -> pd.Series:
    """The verdict that counts: the validator's for common conditions, the reference's for rare ones."""
    common = table["condition"].isin(COMMON_CONDITIONS)
    return table["found_validator"].where(common, table["found_reference"])


def fidelity_summary(table: pd.DataFrame) -> dict[str, dict]:
    """Share of images judged to show the prompted class: overall, per condition, per class, per cell.

    ``table`` has source, class, condition, found_validator and found_reference columns.
    """
    table = table.assign(ok=judged(table))
    out: dict[str, dict] = {}
    for source, rows in table.groupby("source", sort=False):
        out[str(source)] = {
            "images": len(rows),
            "overall": round(float(rows["ok"].mean()), 4),
            "by_condition": {
                str(k): round(float(v), 4) for k, v in rows.groupby("condition", sort=False)["ok"].mean().items()
            },
            "by_class": {str(k): round(float(v), 4) for k, v in rows.groupby("class", sort=False)["ok"].mean().items()},
            "by_cell": {
                f"{cls}/{condition}": round(float(v), 4)
                for (cls, condition), v in rows.groupby(["class", "condition"], sort=False)["ok"].mean().items()
            },
            "validator_overall": round(float(rows["found_validator"].mean()), 4),
            "reference_overall": round(float(rows["found_reference"].mean()), 4),
        }
    return out


def sample_grid(
    table: pd.DataFrame, classes: Sequence[str], conditions: Sequence[str], per_tile: int = 3, thumb: int = 64
) -> Image.Image:
    """Rows = class, columns = condition; each tile shows the cell's first ``per_tile`` images side by side."""
    font = ImageFont.load_default()
    label_w, label_h, gap = 60, 14, 6
    tile_w = per_tile * thumb
    sheet = Image.new(
        "RGB", (label_w + len(conditions) * (tile_w + gap), label_h + len(classes) * (thumb + gap)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for c, condition in enumerate(conditions):
        draw.text((label_w + c * (tile_w + gap) + 2, 1), condition, fill="black", font=font)
    for r, cls in enumerate(classes):
        y = label_h + r * (thumb + gap)
        draw.text((2, y + thumb // 2 - 5), cls, fill="black", font=font)
        for c, condition in enumerate(conditions):
            cell = table[(table["class"] == cls) & (table["condition"] == condition)]
            for k, path in enumerate(cell["path"].head(per_tile)):
                with Image.open(path) as image:
                    tile = image.convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST)
                sheet.paste(tile, (label_w + c * (tile_w + gap) + k * thumb, y))
    return sheet


def markdown_report(result: dict, classes: Sequence[str], conditions: Sequence[str]) -> str:
    """The report in ``docs/default-model.md``: fidelity tables, validator mAP, training cost."""
    fid = result["fidelity"]
    lines = [
        "# The embedded default, measured",
        "",
        f"Written by `{result['command']}` on {result['date']} (code {result['code']}).",
        f"{result['per_cell']} images per class x condition cell and source. A cell's share is the fraction of",
        f"images in which the judge finds the prompted class at conf >= {result['conf']}; the judge is the",
        "default validator for common conditions and the reference detector (trained on every condition) for rare",
        f"ones. With {result['per_cell']} images a cell's share is uncertain by about "
        f"+/-{100 * (0.25 / result['per_cell']) ** 0.5:.0f} points.",
        "",
        "![samples](default-samples.png)",
        "",
        "## Generator fidelity",
        "",
        *(
            [
                f"Generated with {g['num_inference_steps']} steps of the pipeline's scheduler at guidance scale "
                f"{g['guidance_scale']}"
                + (f" and class guidance {g['class_guidance']}" if g.get("class_guidance") else "")
                + " (params `generate`; `python -m bench.guidance` compares scales)."
            ]
            if (g := result.get("generation"))
            else []
        ),
        "",
        "| source | overall | " + " | ".join(conditions) + " | " + " | ".join(classes) + " |",
        "|---|---|" + "---|" * (len(conditions) + len(classes)),
    ]
    for source in SOURCES:
        row = fid[source]
        cells = [f"{row['by_condition'][k]:.2f}" for k in conditions] + [f"{row['by_class'][c]:.2f}" for c in classes]
        lines.append(f"| {source} | **{row['overall']:.2f}** | " + " | ".join(cells) + " |")
    lines += ["", "Generated images, per cell:", "", "| class | " + " | ".join(conditions) + " |",
              "|---|" + "---|" * len(conditions)]  # fmt: skip
    for cls in classes:
        cells = [f"{fid['generated']['by_cell'][f'{cls}/{k}']:.2f}" for k in conditions]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    worst = min(fid["generated"]["by_cell"].items(), key=lambda kv: kv[1])
    lines += [
        "",
        f"Targets: overall >= 0.90 ({'met' if fid['generated']['overall'] >= 0.9 else 'NOT met'}), every cell "
        f">= 0.80 ({'met' if worst[1] >= 0.8 else 'NOT met'}; lowest {worst[0]} {worst[1]:.2f}).",
        "",
        "## Detectors: mAP50-95 on the held-out world test sets",
        "",
        "| detector | " + " | ".join(conditions) + " |",
        "|---|" + "---|" * len(conditions),
    ]
    for name, per_condition in result["map50_95"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_condition[k]:.3f}" for k in conditions) + " |")
    lines += ["", "## Training cost and size", "", "| model | trained in | size | command |", "|---|---|---|---|"]
    for name, record in result["training"].items():
        if record is None:
            lines.append(f"| {name} | (no training record) | | |")
            continue
        lines.append(
            f"| {name} | {record['seconds'] / 60:.1f} min | {record['size_mb']:.1f} MB | `{record['command']}` |"
        )
        if guide := record.get("class_guide"):  # trained after the pipeline, by `synthdet train-guide`
            minutes = guide["figures"]["guide_seconds"] / 60
            lines.append(f"| {name}'s class guide | {minutes:.1f} min | (in the folder) | `{guide['command']}` |")
    lines.append("")
    return "\n".join(lines)
