"""The acceptance rules of the validate stage, on hand-made detections (no model needed)."""

from pathlib import Path

import pandas as pd
import pytest

from tasks.config import ValidateConfig
from tasks.validation import judge, label_lines, resolve_class_map, summarize_validation

CLASSES = ["circle", "square"]
MAPPING = {"circle": 0, "disc": 0, "square": 1}


def det(name: str, conf: float, box: tuple[float, float, float, float] = (0.5, 0.5, 0.2, 0.2)) -> dict:
    return {"name": name, "conf": conf, "box": list(box)}


def cfg(**kwargs) -> ValidateConfig:
    return ValidateConfig(model="x.pt", **kwargs)


def test_class_map_defaults_to_identity_and_accepts_aliases() -> None:
    assert resolve_class_map(CLASSES, ["circle", "square", "dog"], {}) == {"circle": 0, "square": 1}
    assert resolve_class_map(CLASSES, ["disc", "square"], {"circle": ["disc"]}) == {"disc": 0, "square": 1}


def test_class_without_detector_match_fails_before_inference() -> None:
    with pytest.raises(ValueError, match="class 'circle' maps to \\['circle'\\].*does not know"):
        resolve_class_map(CLASSES, ["square", "dog"], {})
    with pytest.raises(ValueError, match="\\['triangle'\\] are not classes"):
        resolve_class_map(CLASSES, ["circle", "square"], {"triangle": ["circle"]})


def test_accepts_the_intended_class() -> None:
    assert judge([det("circle", 0.9)], "circle", MAPPING, CLASSES, cfg()) == ""
    assert judge([det("disc", 0.9)], "circle", MAPPING, CLASSES, cfg()) == ""


@pytest.mark.parametrize(
    ("detections", "settings", "reason"),
    [
        ([], {}, "nothing detected at conf >= 0.25"),
        ([det("square", 0.8)], {}, "no circle at conf >= 0.25 (saw square 0.80)"),
        ([det("circle", 0.9), det("square", 0.5), det("circle", 0.4)], {"max_objects": 2}, "3 objects > max_objects 2"),
        ([det("circle", 0.9, (0.5, 0.5, 0.05, 0.05))], {"min_box_area": 0.01}, "box covers 0.0025"),
        ([det("circle", 0.9), det("dog", 0.6)], {"reject_unexpected": True}, "unexpected class dog 0.60"),
    ],
)
def test_rejections_carry_a_reason(detections: list, settings: dict, reason: str) -> None:
    assert reason in judge(detections, "circle", MAPPING, CLASSES, cfg(**settings))


def test_unexpected_classes_are_tolerated_unless_asked() -> None:
    assert judge([det("circle", 0.9), det("dog", 0.6)], "circle", MAPPING, CLASSES, cfg()) == ""


def test_layout_words_asked_for_are_checked_against_the_intended_boxes() -> None:
    top_left_small = det("circle", 0.6, (0.2, 0.2, 0.3, 0.3))
    bottom_large = det("circle", 0.9, (0.5, 0.8, 0.45, 0.45))
    square_top_left = det("square", 0.9, (0.2, 0.2, 0.3, 0.3))
    assert judge([top_left_small], "circle", MAPPING, CLASSES, cfg(), "top left", "small") == ""
    assert judge([bottom_large, top_left_small], "circle", MAPPING, CLASSES, cfg(), "top left", "") == ""
    reason = judge([bottom_large, square_top_left], "circle", MAPPING, CLASSES, cfg(), "top left", "small")
    assert reason == "circle is large at bottom, asked for small at top left"  # the square does not count
    assert judge([bottom_large], "circle", MAPPING, CLASSES, cfg(), "", "small") == (
        "circle is large at bottom, asked for small"
    )
    assert judge([bottom_large], "circle", MAPPING, CLASSES, cfg(check_layout=False), "top left", "small") == ""


def test_layout_axes_must_use_the_words_the_check_knows() -> None:
    from tasks.config import ConfigError, load_params

    root = Path(__file__).parents[2]
    assert load_params(root / "params.yaml", {"prompts.axes.position": {"top left": 1, "center": 2}})
    with pytest.raises(ConfigError, match=r"prompts.axes.position: \['upper left'\] are not layout words"):
        load_params(root / "params.yaml", {"prompts.axes.position": {"upper left": 1}})
    off = {"prompts.axes.size": {"huge": 1}, "validate.check_layout": False}
    assert load_params(root / "params.yaml", off).prompts.axes["size"] == {"huge": 1}


def test_labels_use_dataset_ids_and_drop_other_classes() -> None:
    lines = label_lines([det("disc", 0.9, (0.5, 0.4, 0.2, 0.1)), det("dog", 0.8), det("square", 0.3)], MAPPING)
    assert lines == ["0 0.500000 0.400000 0.200000 0.100000", "1 0.500000 0.500000 0.200000 0.200000"]


def test_label_coordinates_are_clipped_into_the_image() -> None:
    (line,) = label_lines([det("circle", 0.9, (1.02, 0.5, 0.2, -0.01))], MAPPING)
    assert line == "0 1.000000 0.500000 0.200000 0.000000"


def test_summary_rates_and_histogram() -> None:
    table = pd.DataFrame(
        {
            "class": ["circle", "circle", "square", "square"],
            "accepted": [True, False, True, True],
            "confidence": [0.95, 0.0, 0.55, 0.51],
        }
    )
    metrics = summarize_validation(table)
    assert metrics["acceptance_rate"] == 0.75
    assert metrics["acceptance_rate.circle"] == 0.5 and metrics["acceptance_rate.square"] == 1.0
    assert metrics["confidence_hist.0.5-0.6"] == 2 and metrics["confidence_hist.0.9-1.0"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("confidence_hist")) == 4
