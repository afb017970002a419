"""`dvc repro` runs the same six stages, through the same CLI subcommands, as the Prefect flow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import STAGES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_then_has_nothing_to_do(smoke_params: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    raw = yaml.safe_load(smoke_params.read_text())
    raw["workspace"] = "workspace"  # DVC outputs must lie inside the project
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_HOME", None)
    env.pop("YOLO_CONFIG_DIR", None)

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    # The pipeline is finetune and what it depends on; the training stages stand apart here, because
    # this profile points at the tiny models rather than at the trained defaults' paths.
    first = run(*dvc, "repro", "finetune")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert list(lock) == list(STAGES)
    version = json.loads((project / "workspace/runs/default/version/version.json").read_text())
    assert version["tag"] == "synthetic-v1"
    metrics = json.loads((project / "workspace/runs/default/finetune/metrics.json").read_text())
    assert metrics["dataset_version"] == "synthetic-v1"

    assert "Running stage 'world'" not in first
    second = run(*dvc, "repro", "finetune")
    assert "Running stage" not in second
