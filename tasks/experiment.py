"""experiment: does the synthetic data help? An ablation scored on held-out real test sets.

Each *trial* is one arm at one number ``k`` of scarce real rare images, one seed, one synthetic share
and one validation threshold. Every fine-tuned trial starts from the same weights (``finetune.model``)
and takes exactly ``experiment.steps`` optimizer steps of ``finetune.batch`` images: its distinct
training images (k real rare, common replay, synthetic or ceiling images) are cycled in a seeded order
into a list of ``steps * batch`` files and trained for one epoch, without warm-up and with one optimizer
step per batch, so a small set is seen more often and a large one less, never more steps. The *last*
weights are scored (nothing is selected on any held-out set) on every condition's test set and per
class; the rare-condition figure is the mean over the rare conditions.

Arms (``tasks.config.ARMS``): ``start`` (the starting weights as they are), ``real`` (k real + replay),
``unfiltered`` (+ synthetic images labelled by the starting detector at ``unfiltered_conf``, no filter),
``validated`` (+ synthetic images the starting detector accepts at ``conf``, labelled by it),
``adapted`` (+ synthetic images accepted and labelled by the ``real`` arm's model of the same k and
seed, boxes refined on mirrored images, balanced over class x condition cells) and ``ceiling`` (+ as
many real rare images with true labels). With ``dataset.restyle`` set, the synthetic arms also get common
images recoloured to the rare conditions' colours, and the ``restyled`` arm gets those alone (no generator).

Plain Python: the flow (``flows/experiment.py``) generates the synthetic images, runs the trials and
tracks them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tasks.colour import Stats
from tasks.config import (
    ARMS,
    AddDetail,
    ExperimentConfig,
    FinetuneConfig,
    GenerateConfig,
    PromptsConfig,
    Restyle,
    ValidateConfig,
)
from tasks.dataset import IMAGE_SUFFIXES
from tasks.detail import Grain

log = logging.getLogger(__name__)

METRIC = "mAP50-95"


# --- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One cell of the ablation; ``key`` names its MLflow run and its folder."""

    arm: str
    k: int
    seed: int
    share: float
    conf: float

    @property
    def key(self) -> str:
        return f"{self.arm}-k{self.k}-s{self.seed}-share{self.share:g}-conf{self.conf:g}"

    @property
    def uses_synthetic(self) -> bool:
        return self.arm in ("unfiltered", "validated", "adapted")


def arm_uses_generator(arm: str) -> bool:
    """An arm's figures depend on the generator: its synthetic images, or (ceiling) how many adapted got."""
    return arm in ("unfiltered", "validated", "adapted", "ceiling")


# The arms that train on recoloured common images when dataset.restyle is set.
RESTYLED_ARMS = ("restyled", "unfiltered", "validated", "adapted")


def arm_uses_restyle(arm: str) -> bool:
    """An arm's figures depend on ``dataset.restyle``: it trains on recoloured images (or, the ceiling,
    on as many real ones as adapted had synthetic and recoloured ones)."""
    return arm in RESTYLED_ARMS or arm == "ceiling"


def plan_trials(cfg: ExperimentConfig) -> list[Trial]:
    """Every trial the config asks for, in an order where each trial's inputs come first.

    The main grid is arms x k x seeds at ``synthetic_share`` and ``conf``; the sweeps run ``sweep_arm``
    at ``sweep_k`` over ``shares`` and ``thresholds``. ``start`` trains nothing, so it runs once (k 0,
    first seed). An ``adapted`` trial needs the ``real`` model of its k and seed, so that is planned too.
    """
    trials: list[Trial] = []

    def add(trial: Trial) -> None:
        if trial.arm == "start":
            trial = Trial("start", 0, cfg.seeds[0], cfg.synthetic_share, cfg.conf)
        if trial.arm == "adapted":
            add(Trial("real", trial.k, trial.seed, cfg.synthetic_share, cfg.conf))
        if trial not in trials:
            trials.append(trial)

    for arm in cfg.arms:
        for k in cfg.k:
            for seed in cfg.seeds:
                add(Trial(arm, k, seed, cfg.synthetic_share, cfg.conf))
    for seed in cfg.seeds:
        for share in cfg.shares:
            add(Trial(cfg.sweep_arm, cfg.sweep_k, seed, share, cfg.conf))
        for conf in cfg.thresholds:
            add(Trial(cfg.sweep_arm, cfg.sweep_k, seed, cfg.synthetic_share, conf))
    order = {arm: i for i, arm in enumerate(ARMS)}
    return sorted(trials, key=lambda t: order[t.arm])  # stable: config order within an arm


def model_digest(path: str) -> str:
    """What a model's figures depend on: a digest of a local weights file or pipeline folder's bytes, so
    weights replaced at the same path count as a change; a hub id stands for itself."""
    from tasks.generation import file_sha256, hash_model_dir

    local = Path(path)
    if local.is_dir():
        return hash_model_dir(local)
    return file_sha256(local)[:16] if local.is_file() else path


