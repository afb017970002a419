"""Tests of the embedded world: determinism, exact labels, prompt vocabulary, conditions, split files."""

from __future__ import annotations

import colorsys
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks import world
from tasks.config import load_params
from tasks.dataset import check_label_file
from tasks.finetune import count_images
from tasks.world import CLASSES, COLOURS, CONDITIONS, SCALE, SIZE, build_world, render_scene, write_split

COMMON_CONDITIONS, RARE_CONDITIONS = world.COMMON_CONDITIONS, world.RARE_CONDITIONS

ROOT = Path(__file__).resolve().parents[2]


def scene(seed: int, condition: str = "plain", **kwargs: object) -> world.Scene:
    return render_scene(np.random.default_rng(seed), condition, **kwargs)


def pixels(s: world.Scene) -> np.ndarray:
    return np.asarray(s.image, dtype=np.float64) / 255


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    return [scene(seed, CONDITIONS[seed % len(CONDITIONS)]) for seed in range(150)]


# --- determinism --------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_scene() -> None:
    a, b = scene(3, "rain"), scene(3, "rain")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.boxes, b.boxes) and a.caption == b.caption and a.attributes == b.attributes


def test_other_seeds_give_other_scenes() -> None:
    images = [np.asarray(scene(seed).image) for seed in range(6)]
    assert all(not np.array_equal(images[i], images[j]) for i in range(6) for j in range(i + 1, 6))
    assert len({scene(seed).caption for seed in range(20)}) > 10


# --- labels -------------------------------------------------------------------------------------------
def test_image_is_64px_rgb_with_one_to_three_labelled_objects(scenes: list[world.Scene]) -> None:
    counts = [len(s.boxes) for s in scenes]
    assert all(s.image.size == (SIZE, SIZE) and s.image.mode == "RGB" for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert all(len(scene(seed, n_objects=1).boxes) == 1 for seed in range(10))


def test_boxes_are_tight_around_each_objects_visible_pixels(scenes: list[world.Scene]) -> None:
    for s in scenes:
        assert s.masks.shape == (len(s.boxes), SIZE * SCALE, SIZE * SCALE)
        for (_, cx, cy, w, h), mask in zip(s.boxes, s.masks, strict=True):
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
            x0, x1 = round((cx - w / 2) * SIZE * SCALE), round((cx + w / 2) * SIZE * SCALE)
            y0, y1 = round((cy - h / 2) * SIZE * SCALE), round((cy + h / 2) * SIZE * SCALE)
            inside = mask[y0:y1, x0:x1]
            assert inside.sum() == mask.sum() > 0, "pixels outside the box"
            # tight: every edge row and column of the box holds some of the object
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


# What the colour words mean to a reader, independent of the renderer's palette: hue in degrees.
HUES = {"red": 0, "yellow": 55, "green": 125, "blue": 225, "purple": 280}


def _colour_word(rgb: np.ndarray) -> str:
    hue, saturation, _ = colorsys.rgb_to_hsv(*rgb)
    if saturation < 0.25:
        return "white"
    return min(HUES, key=lambda name: min(abs(hue * 360 - HUES[name]), 360 - abs(hue * 360 - HUES[name])))


def test_masks_sit_where_the_named_colour_is_painted() -> None:
    assert set(HUES) | {"white"} == set(COLOURS)
    checked = 0
    for seed in range(60):
        s = scene(seed)
        image = pixels(s)
        for mask, obj in zip(s.masks, s.attributes["objects"], strict=True):
            full = mask.reshape(SIZE, SCALE, SIZE, SCALE).all(axis=(1, 3))  # output pixels wholly inside
            if full.sum() < 10:
                continue
            assert _colour_word(image[full].mean(axis=0)) == obj["colour"], (seed, obj)
            checked += 1
    assert checked > 80


def test_objects_stay_mostly_visible_and_some_are_occluded(scenes: list[world.Scene]) -> None:
    shares = [o["visible"] for s in scenes for o in s.attributes["objects"]]
    assert min(shares) >= world.MIN_VISIBLE >= 0.5  # every labelled object is mostly in view
    assert sum(share < 0.95 for share in shares) >= 5  # occlusion does happen
    assert sum(len(s.attributes["distractors"]) > 0 for s in scenes) > len(scenes) / 2


def test_objects_of_one_colour_never_touch(scenes: list[world.Scene]) -> None:
    pairs = 0
    for s in scenes:
        objects = s.attributes["objects"]
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                if objects[i]["colour"] == objects[j]["colour"]:
                    pairs += 1
                    grown = np.zeros_like(s.masks[i])  # one sub-pixel wider: touching counts
                    for dy, dx in ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)):
                        grown |= np.roll(s.masks[i], (dy, dx), axis=(0, 1))
                    assert not (grown & s.masks[j]).any()
    assert pairs > 3


