"""finetune: train a YOLO26 detector on a dataset and evaluate it on a held-out set.

Ultralytics' own MLflow integration is switched off by the caller (see ``flows.env``); per-epoch
figures reach the project's tracking through the ``on_epoch`` callback instead, so this module stays
free of any tracking library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.config import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tune produced. Metrics are on the evaluation set, in [0, 1]."""

    weights: Path
    train_dir: Path
    metrics: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)  # class name -> mAP50-95
    plots: list[Path] = field(default_factory=list)


def split_files(data_yaml: Path, split: str) -> list[Path]:
    """The files of a split of a YOLO ``data.yaml`` (folders relative to the file), in sorted order."""
    data = yaml.safe_load(data_yaml.read_text()) or {}
    if split not in data:
        return []
    root = Path(data.get("path") or ".")
    root = root if root.is_absolute() else data_yaml.parent / root
    folders = data[split] if isinstance(data[split], list) else [data[split]]  # a list of folders is allowed
    return [p for f in folders if (root / f).is_dir() for p in sorted((root / f).rglob("*")) if p.is_file()]


def count_images(data_yaml: Path, split: str) -> int:
    """Images listed for a split of a YOLO ``data.yaml`` (paths relative to the file)."""
    return len(split_files(data_yaml, split))


def evaluate_detector(weights: Path | str, data_yaml: Path, split: str, cfg: FinetuneConfig, out_dir: Path):
    """mAP50, mAP50-95, precision and recall of ``weights`` on one split, and mAP50-95 per class."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    result = model.val(
        data=str(data_yaml),
        split=split,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        device=cfg.device,
        plots=False,
        verbose=False,
        project=str(out_dir),
        name="eval",
        exist_ok=True,
        workers=cfg.workers,
    )
    box = result.box
    metrics = {
        "mAP50": float(box.map50),
        "mAP50-95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
    }
    names = result.names
    per_class = {names[int(c)]: float(box.maps[int(c)]) for c in result.ap_class_index}
    return metrics, per_class


def finetune_detector(
    cfg: FinetuneConfig,
    data_yaml: Path,
    out_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``data_yaml``, then evaluate on ``cfg.eval_data`` (or the val split).

    Args:
        cfg: the finetune section (ultralytics' own knob names).
        data_yaml: a YOLO dataset, e.g. a checked-out dataset version.
        out_dir: ultralytics writes ``train/`` (weights, plots, results.csv) and ``eval/`` here.
        on_epoch: called after each epoch with (epoch, {losses and val metrics}).

    Raises:
        ValueError: the dataset has no training or no validation images.
    """
    from ultralytics import YOLO

    for split in ("train", "val"):
        if count_images(data_yaml, split) == 0:
            raise ValueError(f"{data_yaml}: no {split} images to fine-tune with")
    model = YOLO(cfg.model, task="detect")
    if on_epoch is not None:

        def report(trainer: Any) -> None:
            figures = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.metrics}
            on_epoch(int(trainer.epoch), {k: float(v) for k, v in figures.items()})

        model.add_callback("on_fit_epoch_end", report)
    model.train(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        nbs=cfg.nbs,
        device=cfg.device,
        lr0=cfg.lr0,
        lrf=cfg.lrf,
        warmup_epochs=cfg.warmup_epochs,
        optimizer=cfg.optimizer,
        patience=cfg.patience,
        seed=cfg.seed,
        freeze=frozen_layers(model, cfg.freeze),
        deterministic=True,
        mosaic=cfg.mosaic,
        scale=cfg.scale,
        workers=cfg.workers,
        plots=cfg.plots,
        amp=False,
        verbose=False,
        project=str(out_dir),
        name="train",
        exist_ok=True,
    )
    train_dir = out_dir / "train"
    weights = train_dir / "weights" / f"{cfg.select}.pt"
    if not weights.is_file():  # no best.pt when no epoch was validated
        weights = train_dir / "weights" / "last.pt"
    eval_data = cfg.eval_data or data_yaml
    metrics, per_class = evaluate_detector(weights, eval_data, cfg.eval_split, cfg, out_dir)
    plots = sorted(p for p in train_dir.glob("*") if p.suffix in {".png", ".jpg"})
    return FinetuneResult(weights, train_dir, metrics, per_class, plots)


def frozen_layers(model: Any, freeze: str | int | list[int] | None) -> int | list[int] | None:
    """``finetune.freeze`` as ultralytics takes it: ``head`` becomes the index of the model's last layer
    (the detection head: 23 in every YOLO26 size), anything else passes through."""
    if freeze != "head":
        return freeze
    return [len(model.model.model) - 1]


@dataclass(frozen=True)
class Guard:
    """A fine-tuned model's mAP50-95 on the guard set (``finetune.guard_data``) against its starting
    weights' there: what fine-tuning cost on what the detector already knew."""

    after: float
    before: float
    margin: float  # the most it may lose

    @property
    def forgets(self) -> bool:
        return self.after < self.before - self.margin - 1e-9  # a loss of exactly margin is allowed

    def describe(self) -> str:
        change = self.after - self.before
        return f"guard mAP50-95 {self.after:.4f} against the starting weights' {self.before:.4f} ({change:+.4f})"


def promotion_decision(
    challenger: float, champion: float | None, margin: float, guard: Guard | None = None
) -> tuple[bool, str]:
    """Whether a new model replaces the champion: only if it beats it by at least ``margin``, and,
    with a ``guard``, only if it did not lose more than the guard allows on the guard set.

    Both scores are mAP50-95 on the same evaluation set. The first model becomes champion unless the
    guard stops it.
    """
    if guard is not None and guard.forgets:
        kept = "no champion yet" if champion is None else "champion kept"
        return False, f"{guard.describe()}: more than the {guard.margin} allowed, so not promoted; {kept}"
    if champion is None:
        return True, f"first model: mAP50-95 {challenger:.4f} becomes champion"
    if challenger >= champion + margin:
        return True, f"mAP50-95 {challenger:.4f} beats champion {champion:.4f} by >= {margin}"
    return False, f"mAP50-95 {challenger:.4f} does not beat champion {champion:.4f} by {margin}; champion kept"
