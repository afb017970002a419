"""The embedded default's stages end to end at toy sizes: world -> train-validator, train-generator ->
evaluate-default; the saved models load through the very code the pipeline uses for a hub model and a
yolo26n.pt."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import GenerateConfig
from tasks.generation import generate_images, load_pipeline
from tasks.validation import load_detector

pytestmark = pytest.mark.slow

TOY = {
    "prompts": {"classes": [{"name": "circle", "count": 2}]},
    "generate": {"model": "unused", "num_inference_steps": 2, "batch_size": 8},
    "validate": {"model": "unused.pt"},
    "finetune": {"model": "unused.pt"},
    "world": {"common_train": 8, "common_val": 4, "rare_scarce": 1, "test": 2, "captioned": 10, "reference_train": 5},
    "train-validator": {"model": "yolo26n.yaml", "epochs": 1, "imgsz": 32, "batch": 4, "plots": False},
    "train-generator": {"vae_channels": [8, 16, 16], "vae_steps": 2, "vae_batch": 4, "unet_channels": [16, 32],
                        "unet_steps": 2, "unet_batch": 4, "warmup_steps": 1, "text_width": 16, "max_tokens": 24,
                        "guide_steps": 2, "guide_batch": 4, "guide_widths": [8, 16]},
}  # fmt: skip


def test_world_then_both_trainings_then_reload(tmp_path: Path, yolo_env: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**TOY, "workspace": str(tmp_path / "ws")}))
    runner = CliRunner()

    def synthdet(*args: str) -> None:
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 0, result.output + str(result.exception)

    world, models = tmp_path / "world", tmp_path / "models"
    synthdet("world", "--out", str(world))
    assert sorted(p.name for p in (world / "test").iterdir()) == ["fog", "night", "noise", "plain", "rain", "rare.yaml"]
    assert len(pd.read_parquet(world / "captioned" / "captions.parquet")) == 10

    synthdet("train-validator", "--data", str(world / "common_train" / "data.yaml"), "--out",
             str(models / "validator.pt"), "--tests", str(world / "test"))  # fmt: skip
    detector = load_detector(str(models / "validator.pt"))
    assert detector.names == ["circle", "square", "triangle", "star"]

    synthdet("train-generator", "--data", str(world / "captioned"), "--out", str(models / "generator"))
    assert json.loads((models / "generator" / "class_guide" / "config.json").read_text())["classes"] == ["circle"]
    synthdet("train-guide", "--data", str(world / "captioned"), "--generator", str(models / "generator"))
    cfg = GenerateConfig(model=str(models / "generator"), num_inference_steps=2, batch_size=1, class_guidance=10.0)
    prompts = pd.DataFrame(
        {"prompt": ["a red circle, night"], "negative_prompt": [""], "seed": [0], "class": ["circle"]}
    )
    table = generate_images(load_pipeline(cfg), prompts, cfg, tmp_path / "images", progress=False)
    assert (table["status"] == "ok").all()

    # Each training left a record beside its model, which the report quotes.
    for record in (models / "validator.json", models / "generator.json"):
        figures = json.loads(record.read_text())
        assert figures["seconds"] > 0 and figures["size_mb"] > 0 and figures["command"].startswith("synthdet train-")
    guide = json.loads((models / "generator.json").read_text())["class_guide"]
    assert guide["command"].startswith("synthdet train-guide") and guide["settings"]["guide_steps"] == 2

    docs = tmp_path / "docs"
    synthdet("evaluate-default", "--world", str(world), "--generator", str(models / "generator"), "--validator",
             str(models / "validator.pt"), "--reference", str(models / "validator.pt"), "--out", str(docs),
             "--per-cell", "2")  # fmt: skip
    result = json.loads((docs / "default-model.json").read_text())
    cells = {f"circle/{c}" for c in ("plain", "fog", "night", "rain", "noise")}
    for source in ("generated", "real", "roundtrip"):
        assert result["fidelity"][source]["images"] == 2 * len(cells)
        assert set(result["fidelity"][source]["by_cell"]) == cells
    assert set(result["map50_95"]["validator (common conditions only)"]) == {c.split("/")[1] for c in cells}
    assert result["training"]["generator"]["command"].startswith("synthdet train-generator")
    judged = pd.read_parquet(tmp_path / "ws" / "runs" / "default" / "evaluate-default" / "judged.parquet")
    assert judged.groupby("source")["path"].nunique().eq(2 * len(cells)).all()  # no image counted for two sources
    report = (docs / "default-model.md").read_text()
    assert "| generated |" in report and "| roundtrip |" in report and "| circle |" in report
    assert "| generator's class guide |" in report
    with Image.open(docs / "default-samples.png") as grid:
        assert grid.width > 5 * 3 * 64 and grid.height > 64  # five condition columns of three tiles, one class row


def test_the_shipped_default_models_load_like_any_hub_model_and_yolo_checkpoint(tmp_path: Path, yolo_env: Path) -> None:
    """params.yaml's defaults are committed under models/: a fresh clone needs no training."""
    from tasks.config import load_params

    root = Path(__file__).resolve().parents[2]
    params = load_params(root / "params.yaml")
    generator, validator = root / params.generate.model, root / params.validate_.model
    assert params.finetune.model == params.validate_.model
    # start_means reads the world's scarce rare images, which a fresh clone has not rendered: not this test's subject.
    update = {"model": str(generator), "num_inference_steps": 2, "batch_size": 2, "start_means": None}
    cfg = params.generate.model_copy(update=update)
    prompts = pd.DataFrame({"prompt": ["a red star, fog", "a blue circle, plain"], "negative_prompt": [""] * 2,
                            "seed": [0, 1], "class": ["star", "circle"]})  # fmt: skip
    assert cfg.class_guidance > 0  # so the shipped class guide loads and steers too
    table = generate_images(load_pipeline(cfg), prompts, cfg, tmp_path, progress=False)
    assert (table["status"] == "ok").all()
    assert load_detector(str(validator)).names == [c.name for c in params.prompts.classes]
    size_mb = sum(p.stat().st_size for p in generator.rglob("*") if p.is_file()) / 1e6
    assert size_mb < 20 and validator.stat().st_size / 1e6 < 10  # the size budgets
    for record in (root / "models" / "generator.json", root / "models" / "validator.json"):
        assert json.loads(record.read_text())["seconds"] > 0  # each says how it was trained