# --- vocabulary ---------------------------------------------------------------------------------------
def test_world_vocabulary_matches_the_prompt_config() -> None:
    prompts = load_params(ROOT / "params.yaml").prompts
    assert tuple(c.text for c in prompts.classes) == CLASSES
    assert set(COLOURS) == set(prompts.axes["colour"])
    assert set(CONDITIONS) == set(prompts.axes["condition"])


def test_captions_name_the_labelled_objects_left_to_right(scenes: list[world.Scene]) -> None:
    for s in scenes:
        objects, condition = s.caption.rsplit(", ", 1)
        assert condition == s.attributes["condition"] in CONDITIONS
        phrases = objects.split(" and ")
        assert len(phrases) == len(s.boxes)
        for phrase, box, obj in zip(phrases, s.boxes, s.attributes["objects"], strict=True):
            article, colour, name = phrase.split(" ")
            assert (article, colour, name) == ("a", obj["colour"], CLASSES[int(box[0])])
            assert colour in COLOURS
        assert list(s.boxes[:, 1]) == sorted(s.boxes[:, 1])


def test_layout_captions_add_each_objects_size_and_place(scenes: list[world.Scene]) -> None:
    from tasks.layout import agrees

    places = set()
    for s in scenes:
        objects, condition = s.layout_caption.rsplit(", ", 1)
        assert condition == s.attributes["condition"]
        phrases = objects.split(" and ")
        assert len(phrases) == len(s.boxes)
        for phrase, box, obj in zip(phrases, s.boxes, s.attributes["objects"], strict=True):
            size, colour, name, position = re.fullmatch(r"a (\w+) (\w+) (\w+) at ([\w ]+)", phrase).groups()
            assert (colour, name) == (obj["colour"], CLASSES[int(box[0])])
            assert agrees(tuple(box[1:]), position, size), (phrase, box)
            places.add(position)
        plain = re.sub(r"a \w+ (\w+ \w+) at [\w ]+?(?= and |$)", r"a \1", objects)
        assert f"{plain}, {condition}" == s.caption
    assert len(places) >= 6  # objects land all over the grid


def test_one_object_caption_is_exactly_the_prompt_template() -> None:
    prompts = load_params(ROOT / "params.yaml").prompts
    for seed in range(10):
        s = scene(seed, "fog", n_objects=1)
        obj = s.attributes["objects"][0]
        expected = prompts.templates[0].format(colour=obj["colour"], phrase=obj["class"], condition="fog")
        assert s.caption == expected


# --- conditions ---------------------------------------------------------------------------------------
def _stats(condition: str) -> dict[str, np.ndarray]:
    """Per seed: brightness, contrast (std), roughness across and along columns, and change vs plain."""
    rows = []
    for seed in range(12):
        plain, other = scene(seed, "plain"), scene(seed, condition)
        assert np.array_equal(plain.boxes, other.boxes), "a condition must not move the objects"
        image = pixels(other)
        across, along = np.abs(np.diff(image, axis=1)).mean(), np.abs(np.diff(image, axis=0)).mean()
        rows.append([image.mean(), image.std(), across, along, np.abs(image - pixels(plain)).mean()])
    return dict(zip(["mean", "std", "across", "along", "change"], np.array(rows).T, strict=True))


def test_every_rare_condition_changes_the_same_scene() -> None:
    for condition in RARE_CONDITIONS:
        assert _stats(condition)["change"].mean() > 0.04, condition


def test_conditions_look_like_what_they_claim() -> None:
    plain, fog, night, rain, noise = (_stats(c) for c in ("plain", "fog", "night", "rain", "noise"))
    assert (fog["mean"] > plain["mean"]).all() and (fog["std"] < 0.6 * plain["std"]).all()  # lighter, flatter
    dark = night["mean"] / plain["mean"]
    assert (dark < 0.65).all() and dark.mean() < 0.4  # dark, but for the lamp
    assert (rain["std"] < plain["std"]).mean() > 0.8  # veiled
    streaky = (rain["across"] / rain["along"]) / (plain["across"] / plain["along"])
    assert (streaky > 1.1).mean() > 0.8  # near-vertical streaks: rough across, smooth along
    grain = noise["across"] / plain["across"]
    assert (grain > 1.5).all() and grain.mean() > 2.5  # grainy, even on rough gravel


