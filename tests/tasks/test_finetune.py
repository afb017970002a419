"""The champion promotion rule; counting a YOLO data.yaml's images."""

from pathlib import Path

import pytest

from tasks.finetune import Guard, count_images, promotion_decision


def test_first_model_becomes_champion() -> None:
    assert promotion_decision(0.3, None, 0.05) == (True, "first model: mAP50-95 0.3000 becomes champion")


def test_a_challenger_must_beat_the_champion_by_the_margin() -> None:
    assert promotion_decision(0.56, 0.50, 0.05)[0] is True
    assert promotion_decision(0.55, 0.50, 0.05)[0] is True
    promoted, reason = promotion_decision(0.54, 0.50, 0.05)
    assert promoted is False and "champion kept" in reason and "0.5400" in reason
    assert promotion_decision(0.40, 0.50, 0.0)[0] is False


def test_a_model_that_forgets_more_than_the_guard_allows_is_not_promoted() -> None:
    kept = Guard(after=0.854, before=0.865, margin=0.01)  # lost 0.011 on the guard set
    promoted, reason = promotion_decision(0.60, 0.50, 0.0, kept)
    assert promoted is False and "champion kept" in reason and "0.8540" in reason and "-0.0110" in reason
    promoted, reason = promotion_decision(0.60, None, 0.0, kept)  # not even as the first model
    assert promoted is False and "no champion yet" in reason
    within = Guard(after=0.855, before=0.865, margin=0.01)  # exactly the margin
    assert promotion_decision(0.60, 0.50, 0.0, within) == promotion_decision(0.60, 0.50, 0.0)
    better = Guard(after=0.87, before=0.865, margin=0.0)
    assert promotion_decision(0.60, None, 0.0, better)[0] is True
    assert promotion_decision(0.40, 0.50, 0.0, better)[0] is False  # the guard never promotes on its own


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


@pytest.mark.parametrize("select", ["best", "last"])
def test_finetune_keeps_the_selected_weights_and_passes_the_schedule_on(
    tmp_path: Path, yolo_env: Path, select: str
) -> None:
    import yaml

    from tasks.config import FinetuneConfig
    from tasks.finetune import finetune_detector
    from tasks.tiny_models import build_tiny_detector
    from tasks.world import CLASSES, write_split

    data = write_split(tmp_path / "set", 6, ["plain"], seed=0, val="images")
    start = build_tiny_detector(tmp_path / "start.pt", list(CLASSES), seed=0)
    cfg = FinetuneConfig(model=str(start), epochs=2, imgsz=32, batch=4, nbs=4, lr0=1e-4, lrf=0.1, warmup_epochs=0,
                         select=select, plots=False, freeze="head")  # fmt: skip
    result = finetune_detector(cfg, data / "data.yaml", tmp_path / "out")
    assert result.weights == tmp_path / "out" / "train" / "weights" / f"{select}.pt"
    args = yaml.safe_load((tmp_path / "out" / "train" / "args.yaml").read_text())
    assert (args["nbs"], args["warmup_epochs"], args["lr0"], args["lrf"]) == (4, 0, 1e-4, 0.1)
    assert args["freeze"] == [23]  # "head": YOLO26's detection head is its last layer, 23