def fingerprint(
    cfg: ExperimentConfig,
    ft: FinetuneConfig,
    generate: GenerateConfig | None,
    validate: ValidateConfig,
    detail: AddDetail | None = None,
    restyle: Restyle | None = None,
) -> str:
    """What a stored trial's figures depend on besides its key: a finished trial is reused only while
    this is unchanged (the grid, the name, and the share and threshold, which are in the key, are left out).
    Models count by content (``model_digest``), generation by what sets an image's pixels; ``generate``
    is None for a trial that does not use the generator (``arm_uses_generator``), so a new generator
    leaves its figures standing."""
    import hashlib

    grid = {"name", "arms", "k", "seeds", "shares", "thresholds", "sweep_arm", "sweep_k", "synthetic_share", "conf"}
    models = [generate.model if generate else None, ft.model, validate.model, cfg.labeller]
    settings = {
        "experiment": cfg.model_dump(mode="json", exclude=grid),
        "finetune": ft.model_dump(mode="json", include=TRAINED_WITH - unchanged_since_first_trials(ft)),
        "validate": validate.model_dump(mode="json"),
        "models": {m: model_digest(m) for m in models if m},
    }
    if restyle is not None:  # the recoloured images: the settings and the reference images' colours
        from tasks.restyle import restyle_stats

        settings["restyle"] = {"share": restyle.share, "colours": restyle_stats(restyle)}
    if validate.standardise is None:  # trials run before the field existed
        del settings["validate"]["standardise"]
    else:  # the reference images' statistics, not just their folder
        from tasks.validation import reference_stats

        settings["standardise"] = reference_stats(validate.standardise)
    if generate is not None:
        settings["generate"] = generate.model_dump(mode="json", exclude={"device", "batch_size", "retries",
                                                                         "retry_backoff_s"})  # fmt: skip
        if generate.start_means and generate.start_means.strength == 1.0:  # trials run before the field existed
            del settings["generate"]["start_means"]["strength"]
        if not generate.class_guidance:  # likewise
            del settings["generate"]["class_guidance"]
            del settings["generate"]["class_guidance_from"]
        else:  # the guide counts by content, as the models do (the pipeline's hash leaves it out)
            from tasks.generation import guide_hash

            settings["class_guide"] = guide_hash(generate)
        if generate.start_means:  # the real images' bytes, not just their folder
            from tasks.generation import images_digests, start_mean_sources

            settings["start_means"] = images_digests(start_mean_sources(generate))
        if detail is not None:  # the fine detail added to the synthetic images, and the images it is from
            from tasks.generation import images_by_value, images_digests

            settings["detail"] = detail.model_dump(mode="json")
            settings["detail_images"] = images_digests(images_by_value(detail, "dataset.detail.images"))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# --- the data -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One training image: its file, its YOLO label lines, where it came from and its condition."""

    path: str
    lines: tuple[str, ...]
    source: str
    condition: str = ""
    cls: str = ""


def read_yolo_folder(folder: Path, conditions: Sequence[str] | None = None) -> list[Item]:
    """The labelled images of a YOLO folder (``images/`` and ``labels/``), in file order.

    The condition of each image comes from the world's ``captions.parquet`` when there is one; with
    ``conditions`` given, only images of those conditions are kept (a folder without captions keeps all).

    Raises:
        FileNotFoundError: the folder has no ``images/`` or an image has no label file.
    """
    images = folder / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{folder}: expected an images/ folder (a YOLO folder of labelled images)")
    captions = folder / "captions.parquet"
    condition_of: dict[str, str] = {}
    if captions.is_file():
        table = pd.read_parquet(captions, columns=["file", "condition"])
        condition_of = dict(zip(table["file"], table["condition"], strict=True))
    items = []
    for image in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = image.relative_to(folder).as_posix()
        condition = condition_of.get(relative, "")
        if conditions is not None and condition_of and condition not in conditions:
            continue
        label = (folder / "labels" / image.relative_to(images)).with_suffix(".txt")
        if not label.is_file():
            raise FileNotFoundError(f"{image}: no label file {label}")
        lines = tuple(line for line in label.read_text().splitlines() if line.strip())
        items.append(Item(str(image.resolve()), lines, folder.name, condition))
    return items