def test_plain_is_the_only_common_condition() -> None:
    assert COMMON_CONDITIONS == ("plain",) and set(RARE_CONDITIONS) == {"fog", "night", "rain", "noise"}


@pytest.mark.parametrize("bad", [{"condition": "snow"}, {"n_objects": 4}, {"background": "lava"}])
def test_bad_arguments_name_the_value(bad: dict) -> None:
    kwargs = {"condition": "plain", **bad}
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        render_scene(np.random.default_rng(0), **kwargs)


# --- files --------------------------------------------------------------------------------------------
def test_write_split_writes_matching_images_labels_and_captions(tmp_path: Path) -> None:
    out = write_split(tmp_path / "split", 10, ("plain", "night"), seed=5)
    images, labels = sorted((out / "images").glob("*.png")), sorted((out / "labels").glob("*.txt"))
    assert [p.stem for p in images] == [p.stem for p in labels] == [f"{i:06d}" for i in range(10)]
    frame = pd.read_parquet(out / "captions.parquet")
    assert list(frame["file"]) == [f"images/{p.name}" for p in images]
    assert list(frame["condition"]) == ["plain", "night"] * 5
    for row, label in zip(frame.itertuples(), labels, strict=True):
        lines = check_label_file(label, len(CLASSES))
        assert len(lines) == row.n_objects
        again = render_scene(np.random.default_rng(row.seed), row.condition)  # the recorded seed reproduces it
        assert again.caption == row.caption
        assert np.array_equal(np.asarray(again.image), np.asarray(world.Image.open(out / row.file)))
        assert [int(line.split()[0]) for line in lines] == list(again.boxes[:, 0].astype(int))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {"names": dict(enumerate(CLASSES)), "train": "images", "val": "images"}
    assert not list(tmp_path.glob(".*partial"))


def test_a_crash_leaves_the_previous_split_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_split(tmp_path / "split", 3, ("plain",), seed=1)
    before = sorted(p.name for p in out.rglob("*"))
    calls = iter(range(100))

    def failing(*args: object, **kwargs: object) -> world.Scene:
        if next(calls) == 2:
            raise RuntimeError("disk full")
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(world, "render_scene", failing)
    with pytest.raises(RuntimeError):
        write_split(out, 5, ("plain",), seed=2)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_build_world_sets_keep_their_conditions_and_never_share_scenes(tmp_path: Path) -> None:
    sizes = {"common_train": 6, "common_val": 3, "rare_scarce": 2, "test": 2, "captioned": 10, "reference_train": 5}
    sets = build_world(tmp_path, seed=0, sizes=sizes)
    named = {"common_train", "common_val", "rare_scarce", "captioned", "reference_train"}
    assert set(sets) == named | {f"test/{c}" for c in CONDITIONS}
    frames = {name: pd.read_parquet(path / "captions.parquet") for name, path in sets.items()}
    assert set(frames["common_train"]["condition"]) == set(COMMON_CONDITIONS)
    assert list(frames["rare_scarce"]["condition"]) == list(RARE_CONDITIONS) * 2
    assert set(frames["captioned"]["condition"]) == set(CONDITIONS)
    assert set(frames["reference_train"]["condition"]) == set(CONDITIONS)
    rare = yaml.safe_load((tmp_path / "test" / "rare.yaml").read_text())  # every rare test set as one
    assert sorted(rare["val"]) == sorted(f"{c}/images" for c in RARE_CONDITIONS)
    assert count_images(tmp_path / "test" / "rare.yaml", "val") == 2 * len(RARE_CONDITIONS)
    assert all(set(frames[f"test/{c}"]["condition"]) == {c} for c in CONDITIONS)
    seeds = [seed for frame in frames.values() for seed in frame["seed"]]
    assert len(seeds) == len(set(seeds))
    train = yaml.safe_load((sets["common_train"] / "data.yaml").read_text())
    assert (sets["common_train"] / train["val"]).resolve() == (sets["common_val"] / "images").resolve()
    assert "common_val" not in build_world(tmp_path / "other", sizes={**sizes, "common_val": 0, "captioned": 0})
