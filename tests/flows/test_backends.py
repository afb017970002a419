"""The production back ends, against real local servers (docs/scale-out.md): moto's S3 server on loopback
stands in for S3, and Debian's PostgreSQL runs from a temporary data directory.

- DVC on S3: versions pushed to ``s3://bucket/prefix`` through the standard ``AWS_*`` variables, restored
  from the bucket alone, and a version made while the bucket was missing pushed later by the CLI.
- ``synthdet up`` on PostgreSQL (Prefect and MLflow) with MLflow's artifacts in S3: a flow run lands in
  Prefect's database, a run, its artifacts and a registered model land in MLflow's database and the bucket,
  and no password shows on a command line or in a log.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.versioning import list_versions, version_dataset

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"

# Not a decodable image, but bytes are all DVC sees; the NUL and high bytes catch any text-mode copy.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
FILES = {
    "images/train/a.png": PNG,
    "images/val/b.png": PNG[::-1],
    "labels/train/a.txt": b"0 0.5 0.5 0.25 0.25\n",
    "labels/val/b.txt": b"1 0.4 0.4 0.1 0.2\n",
    "data.yaml": b"path: .\ntrain: images/train\nval: images/val\nnames: {0: circle, 1: square}\n",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- servers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module's tests."""
    import requests

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.3)
        yield endpoint
    finally:
        stop(process)
        log.close()