def synthetic_prompts(prompts: PromptsConfig, cfg: ExperimentConfig) -> PromptsConfig:
    """The pipeline's prompt spec aimed at the rare conditions: ``synthetic_images`` prompts shared
    equally by the classes, the ``condition`` axis (if the spec has one) narrowed to the rare ones."""
    axes = dict(prompts.axes)
    if "condition" in axes:
        axes["condition"] = {c: 1.0 for c in cfg.rare_conditions}
    n = len(prompts.classes)
    counts = [cfg.synthetic_images // n + (i < cfg.synthetic_images % n) for i in range(n)]
    classes = [
        c.model_copy(update={"count": max(1, q), "weight": None}) for c, q in zip(prompts.classes, counts, strict=True)
    ]
    return prompts.model_copy(update={"axes": axes, "classes": classes, "total": None, "allow_repeats": True})


def label_synthetic(
    generated: pd.DataFrame,
    detections: list[list[dict[str, Any]]],
    class_names: list[str],
    detector_names: list[str],
    validate: ValidateConfig,
    conf: float,
    filtered: bool,
) -> list[Item]:
    """Synthetic training items from one detector's detections (made at a threshold <= ``conf``).

    Args:
        generated: the generate table's ok rows (class, path, and ``condition`` if prompted with one).
        detections: per row, ``[{"name", "conf", "box"}]`` from :func:`tasks.validation.detect`.
        validate: the validate section's rules (class map, max objects, box area, unexpected classes, the
            size and place asked for).
        conf: detections below this are dropped before judging and labelling.
        filtered: True keeps only the images :func:`tasks.validation.judge` accepts; False keeps every
            image, with whatever boxes clear ``conf`` (possibly none: then it is a background image).
    """
    from tasks.validation import judge, label_lines, resolve_class_map

    rules = validate.model_copy(update={"conf": conf})
    to_dataset = resolve_class_map(class_names, detector_names, validate.class_map)
    conditions = generated["condition"] if "condition" in generated else [""] * len(generated)
    items = []
    for (_, row), found, condition in zip(generated.iterrows(), detections, conditions, strict=True):
        kept = [d for d in found if d["conf"] >= conf]
        layout = (row.get("position") or "", row.get("size") or "")  # asked for where prompts had those axes
        if filtered and judge(kept, row["class"], to_dataset, class_names, rules, *layout):
            continue
        items.append(Item(row["path"], tuple(label_lines(kept, to_dataset)), "synthetic", condition, row["class"]))
    return items


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``cx cy w h`` boxes (any one unit)."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def merge_mirrored(
    lines: Sequence[str], mirrored: Sequence[tuple[int, list[float]]], min_iou: float = 0.5
) -> list[str]:
    """Label lines with each box averaged with its best match among the boxes found on the mirrored
    image (``(class id, [cx, cy, w, h])`` in the mirrored frame), same class and IoU >= ``min_iou``.

    A detector's errors on an image and on its mirror image are partly independent, so the mean box is
    tighter on average; an unmatched box is kept as it is.
    """
    out = []
    for line in lines:
        cls, *box = line.split()
        box = [float(v) for v in box]
        candidates = [[1.0 - b[0], *b[1:]] for c, b in mirrored if c == int(cls)]  # back to the image's frame
        best = max(candidates, key=lambda b: box_iou(box, b), default=None)
        if best is not None and box_iou(box, best) >= min_iou:
            box = [(u + v) / 2 for u, v in zip(box, best, strict=True)]
        out.append(f"{cls} " + " ".join(f"{min(max(v, 0.0), 1.0):.6f}" for v in box))
    return out


def refine_boxes(items: Sequence[Item], labeller: str, class_names: list[str], validate: ValidateConfig) -> list[Item]:
    """Items with their boxes merged with the labeller's boxes on the mirrored images (:func:`merge_mirrored`)."""
    from PIL import Image

    from tasks.validation import load_detector, reference_stats, resolve_class_map, standardised

    detector = load_detector(labeller, "experiment labeller")
    to_dataset = resolve_class_map(class_names, detector.names, validate.class_map)
    stats = reference_stats(validate.standardise) if validate.standardise else None

    def bgr(path: str) -> np.ndarray:  # what the labeller saw when it made the boxes
        return standardised(Path(path), stats) if stats else np.asarray(Image.open(path).convert("RGB"))[..., ::-1]

    out: list[Item] = []
    for start in range(0, len(items), validate.batch):
        chunk = items[start : start + validate.batch]
        arrays = [np.ascontiguousarray(bgr(i.path)[:, ::-1]) for i in chunk]  # mirrored left to right
        predictions = detector.model.predict(arrays, imgsz=validate.imgsz, conf=validate.conf, iou=validate.iou,
                                             device=validate.device, verbose=False)  # fmt: skip
        for item, pred in zip(chunk, predictions, strict=True):
            names = [pred.names[int(c)] for c in pred.boxes.cls.tolist()]
            mirrored = [
                (to_dataset[n], b) for n, b in zip(names, pred.boxes.xywhn.tolist(), strict=True) if n in to_dataset
            ]
            out.append(
                Item(item.path, tuple(merge_mirrored(item.lines, mirrored)), item.source, item.condition, item.cls)
            )
    return out


def balanced_sample(items: Sequence[Item], n: int, rng: np.random.Generator) -> list[Item]:
    """``n`` items taken round-robin over (class, condition) cells, each cell in a seeded order, so no
    cell that the labeller finds easy crowds out the others while another cell still has images."""
    cells: dict[tuple[str, str], list[Item]] = {}
    for i in rng.permutation(len(items)):
        cells.setdefault((items[i].cls, items[i].condition), []).append(items[i])
    queues = [cells[key] for key in sorted(cells)]
    out: list[Item] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def sample(items: Sequence[Item], n: int, rng: np.random.Generator) -> list[Item]:
    """``n`` items (or all, if fewer) drawn without replacement."""
    return [items[i] for i in rng.permutation(len(items))[: min(n, len(items))]]


# --- one trial ----------------------------------------------------------------------------------------------
@dataclass
class TrialData:
    """A trial's distinct training images by source."""

    real: list[Item]
    replay: list[Item]
    extra: list[Item] = field(default_factory=list)  # synthetic and recoloured, or real rare for the ceiling

    @property
    def items(self) -> list[Item]:
        return [*self.real, *self.replay, *self.extra]


