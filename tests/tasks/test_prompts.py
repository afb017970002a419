"""Unit tests of the prompts stage: quotas, weighted sampling, seeds, dedupe and text checks."""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.config import PromptsConfig
from tasks.prompts import FIXED_COLUMNS, expand_prompts


def make(**overrides: Any) -> PromptsConfig:
    """A small valid config: 3 colours x 2 places x 2 templates = 12 prompts per class."""
    raw: dict[str, Any] = {
        "seed": 7,
        "classes": [{"name": "cat", "count": 5}, {"name": "traffic_light", "count": 3}],
        "axes": {"color": {"red": 1.0, "green": 1.0, "blue": 1.0}, "place": {"street": 2.0, "park": 1.0}},
        "templates": ["a photo of a {color} {phrase} in a {place}", "a {color} {class} near a {place}"],
        "negative_prompt": "blurry",
    }
    raw.update(overrides)
    return PromptsConfig.model_validate(raw)


def quotas(frame: pd.DataFrame) -> dict[str, int]:
    return frame.groupby("class", sort=False).size().to_dict()


# --- determinism --------------------------------------------------------------------------------
def test_same_config_gives_identical_frame() -> None:
    pd.testing.assert_frame_equal(expand_prompts(make()), expand_prompts(make()))


def test_other_seed_changes_sampling_and_seeds() -> None:
    a, b = expand_prompts(make(seed=7)), expand_prompts(make(seed=8))
    assert set(a["seed"]).isdisjoint(set(b["seed"]))
    assert list(a["prompt"]) != list(b["prompt"])


def test_negative_seed_is_accepted_and_deterministic() -> None:
    pd.testing.assert_frame_equal(expand_prompts(make(seed=-3)), expand_prompts(make(seed=-3)))


def test_adding_a_class_keeps_the_other_classes_rows() -> None:
    before = expand_prompts(make())
    after = expand_prompts(
        make(classes=[{"name": "cat", "count": 5}, {"name": "dog", "count": 4}, {"name": "traffic_light", "count": 3}])
    )
    for name in ("cat", "traffic_light"):
        cols = ["prompt", "seed", "prompt_id"]
        pd.testing.assert_frame_equal(
            before[before["class"] == name][cols].reset_index(drop=True),
            after[after["class"] == name][cols].reset_index(drop=True),
        )


# --- quotas -------------------------------------------------------------------------------------
def test_counts_are_exact_and_rows_ordered_by_class_id() -> None:
    frame = expand_prompts(make())
    assert quotas(frame) == {"cat": 5, "traffic_light": 3}
    assert list(frame["class_id"]) == [0] * 5 + [1] * 3
    assert list(frame.index) == list(range(8))


def test_total_is_shared_by_weight_with_largest_remainder() -> None:
    # exact shares 6.67 / 3.33 -> floors 6 / 3, the leftover goes to the larger remainder
    frame = expand_prompts(make(classes=[{"name": "a", "weight": 2}, {"name": "b", "weight": 1}], total=10))
    assert quotas(frame) == {"a": 7, "b": 3}


def test_equal_remainders_go_to_the_earlier_class_and_sum_to_total() -> None:
    classes = [{"name": "a"}, {"name": "b"}, {"name": "c"}]  # no weight: weight 1 each
    frame = expand_prompts(make(classes=classes, total=11))
    assert quotas(frame) == {"a": 4, "b": 4, "c": 3}
    assert len(frame) == 11


def test_counted_classes_are_taken_out_of_total_first() -> None:
    classes = [{"name": "a", "count": 5}, {"name": "b", "weight": 2}, {"name": "c"}]
    frame = expand_prompts(make(classes=classes, total=12))  # 7 left: 4.67 / 2.33
    assert quotas(frame) == {"a": 5, "b": 5, "c": 2}


def test_counts_above_total_raise() -> None:
    cfg = make(classes=[{"name": "a", "count": 5}, {"name": "b"}], total=4)
    with pytest.raises(ValueError, match=r"prompts.total: 4 is less than the 5"):
        expand_prompts(cfg)


