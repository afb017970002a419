"""with_retries: backoff doubles, the last error is named, only Exceptions are retried."""

import pytest

from tasks import retry
from tasks.retry import ShardFailed, with_retries


def test_backoff_doubles_and_success_returns_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    outcomes = iter([OSError("disk busy"), OSError("disk busy"), "done"])

    def work() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(work, "shard 1", retries=3, backoff_s=0.5) == "done"
    assert waits == [0.5, 1.0]


def test_giving_up_names_the_shard_and_chains_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    calls = []

    def work() -> None:
        calls.append(1)
        raise ValueError("bad batch")

    with pytest.raises(
        ShardFailed, match="validate batch 4/9: failed 3 times; last error: ValueError: bad batch"
    ) as info:
        with_retries(work, "validate batch 4/9", retries=2, backoff_s=1.0)
    assert isinstance(info.value.__cause__, ValueError) and len(calls) == 3


def test_an_interrupt_is_never_retried() -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with_retries(work, "shard", retries=5, backoff_s=0.0)
    assert calls == [1]
