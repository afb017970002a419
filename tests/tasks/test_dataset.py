from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tasks.config import DatasetConfig
from tasks.dataset import build_dataset, check_label_file, find_real_images, split_of

CLASSES = ["circle", "square"]


def make_validated(tmp_path: Path, n: int, accepted_every: int = 1) -> pd.DataFrame:
    """A validate-stage table with n images; every ``accepted_every``-th is accepted with a label."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image_id = f"img{i:03d}"
        path = images / f"{image_id}.png"
        Image.new("RGB", (16, 16), (i * 7 % 255, 0, 0)).save(path)
        accepted = i % accepted_every == 0
        label = labels / f"{image_id}.txt"
        if accepted:
            label.write_text(f"{i % 2} 0.5 0.5 0.25 0.25\n")
        rows.append(
            {
                "image_id": image_id,
                "class": CLASSES[i % 2],
                "path": str(path),
                "accepted": accepted,
                "label_path": str(label) if accepted else "",
                "confidence": 0.9,
                "seed": i,
            }
        )
    return pd.DataFrame(rows)


def make_real(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "real"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (0, i, 0)).save(root / "images" / f"r{i}.png")
        (root / "labels" / f"r{i}.txt").write_text("1 0.4 0.4 0.2 0.2\n")
    return root


def test_builds_yolo_layout_with_labels_for_every_image(tmp_path: Path) -> None:
    validated = make_validated(tmp_path, 20, accepted_every=2)
    result = build_dataset(validated, CLASSES, DatasetConfig(val_fraction=0.3), tmp_path / "ds")

    assert result.synthetic == 10 and result.real == 0
    assert result.train + result.val == 10 and result.val >= 1
    data = yaml.safe_load(result.data_yaml.read_text())
    assert data["names"] == {0: "circle", 1: "square"} and data["train"] == "images/train"
    for split in ("train", "val"):
        images = sorted(p.stem for p in (result.path / "images" / split).iterdir())
        labels = sorted(p.stem for p in (result.path / "labels" / split).iterdir())
        assert images == labels
    manifest = pd.read_parquet(result.path / "manifest.parquet")
    assert len(manifest) == 10 and set(manifest["source"]) == {"synthetic"}
    assert all((result.path / f).is_file() for f in manifest["file"])
    assert set(manifest["image_id"]) == {f"img{i:03d}" for i in range(0, 20, 2)}


def test_split_is_deterministic_and_stable_when_images_are_added(tmp_path: Path) -> None:
    small = build_dataset(make_validated(tmp_path, 10), CLASSES, DatasetConfig(), tmp_path / "a")
    small_split = pd.read_parquet(small.path / "manifest.parquet").set_index("image_id")["split"]
    large = build_dataset(make_validated(tmp_path, 30), CLASSES, DatasetConfig(), tmp_path / "b")
    large_split = pd.read_parquet(large.path / "manifest.parquet").set_index("image_id")["split"]
    assert (large_split.loc[small_split.index] == small_split).all()
    assert split_of("x", 0, 0.5) == split_of("x", 0, 0.5)


def test_real_images_mixed_in_at_the_configured_ratio(tmp_path: Path) -> None:
    real = make_real(tmp_path, 8)
    cfg = DatasetConfig(real=real, real_ratio=0.5)
    result = build_dataset(make_validated(tmp_path, 10), CLASSES, cfg, tmp_path / "ds")
    assert result.synthetic == 10 and result.real == 5
    manifest = pd.read_parquet(result.path / "manifest.parquet")
    assert (manifest["source"] == "real").sum() == 5
    assert all(i.startswith("real_") for i in manifest.loc[manifest["source"] == "real", "image_id"])


def test_rebuild_replaces_the_old_dataset_whole(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    build_dataset(make_validated(tmp_path, 20), CLASSES, DatasetConfig(), out)
    result = build_dataset(make_validated(tmp_path, 4), CLASSES, DatasetConfig(), out)
    files = [p for p in out.rglob("*.png")]
    assert len(files) == result.train + result.val == 4
    assert not list(tmp_path.glob(".ds.*")), "no staging or old folder left behind"


def test_no_accepted_image_is_a_clear_error(tmp_path: Path) -> None:
    validated = make_validated(tmp_path, 3)
    validated["accepted"] = False
    with pytest.raises(ValueError, match="no accepted images"):
        build_dataset(validated, CLASSES, DatasetConfig(), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2 0.5 0.5 0.1 0.1", "class id 2 out of range"),
        ("0 0.5 1.5 0.1 0.1", r"coordinates must lie in \[0, 1\]"),
        ("0 0.5 0.5 0.1", "expected 'class cx cy w h'"),
        ("a 0.5 0.5 0.1 0.1", "not numbers"),
    ],
)
def test_bad_label_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    label = tmp_path / "x.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        check_label_file(label, num_classes=2)
    assert f"{label}:2" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a png at all", None])
def test_bad_real_image_files_are_named(tmp_path: Path, content: bytes | None) -> None:
    real = make_real(tmp_path, 2)
    bad = real / "images" / "r1.png"
    if content is None:  # truncated
        bad.write_bytes(bad.read_bytes()[:30])
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match="r1.png"):
        find_real_images(real, num_classes=2)


def test_real_folder_without_labels_is_named(tmp_path: Path) -> None:
    (tmp_path / "real" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="expected images/ and labels/"):
        find_real_images(tmp_path / "real", 2)