# --- uniqueness and sampling --------------------------------------------------------------------
def test_ids_seeds_and_prompts_are_unique() -> None:
    frame = expand_prompts(make(classes=[{"name": "cat", "count": 12}, {"name": "dog", "count": 12}]))
    assert frame["prompt_id"].is_unique
    assert frame["seed"].is_unique
    assert not frame.duplicated(["prompt", "seed"]).any()
    assert frame["seed"].between(0, 2**31 - 1).all()
    for _, rows in frame.groupby("class"):
        assert rows["prompt"].is_unique  # the whole 12-prompt grid, each prompt once


def test_prompt_id_hashes_prompt_negative_prompt_and_seed() -> None:
    row = expand_prompts(make()).iloc[0]
    key = f"{row['prompt']}\x1f{row['negative_prompt']}\x1f{row['seed']}"
    assert row["prompt_id"] == hashlib.sha256(key.encode()).hexdigest()[:16]


def test_weighted_sampling_favours_heavy_values() -> None:
    # 2 x 50 = 100 cells, half of them with the 9x value; 40 draws without replacement.
    axes = {"tone": {"heavy": 9.0, "light": 1.0}, "n": {f"v{i}": 1.0 for i in range(50)}}
    frame = expand_prompts(make(classes=[{"name": "cat", "count": 40}], axes=axes, templates=["{tone} {n} {phrase}"]))
    counts = frame["tone"].value_counts()
    assert counts["heavy"] >= 3 * counts.get("light", 0)  # uniform sampling would give about 20 / 20
    assert counts["heavy"] + counts.get("light", 0) == 40


def test_heavy_place_drawn_more_often_over_classes() -> None:
    # Each class draws from its own stream; with street weighing 2 against park 1, one-prompt draws
    # pick street about 200 times in 300 (binomial sd about 8).
    classes = [{"name": f"c{i}", "count": 1} for i in range(300)]
    axes = {"place": {"street": 2.0, "park": 1.0}}
    frame = expand_prompts(make(classes=classes, axes=axes, templates=["a {phrase} in a {place}"]))
    assert 170 <= (frame["place"] == "street").sum() <= 230


# --- grid size, repeats, dedupe -----------------------------------------------------------------
def test_quota_over_grid_raises_naming_class_quota_and_size() -> None:
    cfg = make(classes=[{"name": "cat", "count": 13}])
    with pytest.raises(ValueError, match=r"prompts.classes\[name=cat\]: quota 13 exceeds the 12 distinct"):
        expand_prompts(cfg)


def test_allow_repeats_fills_quota_with_distinct_seeds() -> None:
    frame = expand_prompts(make(classes=[{"name": "cat", "count": 30}], allow_repeats=True))
    assert len(frame) == 30
    assert frame["prompt"].nunique() == 12  # every prompt of the grid, before any is repeated
    assert frame["prompt"].value_counts().between(2, 3).all()
    assert frame["seed"].is_unique and frame["prompt_id"].is_unique
    assert frame["prompt"].iloc[:12].is_unique and frame["prompt"].iloc[12:24].is_unique


def test_template_without_an_axis_dedupes() -> None:
    templates = ["a photo of {phrase}", "{phrase} in a {place}"]
    frame = expand_prompts(make(classes=[{"name": "cat", "count": 3}], templates=templates))
    assert sorted(frame["prompt"]) == ["a photo of cat", "cat in a park", "cat in a street"]
    skipped = frame[frame["template"] == "a photo of {phrase}"]
    assert (skipped["place"] == "").all() and (skipped["color"] == "").all()
    cfg = make(classes=[{"name": "cat", "count": 4}], templates=templates)
    with pytest.raises(ValueError, match="quota 4 exceeds the 3 distinct"):
        expand_prompts(cfg)


def test_templates_weigh_equally_after_dedupe() -> None:
    # "a photo of <class>" stands for all 6 colour x place cells of its template: half the grid's weight,
    # so one-prompt draws pick it about 150 times in 300 (binomial sd about 9).
    classes = [{"name": f"c{i}", "count": 1} for i in range(300)]
    templates = ["a photo of {phrase}", "{phrase} {color} {place}"]
    frame = expand_prompts(make(classes=classes, templates=templates))
    assert 120 <= (frame["template"] == "a photo of {phrase}").sum() <= 180


