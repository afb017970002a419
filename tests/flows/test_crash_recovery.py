"""Crash safety: `synthdet run` killed with SIGKILL at points in every stage, then re-run.

Ten trials, two per stage (generate, validate, dataset, version, finetune). Each trial starts a run in a
fresh workspace, waits until the stage's first output appears, sleeps a random moment (seeded), kills
the whole process group (as a job scheduler or a closed terminal would), then runs the same command
again. Runs report to a real Prefect server started for the test. After each re-run the workspace must match a clean run's:
the same images (none lost, none twice), the same accepted set and the same dataset version hash; the
registry holds exactly that one version, committed, tagged and pushed, and nothing half-made; no
temporary or half-written file is left; the killed run's MLflow runs are FAILED and its Prefect flow
run Crashed, none left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# Ten kill-and-resume trials: about 15 min on a quiet 2-core machine, far more on a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# Stage -> a path (relative to the workspace) whose appearance means the stage is under way.
MARKERS = {
    "generate": ["cache/images/*.png"],
    "validate": ["cache/detections/*.json"],
    "dataset": ["runs/default/.dataset.staging/*", "runs/default/dataset/*"],
    "version": [".registry.*", "registry/*"],
    "finetune": ["runs/default/finetune/*"],
}


# Each workspace keeps its own Ultralytics settings, as for a user. Runs report to one real Prefect
# server (as after `synthdet up`): a temporary server per run is slow to start on a loaded 2-core machine.
ENV = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "YOLO_CONFIG_DIR")}


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[str]:
    import requests

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(1)
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_command(params: Path, workspace: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--params", str(params), "--workspace", str(workspace)]


def outcome(ws: Path) -> dict:
    """What a finished run must reproduce: images, accepted set, dataset version."""
    run = ws / "runs" / "default"
    generated = pd.read_parquet(run / "generate" / "generated.parquet")
    validated = pd.read_parquet(run / "validate" / "validated.parquet")
    version = json.loads((run / "version" / "version.json").read_text())
    return {
        "images": sorted(generated["image_id"]),
        "accepted": sorted(validated.loc[validated["accepted"], "image_id"]),
        "dataset_md5": version["dvc_md5"],
        "tag": version["tag"],
    }


def check_workspace_is_whole(ws: Path, clean: dict) -> None:
    # Images: one PNG and one record per image id, every PNG decodes; nothing else in the store.
    pngs = sorted(p.stem for p in (ws / "cache" / "images").glob("*.png"))
    assert pngs == sorted(set(clean["images"])), "images lost or extra"
    for png in (ws / "cache" / "images").glob("*.png"):
        with Image.open(png) as image:
            image.load()
    for record in (ws / "cache").rglob("*.json"):
        json.loads(record.read_text())
    # No temporary, staging or partial file anywhere outside the tools' own folders.
    leftovers = [p for p in (ws / "cache").rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    leftovers += [p for p in (ws / "runs").rglob("*") if ".tmp" in p.name or ".staging" in p.name]
    leftovers += list(ws.glob(".registry.*"))
    assert not leftovers, leftovers
    # The registry: exactly the clean run's version, committed, tagged, pushed; a clean working tree.
    git = ["git", "-C", str(ws / "registry")]
    tags = subprocess.run([*git, "tag", "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert tags == [clean["tag"]], tags
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    assert status.strip() == "", status
    listed = subprocess.run([sys.executable, "-m", "flows.cli", "datasets", "list", "--workspace", str(ws)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert clean["tag"] in listed and "NOT pushed" not in listed, listed


def check_records_are_closed(ws: Path, killed_stage: str, api: str) -> None:
    import requests

    with sqlite3.connect(ws / "mlflow.db") as db:
        statuses = dict(db.execute("select run_uuid, status from runs").fetchall())
        crashed = {r for (r,) in db.execute("select run_uuid from tags where key = 'synthdet.crashed'")}
        flow_runs = {v for (v,) in db.execute("select value from tags where key = 'prefect.flow_run_id'")}
    assert "RUNNING" not in statuses.values(), statuses
    assert crashed and all(statuses[r] == "FAILED" for r in crashed), (killed_stage, statuses, crashed)
    states = [requests.get(f"{api}/flow_runs/{run}", timeout=10).json()["state"]["type"] for run in flow_runs]
    assert sorted(states) == ["COMPLETED", "CRASHED"], states  # the killed run's and the re-run's


def kill_during(stage: str, params: Path, ws: Path, rng: random.Random, timeout: float = 300) -> None:
    """Start a run, wait for ``stage`` to begin, sleep a random moment, SIGKILL its process group."""
    log = (ws.parent / f"{ws.name}-killed.log").open("w")
    process = subprocess.Popen(run_command(params, ws), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not any(any(ws.glob(marker)) for marker in MARKERS[stage]):
            assert process.poll() is None, f"the run ended before {stage} began: see {log.name}"
            assert time.monotonic() < deadline, f"{stage} did not begin within {timeout} s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        assert process.poll() is None, f"the run finished before it could be killed in {stage}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the assertion above says why
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def test_runs_killed_in_every_stage_resume_to_the_clean_result(
    smoke_params: Path, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ENV, "PREFECT_API_URL", prefect_api)
    raw = yaml.safe_load(smoke_params.read_text())
    raw["prompts"]["axes"]["colour"] = {"red": 1, "blue": 1, "yellow": 1, "green": 1, "white": 1}
    raw["prompts"]["classes"] = [{"name": "circle", "count": 9}, {"name": "square", "count": 9}]
    raw["generate"]["batch_size"] = 2  # more, smaller steps: more places to be killed in
    raw["validate"]["batch"] = 2
    raw["generate"]["num_inference_steps"] = 10
    params = tmp_path / "crash.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))

    clean_ws = tmp_path / "clean"
    first = subprocess.run(run_command(params, clean_ws), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    clean = outcome(clean_ws)
    assert clean["accepted"] and clean["tag"] == "synthetic-v1"

    rng = random.Random(7)
    for trial, stage in enumerate([s for s in MARKERS for _ in range(2)]):
        ws = tmp_path / f"trial-{trial:02d}-{stage}"
        kill_during(stage, params, ws, rng)
        rerun = subprocess.run(run_command(params, ws), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, f"trial {trial} ({stage}): " + rerun.stdout[-2000:] + rerun.stderr[-3000:]
        assert outcome(ws) == clean, f"trial {trial} ({stage})"
        check_workspace_is_whole(ws, clean)
        check_records_are_closed(ws, stage, prefect_api)
