"""dataset: assemble accepted images (and optional real labelled images) into a YOLO dataset.

Layout written (built beside the target, then swapped in, so a crash leaves the old one whole)::

    <out>/images/{train,val}/<id>.png
    <out>/labels/{train,val}/<id>.txt
    <out>/data.yaml          names; paths relative to this file
    <out>/manifest.parquet   one row per image with its full provenance

With ``dataset.detail`` the accepted images are written with real images' fine detail added
(tasks/detail.py; their labels were made on the clean image), and the manifest's ``detail`` is True.

The split is decided per image by a hash of (seed, id), so adding images never moves old ones.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from tasks.config import DatasetConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# Columns of the run tables that are copied into the dataset manifest.
PROVENANCE = [
    "image_id",
    "prompt_id",
    "class",
    "prompt",
    "negative_prompt",
    "seed",
    "model",
    "model_hash",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "file_sha256",
    "confidence",
    "detections",
]


@dataclass(frozen=True)
class DatasetResult:
    path: Path
    data_yaml: Path
    train: int
    val: int
    synthetic: int
    real: int  # real images mixed in, the recoloured ones included
    restyled: int = 0  # real images recoloured to a value's colours (dataset.restyle)


def split_of(image: str, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"``, stable for an image whatever else is in the dataset."""
    bucket = int(hashlib.sha256(f"{seed}:{image}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def check_label_file(path: Path, num_classes: int) -> list[str]:
    """The label file's lines if every one is ``class cx cy w h`` with a class in range and
    coordinates in [0, 1].

    Raises:
        ValueError: naming the file, the line and what is wrong.
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) != 5:
            raise ValueError(f"{where}: expected 'class cx cy w h', got {line!r}")
        try:
            class_id, coords = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{where}: not numbers: {line!r}") from None
        if not 0 <= class_id < num_classes:
            raise ValueError(f"{where}: class id {class_id} out of range 0..{num_classes - 1}")
        if not all(0.0 <= v <= 1.0 for v in coords):
            raise ValueError(f"{where}: coordinates must lie in [0, 1], got {coords}")
    return lines


def check_image_file(path: Path) -> None:
    """Raises ValueError naming the file if it is empty, truncated or not an image."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises several kinds for broken files
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def find_real_images(real_dir: Path, num_classes: int) -> pd.DataFrame:
    """Real labelled images in a YOLO folder (``images/**`` with ``labels/**`` mirroring it), checked.

    Raises:
        FileNotFoundError / ValueError: naming the folder or the first bad file.
    """
    images_dir, labels_dir = real_dir / "images", real_dir / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(f"dataset.real: {real_dir}: expected images/ and labels/ folders")
    rows = []
    for image in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        label = (labels_dir / image.relative_to(images_dir)).with_suffix(".txt")
        if not label.is_file():
            raise ValueError(f"dataset.real: {image}: no label file {label}")
        check_image_file(image)
        check_label_file(label, num_classes)
        name = "real_" + image.relative_to(images_dir).with_suffix("").as_posix().replace("/", "_")
        rows.append({"image_id": name, "path": str(image), "label_path": str(label), "source": "real"})
    if not rows:
        raise ValueError(f"dataset.real: {real_dir}: no images found")
    return pd.DataFrame(rows)


def build_dataset(validated: pd.DataFrame, class_names: list[str], cfg: DatasetConfig, out_dir: Path) -> DatasetResult:
    """Write a YOLO dataset of the accepted images, plus real ones at ``cfg.real_ratio`` and, with
    ``cfg.restyle``, real ones recoloured to each of its values' colours in turn (``restyle.share`` per
    accepted image; :mod:`tasks.restyle`).

    Args:
        validated: the validate stage's table (accepted, image_id, path, label_path, ...).
        class_names: class names in id order.
        cfg: split, seed and real-data settings.
        out_dir: replaced whole by the new dataset.

    Raises:
        ValueError: no accepted image, or a bad real file or label.
    """
    synthetic = validated[validated["accepted"]].drop_duplicates("image_id").copy()
    if synthetic.empty:
        raise ValueError("dataset: no accepted images to build a dataset from (see the validate stage's reasons)")
    synthetic["source"] = "synthetic"
    parts = [synthetic]
    mixes_real = cfg.real is not None and (cfg.real_ratio > 0 or cfg.restyle is not None)
    real = find_real_images(cfg.real, len(class_names)) if mixes_real else None
    if real is not None and cfg.real_ratio > 0:
        wanted = min(len(real), round(cfg.real_ratio * len(synthetic)))
        order = np.random.default_rng(cfg.seed).permutation(len(real))[:wanted]
        parts.append(real.iloc[sorted(order)])
    colours = {}
    if cfg.restyle is not None and real is not None:  # real images to recolour, each to the next value's colours
        from tasks.restyle import restyle_stats, values_in_turn

        colours = restyle_stats(cfg.restyle)
        wanted = min(len(real), round(cfg.restyle.share * len(synthetic)))
        restyled = real.iloc[sorted(np.random.default_rng([cfg.seed, 1]).permutation(len(real))[:wanted])].copy()
        restyled["restyle"] = values_in_turn(len(restyled), colours)
        restyled["image_id"] = "restyled_" + restyled["restyle"] + "_" + restyled["image_id"]
        restyled["source"] = "restyled"
        parts.append(restyled)
    table = pd.concat(parts, ignore_index=True)
    table["split"] = [split_of(i, cfg.seed, cfg.val_fraction) for i in table["image_id"]]
    grains = {}
    if cfg.detail is not None:  # fitted on every generated image of a value, not just the accepted
        from tasks.detail import detail_grains

        made = validated[validated["status"] == "ok"] if "status" in validated else validated
        grains = detail_grains(cfg.detail, made.drop_duplicates("image_id"))
    values = table[cfg.detail.axis].astype(str) if cfg.detail and grains else pd.Series("", index=table.index)
    table["detail"] = (table["source"] == "synthetic") & values.isin(list(grains))
    if cfg.val_fraction > 0 and len(table) > 1 and not (table["split"] == "val").any():
        table.loc[table.index[-1], "split"] = "val"  # ultralytics needs at least one val image

    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    for index, row in table.iterrows():
        image, label = Path(row["path"]), Path(row["label_path"])
        lines = check_label_file(label, len(class_names))
        if row["source"] == "synthetic" and not lines:
            raise ValueError(f"{label}: an accepted image has an empty label file")
        dest = f"{row['split']}/{row['image_id']}"
        (staging / "images" / row["split"]).mkdir(parents=True, exist_ok=True)
        (staging / "labels" / row["split"]).mkdir(parents=True, exist_ok=True)
        suffix = ".png" if row["detail"] or row["source"] == "restyled" else image.suffix.lower()
        if row["source"] == "restyled":
            from tasks.colour import rescaled

            Image.fromarray(rescaled(image, colours[row["restyle"]])).save(staging / "images" / f"{dest}.png")
        elif row["detail"]:
            from tasks.detail import grained_copy

            grained_copy(image, grains[str(row[cfg.detail.axis])], cfg.seed, staging / "images" / f"{dest}.png")
        else:
            shutil.copyfile(image, staging / "images" / f"{dest}{suffix}")
        (staging / "labels" / f"{dest}.txt").write_text("\n".join(lines) + "\n")
        table.loc[index, "file"] = f"images/{dest}{suffix}"
    data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(class_names))}
    (staging / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    restyle_column = ["restyle"] if colours else []  # the value whose colours a recoloured image took
    manifest = table[["file", "split", "source", "detail", *restyle_column, *[c for c in PROVENANCE if c in table]]]
    manifest.sort_values("file").to_parquet(staging / "manifest.parquet", index=False)

    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    counts = table["split"].value_counts()
    return DatasetResult(
        path=out_dir,
        data_yaml=out_dir / "data.yaml",
        train=int(counts.get("train", 0)),
        val=int(counts.get("val", 0)),
        synthetic=len(synthetic),
        real=len(table) - len(synthetic),
        restyled=int((table["source"] == "restyled").sum()),
    )
