"""dataset.restyle: real images recoloured to a condition's colours, in the dataset stage and the experiment."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.colour import colour_stats
from tasks.config import DatasetConfig, ExperimentConfig, Restyle
from tasks.dataset import build_dataset
from tasks.restyle import restyle_stats, restyled_copies

LABEL = "0 0.5 0.5 0.25 0.25\n"


def write(folder: Path, n: int, mean: float, spread: float, seed: int, labels: bool = False) -> list[Path]:
    """n noisy RGB images of the given mean and spread, in folder/images (and their labels)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.clip(rng.normal(mean, spread, (32, 32, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / "images" / f"{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
        if labels:
            (folder / "labels").mkdir(exist_ok=True)
            (folder / "labels" / f"{i:03d}.txt").write_text(LABEL)
    return paths


@pytest.fixture
def looks(tmp_path: Path) -> Restyle:
    """Two 'conditions': dark and flat (night), bright and flat (fog)."""
    write(tmp_path / "night", 2, 40, 12, seed=1)
    write(tmp_path / "fog", 2, 190, 10, seed=2)
    return Restyle(images={"night": str(tmp_path / "night"), "fog": str(tmp_path / "fog")}, share=1.0)


def test_copies_take_each_value_colours_in_turn_and_are_written_once(looks: Restyle, tmp_path: Path) -> None:
    sources = write(tmp_path / "common", 4, 120, 40, seed=3)
    colours = restyle_stats(looks)
    assert list(colours) == ["fog", "night"]
    copies = restyled_copies(sources, colours, tmp_path / "out")
    assert [v for _, v in copies] == ["fog", "night", "fog", "night"]
    for copy, value in copies:
        mean, spread = colour_stats([copy])
        assert np.allclose(mean, colours[value][0], atol=1.5) and np.allclose(spread, colours[value][1], atol=1.5)
    stamps = [c.stat().st_mtime_ns for c, _ in copies]
    assert restyled_copies(sources, colours, tmp_path / "out") == copies
    assert [c.stat().st_mtime_ns for c, _ in copies] == stamps, "a re-run reuses the copies"


def test_dataset_stage_adds_recoloured_real_images_with_their_true_labels(looks: Restyle, tmp_path: Path) -> None:
    write(tmp_path / "common", 10, 120, 40, seed=4, labels=True)
    made = write(tmp_path / "made", 4, 100, 30, seed=5)
    rows = []
    for path in made:
        label = path.with_suffix(".txt")
        label.write_text("0 0.4 0.4 0.2 0.2\n")
        rows.append({"image_id": path.stem, "class": "circle", "path": str(path), "status": "ok", "accepted": True,
                     "label_path": str(label)})  # fmt: skip
    cfg = DatasetConfig(val_fraction=0.0, real=tmp_path / "common", real_ratio=1.0, restyle=looks.model_copy(
        update={"share": 1.5}))  # fmt: skip
    result = build_dataset(pd.DataFrame(rows), ["circle"], cfg, tmp_path / "ds")

    assert (result.synthetic, result.real, result.restyled) == (4, 4 + 6, 6)
    manifest = pd.read_parquet(result.path / "manifest.parquet")
    restyled = manifest[manifest["source"] == "restyled"]
    assert sorted(restyled["restyle"]) == ["fog"] * 3 + ["night"] * 3
    colours = restyle_stats(looks)
    for row in restyled.itertuples():
        mean, _ = colour_stats([result.path / row.file])
        assert np.allclose(mean, colours[row.restyle][0], atol=1.5)
        assert (result.path / row.file.replace("images/", "labels/")).with_suffix(".txt").read_text() == LABEL


def test_experiment_arms_get_recoloured_replay_images(looks: Restyle, tmp_path: Path) -> None:
    from tasks.experiment import Item, Restyling, Sources, Trial, trial_data

    common = [Item(str(p), (LABEL.strip(),), "common_train", "plain") for p in write(tmp_path / "c", 8, 120, 40, 6)]
    synthetic = [Item(f"s{i}.png", (LABEL.strip(),), "synthetic", "fog", "circle") for i in range(20)]
    cfg = ExperimentConfig(replay_images=4)
    sources = Sources([], common, [], common[-2:], pd.DataFrame(), ["circle"])
    sources.restyle = Restyling(restyle_stats(looks), 0.5, tmp_path / "copies")

    restyled = trial_data(Trial("restyled", 0, 0, 1.0, 0.25), cfg, sources, synthetic)
    assert [i.source for i in restyled.extra] == ["restyled"] * 2 and {i.condition for i in restyled.extra} == {
        "fog", "night"}  # fmt: skip
    validated = trial_data(Trial("validated", 0, 0, 1.0, 0.25), cfg, sources, synthetic)
    assert sorted(i.source for i in validated.extra) == ["restyled"] * 2 + ["synthetic"] * 4
    assert not any(i.source == "restyled" for i in trial_data(Trial("real", 0, 0, 1.0, 0.25), cfg, sources, []).extra)
    sources.restyle = None
    with pytest.raises(ValueError, match="restyled arm needs dataset.restyle"):
        trial_data(Trial("restyled", 0, 0, 1.0, 0.25), cfg, sources, synthetic)


def test_restyle_needs_real_images_and_the_restyled_arm_needs_restyle(tmp_path: Path) -> None:
    from tasks.config import load_params

    smoke = Path(__file__).resolve().parents[2] / "params.smoke.yaml"
    with pytest.raises(ValueError, match="dataset.restyle: recolours the real images of dataset.real"):
        load_params(smoke, {"dataset.restyle": {"images": str(tmp_path)}})
    with pytest.raises(ValueError, match="the restyled arm needs dataset.restyle"):
        load_params(smoke, {"experiment.arms": ["real", "restyled"]})


def test_the_experiment_flow_checks_arms_it_is_given_like_the_params_file(tmp_path: Path) -> None:
    from flows.experiment import experiment

    smoke = Path(__file__).resolve().parents[2] / "params.smoke.yaml"
    with pytest.raises(ValueError, match="the restyled arm needs dataset.restyle"):  # before any trial runs
        experiment.fn(params=str(smoke), workspace=str(tmp_path / "ws"), arms=["real", "restyled"])
    assert not (tmp_path / "ws" / "experiments").exists()
