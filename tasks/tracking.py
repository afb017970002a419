"""MLflow tracking: the only module that imports mlflow.

One parent run per flow run and one nested run per stage, addressed by run id through
``MlflowClient`` rather than mlflow's thread-local "active run": Prefect runs tasks in worker
threads, where the active-run stack of the flow's thread is not visible.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

log = logging.getLogger(__name__)

EXPERIMENT = "synthdet"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists and other values become their JSON/str form."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:_MAX_PARAM_LENGTH]
    return flat


class Tracker:
    """Writes runs, metrics, artifacts and registered models to one MLflow tracking URI.

    Args:
        tracking_uri: ``sqlite:///...`` or ``http://host:port``.
        artifact_location: where a new experiment keeps artifacts (for a local SQLite store);
            ignored when the experiment exists or a server decides.
    """

    def __init__(self, tracking_uri: str, artifact_location: str | None = None, experiment: str = EXPERIMENT):
        self.uri = tracking_uri
        check_reachable(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment, artifact_location)
        )

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def end_run(self, run_id: str, failed: bool = False) -> None:
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status)

    @contextmanager
    def run(self, name: str, parent: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED if the block raises."""
        run_id = self.start_run(name, parent, tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, failed=True)
            raise
        self.end_run(run_id)

    def fail_stale_runs(self, tags: Mapping[str, str], reason: str) -> list[Any]:
        """Mark FAILED every run still RUNNING with these tags, e.g. those of a killed process.

        Only call this when no live process can own such a run (synthdet holds the workspace lock).
        The reason goes into the ``synthdet.crashed`` tag. Returns the runs as they were found.
        """
        running = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=10_000)
        # Matched here rather than in the query: tag values (paths) may hold quotes the filter syntax chokes on.
        stale = [run for run in running if all(run.data.tags.get(k) == v for k, v in tags.items())]
        for run in stale:
            self.client.set_tag(run.info.run_id, "synthdet.crashed", reason)
            self.end_run(run.info.run_id, failed=True)
        return stale

    # -- data -------------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = get_current_time_millis()
        items = [
            Metric(_metric_key(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, table: pd.DataFrame, artifact_file: str) -> None:
        """A table MLflow's UI can show and compare (JSON), e.g. the prompt table."""
        self.client.log_table(run_id, data=table, artifact_file=artifact_file)

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_image(self, run_ids: str | Sequence[str], image: Any, artifact_file: str) -> None:
        """A PIL image, e.g. a grid of accepted or rejected samples, as a PNG artifact of one run or several.

        Encoded once, at zlib level 1: a 1024x330 grid takes 0.03 s instead of 0.12 s at PIL's default
        (level 6) for about 20% more bytes, which an unchanged re-run would otherwise pay per grid and run.
        """
        runs = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        folder = str(Path(artifact_file).parent)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            image.save(path, format="PNG", compress_level=1)
            for run_id in runs:
                self.log_artifact(run_id, path, None if folder == "." else folder)

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    # -- registry ---------------------------------------------------------------------------
    def register_model(self, run_id: str, weights: Path, name: str, tags: Mapping[str, str] | None = None) -> str:
        """Log ``weights`` as a pyfunc model of the run and register it as a new version of ``name``.

        Returns:
            The new model version number, as a string.
        """
        import ultralytics

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                python_model=YoloDetector(),
                artifacts={"weights": str(weights)},
                pip_requirements=[f"ultralytics=={ultralytics.__version__}", "pandas"],
            )
            self.client.log_artifacts(run_id, str(model_dir), "model")
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source, run_id=run_id, tags=dict(tags or {}))
        return str(version.version)

    def champion(self, name: str, alias: str) -> Any | None:
        """The model version ``alias`` points at, or None if the alias (or the model) does not exist."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def download_weights(self, run_id: str, dest: Path) -> Path:
        """The weights a finetune run logged (``weights/best.pt`` or ``weights/last.pt``, as
        ``finetune.select`` chose), copied under ``dest``."""
        found = [a.path for a in self.client.list_artifacts(run_id, "weights") if a.path.endswith(".pt")]
        if len(found) != 1:
            raise FileNotFoundError(f"MLflow run {run_id}: expected one weights/*.pt artifact, found {found}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, found[0], str(dest)))


def redact(uri: str) -> str:
    """The URI without a password, fit for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any heavy work, if an MLflow server does not answer its health check.

    MLflow's own client would retry for minutes; a run that cannot log should not start at all.

    Raises:
        RuntimeError: naming the (redacted) URI.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise RuntimeError(
            f"MLflow tracking server {redact(uri)} is unreachable ({type(exc).__name__}); start it, or unset "
            "MLFLOW_TRACKING_URI to log to the workspace's SQLite store"
        ) from None


def _metric_key(key: str) -> str:
    # MLflow accepts letters, digits and _-./ and spaces; ultralytics uses "metrics/mAP50(B)".
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class YoloDetector(mlflow.pyfunc.PythonModel):
    """A registered detector: input a table with a ``path`` column, output one row per detection."""

    def load_context(self, context: Any) -> None:
        from ultralytics import YOLO

        self.model = YOLO(context.artifacts["weights"], task="detect")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = []
        for path, result in zip(
            model_input["path"], self.model.predict(list(model_input["path"]), verbose=False), strict=True
        ):
            for cls, conf, box in zip(
                result.boxes.cls.tolist(), result.boxes.conf.tolist(), result.boxes.xywhn.tolist(), strict=True
            ):
                rows.append({"path": path, "class": result.names[int(cls)], "conf": conf, "box": box})
        return pd.DataFrame(rows, columns=["path", "class", "conf", "box"])
