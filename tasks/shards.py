"""Shards: the unit of parallel work for generation and validation.

A shard is a fixed-size list of images. A stage splits its work into shards and hands them to a
``MapShards`` function: the stage's own loop in this process (stage commands), or a Prefect task
runner that spreads them over threads, Dask or Ray workers (flows; see ``flows/runners.py``).
Shard functions are idempotent, as every image and detection is stored by id and written whole, so
a shard lost with its worker is simply run again, and results come back in shard order, so the
merged table does not depend on which worker finished first.

Each worker process loads a model once (``worker_cache``) and reuses it for every shard it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# fn, shards -> one result per shard, in shard order
MapShards = Callable[[Callable[[T], R], Sequence[T]], list[R]]

# This process's loaded models, by what determines them; a Dask or Ray worker keeps its own.
_WORKER_CACHE: dict[tuple, Any] = {}


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive lists of ``size`` (the last may be shorter)."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def worker_cache(key: tuple, load: Callable[[], R]) -> R:
    """The object ``load()`` made for ``key`` in this process, made on first use."""
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = load()
    return _WORKER_CACHE[key]


def release_worker_cache(kind: str | None = None) -> None:
    """Drop this process's loaded models: all of them, or one kind (a key's first item: "pipeline",
    "detector"), so a stage that ran its shards in-process frees its own models and keeps the others'."""
    for key in [key for key in _WORKER_CACHE if kind is None or key[0] == kind]:
        del _WORKER_CACHE[key]


def worker_slot() -> int:
    """This worker's index: ``SYNTHDET_WORKER_SLOT``, else the Dask worker's name in a local cluster, else 0."""
    if os.environ.get("SYNTHDET_WORKER_SLOT", "").isdigit():
        return int(os.environ["SYNTHDET_WORKER_SLOT"])
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return 0
    return int(name) if str(name).isdigit() else 0


def shard_device(device: str, gpu_count: int | None = None) -> str:
    """The device a worker should use: with ``cuda`` and several GPUs, worker n takes ``cuda:(n mod GPUs)``.

    Any other device (``cpu``, ``cuda:1``, ``mps``) is used as given.
    """
    if device != "cuda":
        return device
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()
    return f"cuda:{worker_slot() % gpu_count}" if gpu_count > 1 else device


def torch_threads() -> int:
    """Threads for torch on the CPU: ``SYNTHDET_TORCH_THREADS`` (set per worker by the runner) or every core."""
    value = os.environ.get("SYNTHDET_TORCH_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)
