"""A re-run reuses the last fine-tune only when nothing it depends on changed; promote() moves the alias only on a win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.stages import finetune_key, reusable_finetune
from tasks.config import FinetuneConfig


def test_the_key_follows_settings_start_weights_and_dataset(tmp_path: Path) -> None:
    weights = tmp_path / "start.pt"
    weights.write_bytes(b"weights one")
    cfg = FinetuneConfig(model=str(weights))
    key = finetune_key(cfg, "synthetic-v1", "abc")
    assert finetune_key(cfg, "synthetic-v1", "abc") == key
    assert finetune_key(cfg.model_copy(update={"reuse": False}), "synthetic-v1", "abc") == key  # not a setting
    assert finetune_key(cfg.model_copy(update={"epochs": 11}), "synthetic-v1", "abc") != key
    assert finetune_key(cfg, "synthetic-v2", "abc") != key
    assert finetune_key(cfg, "synthetic-v1", "abd") != key
    weights.write_bytes(b"weights two")  # same path, new bytes
    assert finetune_key(cfg, "synthetic-v1", "abc") != key


def test_only_a_matching_summary_with_its_weights_is_reused(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    assert reusable_finetune(metrics, "k1") is None  # no earlier fine-tune
    best = tmp_path / "best.pt"
    best.write_bytes(b"trained")
    metrics.write_text(json.dumps({"key": "k1", "weights": str(best), "mAP50-95": 0.5, "mlflow_run_id": "r"}))
    assert reusable_finetune(metrics, "k1")["mAP50-95"] == 0.5
    assert reusable_finetune(metrics, "k2") is None  # something changed
    best.unlink()
    assert reusable_finetune(metrics, "k1") is None  # the weights are gone
    metrics.write_text("{not json")
    assert reusable_finetune(metrics, "k1") is None


class FakeTracker:
    """What promote() asks of the tracker, recorded; no champion registered yet."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.tags: dict[str, object] = {}
        self.metrics: dict[str, float] = {}

    def champion(self, name: str, alias: str) -> None:
        return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.tags.update(tags)

    def log_metrics(self, run_id: str, metrics: dict) -> None:
        self.metrics = dict(metrics)


def test_the_guard_scores_both_weights_and_a_first_model_it_stops_leaves_no_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import tasks.finetune
    from flows.stages import promote

    guard_set = {"start.pt": 0.865, "forgets.pt": 0.85, "keeps.pt": 0.86}  # mAP50-95 of each weights there
    seen = []

    def evaluate(weights, data_yaml, split, cfg, out_dir):
        seen.append((Path(weights).name, Path(data_yaml).name, split))
        return {"mAP50-95": guard_set[Path(weights).name]}, {}

    monkeypatch.setattr(tasks.finetune, "evaluate_detector", evaluate)
    tracker = FakeTracker()
    cfg = FinetuneConfig(model="start.pt", guard_data=tmp_path / "plain.yaml", guard_margin=0.01)
    ctx = SimpleNamespace(params=SimpleNamespace(finetune=cfg), tracker=tracker, out=lambda stage: tmp_path / stage)
    stopped = promote(ctx, "run", 0.6, "1", tmp_path / "data.yaml", Path("forgets.pt"))
    assert seen == [("start.pt", "plain.yaml", "val"), ("forgets.pt", "plain.yaml", "val")]
    assert stopped["promoted"] is False and stopped["champion_version"] is None
    assert stopped["guard"] == {"mAP50-95": 0.85, "start_mAP50-95": 0.865, "margin": 0.01,
                                "set": str(tmp_path / "plain.yaml")}  # fmt: skip
    assert tracker.aliases == {} and tracker.tags["promotion.champion_version"] == "none"
    assert "no champion yet" in tracker.tags["promotion.reason"]
    passed = promote(ctx, "run", 0.6, "1", tmp_path / "data.yaml", Path("keeps.pt"))
    assert passed["promoted"] is True and tracker.aliases == {"champion": "1"}
    assert tracker.metrics == {"guard.mAP50-95": 0.86, "guard.start.mAP50-95": 0.865}
    unguarded = SimpleNamespace(params=SimpleNamespace(finetune=FinetuneConfig(model="start.pt")), tracker=tracker)
    assert promote(unguarded, "run", 0.6, "2", tmp_path / "data.yaml", Path("forgets.pt"))["guard"] is None