def write_training_set(
    data: TrialData, val: Sequence[Item], class_names: list[str], steps: int, batch: int, seed: int, out_dir: Path
) -> Path:
    """A YOLO folder whose train split lists exactly ``steps * batch`` images, cycled in seeded order.

    Files are hard links to the sources where the file system allows (copies otherwise); labels are
    written per entry. ``out_dir`` is replaced.

    Returns:
        ``out_dir/data.yaml``.

    Raises:
        ValueError: the trial has no training image at all.
    """
    items = data.items
    if not items:
        raise ValueError("experiment: a trial with no training images (k 0, no replay and no synthetic images)")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(rng.permutation(len(items)).tolist())
    shutil.rmtree(out_dir, ignore_errors=True)
    for split, entries in (("train", [items[i] for i in order[: steps * batch]]), ("val", list(val))):
        (out_dir / "images" / split).mkdir(parents=True)
        (out_dir / "labels" / split).mkdir(parents=True)
        for n, item in enumerate(entries):
            source = Path(item.path)
            name = f"{n:06d}_{item.source}_{source.stem}"
            _link(source, out_dir / "images" / split / f"{name}{source.suffix.lower()}")
            (out_dir / "labels" / split / f"{name}.txt").write_text("".join(f"{line}\n" for line in item.lines))
    data_yaml = out_dir / "data.yaml"
    spec = {"path": str(out_dir.resolve()), "train": "images/train", "val": "images/val"}
    data_yaml.write_text(yaml.safe_dump({**spec, "names": dict(enumerate(class_names))}, sort_keys=False))
    return data_yaml


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, dest)


# The finetune fields train_detector reads: only these count in a trial's fingerprint, so a pipeline-only
# change (epochs, warm-up, the registered model's name) leaves stored trials standing.
TRAINED_WITH = {"model", "imgsz", "batch", "device", "lr0", "lrf", "freeze", "optimizer", "mosaic", "scale", "workers"}


def unchanged_since_first_trials(ft: FinetuneConfig) -> set[str]:
    """The fields added since trials were first stored that keep their old behaviour here (lr0 throughout,
    nothing frozen): left out of the fingerprint, so those trials stay valid."""
    return {name for name, old in (("lrf", 1.0), ("freeze", None)) if getattr(ft, name) == old}


def step_decay(lrf: float) -> Callable[[Any], None]:
    """An ``on_train_batch_start`` callback: the learning rate falls linearly over the epoch's batches,
    from lr0 at the first to lr0 x ``lrf`` at the last (ultralytics' own linear schedule moves once per
    epoch, so over the experiment's single epoch it would hold lr0 throughout)."""

    def callback(trainer: Any) -> None:
        step = getattr(trainer, "synthdet_step", -1) + 1
        trainer.synthdet_step = step
        done = step / max(len(trainer.train_loader) - 1, 1)
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * (1 - (1 - lrf) * done)

    return callback


def train_detector(start: str, data_yaml: Path, ft: FinetuneConfig, seed: int, out_dir: Path) -> Path:
    """One epoch over ``data_yaml``'s train list from ``start``: one optimizer step per batch of
    ``ft.batch`` images (nominal batch = batch), no warm-up (its bias learning rate of 0.1 would shake a
    trained detector), the learning rate falling linearly from ``ft.lr0`` to ``ft.lr0 x ft.lrf`` over the
    steps, as the pipeline's fine-tune falls over its epochs. Returns the last weights (nothing is selected)."""
    from ultralytics import YOLO

    from tasks.finetune import frozen_layers

    model = YOLO(start, task="detect")
    if ft.lrf < 1:
        model.add_callback("on_train_batch_start", step_decay(ft.lrf))
    model.train(
        data=str(data_yaml),
        epochs=1,
        imgsz=ft.imgsz,
        batch=ft.batch,
        nbs=ft.batch,
        device=ft.device,
        lr0=ft.lr0,
        lrf=ft.lrf,
        freeze=frozen_layers(model, ft.freeze),
        optimizer=ft.optimizer,
        warmup_epochs=0,
        seed=seed,
        deterministic=True,
        mosaic=ft.mosaic,
        scale=ft.scale,
        workers=ft.workers,
        val=False,
        plots=False,
        amp=False,
        verbose=False,
        project=str(out_dir),
        name="train",
        exist_ok=True,
    )
    return out_dir / "train" / "weights" / "last.pt"


def held_out_sets(cfg: ExperimentConfig) -> dict[str, Path]:
    """Each condition's held-out set, ``<tests>/<condition>/data.yaml``, rare conditions first.

    Raises:
        FileNotFoundError: a condition's test set is missing (with the command that renders it).
    """
    sets: dict[str, Path] = {}
    for condition in [*cfg.rare_conditions, *cfg.common_conditions]:
        path = cfg.tests / condition / "data.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"experiment.tests: {path}: no such file (run `synthdet world --only test`)")
        sets[condition] = path
    return sets


def tests_digest(sets: dict[str, Path], split: str = "val") -> str:
    """What the scores depend on besides the weights: the bytes of every held-out image and its labels.
    A trial's fingerprint holds the tests' folder, not what is in it, so this is stored beside it."""
    import hashlib

    from ultralytics.data.utils import img2label_paths

    from tasks.finetune import split_files

    digest = hashlib.sha256()
    for condition, data_yaml in sorted(sets.items()):
        digest.update(condition.encode())
        images = split_files(data_yaml, split)
        for image, labels in zip(images, map(Path, img2label_paths(images)), strict=True):
            digest.update(hashlib.sha256(image.read_bytes()).digest())
            digest.update(hashlib.sha256(labels.read_bytes() if labels.is_file() else b"").digest())
    return digest.hexdigest()[:16]


