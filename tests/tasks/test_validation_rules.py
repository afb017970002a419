"""The acceptance rules of the validate stage, on hand-made detections (no model needed)."""

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
