"""The embedded default's stages end to end at toy sizes: world -> train-validator, train-generator;
the saved models load through the very code the pipeline uses for a hub model and a yolo26n.pt."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import GenerateConfig
from tasks.generation import generate_images, load_pipeline
from tasks.validation import load_detector

pytestmark = pytest.mark.slow

TOY = {
    "prompts": {"classes": [{"name": "circle", "count": 2}]},
    "generate": {"model": "unused"},
    "validate": {"model": "unused.pt"},
    "finetune": {"model": "unused.pt"},
    "world": {"common_train": 8, "common_val": 4, "rare_scarce": 1, "test": 2, "captioned": 10},
    "train-validator": {"model": "yolo26n.yaml", "epochs": 1, "imgsz": 32, "batch": 4, "plots": False},
    "train-generator": {"vae_channels": [8, 16, 16], "vae_steps": 2, "vae_batch": 4, "unet_channels": [16, 32],
                        "unet_steps": 2, "unet_batch": 4, "warmup_steps": 1, "text_width": 16, "max_tokens": 24},
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
    assert sorted(p.name for p in (world / "test").iterdir()) == ["fog", "night", "noise", "plain", "rain"]
    assert len(pd.read_parquet(world / "captioned" / "captions.parquet")) == 10

    synthdet("train-validator", "--data", str(world / "common_train" / "data.yaml"), "--out",
             str(models / "validator.pt"), "--tests", str(world / "test"))  # fmt: skip
    detector = load_detector(str(models / "validator.pt"))
    assert detector.names == ["circle", "square", "triangle", "star"]

    synthdet("train-generator", "--data", str(world / "captioned"), "--out", str(models / "generator"))
    cfg = GenerateConfig(model=str(models / "generator"), num_inference_steps=2, batch_size=1)
    prompts = pd.DataFrame({"prompt": ["a red circle, night"], "negative_prompt": [""], "seed": [0]})
    table = generate_images(load_pipeline(cfg), prompts, cfg, tmp_path / "images", progress=False)
    assert (table["status"] == "ok").all()