def score(weights: Path | str, sets: dict[str, Path], ft: FinetuneConfig, cfg: ExperimentConfig, out_dir: Path):
    """mAP50-95 and mAP50 of ``weights`` on each condition's test set, mAP50-95 per class, and their
    means over the rare (``rare.*``) and the common (``common.*``) conditions.

    The rare figure is the mean of the rare conditions' figures (each test set counts the same), not
    one mAP over the pooled images. Keys like ``fog.mAP50-95``, ``rare.mAP50-95``, ``rare.star.mAP50-95``.
    """
    from tasks.finetune import evaluate_detector

    figures: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    for name, data_yaml in sets.items():
        metrics, per_class[name] = evaluate_detector(weights, data_yaml, "val", ft, out_dir / name)
        figures[f"{name}.{METRIC}"] = metrics[METRIC]
        figures[f"{name}.mAP50"] = metrics["mAP50"]
    for group, conditions in (("rare", cfg.rare_conditions), ("common", cfg.common_conditions)):
        if not conditions:
            continue
        for metric in (METRIC, "mAP50"):
            figures[f"{group}.{metric}"] = float(np.mean([figures[f"{c}.{metric}"] for c in conditions]))
        classes = sorted({c for name in conditions for c in per_class[name]})
        for c in classes:
            values = [per_class[name][c] for name in conditions if c in per_class[name]]
            figures[f"{group}.{c}.{METRIC}"] = float(np.mean(values))
    return figures


@dataclass
class Sources:
    """Everything the trials draw from, read once."""

    real: list[Item]
    replay: list[Item]
    ceiling: list[Item]
    val: list[Item]
    synthetic: pd.DataFrame  # the generate table's ok rows
    class_names: list[str]
    grains: dict[str, Grain] = field(default_factory=dict)  # dataset.detail's, per value of grain_axis
    grain_axis: str = "condition"
    restyle: Restyling | None = None  # dataset.restyle's colours, and where the recoloured copies go


@dataclass
class Restyling:
    """How the arms that use ``dataset.restyle`` get their recoloured common images."""

    colours: dict[str, Stats]  # per value (condition), from tasks.restyle.restyle_stats
    share: float  # recoloured images per real training image (k + replay)
    folder: Path  # the copies, written once


def trial_data(
    trial: Trial,
    cfg: ExperimentConfig,
    sources: Sources,
    synthetic: list[Item],
    ceiling_n: int | None = None,
) -> TrialData:
    """The distinct training images of a trial.

    Args:
        synthetic: the candidate synthetic items for this trial's arm and threshold (already labelled
            and, for the filtered arms, accepted).
        ceiling_n: how many real rare images the ceiling gets (the ``adapted`` trial's synthetic count);
            None: the nominal share.
    """
    rng = np.random.default_rng([trial.seed, trial.k, 8])
    real = sources.real[: trial.k]
    if len(real) < trial.k:
        raise ValueError(f"experiment.k: {trial.k} real images asked for, {cfg.real} has {len(sources.real)}")
    replay = sample(sources.replay, cfg.replay_images, rng)
    data = TrialData(real, replay)
    wanted = round(trial.share * (len(real) + len(replay)))
    if trial.arm == "ceiling":
        data.extra = sample(sources.ceiling, wanted if ceiling_n is None else ceiling_n, rng)
    elif trial.arm == "adapted":
        data.extra = balanced_sample(synthetic, wanted, rng)
    elif trial.uses_synthetic:
        data.extra = sample(synthetic, wanted, rng)
    if sources.restyle is not None and trial.arm in RESTYLED_ARMS:
        from tasks.restyle import restyled_copies

        picked = sample(sources.replay, round(sources.restyle.share * (len(real) + len(replay))), rng)
        copies = restyled_copies([i.path for i in picked], sources.restyle.colours, sources.restyle.folder)
        data.extra += [Item(str(c), i.lines, "restyled", v) for i, (c, v) in zip(picked, copies, strict=True)]
    elif trial.arm == "restyled":
        raise ValueError("experiment.arms: the restyled arm needs dataset.restyle")
    return data


def adapted_count(done: pd.DataFrame, trial: Trial) -> int | None:
    """How many extra images (synthetic and recoloured) the ``adapted`` trial of ``trial``'s k and seed had, or None if
    ``done`` (the finished trials) has none: the ceiling then gets the nominal share."""
    if done.empty:  # a fresh experiment: the stored table has no columns but key and fingerprint yet
        return None
    twin = done[(done["arm"] == "adapted") & (done["k"] == trial.k) & (done["seed"] == trial.seed)]
    return int(twin["n_extra"].iloc[0]) if len(twin) else None


def load_sources(cfg: ExperimentConfig, class_names: list[str], generated: pd.DataFrame | None) -> Sources:
    """Read the data sets the config names (the ceiling pool only if the ceiling arm runs)."""
    real = read_yolo_folder(cfg.real, cfg.rare_conditions)
    replay = read_yolo_folder(cfg.replay, cfg.common_conditions) if cfg.replay and cfg.replay_images else []
    ceiling = read_yolo_folder(cfg.ceiling_pool, cfg.rare_conditions) if "ceiling" in cfg.arms else []
    # Ultralytics insists on a val split; the last replay images serve (the last weights are scored).
    val = (replay or real)[-cfg.val_images :]
    if not val:
        raise ValueError("experiment: no replay and no real images, so nothing to validate on")
    empty = pd.DataFrame(columns=["class", "path"])
    return Sources(real, replay, ceiling, val, generated if generated is not None else empty, class_names)


