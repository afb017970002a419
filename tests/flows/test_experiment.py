"""The ``experiment`` flow through the CLI on a toy world with tiny real models: real Prefect, real
MLflow, real fine-tuning and evaluation. It checks the wiring (table, runs, plots, resume), not the
figures, which tiny random models make meaningless."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow

CLASSES = ["circle", "square", "triangle", "star"]  # the world's classes, in its id order


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.world import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, sizes={"common_train": 12, "common_val": 0, "rare_scarce": 2, "test": 4,
                                    "captioned": 0, "reference_train": 0})  # fmt: skip
    return out


def toy_params(tmp_path: Path, smoke_params: Path, world: Path, detector: Path) -> Path:
    raw = yaml.safe_load(smoke_params.read_text())
    raw["prompts"]["classes"] = [{"name": c, "count": 1} for c in CLASSES]
    raw["validate"]["model"] = raw["finetune"]["model"] = str(detector)
    raw["finetune"]["batch"] = 4
    raw["finetune"]["freeze"] = "head"
    raw["experiment"] = {
        "k": [2], "seeds": [0], "real": str(world / "rare_scarce"), "replay": str(world / "common_train"),
        "replay_images": 4, "tests": str(world / "test"), "rare_conditions": ["fog", "night"], "synthetic_images": 4,
        "conf": 0.002, "unfiltered_conf": 0.001, "thresholds": [0.001, 0.002], "sweep_k": 2, "steps": 2,
        "val_images": 2,
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_experiment_flow_writes_table_runs_and_plots(
    tmp_path: Path, smoke_params: Path, tiny_models: dict[str, Path], toy_world: Path
) -> None:
    from tasks.tiny_models import build_tiny_detector

    detector = build_tiny_detector(tmp_path / "detector.pt", CLASSES, seed=0)
    params = toy_params(tmp_path, smoke_params, toy_world, detector)
    runner = CliRunner()
    args = ["experiment", "--params", str(params), "--arms", "real,validated,adapted", "--name", "toy"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    out = tmp_path / "workspace" / "experiments" / "toy"
    results = pd.read_parquet(out / "results.parquet")
    # the three arms at k 2, plus the threshold sweep's extra point (validated, k 2, conf 0.001)
    assert sorted(results["key"]) == [
        "adapted-k2-s0-share1-conf0.002", "real-k2-s0-share1-conf0.002", "validated-k2-s0-share1-conf0.001",
        "validated-k2-s0-share1-conf0.002",
    ]  # fmt: skip
    for column in ("rare.mAP50-95", "common.mAP50-95", "fog.mAP50-95", "night.mAP50-95", "plain.mAP50-95"):
        assert results[column].between(0, 1).all(), column
    assert (results["n_real"] == 2).all()
    assert (results["n_replay"] == 4).all()
    for key in results["key"]:
        assert (out / key / "train" / "weights" / "last.pt").is_file()
        assert not (out / key / "data").exists()  # the padded training set is deleted after use
    trained = out / "real-k2-s0-share1-conf0.002" / "train"
    args_used = yaml.safe_load((trained / "args.yaml").read_text())
    assert args_used["lrf"] < 1  # the learning rate has fallen to lr0 x lrf by the last step of the one epoch
    assert pd.read_csv(trained / "results.csv")["lr/pg0"].iloc[-1] == pytest.approx(args_used["lr0"] * args_used["lrf"])
    import torch  # finetune.freeze: head keeps the detection head (layer 23) as the starting weights have it

    def layers(path: Path) -> dict[str, torch.Tensor]:
        checkpoint = torch.load(path, weights_only=False)
        return (checkpoint.get("ema") or checkpoint["model"]).state_dict()

    before, after = layers(detector), layers(trained / "weights" / "last.pt")
    head = [name for name in before if name.startswith("model.23.")]
    assert head and all(torch.equal(before[name], after[name]) for name in head)
    assert not torch.equal(before["model.0.conv.weight"], after["model.0.conv.weight"])  # the rest learnt

    comparison = (out / "comparison.md").read_text()
    assert "| real | 2 | 1 |" in comparison and "| validated | 2 | 1 |" in comparison
    assert "Sweep of the validation threshold" in comparison
    assert "UNMEASURED: adapted beats real by >= 0.05 at k=10" in comparison
    assert (out / "map_vs_k.png").stat().st_size > 1000
    assert (out / "map_vs_threshold.png").stat().st_size > 1000
    assert (out / "map_rare_vs_common.png").stat().st_size > 1000  # plain is the common test set here
    assert not (out / "map_vs_share.png").exists()  # no share sweep asked for

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'workspace' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthdet")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'experiment'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(results["key"])
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert "rare.mAP50-95" in children[0].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "comparison.md",
        "results.parquet",
        "results.json",
        "map_vs_k.png",
        "map_vs_threshold.png",
        "map_rare_vs_common.png",
    } <= artifacts

    # A second run finds every trial done: it trains nothing and reports the same table.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "4 trials (0 run now)" in again.output
    assert len(pd.read_parquet(out / "results.parquet")) == 4

    # Another guidance scale changes the synthetic images: the arms that use them run again, real does not.
    raw = yaml.safe_load(params.read_text())
    raw["generate"]["guidance_scale"] = raw["generate"]["guidance_scale"] + 1.0
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    regenerated = runner.invoke(app, args)
    assert regenerated.exit_code == 0, regenerated.output + repr(regenerated.exception)
    assert "4 trials (3 run now)" in regenerated.output
    rerun = pd.read_parquet(out / "results.parquet")
    assert sorted(rerun["key"]) == sorted(results["key"])
    kept = "real-k2-s0-share1-conf0.002"  # the same stored trial, not trained again
    assert rerun.set_index("key").at[kept, "mlflow_run_id"] == results.set_index("key").at[kept, "mlflow_run_id"]

    # Results stored before the tests' digest existed are taken as scored on today's tests, and stamped.
    rerun.drop(columns=["tests_digest"]).to_parquet(out / "results.parquet")
    legacy = runner.invoke(app, args)
    assert legacy.exit_code == 0, legacy.output + repr(legacy.exception)
    assert "4 trials (0 run now)" in legacy.output
    assert pd.read_parquet(out / "results.parquet")["tests_digest"].nunique() == 1

    # Other held-out files at the same path: no stored figure stands, every trial runs again.
    label = sorted((toy_world / "test" / "fog" / "labels").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    moved = runner.invoke(app, args)
    assert moved.exit_code == 0, moved.output + repr(moved.exception)
    assert "4 trials (4 run now)" in moved.output
    assert pd.read_parquet(out / "results.parquet")["tests_digest"].nunique() == 1
