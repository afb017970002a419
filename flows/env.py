"""The process environment a run needs: offline switches, tool homes inside the workspace.

Called by the CLI and the flows before anything imports prefect, ultralytics or mlflow, never at
import time. Values the user already set win (``setdefault``), so someone online can turn
``HF_HUB_OFFLINE=0`` to pass hub ids, or point ``MLFLOW_TRACKING_URI`` at a server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.workspace import Workspace

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    # The temporary local Prefect API needs more than the default 20 s on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Idle OpenMP threads sleep instead of spinning. When other processes share the cores, spinning
    # threads wait on descheduled ones: torch on 2 threads ran the default generator 10-20x slower
    # (docs/benchmarks.md, orchestration). Read once, when torch loads: set before importing it.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def configure_environment(ws: Workspace) -> None:
    """Set offline switches and keep tool state (Prefect, Ultralytics) inside the workspace."""
    ws.root.mkdir(parents=True, exist_ok=True)
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home.resolve()))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ws.config_dir.resolve()))
    _install_font(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
    _switch_off_ultralytics_integrations()


def tracking_uri(ws: Workspace) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store in the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or ws.mlflow_uri


def _install_font(folder: Path) -> None:
    # Ultralytics fetches Arial.ttf for its plots and dataset checks; offline it must already be there.
    target = folder / "Arial.ttf"
    if target.is_file():
        return
    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    shutil.copyfile(source, target)


def _switch_off_ultralytics_integrations() -> None:
    # Its MLflow callback would join (and end) whatever run is active and log 100+ params to it.
    from ultralytics.utils import SETTINGS

    wanted = {
        key: False
        for key in (
            "mlflow",
            "sync",
            "dvc",
            "tensorboard",
            "wandb",
            "clearml",
            "comet",
            "neptune",
            "raytune",
            "hub",
        )
        if key in SETTINGS
    }
    if any(SETTINGS.get(key) for key in wanted):
        SETTINGS.update(wanted)
