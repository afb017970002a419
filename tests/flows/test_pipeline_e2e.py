"""The whole ``pipeline`` flow through the CLI, on the small profile with tiny real models: real
Prefect (its temporary local API), real MLflow (SQLite in the workspace), a real DVC registry with a
local remote. Network access other than loopback is recorded and refused in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.config import STAGES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

NETWORK_GUARD = textwrap.dedent('''
    """Loaded at start-up of every Python process of the test: refuse and record non-loopback traffic."""
    import ipaddress, os, socket

    _LOG = os.environ["SYNTHDET_NETWORK_LOG"]

    def _check(host):
        text = host.decode() if isinstance(host, bytes) else str(host)
        if text in ("localhost", "", "None"):
            return
        try:
            if ipaddress.ip_address(text.split("%")[0]).is_loopback:
                return
        except ValueError:
            pass
        with open(_LOG, "a") as log:
            log.write(text + "\\n")
        raise OSError(f"test network guard: refused {text}")

    _getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        _check(host)
        return _getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple):
            _check(address[0])
        return _connect(self, address)

    def connect_ex(self, address):
        if isinstance(address, tuple):
            _check(address[0])
        return _connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
''')


@pytest.fixture
def guarded_env(tmp_path: Path) -> dict[str, str]:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(guard), str(ROOT)])
    env["SYNTHDET_NETWORK_LOG"] = str(tmp_path / "network.log")
    for key in ("PREFECT_HOME", "YOLO_CONFIG_DIR"):  # let the CLI put them in the workspace
        env.pop(key, None)
    env.update(SECRETS)  # planted: none may reach a log, a param, a tag or an artifact
    return env


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "synthdet-planted-aws-secret-7f3a",
    "HF_TOKEN": "hf_synthdetPlantedToken9c1e",
    "MLFLOW_TRACKING_TOKEN": "synthdet-planted-mlflow-token-41d0",
}


def synthdet(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"synthdet {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def git_head(folder: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()


def test_pipeline_end_to_end(smoke_params: Path, guarded_env: dict[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    code_head = git_head(ROOT)
    first = synthdet(["run", "--params", str(smoke_params)], guarded_env)
    assert "synthdet pipeline: done" in first.stdout
    for line in ("prompts      12", "version      synthetic-v1", "mAP50-95", "mlflow run"):
        assert line in first.stdout

    ws = tmp_path / "workspace"
    run = ws / "runs" / "default"
    prompts = pd.read_parquet(run / "prompts" / "prompts.parquet")
    generated = pd.read_parquet(run / "generate" / "generated.parquet")
    validated = pd.read_parquet(run / "validate" / "validated.parquet")

    # One manifest row per prompt, and one image file per ok row.
    assert len(prompts) == 12 and list(generated["prompt_id"]) == list(prompts["prompt_id"])
    assert all(Path(p).is_file() for p in generated.loc[generated["status"] == "ok", "path"])
    # Labels for every accepted image, a reason for every rejected one.
    accepted = validated[validated["accepted"]]
    assert 0 < len(accepted) < len(validated)
    for label in accepted["label_path"]:
        assert Path(label).read_text().strip()
    assert (validated.loc[~validated["accepted"], "reject_reason"] != "").all()
    v1_dataset = snapshot(run / "dataset")
    assert len([f for f in v1_dataset if f.startswith("images/")]) == len(accepted)

    # MLflow: one parent run, a nested run per stage with metrics and artifacts, a registered model.
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("synthdet")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "pipeline"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["dataset.version"] == "synthetic-v1"
    assert parent.data.tags["git.sha"] != "unknown"
    assert children["validate"].data.metrics["acceptance_rate"] == pytest.approx(len(accepted) / len(validated))
    assert "mAP50-95" in children["finetune"].data.metrics and "train/box_loss" in children["finetune"].data.metrics
    assert children["generate"].data.params["num_inference_steps"] == "2"

    def artifacts(run_id: str, path: str | None = None) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, path)}

    assert {"accepted_grid.png", "rejected_grid.png", "summary.json"} <= artifacts(parent.info.run_id)
    assert {"prompts.json", "prompts.parquet"} <= artifacts(children["prompts"].info.run_id)
    assert "generated_grid.png" in artifacts(children["generate"].info.run_id)
    assert "confidence_histogram.png" in artifacts(children["validate"].info.run_id)
    assert {"data.yaml", "manifest.parquet"} <= artifacts(children["dataset"].info.run_id)
    assert "weights/best.pt" in artifacts(children["finetune"].info.run_id, "weights")
    (model_version,) = client.search_model_versions("name='synthdet-detector'")
    assert model_version.run_id == children["finetune"].info.run_id
    assert model_version.tags["dataset.version"] == "synthetic-v1"
    assert str(client.get_model_version_by_alias("synthdet-detector", "champion").version) == "1"
    assert children["finetune"].data.tags["promotion.reason"].startswith("first model")
    assert "champion     v1: first model" in first.stdout

    # A run with changed params makes version 2; version 1 comes back byte for byte.
    raw = yaml.safe_load(smoke_params.read_text())
    raw["prompts"]["seed"] = 1
    smoke_params.write_text(yaml.safe_dump(raw))
    second = synthdet(["run", "--params", str(smoke_params)], guarded_env)
    assert "version      synthetic-v2" in second.stdout
    assert json.loads((run / "version" / "version.json").read_text())["new"] is True
    synthdet(["version", "--params", str(smoke_params)], guarded_env)  # the same content again: no new version
    again = json.loads((run / "version" / "version.json").read_text())
    assert again["tag"] == "synthetic-v2" and again["new"] is False
    listed = synthdet(["datasets", "list", "--params", str(smoke_params)], guarded_env).stdout
    assert "synthetic-v1" in listed and "synthetic-v2" in listed
    restored = tmp_path / "restored"
    synthdet(
        ["datasets", "checkout", "synthetic-v1", "--to", str(restored), "--params", str(smoke_params)], guarded_env
    )
    assert snapshot(restored) == v1_dataset
    assert snapshot(run / "dataset") != v1_dataset
    assert len(client.search_model_versions("name='synthdet-detector'")) == 2
    # The second model was compared with the champion, re-evaluated on the same data; the alias
    # follows the decision recorded on the run.
    finetune_runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'finetune'")
    latest = max(finetune_runs, key=lambda r: r.info.start_time)
    assert "champion.mAP50-95" in latest.data.metrics
    promoted = latest.data.tags["promotion.promoted"] == "True"
    champion = str(client.get_model_version_by_alias("synthdet-detector", "champion").version)
    assert champion == ("2" if promoted else "1")

    # The retrain flow fine-tunes on the latest version: with nothing changed since the last
    # fine-tune it reuses that one (no new model version), unless finetune.reuse is off; then it
    # trains and records its promotion decision.
    reused = synthdet(["run", "--flow", "retrain", "--params", str(smoke_params)], guarded_env)
    assert "fine-tuned   on synthetic-v2 (reused" in reused.stdout
    assert len(client.search_model_versions("name='synthdet-detector'")) == 2
    raw["finetune"]["reuse"] = False
    # with a guard set (here the dataset's own val split) that allows no loss: both weights scored there
    raw["finetune"].update({"guard_data": str(run / "dataset" / "data.yaml"), "guard_margin": 0.0})
    smoke_params.write_text(yaml.safe_dump(raw))
    retrained = synthdet(["run", "--flow", "retrain", "--params", str(smoke_params)], guarded_env)
    assert "synthdet retrain: done" in retrained.stdout and "fine-tuned   on synthetic-v2\n" in retrained.stdout
    assert len(client.search_model_versions("name='synthdet-detector'")) == 3
    assert "champion     v" in retrained.stdout
    assert "at most -0.0 allowed), on " in retrained.stdout
    guarded = max(client.search_runs([experiment.experiment_id], "attributes.run_name = 'finetune'"),
                  key=lambda r: r.info.start_time)  # fmt: skip
    after, before = guarded.data.metrics["guard.mAP50-95"], guarded.data.metrics["guard.start.mAP50-95"]
    stopped = "guard mAP50-95" in guarded.data.tags["promotion.reason"]
    assert stopped == (after < before - 1e-9), (after, before, guarded.data.tags["promotion.reason"])
    if stopped:  # the decision the logged figures call for, and its effect on the alias
        assert guarded.data.tags["promotion.promoted"] == "False"

    # No planted secret was written anywhere in the workspace (MLflow store and artifacts, Prefect's
    # database and logs, the registry, the run folders) or printed.
    printed = "".join(r.stdout + r.stderr for r in (first, second, reused, retrained))
    for secret in SECRETS.values():
        assert secret not in printed
        leaks = [p for p in ws.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} found in {leaks}"

    # Nothing left the machine, and the user's own repository was not committed to.
    network_log = tmp_path / "network.log"
    assert not network_log.exists(), f"non-loopback network use: {network_log.read_text()}"
    assert git_head(ROOT) == code_head
