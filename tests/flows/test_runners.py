"""Shards through Prefect task runners: the same small synthesize flow with the local runner and with
Dask (a LocalCluster of 2 worker processes) and Ray makes the same images, the same accepted set and
the same dataset version hash. Each run is a CLI subprocess (Dask and Ray spawn worker processes)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.shards import chunks, shard_device, worker_slot

ROOT = Path(__file__).resolve().parents[2]
TIMING = ["seconds"]  # the only column allowed to differ between runners


def run_synthesize(params: Path, tmp_path: Path, runner: dict, name: str, threads: int = 1) -> dict:
    raw = yaml.safe_load(params.read_text())
    raw["workspace"] = str(tmp_path / name)
    raw["runner"] = runner
    raw["generate"]["batch_size"] = 3
    raw["validate"]["batch"] = 3
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--flow", "synthesize", "--params", str(file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # Float sums differ in the last bit between torch thread counts, which can flip a pixel: the
        # runs compare like with like at the workers' count (2 workers on 2 cores: 1 thread each).
        # no PREFECT_HOME: the CLI keeps Prefect's database in the workspace, where the test reads it
        env={**{k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}, "SYNTHDET_TORCH_THREADS": str(threads)},
    )
    assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    run_dir = tmp_path / name / "runs" / "default"

    def table(path: Path) -> pd.DataFrame:  # paths relative to the workspace, timings dropped
        frame = pd.read_parquet(path).drop(columns=TIMING, errors="ignore")
        for column in frame.columns[[pd.api.types.is_string_dtype(t) for t in frame.dtypes]]:
            frame[column] = frame[column].str.replace(str(tmp_path / name), "<workspace>", regex=False)
        return frame

    with sqlite3.connect(tmp_path / name / "prefect" / "prefect.db") as db:
        task_runs = db.execute("SELECT name, state_type FROM task_run").fetchall()
    return {
        "task_runs": task_runs,
        "generated": table(run_dir / "generate" / "generated.parquet"),
        "validated": table(run_dir / "validate" / "validated.parquet"),
        "manifest": table(run_dir / "dataset" / "manifest.parquet"),
        "version": json.loads((run_dir / "version" / "version.json").read_text()),
    }


def assert_same_run(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["generated"], b["generated"])
    pd.testing.assert_frame_equal(a["validated"], b["validated"])
    pd.testing.assert_frame_equal(a["manifest"], b["manifest"])
    assert a["version"]["dvc_md5"] == b["version"]["dvc_md5"]
    assert a["version"]["files"] == b["version"]["files"]


@pytest.mark.slow
def test_dask_and_ray_runners_make_the_same_dataset_as_the_local_one(smoke_params: Path, tmp_path: Path) -> None:
    # 12 images in shards of 3 (one batch each): 4 shards per stage, spread over 2 workers.
    local = run_synthesize(smoke_params, tmp_path, {"kind": "local", "shard_size": 3}, "local")
    dask = run_synthesize(smoke_params, tmp_path, {"kind": "dask", "workers": 2, "shard_size": 3}, "dask")
    assert local["version"]["tag"] == dask["version"]["tag"] == "synthetic-v1"
    assert local["validated"]["accepted"].sum() > 0  # the comparison covers labels, not just rejections
    assert len(local["generated"]) == 12 and (local["generated"]["status"] == "ok").all()
    assert_same_run(local, dask)
    # the shards really went through the runners: one completed Prefect task run per shard and stage
    for run in (local, dask):
        assert shard_runs(run, "generate") == shard_runs(run, "validate") == 4, run["task_runs"]

    ray = run_synthesize(smoke_params, tmp_path, {"kind": "ray", "workers": 2, "shard_size": 3}, "ray")
    assert_same_run(local, ray)
    assert shard_runs(ray, "generate") == shard_runs(ray, "validate") == 4, ray["task_runs"]


def shard_runs(run: dict, stage: str) -> int:
    return sum(name.startswith(f"{stage}-shard-") and state == "COMPLETED" for name, state in run["task_runs"])


def test_shards_are_fixed_size_consecutive_chunks() -> None:
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 3) == []


def test_each_worker_takes_its_own_gpu_when_there_are_several(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shard_device("cpu", gpu_count=4) == "cpu"
    assert shard_device("cuda:1", gpu_count=4) == "cuda:1"  # an explicit device is kept
    monkeypatch.setenv("SYNTHDET_WORKER_SLOT", "5")
    assert worker_slot() == 5
    assert shard_device("cuda", gpu_count=4) == "cuda:1"
    assert shard_device("cuda", gpu_count=1) == "cuda"