@pytest.fixture
def s3(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The standard AWS variables pointed at moto (no ~/.aws file is read); a boto3 S3 client."""
    import boto3

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "synthdet-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"s3-secret-{secrets.token_hex(8)}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return boto3.client("s3")


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (not on PATH), or None if not installed."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)  # fmt: skip
    return Path(found).parent if found else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server from a temporary data directory on a free loopback port, with a password.

    initdb refuses to run as root: as root the server runs as Debian's ``postgres`` user.

    Yields:
        ``user:password@127.0.0.1:port`` for SQLAlchemy URLs.
    """
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("Debian's postgresql is not installed (make setup installs it)")
    as_user: dict = {}
    root = Path(tempfile.mkdtemp(prefix="synthdet-pg-"))
    password = f"pg-secret-{secrets.token_hex(8)}"
    (root / "password").write_text(password + "\n")
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        for path in (root, root / "password"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()

    def pg(*args: str) -> None:
        result = subprocess.run([str(bindir / args[0]), *args[1:]], capture_output=True, text=True, **as_user)
        assert result.returncode == 0, f"{args[0]}: {result.stdout[-1000:]}{result.stderr[-1000:]}"

    try:
        pg("initdb", "-D", str(data), "-U", "synthdet", "--pwfile", str(root / "password"),
           "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
           "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start")  # fmt: skip
        try:
            yield f"synthdet:{password}@127.0.0.1:{port}"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """A database owned by a new login role of the same name, as docs/scale-out.md creates it; its URL."""
    import psycopg2

    password = f"{name}-secret-{secrets.token_hex(8)}"
    connection = psycopg2.connect(f"postgresql://{server}/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
        cursor.execute(f"CREATE DATABASE {name} OWNER {name}")
    connection.close()
    return f"postgresql://{name}:{password}@{server.split('@')[1]}/{name}"


def query(url: str, sql: str, *args: object) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        rows = cursor.fetchall()
    connection.close()
    return rows


# -- DVC on S3 ------------------------------------------------------------------------------------
def make_dataset(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def synthdet(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_dataset_versions_on_s3(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="datasets")
    registry, remote = tmp_path / "registry", "s3://datasets/synthdet"
    v1 = version_dataset(make_dataset(tmp_path / "ds1", FILES), "synthetic", registry, remote)

    assert v1.pushed
    stored = keys(s3, "datasets", "synthdet/files/md5/")
    assert len(stored) == len(FILES) + 1  # one object per file, plus the .dir listing
    assert f"synthdet/files/md5/{v1.dvc_md5[:2]}/{v1.dvc_md5[2:]}" in stored
    assert f"url = {remote}" in (registry / ".dvc" / "config").read_text()

    # Credentials come from the environment only: nothing committed or configured in the registry holds them.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=registry, capture_output=True, text=True).stdout
    configs = "".join(p.read_text() for p in (registry / ".dvc").glob("config*"))
    assert secret not in history + configs and "synthdet-test-key" not in history + configs

    # Restored from the bucket alone: no local cache, no working copy, no local remote.
    shutil.rmtree(registry / ".dvc" / "cache")
    shutil.rmtree(registry / "datasets" / "synthetic")
    raw = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    raw["workspace"] = str(tmp_path / "workspace")
    raw["version"].update(registry=str(registry), remote=remote)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    synthdet("datasets", "checkout", "synthetic-v1", "--to", str(tmp_path / "restored"), "--params", str(params))
    assert snapshot(tmp_path / "restored") == FILES

    # A version made while the bucket is missing stays local, and the CLI pushes it once the bucket exists.
    missing = "s3://late-bucket/synthdet"
    changed = {**FILES, "images/train/c.png": PNG + b"\x00c"}
    v2 = version_dataset(make_dataset(tmp_path / "ds2", changed), "synthetic", registry, missing)
    assert (v2.tag, v2.pushed) == ("synthetic-v2", False)
    s3.create_bucket(Bucket="late-bucket")
    raw["version"]["remote"] = missing
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    synthdet("datasets", "push", "synthetic-v2", "--params", str(params))
    assert [v.pushed for v in list_versions(registry, "synthetic")] == [True, True]
    assert len(keys(s3, "late-bucket", "synthdet/files/md5/")) == len(changed) + 1


# -- synthdet up on PostgreSQL, MLflow artifacts on S3 --------------------------------------------
TINY_FLOW = """
from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow(name="backend-check")
def check() -> int:
    return double(21)

assert check() == 42
"""


@pytest.mark.slow
def test_services_on_postgres_with_artifacts_on_s3(
    s3, postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from tasks.tracking import Tracker

    s3.create_bucket(Bucket="mlflow")
    mlflow_db, prefect_db = create_database(postgres, "mlflow"), create_database(postgres, "prefect")
    passwords = [url.split(":")[2].split("@")[0] for url in (mlflow_db, prefect_db)]
    passwords.append(os.environ["AWS_SECRET_ACCESS_KEY"])
    prefect_port, mlflow_port = free_port(), free_port()
    raw = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    raw["workspace"] = str(tmp_path / "workspace")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "YOLO_CONFIG_DIR")}
    env.update(
        MLFLOW_BACKEND_STORE_URI=mlflow_db.replace("postgresql://", "postgresql+psycopg2://"),
        MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow/artifacts",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=prefect_db.replace("postgresql://", "postgresql+asyncpg://"),
    )
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), "--params", str(params)]

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    try:
        cli("up", *ports)
        assert cli("status", *ports).count("healthy") == 3
        # No password shows on a command line (the stores are passed in the environment).
        lines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
        assert not [line for line in lines if any(password in line for password in passwords)]

        # Prefect keeps its work pool, deployments and flow runs in PostgreSQL.
        flow = subprocess.run([sys.executable, "-c", TINY_FLOW], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}, timeout=300)  # fmt: skip
        assert flow.returncode == 0, flow.stdout[-2000:] + flow.stderr[-2000:]
        assert query(prefect_db, "SELECT name FROM work_pool WHERE name = 'synthdet'") == [("synthdet",)]
        deployments = {name for (name,) in query(prefect_db, "SELECT name FROM deployment")}
        assert {"pipeline", "synthesize", "finetune", "retrain"} <= deployments
        runs = query(prefect_db, "SELECT r.state_type FROM flow_run r JOIN flow f ON r.flow_id = f.id "
                                 "WHERE f.name = 'backend-check'")  # fmt: skip
        assert runs == [("COMPLETED",)]
        assert query(prefect_db, "SELECT state_type FROM task_run WHERE name LIKE %s", "double-%") == [("COMPLETED",)]

        # The Kubernetes work pool and its deployments, exactly as docs/scale-out.md creates them.
        prefect = [str(Path(sys.executable).with_name("prefect"))]
        api_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
        for command in (["work-pool", "create", "synthdet-k8s", "--type", "kubernetes",
                         "--base-job-template", str(KUBERNETES / "base-job-template.json")],
                        ["--no-prompt", "deploy", "--all", "--prefect-file", str(KUBERNETES / "prefect.yaml")]):  # fmt: skip
            done = subprocess.run(prefect + command, cwd=ROOT, env=api_env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        pools = query(prefect_db, "SELECT p.type, d.name, d.infra_overrides->>'image' FROM deployment d "
                                  "JOIN work_queue q ON d.work_queue_id = q.id JOIN work_pool p ON q.work_pool_id = p.id "
                                  "WHERE p.name = 'synthdet-k8s'")  # fmt: skip
        assert sorted(pools) == sorted(("kubernetes", name, "registry.example.com/synthdet:0.1.0")
                                       for name in ("pipeline", "synthesize", "finetune", "retrain"))  # fmt: skip

        # MLflow: the run in PostgreSQL, its artifacts (and a registered model's files) in the bucket. The
        # server proxies the artifacts: the client logging them has no S3 credentials or endpoint at all.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # were S3 used here, fail rather than probe
        tracker = Tracker(f"http://127.0.0.1:{mlflow_port}")
        weights = tmp_path / "best.pt"
        weights.write_bytes(PNG * 64)
        with tracker.run("finetune") as run_id:
            tracker.log_metrics(run_id, {"mAP50-95": 0.5})
            tracker.log_artifact(run_id, weights, "weights")
            version = tracker.register_model(run_id, weights, "synthdet-detector")
        assert tracker.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
        stored = keys(s3, "mlflow", "artifacts/")
        assert f"artifacts/{tracker.experiment_id}/{run_id}/artifacts/weights/best.pt" in stored
        assert any(key.endswith("/model/MLmodel") for key in stored)
        assert tracker.download_weights(run_id, tmp_path / "back").read_bytes() == weights.read_bytes()
        assert query(mlflow_db, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
        assert query(mlflow_db, "SELECT name, version FROM model_versions") == [("synthdet-detector", int(version))]
        assert MlflowClient(tracker.uri).get_run(run_id).data.metrics["mAP50-95"] == 0.5
    finally:
        cli("down", "--params", str(params))

    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "workspace" / "services").glob("*.log"))
    assert not [password for password in passwords if password in logs]
    strays = [p.info for p in psutil.process_iter(["pid", "cmdline"])
              if any(str(port) in " ".join(p.info["cmdline"] or []) for port in (prefect_port, mlflow_port))]  # fmt: skip
    assert not strays, strays


# -- the Kubernetes work pool's configuration -----------------------------------------------------
def test_kubernetes_job_template_renders_the_deployments() -> None:
    """Each deployment's job variables, applied to the pool's template as the worker does: the image, the
    workspace claim, the secret's variables, and a GPU only when asked for."""
    import json

    from prefect.utilities.templating import apply_values

    from flows.pipeline import FLOWS

    template = json.loads((KUBERNETES / "base-job-template.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    config = yaml.safe_load((KUBERNETES / "prefect.yaml").read_text())
    assert {d["name"] for d in config["deployments"]} == set(FLOWS)
    for deployment in config["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        assert set(variables) <= set(template["variables"]["properties"]), deployment["name"]
        flow = FLOWS[deployment["name"]]
        assert deployment["entrypoint"] == f"flows/pipeline.py:{flow.fn.__name__}"
        flow.validate_parameters(deployment["parameters"])
        for extra in ({}, {"gpu_limit": 1}):
            values = {**defaults, **variables, **extra, "command": "prefect flow-run execute", "name": "run"}
            spec = apply_values(template["job_configuration"], values)["job_manifest"]["spec"]["template"]["spec"]
            (container,) = spec["containers"]
            assert container["image"] == variables["image"]
            assert container["env"]["MLFLOW_TRACKING_URI"].startswith("http://")
            assert container["envFrom"] == [{"secretRef": {"name": "synthdet-secrets"}}]
            assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "synthdet-workspace"
            assert container["volumeMounts"][0]["mountPath"] == deployment["parameters"]["workspace"]
            assert container["resources"]["limits"].get("nvidia.com/gpu") == extra.get("gpu_limit")
            assert "serviceAccountName" not in spec  # unset variables leave no empty keys behind
