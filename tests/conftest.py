"""Shared fixtures. Tests never touch the network or the user's home: every tool's state goes to a
temporary folder set up here, before any test imports ultralytics, mlflow or prefect."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="synthdet-tests-"))
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_CONFIG_DIR": str(_SESSION_HOME / "yolo"),
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect reads its settings once, at import: tests that run a flow in this process get the same
    # start-up allowance for the temporary API as the CLI (its 20 s default fails on a loaded machine).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ[_key] = _value
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def yolo_env() -> Path:
    """Ultralytics' config dir with its font in place and its own integrations off."""
    from flows.env import _install_font, _switch_off_ultralytics_integrations

    folder = Path(os.environ["YOLO_CONFIG_DIR"])
    _install_font(folder / "Ultralytics")
    _switch_off_ultralytics_integrations()
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, yolo_env: Path) -> dict[str, Path]:
    """A tiny random-weight diffusers pipeline and YOLO26n detector, built from configs once per session."""
    from tasks.tiny_models import build_tiny_detector, build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {
        "generator": build_tiny_pipeline(root / "generator", seed=0),
        "validator": build_tiny_detector(root / "validator.pt", ["circle", "square"], seed=0),
    }


@pytest.fixture
def smoke_params(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """The real small profile, pointed at the tiny models and a temporary workspace."""
    raw = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    raw["workspace"] = str(tmp_path / "workspace")
    raw["generate"]["model"] = str(tiny_models["generator"])
    raw["validate"]["model"] = str(tiny_models["validator"])
    raw["finetune"]["model"] = str(tiny_models["validator"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