def synthetic_candidates(
    trial: Trial,
    labeller: str,
    sources: Sources,
    validate: ValidateConfig,
    cfg: ExperimentConfig,
    cache_dir: Path,
    detail_dir: Path,
) -> list[Item]:
    """The synthetic images a trial may draw from, labelled by ``labeller`` (and, except for the
    unfiltered arm, accepted by it at ``trial.conf``). Detections are cached per weights and threshold.
    With ``sources.grains`` (``dataset.detail``), each image is then replaced by a copy with real fine
    detail added, written under ``detail_dir``."""
    from tasks.validation import detect, load_detector

    detector = load_detector(labeller, "experiment labeller")
    floor = cfg.unfiltered_conf if trial.arm == "unfiltered" else trial.conf
    settings = validate.model_copy(update={"model": labeller, "conf": floor})
    generated = sources.synthetic
    found = detect(detector, [Path(p) for p in generated["path"]], settings, cache_dir, progress=False)
    items = label_synthetic(
        generated, found, sources.class_names, detector.names, validate, floor, filtered=trial.arm != "unfiltered"
    )
    if trial.arm == "adapted" and cfg.refine_boxes:
        items = refine_boxes(items, labeller, sources.class_names, validate.model_copy(update={"conf": floor}))
    if sources.grains:  # labelled on the clean image, trained on it with real detail added
        from tasks.detail import add_detail

        axis = dict(zip(generated["path"], generated[sources.grain_axis], strict=True))
        paths = add_detail([i.path for i in items], [axis[i.path] for i in items], sources.grains, 0, detail_dir)
        items = [replace(item, path=path) for item, path in zip(items, paths, strict=True)]
    return items


