"""The champion promotion rule; counting a YOLO data.yaml's images."""

from pathlib import Path

import pytest

from tasks.finetune import count_images, promotion_decision


def test_first_model_becomes_champion() -> None:
    assert promotion_decision(0.3, None, 0.05) == (True, "first model: mAP50-95 0.3000 becomes champion")


def test_a_challenger_must_beat_the_champion_by_the_margin() -> None:
    assert promotion_decision(0.56, 0.50, 0.05)[0] is True
    assert promotion_decision(0.55, 0.50, 0.05)[0] is True
    promoted, reason = promotion_decision(0.54, 0.50, 0.05)
    assert promoted is False and "champion kept" in reason and "0.5400" in reason
    assert promotion_decision(0.40, 0.50, 0.0)[0] is False


def test_count_images_reads_paths_relative_to_the_yaml_even_when_the_yaml_path_is_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The world's data.yaml files have no `path:`; `synthdet train-validator` passes them relative to the cwd.
    for folder, n in (("set/images", 3), ("val/images", 2)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            (tmp_path / folder / f"{i}.png").write_bytes(b"")
    (tmp_path / "set" / "data.yaml").write_text("names: {0: a}\ntrain: images\nval: ../val/images\n")
    monkeypatch.chdir(tmp_path)
    assert count_images(Path("set/data.yaml"), "train") == 3
    assert count_images(Path("set/data.yaml"), "val") == 2
    assert count_images(Path("set/data.yaml"), "test") == 0
    (tmp_path / "set" / "both.yaml").write_text("names: {0: a}\ntrain: images\nval: [images, ../val/images]\n")
    assert count_images(Path("set/both.yaml"), "val") == 5  # a list of folders, as ultralytics allows
