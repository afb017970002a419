"""The bad-input corpus (tests/bad_inputs/): each file must give a clear one-line error naming the field
or file, through the CLI, before any stage runs, with no traceback and a non-zero exit.

A file is merged into the small profile (pointed at the tiny models) unless it starts with
``# whole-file``; its ``# error:`` line is what the message must contain. ``{tmp}`` is a folder that
holds the broken files the cases point at.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))


def merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def broken_files(tmp: Path) -> None:
    (tmp / "empty-dir").mkdir()
    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    for name, image, label in [
        ("real-empty", b"", "0 0.5 0.5 0.1 0.1\n"),
        ("real-truncated", None, "0 0.5 0.5 0.1 0.1\n"),
        ("real-bad-label", "ok", "7 0.5 0.5 0.1 0.1\n"),
        ("real-bad-coords", "ok", "0 0.5 1.5 0.1 0.1\n"),
    ]:
        (tmp / name / "images").mkdir(parents=True)
        (tmp / name / "labels").mkdir()
        png = tmp / name / "images" / "a.png"
        if isinstance(image, bytes):
            png.write_bytes(image)
        else:
            Image.new("RGB", (16, 16), "red").save(png)
            if image is None:
                png.write_bytes(png.read_bytes()[:40])
        (tmp / name / "labels" / "a.txt").write_text(label)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_input_fails_early_with_one_clear_line(case: Path, smoke_params: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "inputs"
    tmp.mkdir()
    broken_files(tmp)
    text = case.read_text().replace("{tmp}", str(tmp))
    expected = next(line for line in text.splitlines() if line.startswith("# error: "))[len("# error: ") :]
    params = tmp_path / "bad.yaml"
    if text.startswith("# whole-file"):
        params.write_text(text)
    else:
        base = yaml.safe_load(smoke_params.read_text())
        params.write_text(yaml.safe_dump(merge(base, yaml.safe_load(text)), sort_keys=False))

    result = CliRunner().invoke(app, ["run", "--params", str(params)])

    assert result.exit_code != 0
    assert expected in result.stderr, result.stderr
    assert all(line.startswith("error: ") for line in result.stderr.strip().splitlines())
    assert "Traceback" not in result.output
    runs = tmp_path / "workspace" / "runs"
    assert not runs.exists() or not any(runs.rglob("*.parquet")), "no stage may have run"
