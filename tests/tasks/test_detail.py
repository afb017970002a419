"""Fine detail added back to generated images: the spectrum it adds, its colour correlation, its seeding,
and the dataset stage that writes it."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import AddDetail, DatasetConfig
from tasks.dataset import build_dataset
from tasks.detail import add_detail, add_grain, detail_grains, fit_grain, high_pass, power_spectrum

SIZE = 32


def smooth(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, SIZE, SIZE, 3) images with only coarse structure: waves of 0-2 cycles per image (periodic, so
    the Fourier transform sees no edge at the borders), around mid-grey."""
    y, x = np.mgrid[:SIZE, :SIZE] / SIZE
    images = np.full((n, SIZE, SIZE, 3), 0.5)
    for _ in range(4):
        fy, fx = rng.integers(0, 3, (2, n, 1, 1, 1))
        phase, amplitude = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3)), rng.uniform(0, 0.08, (n, 1, 1, 3))
        images += amplitude * np.cos(2 * np.pi * (fy * y[..., None] + fx * x[..., None]) + phase)
    return images


def band_power(pixels: np.ndarray, mask: np.ndarray) -> float:
    return float(power_spectrum(pixels)[:, mask].sum())


def grained(images: np.ndarray, grain, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([add_grain(np.uint8(np.round(i * 255)), grain, rng) for i in images]) / 255


@pytest.mark.parametrize("grey", [True, False])
def test_grain_gives_generated_images_the_real_high_frequency_power_and_colour_correlation(grey: bool) -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (40, SIZE, SIZE, 1 if grey else 3))
    real = np.clip(smooth(rng, 40) + noise, 0, 1)  # grey grain: the same in every channel
    made = smooth(rng, 40)
    grain = fit_grain(real, made, above=0.2)
    out = grained(made, grain)

    high, low = high_pass(SIZE, SIZE, 0.2), ~high_pass(SIZE, SIZE, 0.2)
    assert band_power(made, high) < 0.1 * band_power(real, high)
    assert band_power(out, high) == pytest.approx(band_power(real, high), rel=0.15)
    assert band_power(out, low) == pytest.approx(band_power(made, low), rel=0.1)  # the content is left alone
    residual = (out - made).reshape(-1, 3)
    correlation = np.corrcoef(residual, rowvar=False)[0, 1:]
    assert (correlation > 0.9).all() if grey else (np.abs(correlation) < 0.1).all()


def test_nothing_is_added_where_generated_images_already_have_the_detail() -> None:
    rng = np.random.default_rng(1)
    real = np.clip(smooth(rng, 20) + rng.normal(0, 0.05, (20, SIZE, SIZE, 3)), 0, 1)
    grain = fit_grain(real, real, above=0.2)

    assert grain.std.max() < 1e-9
    with pytest.raises(ValueError, match="one size"):
        fit_grain(real, real[:, :16, :16], above=0.2)


def test_add_detail_is_seeded_by_file_name_and_leaves_values_without_grain(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    real = np.clip(smooth(rng, 8) + rng.normal(0, 0.1, (8, SIZE, SIZE, 3)), 0, 1)
    grains = {"fog": fit_grain(real, smooth(rng, 8), above=0.2)}
    paths = []
    for name in ("a", "b"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(np.uint8(smooth(rng, 1)[0] * 255)).save(paths[-1])

    first = add_detail(paths, ["fog", "plain"], grains, 0, tmp_path / "out")
    assert first[1] == paths[1]  # plain has no grain: the image as it is
    again = add_detail(paths, ["fog", "plain"], grains, 0, tmp_path / "again")
    assert Path(first[0]).read_bytes() == Path(again[0]).read_bytes()
    other_seed = add_detail(paths, ["fog", "plain"], grains, 1, tmp_path / "seed1")
    assert Path(first[0]).read_bytes() != Path(other_seed[0]).read_bytes()
    assert np.asarray(Image.open(first[0])).std() > np.asarray(Image.open(paths[0])).std()


def write_images(folder: Path, pixels: np.ndarray, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(pixels):
        paths.append(folder / f"{prefix}{i:03d}.png")
        Image.fromarray(np.uint8(np.round(p * 255))).save(paths[-1])
    return paths


def test_dataset_stage_writes_accepted_images_with_detail_and_their_labels_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    grainy = np.clip(smooth(rng, 6) + rng.normal(0, 0.1, (6, SIZE, SIZE, 3)), 0, 1)
    write_images(tmp_path / "real" / "fog", grainy, "r")
    made = write_images(tmp_path / "made", smooth(rng, 12), "g")
    rows = []
    for i, path in enumerate(made):
        label = tmp_path / "made" / f"{path.stem}.txt"
        label.write_text("0 0.5 0.5 0.25 0.25\n")
        rows.append({"image_id": path.stem, "class": "circle", "path": str(path), "status": "ok", "accepted": i % 2 == 0,
                     "label_path": str(label), "condition": "fog" if i < 8 else "plain"})  # fmt: skip
    validated = pd.DataFrame(rows)
    detail = AddDetail(images={"fog": str(tmp_path / "real" / "fog")}, above=0.2)
    result = build_dataset(validated, ["circle"], DatasetConfig(val_fraction=0.0, detail=detail), tmp_path / "ds")

    manifest = pd.read_parquet(result.path / "manifest.parquet").set_index("image_id")
    assert manifest["detail"].to_dict() == {f"g{i:03d}": i < 8 for i in range(0, 12, 2)}
    for image_id, row in manifest.iterrows():
        written = np.asarray(Image.open(result.path / row["file"]), dtype=float)
        source = np.asarray(Image.open(tmp_path / "made" / f"{image_id}.png"), dtype=float)
        changed = np.abs(written - source).mean()
        assert changed > 2 if row["detail"] else changed == 0
        label = (result.path / row["file"].replace("images/", "labels/")).with_suffix(".txt")
        assert label.read_text() == "0 0.5 0.5 0.25 0.25\n"

    with pytest.raises(ValueError, match="dataset.detail.axis"):
        build_dataset(validated.drop(columns=["condition"]), ["circle"],
                      DatasetConfig(val_fraction=0.0, detail=detail), tmp_path / "ds2")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="dataset.detail.images.fog"):
        detail_grains(AddDetail(images={"fog": str(tmp_path / "missing")}), validated)