def run_trial(
    trial: Trial,
    cfg: ExperimentConfig,
    ft: FinetuneConfig,
    sources: Sources,
    sets: dict[str, Path],
    out_dir: Path,
    candidates: Sequence[Item] = (),
    ceiling_n: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """Build a trial's training set, fine-tune ``ft.model`` on it and score it (``start``: score only).

    Writes ``out_dir/train/weights/last.pt`` and ``out_dir/eval/``; the training set is deleted after.

    Returns:
        The results row (see :func:`record`) and the scored weights.
    """
    began = time.perf_counter()
    if trial.arm == "start":
        data, weights = TrialData([], []), Path(ft.model)
    else:
        data = trial_data(trial, cfg, sources, list(candidates), ceiling_n)
        folder = out_dir / "data"
        data_yaml = write_training_set(data, sources.val, sources.class_names, cfg.steps, ft.batch, trial.seed, folder)
        weights = train_detector(ft.model, data_yaml, ft, trial.seed, out_dir)
        shutil.rmtree(folder, ignore_errors=True)
    figures = score(weights, sets, ft, cfg, out_dir / "eval")
    log.info("experiment: %s: rare %s %.3f", trial.key, METRIC, figures[f"rare.{METRIC}"])
    return record(trial, data, figures, time.perf_counter() - began), weights


# --- the report ---------------------------------------------------------------------------------------------
def summarize(results: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (arm, k, share, conf), for each metric column."""
    results = results.astype({"k": int, "seed": int, "share": float, "conf": float})
    groups = results.groupby(["arm", "k", "share", "conf"], sort=False)
    table = groups.agg(
        seeds=("seed", "nunique"),
        n_synthetic=("n_extra", "mean"),
        **{f"{c} mean": (c, "mean") for c in columns},
        **{f"{c} std": (c, lambda s: float(s.std(ddof=1)) if len(s) > 1 else float("nan")) for c in columns},
    )
    return table.reset_index()


def _cell(mean: float, std: float) -> str:
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def comparison_markdown(results: pd.DataFrame, cfg: ExperimentConfig) -> str:
    """The comparison: mean ± std over seeds of mAP50-95 per arm and k (rare mean, common, each
    condition), then the sweeps, then the goals of the issue checked against the figures."""
    conditions = [*cfg.rare_conditions, *cfg.common_conditions]
    columns = [f"rare.{METRIC}", f"common.{METRIC}", *(f"{c}.{METRIC}" for c in conditions)]
    columns = [c for c in columns if c in results]
    summary = summarize(results, columns)
    main = summary[(summary["share"] == cfg.synthetic_share) & (summary["conf"] == cfg.conf)]
    header = ["arm", "k", "seeds", "extra images", "rare", "common", *conditions]
    lines = [
        f"mAP50-95 on the held-out real test sets, mean ± std over seeds; rare = mean of {', '.join(cfg.rare_conditions)}"
        f", common = {', '.join(cfg.common_conditions) or 'none'}. Extra images: synthetic and"
        " recoloured images (the ceiling: real rare ones) per trial, mean over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, row in main.iterrows():
        cells = [_cell(row[f"{c} mean"], row[f"{c} std"]) if f"{c} mean" in row else "" for c in columns]
        lines.append(
            f"| {row['arm']} | {row['k']} | {row['seeds']} | {row['n_synthetic']:.0f} | " + " | ".join(cells) + " |"
        )
    for name, column in (("synthetic share", "share"), ("validation threshold", "conf")):
        other = "conf" if column == "share" else "share"
        fixed = cfg.conf if column == "share" else cfg.synthetic_share
        sweep = summary[(summary["arm"] == cfg.sweep_arm) & (summary["k"] == cfg.sweep_k) & (summary[other] == fixed)]
        if sweep[column].nunique() < 2:
            continue
        lines += ["", f"Sweep of the {name} ({cfg.sweep_arm}, k = {cfg.sweep_k}):", "",
                  f"| {column} | seeds | extra images | rare | common |", "|---|---|---|---|---|"]  # fmt: skip
        for _, row in sweep.sort_values(column).iterrows():
            rare, common = (_cell(row[f"{c} mean"], row[f"{c} std"]) for c in columns[:2])
            lines.append(f"| {row[column]:g} | {row['seeds']} | {row['n_synthetic']:.0f} | {rare} | {common} |")
    per_class = [c for c in results if c.startswith("rare.") and c.count(".") == 2 and c.endswith(METRIC)]
    if per_class:
        names = [c.split(".")[1] for c in per_class]
        by_class = summarize(results, per_class)
        by_class = by_class[(by_class["share"] == cfg.synthetic_share) & (by_class["conf"] == cfg.conf)]
        lines += ["", "Per class, rare conditions (mean over seeds):", "", "| arm | k | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]  # fmt: skip
        for _, row in by_class.iterrows():
            cells = " | ".join(f"{row[f'{c} mean']:.3f}" for c in per_class)
            lines.append(f"| {row['arm']} | {row['k']} | {cells} |")
    lines += ["", "Goals of the issue, checked against these figures:", "", *goal_lines(main)]
    return "\n".join(lines) + "\n"


def goal_lines(main: pd.DataFrame) -> list[str]:
    """Each goal of issue 8 as met, missed or unmeasured, with the figures it rests on."""
    mean = {(r["arm"], r["k"]): r[f"rare.{METRIC} mean"] for _, r in main.iterrows()}
    common = {(r["arm"], r["k"]): r.get(f"common.{METRIC} mean", np.nan) for _, r in main.iterrows()}
    spread = {(r["arm"], r["k"]): (r.get(f"rare.{METRIC} std", np.nan), r.get("seeds", 0)) for _, r in main.iterrows()}
    start = mean.get(("start", 0))
    for k in {k for _, k in mean}:  # the start arm scores the same at every k
        if start is not None:
            mean.setdefault(("start", k), start)
            common.setdefault(("start", k), common[("start", 0)])
    out = []

    def check(text: str, needs: list[tuple[str, int]], test) -> None:
        missing = [f"{a} at k={k}" for a, k in needs if (a, k) not in mean]
        if missing:
            out.append(f"- UNMEASURED: {text} (no {', '.join(missing)})")
            return
        ok, figures = test()
        out.append(f"- {'MET' if ok else 'MISSED'}: {text}: {figures}")

    def gain(k: int) -> float:
        return mean[("adapted", k)] - mean[("real", k)]

    def stated(k: int) -> str:
        """The gain at k, with its standard error when the seeds' spread is known: a margin within one
        or two of them of the line is the seeds' luck as much as the method's."""
        parts = [spread.get(arm_k, (np.nan, 0)) for arm_k in (("adapted", k), ("real", k))]
        error = float(np.sqrt(sum(s**2 / n for s, n in parts))) if all(n > 1 and s == s for s, n in parts) else np.nan
        return f"{gain(k):+.3f}" + ("" if np.isnan(error) else f" (± {error:.3f} standard error)")

    check("adapted beats real by >= 0.05 at k=10", [("adapted", 10), ("real", 10)],
          lambda: (gain(10) >= 0.05, stated(10)))  # fmt: skip
    check("adapted beats real at k=0 by >= 0.05 and by more than at k=10", [("adapted", 0), ("real", 0), ("adapted", 10), ("real", 10)],
          lambda: (gain(0) > max(gain(10), 0.05), f"{stated(0)} at k=0, {stated(10)} at k=10"))  # fmt: skip

    def closed() -> tuple[bool, str]:
        gap = mean[("ceiling", 30)] - mean[("real", 30)]
        share = gain(30) / gap if gap > 0 else float("nan")
        return bool(share >= 0.5), f"closes {share:.0%} of the gap {gap:+.3f} between real and ceiling"

    check("adapted closes >= half the real-to-ceiling gap at k=30", [("adapted", 30), ("real", 30), ("ceiling", 30)],
          closed)  # fmt: skip
    for other in ("unfiltered", "validated"):
        ks = sorted(k for a, k in mean if a == "adapted" and (other, k) in mean)
        needs = [("adapted", k) for k in ks] + [(other, k) for k in ks] or [("adapted", 10), (other, 10)]
        check(f"adapted beats {other} at every k", needs,
              lambda o=other, ks=ks: (all(mean[("adapted", k)] > mean[(o, k)] for k in ks),
                                      ", ".join(f"k={k} {mean[('adapted', k)] - mean[(o, k)]:+.3f}" for k in ks)))  # fmt: skip
    ks = sorted(k for a, k in mean if a == "adapted")
    check("adapted costs <= 0.01 on the common set (vs the starting detector)", [("start", 0)] + [("adapted", k) for k in ks or [10]],
          lambda: (all(common[("adapted", k)] >= common[("start", 0)] - 0.01 for k in ks),
                   ", ".join(f"k={k} {common[('adapted', k)] - common[('start', 0)]:+.3f}" for k in ks)))  # fmt: skip
    if same_k := [k for k in ks if ("real", k) in common]:  # the fine-tune itself forgets too: split the two
        out.append("- NOTE: on the common set, adapted against real at the same k (what the added images cost): "
                   + ", ".join(f"k={k} {common[('adapted', k)] - common[('real', k)]:+.3f}" for k in same_k))  # fmt: skip
    return out


def plot_results(results: pd.DataFrame, cfg: ExperimentConfig, out_dir: Path) -> list[Path]:
    """PNGs of rare-condition mAP50-95 (mean ± std over seeds) against k, synthetic share and threshold.

    Writes ``map_vs_k.png`` always, ``map_rare_vs_common.png`` when there is a common-condition test set,
    and ``map_vs_share.png`` / ``map_vs_threshold.png`` when the sweep has two or more values. Returns the
    files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = f"rare.{METRIC}"
    summary = summarize(results, [column])
    written = []
    main = summary[(summary["share"] == cfg.synthetic_share) & (summary["conf"] == cfg.conf)]
    ks = sorted(results["k"].unique())
    figure, axes = plt.subplots(figsize=(6, 4))
    for arm, group in main.groupby("arm", sort=False):
        if arm == "start":
            axes.axhline(group[f"{column} mean"].iloc[0], color="gray", linestyle="--", label="start")
            continue
        group = group.sort_values("k")
        axes.errorbar(group["k"], group[f"{column} mean"], yerr=group[f"{column} std"].fillna(0), marker="o",
                      capsize=3, label=arm)  # fmt: skip
    axes.set(xlabel="k: scarce real rare images", ylabel="rare-condition mAP50-95", xticks=ks)
    axes.legend(fontsize=8)
    written.append(_save(figure, out_dir / "map_vs_k.png"))
    if f"common.{METRIC}" in results and results[f"common.{METRIC}"].notna().any():
        written.append(plot_trade_off(summarize(results, [column, f"common.{METRIC}"]), cfg, out_dir))
    for name, key, label in (("share", "share", "synthetic images per real image"),
                             ("threshold", "conf", "validation threshold")):  # fmt: skip
        other, fixed = ("conf", cfg.conf) if key == "share" else ("share", cfg.synthetic_share)
        sweep = summary[(summary["arm"] == cfg.sweep_arm) & (summary["k"] == cfg.sweep_k) & (summary[other] == fixed)]
        if sweep[key].nunique() < 2:
            continue
        sweep = sweep.sort_values(key)
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.errorbar(sweep[key], sweep[f"{column} mean"], yerr=sweep[f"{column} std"].fillna(0), marker="o",
                      capsize=3, label=f"{cfg.sweep_arm}, k={cfg.sweep_k}")  # fmt: skip
        axes.set(xlabel=label, ylabel="rare-condition mAP50-95")
        axes.legend(fontsize=8)
        written.append(_save(figure, out_dir / f"map_vs_{name}.png"))
    return written


def plot_trade_off(summary: pd.DataFrame, cfg: ExperimentConfig, out_dir: Path) -> Path:
    """``map_rare_vs_common.png``: each arm's rare-condition mAP50-95 against its common-condition one
    (mean ± std over seeds, one point per k), so gains on the target and forgetting show together. The
    dashed line is one point below the starting detector on the common set, the issue's limit."""
    import matplotlib.pyplot as plt

    rare, common = f"rare.{METRIC}", f"common.{METRIC}"
    main = summary[(summary["share"] == cfg.synthetic_share) & (summary["conf"] == cfg.conf)]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for arm, group in main.groupby("arm", sort=False):
        group = group.sort_values("k")
        x, y = group[f"{common} mean"], group[f"{rare} mean"]
        if arm == "start":
            axes.plot(x, y, marker="*", markersize=12, color="gray", linestyle="none", label="start")
            axes.axvline(x.iloc[0] - 0.01, color="gray", linestyle="--", linewidth=1, label="start - 0.01 (common)")
            continue
        axes.errorbar(x, y, xerr=group[f"{common} std"].fillna(0), yerr=group[f"{rare} std"].fillna(0), marker="o",
                      capsize=2, label=arm)  # fmt: skip
        for k, xi, yi in zip(group["k"], x, y, strict=True):
            axes.annotate(f"k={k}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6)
    axes.set(xlabel="common-condition mAP50-95 (forgetting: further left)", ylabel="rare-condition mAP50-95")
    axes.legend(fontsize=7)
    return _save(figure, out_dir / "map_rare_vs_common.png")


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from tasks.workspace import atomic_path

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


def record(trial: Trial, data: TrialData, figures: dict[str, float], seconds: float) -> dict[str, Any]:
    """One results row: the trial, its data counts and its figures."""
    conditions = pd.Series([i.condition for i in data.extra], dtype=str).value_counts().to_dict()
    return {
        "key": trial.key,
        "arm": trial.arm,
        "k": trial.k,
        "seed": trial.seed,
        "share": trial.share,
        "conf": trial.conf,
        "n_real": len(data.real),
        "n_replay": len(data.replay),
        "n_extra": len(data.extra),
        "n_restyled": sum(i.source == "restyled" for i in data.extra),
        "extra_conditions": json.dumps(conditions),
        "seconds": round(seconds, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **figures,
    }
