"""Retry one shard of work (a batch of images) with exponential backoff, and name it when giving up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class ShardFailed(RuntimeError):
    """A shard kept failing after every retry; the message names it and the last error."""


def with_retries(work: Callable[[], T], shard: str, retries: int, backoff_s: float) -> T:
    """Call ``work()``; on an exception wait ``backoff_s * 2**k`` seconds and try again, ``retries`` times.

    Args:
        work: the shard's work; it must be safe to repeat (ours write each finished image atomically).
        shard: how to name the shard in logs and in the final error, e.g. "generate batch 3/10 (ids ...)".
        retries: further attempts after the first; 0 fails at once.
        backoff_s: the first wait.

    Raises:
        ShardFailed: after the last attempt, chained to its exception. KeyboardInterrupt and other
            non-``Exception`` errors are never retried.
    """
    for attempt in range(retries + 1):
        try:
            return work()
        except Exception as exc:
            if attempt == retries:
                raise ShardFailed(
                    f"{shard}: failed {retries + 1} times; last error: {type(exc).__name__}: {exc}"
                ) from exc
            wait = backoff_s * 2**attempt
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.1f s", shard, attempt + 1,
                        type(exc).__name__, exc, wait)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")
