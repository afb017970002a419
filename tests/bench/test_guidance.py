from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.guidance import real_tone, tone


def test_tone_is_each_conditions_mean_brightness_and_mean_per_image_contrast() -> None:
    flat = np.full((4, 4, 3), 51, np.uint8)  # 0.2 everywhere: no contrast
    halves = np.zeros((4, 4, 3), np.uint8)
    halves[:2] = 255  # half black, half white: mean 0.5, std 0.5
    shown = tone([flat, halves, flat], ["fog", "night", "fog"])
    assert shown == {"fog": "0.20/0.000", "night": "0.50/0.500"}


def test_real_tone_reads_each_conditions_test_images_and_is_none_if_one_is_missing(tmp_path: Path) -> None:
    for condition, value in [("plain", 0), ("fog", 255)]:
        (tmp_path / condition / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / condition / "images" / "a.png")
    assert real_tone(tmp_path, ["plain", "fog"]) == {"plain": "0.00/0.000", "fog": "1.00/0.000"}
    assert real_tone(tmp_path, ["plain", "fog", "night"]) is None


def test_start_means_needs_a_params_file_that_sets_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from bench.guidance import main

    params = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    params["generate"]["start_means"] = None
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):  # before any model loads
        main(["--start-means", str(path), "--generator", str(tmp_path / "none"), "--out", str(tmp_path / "o.json")])
    assert "sets no generate.start_means" in capsys.readouterr().err
