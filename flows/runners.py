"""Task runners for shards: the ``runner`` section of params picks where generation and validation run.

- ``local``: Prefect's thread pool with one thread, in the flow's own process (the default);
- ``dask``: prefect-dask's ``DaskTaskRunner``, on a ``LocalCluster`` of ``runner.workers`` processes
  or on the scheduler at ``runner.address``;
- ``ray``: prefect-ray's ``RayTaskRunner``, on a local Ray instance or the cluster at ``runner.address``.

Each shard is one Prefect task run (``generate-shard``, ``validate-shard``) in the flow run, so the
dashboard shows progress shard by shard. Results are collected in shard order. A runner lives for one
stage, so the workers' models are freed before the next stage loads its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm.auto import tqdm

from tasks.config import RunnerConfig
from tasks.shards import MapShards, release_worker_cache


def _call(fn: Callable[[Any], Any], shard: Any) -> Any:
    return fn(shard)


# A shard's own retries (transient errors) happen inside it; a lost worker's shard is re-run by the
# engine (Dask and Ray resubmit the work of a worker that died).
SHARD_TASKS = {
    stage: task(name=f"{stage}-shard", cache_policy=NO_CACHE, task_run_name=f"{stage}-shard-{{shard_index}}")(
        lambda fn, shard, shard_index: _call(fn, shard)
    )
    for stage in ("generate", "validate")
}
STAGE_MODELS = {"generate": "pipeline", "validate": "detector"}  # what each stage's shards keep in worker_cache


def worker_env(cfg: RunnerConfig) -> dict[str, str]:
    """Environment for a local cluster's workers: the flow's Prefect API (a temporary one too) and a
    fair share of the cores for torch, so that workers do not fight over them."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api = str(client.api_url)
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    return {"PREFECT_API_URL": api, "SYNTHDET_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def task_runner(cfg: RunnerConfig) -> Any:
    """The Prefect task runner ``cfg`` describes (not started)."""
    if cfg.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RuntimeError("runner.kind: dask needs the dask extra: pip install 'synthdet[dask]'") from exc
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        cluster = {"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True, "env": worker_env(cfg)}
        return DaskTaskRunner(cluster_kwargs={**cluster, "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise RuntimeError("runner.kind: ray needs the ray extra: pip install 'synthdet[ray]'") from exc
    if cfg.address:
        return RayTaskRunner(address=cfg.address)
    init = {"num_cpus": cfg.workers, "include_dashboard": False, "runtime_env": {"env_vars": worker_env(cfg)}}
    return RayTaskRunner(init_kwargs=init)


@contextmanager
def shard_runner(cfg: RunnerConfig, stage: str, progress: bool = True) -> Iterator[MapShards]:
    """Start ``cfg``'s task runner for one stage and yield a ``MapShards`` that submits to it."""
    shard_task = SHARD_TASKS[stage]
    runner = task_runner(cfg)

    def map_shards(fn: Callable[[Any], Any], shards: Sequence[Any]) -> list[Any]:
        futures = [runner.submit(shard_task, {"fn": fn, "shard": s, "shard_index": i}) for i, s in enumerate(shards)]
        with tqdm(total=len(futures), desc=f"{stage} ({cfg.kind})", unit="shard", disable=not progress) as bar:
            for _ in as_completed(futures):
                bar.update(1)
        return [future.result() for future in futures]  # shard order, whoever finished first

    try:
        with runner:
            yield map_shards
    finally:
        # The local runner's models live in this process. Only this stage's go: the detector preflight
        # loaded must outlive the generate stage, or validate loads it again.
        release_worker_cache(STAGE_MODELS[stage])
