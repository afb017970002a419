"""MLflow going down in the middle of a run: the run fails with MLflow's error, keeps every image it
made, and once MLflow is back a re-run resumes from them (no image made twice), closes the runs the
failed one left open, and makes the dataset version."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class MlflowServer:
    """A real ``mlflow server`` on loopback, with its store in ``folder``; stop() and start() again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import requests

        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts")]  # fmt: skip
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=5).status_code == 200:
                    return
            assert self.process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # an outage, not a shutdown
            self.process.wait(timeout=60)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_outage_mid_run_fails_keeps_images_and_a_rerun_resumes(
    smoke_params: Path, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    raw = yaml.safe_load(smoke_params.read_text())
    raw["prompts"]["classes"] = [{"name": "circle", "count": 24}, {"name": "square", "count": 24}]
    raw["prompts"]["allow_repeats"] = True
    raw["generate"].update(batch_size=1, num_inference_steps=8)  # slow enough to pull the plug mid-stage
    params = tmp_path / "outage.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    ws = Path(raw["workspace"])
    images = ws / "cache" / "images"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # fail in seconds, not after minutes of backoff
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    command = [sys.executable, "-m", "flows.cli", "run", "--flow", "synthesize", "--params", str(params)]

    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(list(images.glob("*.png"))) < 3:  # generation is under way: MLflow goes down
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no image appeared"
        time.sleep(0.2)
    mlflow_server.stop()
    _, stderr = run.communicate(timeout=600)

    assert run.returncode != 0, "the run cannot log, so it must fail"
    assert "error:" in stderr and str(mlflow_server.port) in stderr, stderr[-3000:]
    made = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert len(made) >= 3  # every image made before the outage is kept

    mlflow_server.start()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]

    after = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert {name: after[name] for name in made} == made  # nothing made twice
    run_dir = ws / "runs" / "default"
    version = json.loads((run_dir / "version" / "version.json").read_text())
    assert version["tag"] == "synthetic-v1"
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("synthdet")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the failed run's runs were closed
    assert [r for r in runs if r.info.status == "FAILED"], "the interrupted runs are marked failed"
    finished = [r for r in runs if r.data.tags.get("synthdet.flow") == "synthesize" and r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["dataset.version"] == "synthetic-v1"
