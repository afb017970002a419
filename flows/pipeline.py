"""Prefect flows: ``synthesize`` (prompts -> version), ``finetune`` (version -> finetune),
``pipeline`` (both) and ``retrain`` (the scheduled one: optionally a fresh batch, then finetune). Each stage is a Prefect task of the same name; each flow run is one MLflow
parent run tagged with its Prefect flow run, and each stage a nested MLflow run.

Caching is the stages' own (content-addressed images and detections), so Prefect's input hashing
is off (``NO_CACHE``): a re-run of a flow does only the work that is new.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows import stages
from flows.env import configure_environment, tracking_uri
from flows.runners import shard_runner
from tasks.config import STAGES, RunOverrides, load_params
from tasks.shards import release_worker_cache
from tasks.tracking import Tracker
from tasks.workspace import Workspace, sweep_temp_files, workspace_lock

log = logging.getLogger(__name__)

# A flow run waits this long for another run of its workspace to finish (a triggered retrain often
# starts while the synthesize run that triggered it is still closing); a single stage command does not wait.
LOCK_WAIT_S = 600

SYNTHESIZE = STAGES[:5]
FINETUNE = STAGES[5:]

TASKS = {name: task(name=name, cache_policy=NO_CACHE)(fn) for name, fn in stages.STAGE_FUNCTIONS.items()}


def open_context(
    params_path: str,
    workspace: str | None,
    progress: bool = True,
    overrides: RunOverrides | None = None,
    changes: dict[str, Any] | None = None,
) -> stages.StageContext:
    """Load params (with a run's overrides, then ``changes``: more dotted keys), set up the workspace's
    environment and tracking. The result is validated like the file, cross-section rules included."""
    dotted = {**(overrides.dotted() if overrides else {}), **(changes or {}),
              **({"workspace": workspace} if workspace else {})}  # fmt: skip
    params = load_params(params_path, dotted)
    ws = Workspace(Path(params.workspace).resolve(), params.run_name)
    configure_environment(ws)
    uri = tracking_uri(ws)
    artifacts = ws.mlflow_artifacts.resolve().as_uri() if uri == ws.mlflow_uri else None
    return stages.StageContext(params, ws, Tracker(uri, artifacts), progress=progress, params_file=params_path)


def run_stages(flow_name: str, ctx: stages.StageContext, names: tuple[str, ...], **finetune_args: Any) -> dict:
    """Run stages in order as Prefect tasks under one MLflow parent run; return a summary.

    Generation and validation map their shards through the task runner ``params.runner`` names.
    """
    tags = {
        "synthdet.flow": flow_name,
        "synthdet.run_name": ctx.params.run_name,
        "git.sha": stages.git_sha(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
    }
    summary: dict[str, Any] = {
        "flow": flow_name,
        "workspace": str(ctx.ws.root.resolve()),
        "run_dir": str(ctx.ws.run_dir.resolve()),
        "mlflow_uri": ctx.tracker.uri,
    }
    try:
        stages.preflight(ctx.params, names)  # loads the validator once, into this process's model cache
        ctx.shard_runner = functools.partial(shard_runner, ctx.params.runner, progress=ctx.progress)
        with workspace_lock(ctx.ws.root, wait_s=LOCK_WAIT_S):
            reap_crashed(ctx)
            return _run_under_parent(flow_name, ctx, names, {**tags, **ctx.owner_tags()}, finetune_args, summary)
    finally:
        release_worker_cache()  # whatever stage the run ended in, its models go with it


def reap_crashed(ctx: stages.StageContext) -> list[str]:
    """Clean up after an earlier run of this workspace that was killed (SIGKILL, power loss).

    Call with the workspace lock held: no live process then owns a run of this workspace, so any MLflow
    run of it still RUNNING is dead. Those runs become FAILED (tag ``synthdet.crashed``) and their
    Prefect flow runs, if still running, become Crashed. Temporary files it left half-written are
    deleted (finished files are only ever renamed into place). Returns the MLflow run ids closed.
    """
    reason = f"found still running by pid {os.getpid()}: its process died without ending it"
    stale = ctx.tracker.fail_stale_runs({"synthdet.workspace": str(ctx.ws.root.resolve())}, reason)
    flow_runs = {r.data.tags.get("prefect.flow_run_id") for r in stale} - {None, ""}
    if flow_runs:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            for flow_run_id in flow_runs:
                state = client.read_flow_run(flow_run_id).state
                if state is not None and not state.is_final():
                    client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    if stale:
        log.warning("closed %d run(s) left running by a killed process: %s", len(stale),
                    ", ".join(r.info.run_id for r in stale))  # fmt: skip
    swept = sweep_temp_files(ctx.ws.root)
    if swept:
        log.warning("deleted %d half-written temporary file(s) left by a killed process", len(swept))
    return [r.info.run_id for r in stale]


def _run_under_parent(
    flow_name: str,
    ctx: stages.StageContext,
    names: tuple[str, ...],
    tags: dict[str, str],
    finetune_args: dict,
    summary: dict[str, Any],
) -> dict[str, Any]:
    logger = get_run_logger()
    with ctx.tracker.run(flow_name, tags=tags) as parent:
        ctx.parent_run = parent
        summary["mlflow_run_id"] = parent
        for name in names:
            args = finetune_args if name == "finetune" else {}
            result = TASKS[name](ctx, **args)
            logger.info("%s: %s", name, {k: v for k, v in result.items() if k != "per_class"})
            summary[name] = result
            if name == "version" and result["new"]:
                announce_version(ctx, flow_name, result)
        numbers = {
            f"{stage}.{key}": value
            for stage, result in summary.items()
            if isinstance(result, dict)
            for key, value in result.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        ctx.tracker.log_metrics(parent, numbers)
        summary["mlflow_run_ids"] = dict(ctx.run_ids)
        ctx.tracker.log_dict(parent, summary, "summary.json")
    return summary


VERSIONED = "synthdet.dataset.versioned"


def announce_version(ctx: stages.StageContext, flow_name: str, version: dict[str, Any]) -> None:
    """Emit a Prefect event for a new dataset version; the ``retrain`` deployment's trigger reacts to it.

    The payload carries what the triggered run needs (params file, workspace, version tag). Outside a
    Prefect server (the CLI, tests without one) the event goes nowhere.
    """
    emit_event(
        event=VERSIONED,
        resource={
            "prefect.resource.id": f"synthdet.dataset.{version['name']}",
            "prefect.resource.name": version["tag"],
            "synthdet.flow": flow_name,
        },
        payload={
            "version": version["tag"],
            "files": version["files"],
            "params": ctx.params_file,
            "workspace": str(ctx.ws.root.resolve()),
            "run_name": ctx.params.run_name,
        },
    )


NO_OVERRIDES = RunOverrides()  # frozen, so one shared default is safe


@flow(name="synthesize")
def synthesize(
    params: str = "params.yaml", workspace: str | None = None, overrides: RunOverrides = NO_OVERRIDES
) -> dict:
    """prompts -> generate -> validate -> dataset -> version: a new synthetic dataset version.

    Args:
        params: The params file, relative to the folder the flow runs in.
        workspace: Write everything here instead of the params file's workspace.
        overrides: Changes to the params for this run only.
    """
    return run_stages("synthesize", open_context(params, workspace, overrides=overrides), SYNTHESIZE)


@flow(name="finetune")
def finetune(
    params: str = "params.yaml",
    workspace: str | None = None,
    dataset_version: str = "latest",
    overrides: RunOverrides = NO_OVERRIDES,
) -> dict:
    """Fine-tune the detector on a dataset version, register it, and promote it if it wins.

    Args:
        params: The params file, relative to the folder the flow runs in.
        workspace: Write everything here instead of the params file's workspace.
        dataset_version: A version tag such as synthetic-v2, or "latest".
        overrides: Changes to the params for this run only.
    """
    ctx = open_context(params, workspace, overrides=overrides)
    return run_stages("finetune", ctx, FINETUNE, dataset_version=dataset_version)


@flow(name="pipeline")
def pipeline(params: str = "params.yaml", workspace: str | None = None, overrides: RunOverrides = NO_OVERRIDES) -> dict:
    """The whole DAG: synthesize a dataset version, then fine-tune on it.

    Args:
        params: The params file, relative to the folder the flow runs in.
        workspace: Write everything here instead of the params file's workspace.
        overrides: Changes to the params for this run only.
    """
    return run_stages("pipeline", open_context(params, workspace, overrides=overrides), STAGES)


@flow(name="retrain")
def retrain(
    params: str = "params.yaml",
    workspace: str | None = None,
    fresh_batch: bool = False,
    dataset_version: str = "latest",
    overrides: RunOverrides = NO_OVERRIDES,
) -> dict:
    """Fine-tune on a dataset version (the latest by default), after generating a fresh batch if asked.
    The champion alias moves to the new model only if it beats the champion by finetune.promote_margin
    and loses no more than finetune.guard_margin on finetune.guard_data (when set).

    Runs nightly when its schedule is enabled, and whenever the synthesize flow makes a new dataset
    version (the deployment's event trigger passes that version).

    Args:
        params: The params file, relative to the folder the flow runs in.
        workspace: Write everything here instead of the params file's workspace.
        fresh_batch: Generate, validate and version a new batch first, and fine-tune on it.
        dataset_version: A version tag such as synthetic-v2, or "latest"; ignored with fresh_batch.
        overrides: Changes to the params for this run only.
    """
    ctx = open_context(params, workspace, overrides=overrides)
    if fresh_batch:
        return run_stages("retrain", ctx, STAGES)
    return run_stages("retrain", ctx, FINETUNE, dataset_version=dataset_version)


FLOWS = {"pipeline": pipeline, "synthesize": synthesize, "finetune": finetune, "retrain": retrain}