def test_empty_value_leaves_no_stray_comma() -> None:
    axes = {"style": {"": 1.0, "cinematic": 1.0}}
    frame = expand_prompts(
        make(classes=[{"name": "cat", "count": 2}], axes=axes, templates=["{phrase},  {style}, photo"])
    )
    assert sorted(frame["prompt"]) == ["cat, cinematic, photo", "cat, photo"]


# --- columns ------------------------------------------------------------------------------------
def test_columns_and_dtypes() -> None:
    frame = expand_prompts(make())
    assert list(frame.columns) == FIXED_COLUMNS + ["color", "place"]
    assert FIXED_COLUMNS == [
        "prompt_id",
        "class",
        "class_id",
        "phrase",
        "template",
        "prompt",
        "negative_prompt",
        "seed",
    ]
    assert frame["class_id"].dtype == "int64" and frame["seed"].dtype == "int64"
    for col in ["prompt_id", "class", "phrase", "template", "prompt", "negative_prompt", "color", "place"]:
        assert pd.api.types.is_string_dtype(frame[col]), col
        assert all(isinstance(v, str) for v in frame[col]), col
    assert frame["prompt_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(frame["phrase"]) == {"cat", "traffic light"}
    assert (frame["negative_prompt"] == "blurry").all()


def test_axis_columns_hold_the_values_in_the_prompt() -> None:
    frame = expand_prompts(make())
    for values in frame.to_dict("records"):
        rendered = values["template"].format(
            phrase=values["phrase"],
            color=values["color"],
            place=values["place"],
            **{"class": values["class"]},
        )
        assert rendered == values["prompt"]
        assert values["color"] in {"red", "green", "blue"} and values["place"] in {"street", "park"}


# --- text checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"classes": [{"name": "cat", "phrase": "ca\x00t", "count": 1}]}, r"classes\[name=cat\]: phrase"),
        ({"axes": {"color": {"re\u200bd": 1.0}, "place": {"park": 1.0}}}, r"prompts.axes.color: value"),
        ({"templates": ["a {phrase}\x07"]}, r"prompts.templates"),
        ({"negative_prompt": "bad\x1b[0m"}, r"prompts.negative_prompt"),
    ],
)
def test_control_characters_are_rejected(overrides: dict[str, Any], where: str) -> None:
    cfg = make(**overrides)  # valid config: the check belongs to the stage (ValidationError is a ValueError)
    with pytest.raises(ValueError, match=where + r".*control character.*U\+"):
        expand_prompts(cfg)


def test_newlines_in_a_template_are_collapsed_not_rejected() -> None:
    frame = expand_prompts(make(classes=[{"name": "cat", "count": 1}], axes={}, templates=["a photo\n of\t{phrase}\n"]))
    assert frame["prompt"].tolist() == ["a photo of cat"]


@pytest.mark.parametrize("axis", ["a.b", "0", "a-b"])
def test_axis_name_that_is_no_identifier_is_a_validation_error(axis: str) -> None:
    # str.format would read "{a.b}" as an attribute and "{0}" as a position: refuse such names at load.
    with pytest.raises(ValidationError) as info:
        make(classes=[{"name": "cat", "count": 1}], axes={axis: {"x": 1.0}}, templates=[f"{{{axis}}} {{phrase}}"])
    assert info.value.errors()[0]["loc"][0] == "axes"


def test_infinite_weight_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        make(axes={"colour": {"red": float("inf")}})


# --- config-level errors (tasks.config) ----------------------------------------------------------
def test_empty_class_list_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        make(classes=[])
    assert info.value.errors()[0]["loc"] == ("classes",)
    assert "class list is empty" in str(info.value)


def test_unknown_template_placeholder_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"template 'a \{size\} \{phrase\}' uses \['size'\]"):
        make(templates=["a {size} {phrase}"])


def test_reserved_axis_name_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        make(axes={"seed": {"1": 1.0}})
    assert info.value.errors()[0]["loc"] == ("axes",)
    assert "axis name 'seed' is reserved" in str(info.value)
