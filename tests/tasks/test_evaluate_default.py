"""The bookkeeping of evaluate-default: prompts, real scenes, which judge counts, the summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from tasks import evaluate_default as ev


def test_prompts_cover_every_cell_in_the_prompt_expanders_words() -> None:
    table = ev.prompt_table(["circle", "star"], ["plain", "fog"], per_cell=6)
    assert len(table) == 24
    assert table.groupby(["class", "condition"]).size().eq(6).all()
    assert table["prompt"].iloc[0] == "a red circle, plain"
    assert table["colour"].nunique() == 6  # six images of a cell use six colours
    assert table["seed"].is_unique
    assert table.equals(ev.prompt_table(["circle", "star"], ["plain", "fog"], per_cell=6))


def test_layout_prompts_ask_for_every_place_and_size_in_turn() -> None:
    from tasks.layout import POSITIONS, SIZES

    table = ev.prompt_table(["circle"], ["fog"], per_cell=9, layout=True)
    assert table["prompt"].iloc[1] == "a medium green circle at center, fog"
    assert sorted(table["position"]) == sorted(POSITIONS)  # nine prompts, nine places
    assert table["size"].value_counts().to_dict() == dict.fromkeys(SIZES, 3)
    plain = ev.prompt_table(["circle"], ["fog"], per_cell=9)
    assert (plain["position"] == "").all() and plain["seed"].equals(table["seed"])  # same seeds either way


def test_real_scenes_show_one_object_of_their_cells_class(tmp_path: Path) -> None:
    table = ev.render_real(["circle", "star"], ["plain", "night"], per_cell=3, out_dir=tmp_path)
    assert table.groupby(["class", "condition"]).size().eq(3).all()
    for cls, condition, caption, path in table[["class", "condition", "caption", "path"]].itertuples(index=False):
        assert " and " not in caption and caption.endswith(f" {cls}, {condition}")  # e.g. "a red star, night"
        with Image.open(path) as image:
            assert image.size == (64, 64)
    again = ev.render_real(["circle", "star"], ["plain", "night"], per_cell=3, out_dir=tmp_path / "again")
    assert [Path(p).read_bytes() for p in table["path"]] == [Path(p).read_bytes() for p in again["path"]]


def test_found_needs_the_intended_class_among_the_detections() -> None:
    detections = [[{"name": "circle", "conf": 0.9}], [{"name": "square", "conf": 0.9}], []]
    assert ev.found(detections, ["circle", "circle", "circle"]) == [True, False, False]


def test_common_conditions_are_judged_by_the_validator_and_rare_ones_by_the_reference() -> None:
    table = pd.DataFrame({
        "source": ["generated"] * 4,
        "class": ["circle", "circle", "star", "star"],
        "condition": ["plain", "fog", "plain", "fog"],
        "found_validator": [True, True, False, False],
        "found_reference": [False, False, True, True],
    })  # fmt: skip
    assert ev.judged(table).tolist() == [True, False, False, True]
    summary = ev.fidelity_summary(table)["generated"]
    assert summary["overall"] == 0.5
    assert summary["by_cell"] == {"circle/plain": 1.0, "circle/fog": 0.0, "star/plain": 0.0, "star/fog": 1.0}
    assert summary["by_condition"] == {"plain": 0.5, "fog": 0.5}
    assert summary["validator_overall"] == 0.5 and summary["reference_overall"] == 0.5


def test_round_trips_of_a_retrained_autoencoder_are_not_reused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from tasks.evaluate_default import autoencoder_round_trip
    from tasks.generation import hash_model_dir

    image = tmp_path / "real.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    vae = tmp_path / "vae"
    shutil.copytree(tiny_models["generator"] / "vae", vae)
    first = autoencoder_round_trip(vae, [str(image)], tmp_path / "roundtrip")
    assert Path(first[0]).is_file() and hash_model_dir(vae) in first[0]
    assert autoencoder_round_trip(vae, [str(image)], tmp_path / "roundtrip") == first  # reused as it is
    config = vae / "config.json"
    config.write_text(config.read_text() + " ")  # any change to the autoencoder's files
    second = autoencoder_round_trip(vae, [str(image)], tmp_path / "roundtrip")
    assert second != first and Path(second[0]).is_file()
