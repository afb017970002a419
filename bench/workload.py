"""The workloads the benchmarks run: a params file changed in a few keys, and stages run through Prefect.

Stages run through the project's own entry points (:func:`flows.pipeline.open_context` and
:func:`flows.pipeline.run_stages` inside a Prefect flow), so a benchmark measures whatever the flow does
today, not a copy of it.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml


def derive_params(base: Path, out: Path, changes: dict[str, Any]) -> Path:
    """Write ``out``: the params file ``base`` with dotted keys set (``{"generate.batch_size": 8}``).

    ``prompts.classes`` may be given as ``{name: count}``, replacing the classes' counts in order.
    """
    raw = yaml.safe_load(base.read_text())
    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        if key == "prompts.classes" and isinstance(value, dict):
            value = [{"name": name, "count": count} for name, count in value.items()]
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def class_counts(params: Path, total: int) -> dict[str, int]:
    """``total`` prompts spread over the classes of ``params`` (the first classes get the remainder)."""
    names = [c["name"] for c in yaml.safe_load(params.read_text())["prompts"]["classes"]]
    share, extra = divmod(total, len(names))
    return {name: share + (i < extra) for i, name in enumerate(names)}


def prepare_environment(root: Path) -> None:
    """Offline switches and tool homes (as the CLI sets them), before prefect or ultralytics is imported."""
    from flows.env import configure_environment
    from tasks.workspace import Workspace

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keep the table readable
    configure_environment(Workspace(root))


def stage_flow():
    """A Prefect flow running some stages with :func:`flows.pipeline.run_stages`; built on first use
    so that importing this module imports no Prefect."""
    from prefect import flow

    from flows.pipeline import open_context, run_stages

    @flow(name="bench-stages", log_prints=False)
    def bench_stages(params: str, workspace: str, names: list[str]) -> dict:
        ctx = open_context(params, workspace, progress=False)
        began = time.perf_counter()
        summary = run_stages("bench", ctx, tuple(names))
        summary["inner_s"] = time.perf_counter() - began  # without the flow run's own start and end
        return summary

    return bench_stages


def timed(fn, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Wall seconds of one call, and its result."""
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - began, result


def cpu_seconds() -> float:
    """CPU seconds used so far by this process, its finished child processes (DVC, git) and its live
    ones (the local Prefect server).

    On a machine shared with other jobs, wall time swings several-fold with their load; CPU time
    swings far less, so the benchmarks report both.
    """
    import resource

    import psutil

    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + finished.ru_utime + finished.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed_cpu(fn, *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """Wall seconds and CPU seconds (see :func:`cpu_seconds`) of one call, and its result."""
    cpu = cpu_seconds()
    wall, result = timed(fn, *args, **kwargs)
    return wall, cpu_seconds() - cpu, result
