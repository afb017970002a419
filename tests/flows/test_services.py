"""The platform, for real: `synthdet up` starts a Prefect server, a worker with the deployments and an
MLflow server on free loopback ports; a `pipeline` run is triggered through the Prefect API with custom
parameters, as the dashboard's Run button does; a `synthesize` run's new dataset version triggers `retrain`
through its event; a hand-triggered `retrain` keeps the champion when the margin is not met; `synthdet down`
leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def browse(prefect_port: int, mlflow_port: int, experiment_id: str, run_id: str, shots: Path) -> None:
    """Open the deployment's Run form and the MLflow run's artifacts in headless Chromium."""
    import requests
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    deployment = requests.get(f"http://127.0.0.1:{prefect_port}/api/deployments/name/pipeline/pipeline", timeout=10)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{prefect_port}/deployments/deployment/{deployment.json()['id']}/run")
        for text in ("The params file, relative to the folder the flow runs in.", "finetune.epochs."):
            page.get_by_text(text).first.wait_for(timeout=120_000)  # the typed form, with descriptions
        page.screenshot(path=shots / "prefect-run-form.png")
        page.goto(f"http://127.0.0.1:{mlflow_port}/#/experiments/{experiment_id}/runs/{run_id}/artifacts")
        page.get_by_text("accepted_grid.png").first.wait_for(timeout=120_000)
        page.get_by_text("rejected_grid.png").first.wait_for(timeout=10_000)
        page.get_by_text("accepted_grid.png").first.click()
        page.locator("img").last.wait_for(timeout=30_000)  # the grid itself is shown
        page.screenshot(path=shots / "mlflow-run-artifacts.png")
        browser.close()
    assert all((shots / name).stat().st_size > 10_000 for name in ("prefect-run-form.png", "mlflow-run-artifacts.png"))


def wait_for_runs(prefect_port: int, deployment: str, count: int, timeout: float = 420) -> list[dict]:
    """The deployment's flow runs, once ``count`` of them have finished (any more is an error)."""
    import requests

    api = f"http://127.0.0.1:{prefect_port}/api"
    deployment_id = requests.get(f"{api}/deployments/name/{deployment}/{deployment}", timeout=10).json()["id"]
    deadline = time.monotonic() + timeout
    while True:
        runs = requests.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}},
                             timeout=10).json()  # fmt: skip
        states = [r["state"]["type"] for r in runs]
        assert len(runs) <= count and "FAILED" not in states and "CRASHED" not in states, runs
        if len(runs) == count and all(s == "COMPLETED" for s in states):
            return runs
        assert time.monotonic() < deadline, f"{deployment}: {states} after {timeout} s, waiting for {count} completed"
        time.sleep(3)


def finetune_runs(client, experiment_id: str, flow: str) -> list:
    """The finetune stage runs nested under the MLflow parent runs of ``flow``."""
    parents = client.search_runs([experiment_id], f"attributes.run_name = '{flow}'")
    return [run for parent in parents for run in client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'finetune'")]  # fmt: skip


def obeys_the_promotion_rule(run, margin: float) -> None:
    """The run's promotion decision follows from the two scores it logged."""
    challenger, champion = run.data.metrics["mAP50-95"], run.data.metrics["champion.mAP50-95"]
    assert run.data.tags["promotion.promoted"] == str(challenger >= champion + margin), run.data.tags


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_up_trigger_a_deployment_and_down(smoke_params: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    prefect_port, mlflow_port = free_port(), free_port()
    ws = tmp_path / "workspace"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "YOLO_CONFIG_DIR")}
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]

    def synthdet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--params", str(smoke_params)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert not check or result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    try:
        synthdet("up", *ports)
        status = synthdet("status", *ports).stdout
        assert status.count("healthy") == 3, status
        pids = {line.split()[0]: line.split()[3] for line in status.splitlines()}
        synthdet("up", *ports)  # idempotent: nothing new starts
        assert {line.split()[0]: line.split()[3] for line in synthdet("status", *ports).stdout.splitlines()} == pids

        # What the dashboard's Run button does: a flow run of the deployment, with parameters.
        parameters = {"params": str(smoke_params), "workspace": str(ws),
                      "overrides": {"run_name": "dashboard", "epochs": 1}}  # fmt: skip
        api_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}

        def deployment_run(name: str, parameters: dict) -> None:
            run = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run", name,
                                  "--params", json.dumps(parameters), "--watch", "--watch-timeout", "480"],
                                 cwd=ROOT, env=api_env, capture_output=True, text=True, timeout=540)  # fmt: skip
            assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]

        deployment_run("pipeline/pipeline", parameters)

        # The run logged to the MLflow server, linked back to its Prefect flow run.
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("synthdet")
        (parent,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pipeline'")
        assert parent.data.tags["synthdet.run_name"] == "dashboard"
        assert parent.data.tags["prefect.flow_run_url"].startswith(f"http://127.0.0.1:{prefect_port}/")
        assert parent.data.metrics["validate.accepted"] > 0
        assert "accepted_grid.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        champion = client.get_model_version_by_alias("synthdet-detector", "champion")
        assert str(champion.version) == "1"
        assert (ws / "runs" / "dashboard" / "version" / "version.json").is_file()

        browse(prefect_port, mlflow_port, experiment.experiment_id, parent.info.run_id, tmp_path / "screenshots")

        # A new dataset version from the synthesize flow triggers retrain on it (event -> deployment trigger).
        synthesize = {"params": str(smoke_params), "workspace": str(ws),
                      "overrides": {"run_name": "fresh", "seed": 1, "epochs": 1}}  # fmt: skip
        deployment_run("synthesize/synthesize", synthesize)
        triggered = wait_for_runs(prefect_port, "retrain", count=1)
        assert triggered[0]["parameters"]["dataset_version"] == "synthetic-v2", triggered[0]["parameters"]
        assert triggered[0]["parameters"]["workspace"] == str(ws.resolve())
        (auto,) = finetune_runs(client, experiment.experiment_id, "retrain")
        assert auto.data.tags["dataset.version"] == "synthetic-v2"
        obeys_the_promotion_rule(auto, margin=0.0)

        # Triggered by hand with a margin no model can clear: the champion stays, and the run says why.
        before = client.get_model_version_by_alias("synthdet-detector", "champion").version
        deployment_run("retrain/retrain", {"params": str(smoke_params), "workspace": str(ws),
                                           "overrides": {"epochs": 1, "promote_margin": 1.0}})  # fmt: skip
        manual = max(finetune_runs(client, experiment.experiment_id, "retrain"), key=lambda r: r.info.start_time)
        assert manual.data.tags["promotion.promoted"] == "False"
        assert "champion kept" in manual.data.tags["promotion.reason"]
        assert client.get_model_version_by_alias("synthdet-detector", "champion").version == before
        assert len(wait_for_runs(prefect_port, "retrain", count=2)) == 2  # no further trigger fired
    finally:
        synthdet("down")

    assert "stopped" in synthdet("status", *ports, check=False).stdout
    strays = [p.info for p in psutil.process_iter(["pid", "cmdline"])
              if any(str(port) in " ".join(p.info["cmdline"] or []) for port in (prefect_port, mlflow_port))
              or "synthdet-local" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    assert not strays, strays
