"""The six stages, wired: read the previous stage's table, call the plain task function, write the
stage's outputs under the run directory, and log to the stage's MLflow run.

The CLI subcommands (and so ``dvc repro``) call these directly; the Prefect flows wrap the same
functions as tasks. No ML logic lives here.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.config import GUIDE_DIR, FinetuneConfig, ImagesByValue, Params
from tasks.finetune import Guard
from tasks.shards import MapShards
from tasks.tracking import Tracker
from tasks.workspace import Workspace, atomic_path, write_parquet_atomic, write_text_atomic

if TYPE_CHECKING:
    from tasks.class_guide import GuideResult

log = logging.getLogger(__name__)

GRID_SIZE = 32  # images per contact sheet logged to MLflow


@dataclass
class StageContext:
    """What every stage needs: the params, where to write, and where to log."""

    params: Params
    ws: Workspace
    tracker: Tracker
    parent_run: str | None = None
    progress: bool = True
    params_file: str = "params.yaml"  # as the flow was given it; an event names it for the runs it triggers
    run_ids: dict[str, str] = field(default_factory=dict)
    # stage -> a context yielding the MapShards its shards go through; None: the stage's own loop here.
    # The flows set it to a Prefect task runner (flows/runners.py); stage commands leave it None.
    shard_runner: Callable[[str], AbstractContextManager[MapShards]] | None = None

    def sharding(self, stage: str) -> AbstractContextManager[MapShards | None]:
        """Where ``stage`` runs its shards: the flow's task runner, or None for this process."""
        return self.shard_runner(stage) if self.shard_runner else nullcontext(None)

    @contextmanager
    def stage_run(self, stage: str) -> Iterator[str]:
        """The stage's MLflow run (nested under the flow's run, if any), with its params logged."""
        tags = {"synthdet.stage": stage, "synthdet.run_name": self.params.run_name, **self.owner_tags()}
        with self.tracker.run(stage, parent=self.parent_run, tags=tags) as run_id:
            self.run_ids[stage] = run_id
            self.tracker.log_params(run_id, self.params.section(stage).model_dump(mode="json"))
            yield run_id

    def owner_tags(self) -> dict[str, str]:
        """Tags on every MLflow run this context starts: whose workspace, which process."""
        return {"synthdet.workspace": str(self.ws.root.resolve()), "synthdet.pid": str(os.getpid())}

    def out(self, stage: str, name: str = "") -> Path:
        return self.ws.stage_dir(stage) / name if name else self.ws.stage_dir(stage)

    def read_table(self, stage: str, name: str) -> pd.DataFrame:
        path = self.out(stage, name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the {stage} stage first")
        return pd.read_parquet(path)


def class_names(params: Params) -> list[str]:
    return [c.name for c in params.prompts.classes]


def git_sha(folder: Path | None = None) -> str:
    """The commit of the project's code, with ``-dirty`` if it has uncommitted changes."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def check_images_by_value(spec: ImagesByValue, field: str, params: Params) -> None:
    """``spec.axis`` must be an axis of prompts, and every image ``spec`` names must be there.

    Raises:
        ValueError / FileNotFoundError: naming ``<field>.axis`` or ``<field>.images``.
    """
    from tasks.generation import images_by_value

    if spec.axis not in params.prompts.axes:
        raise ValueError(f"{field}.axis: {spec.axis!r} is not an axis of prompts (axes: {sorted(params.prompts.axes)})")
    images_by_value(spec, f"{field}.images")


def preflight(params: Params, names: tuple[str, ...]) -> None:
    """Check every input the given stages will read, before any heavy work starts.

    Raises:
        FileNotFoundError / ValueError: naming the field and the file, as the stage itself would.
    """
    from tasks.dataset import find_real_images
    from tasks.generation import resolve_model_dir
    from tasks.prompts import expand_prompts
    from tasks.validation import load_detector, worker_detector

    if "prompts" in names:
        expand_prompts(params.prompts)  # quotas, control characters: milliseconds
    if "generate" in names:
        resolve_model_dir(params.generate.model)
        if params.generate.start_means:
            check_images_by_value(params.generate.start_means, "generate.start_means", params)
    if "validate" in names:  # kept in this process's cache: the validate stage takes this copy
        worker_detector(params.validate_.model, params.validate_.device, "validate.model")
        if params.validate_.standardise:
            from tasks.validation import reference_stats

            reference_stats(params.validate_.standardise)
    if "dataset" in names and params.dataset.real is not None and params.dataset.real_ratio > 0:
        find_real_images(params.dataset.real, len(params.prompts.classes))
    if "dataset" in names and params.dataset.detail is not None:
        check_images_by_value(params.dataset.detail, "dataset.detail", params)
    if "dataset" in names and params.dataset.restyle is not None:
        check_images_by_value(params.dataset.restyle, "dataset.restyle", params)
    if "finetune" in names:
        checked = "validate" in names and params.finetune.model == params.validate_.model
        if not params.finetune.model.endswith(".yaml") and not checked:
            load_detector(params.finetune.model, "finetune.model")
        for field in ("eval_data", "guard_data"):
            path = getattr(params.finetune, field)
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"finetune.{field}: {path}: no such file")


# ---------------------------------------------------------------------------------------------
def prompts(ctx: StageContext) -> dict[str, Any]:
    """Expand the prompt spec into ``prompts/prompts.parquet``."""
    from tasks.prompts import expand_prompts

    with ctx.stage_run("prompts") as run_id:
        table = expand_prompts(ctx.params.prompts)
        path = ctx.out("prompts", "prompts.parquet")
        write_parquet_atomic(table, path)
        counts = table["class"].value_counts()
        ctx.tracker.log_metrics(run_id, {"prompts": len(table), **{f"prompts.{k}": v for k, v in counts.items()}})
        ctx.tracker.log_table(run_id, table, "prompts.json")
        ctx.tracker.log_artifact(run_id, path)
    return {"prompts": len(table), "path": str(path)}


def generate(ctx: StageContext) -> dict[str, Any]:
    """Render every prompt; images go to the shared cache, the manifest to ``generate/generated.parquet``."""
    from tasks.generation import generate_images, load_pipeline, pipeline_identity
    from tasks.grids import image_grid

    table = ctx.read_table("prompts", "prompts.parquet")
    cfg = ctx.params.generate
    with ctx.stage_run("generate") as run_id, ctx.sharding("generate") as map_shards:
        loaded = pipeline_identity(cfg) if map_shards else load_pipeline(cfg)  # workers load their own
        ctx.tracker.set_tags(run_id, {"generator.model": loaded.model, "generator.hash": loaded.model_hash})
        size = ctx.params.runner.shard_size
        generated = generate_images(loaded, table, cfg, ctx.ws.images, ctx.progress, map_shards, size)
        path = ctx.out("generate", "generated.parquet")
        write_parquet_atomic(generated, path)
        ok = generated[generated["status"] == "ok"]
        seconds = generated["seconds"].astype(float)
        ctx.tracker.log_metrics(
            run_id,
            {
                "generated": len(ok),
                "degenerate": len(generated) - len(ok),
                "seconds_per_image": float(seconds.mean()) if len(seconds) else 0.0,
            },
        )
        ctx.tracker.log_artifact(run_id, path)
        if len(ok):
            sample = ok.head(GRID_SIZE)
            ctx.tracker.log_image(run_id, image_grid(sample["path"], sample["prompt"]), "generated_grid.png")
    return {"generated": len(ok), "degenerate": len(generated) - len(ok), "path": str(path)}


def validate(ctx: StageContext) -> dict[str, Any]:
    """Accept or reject each generated image; labels to ``validate/labels/``, table to ``validated.parquet``."""
    from tasks.grids import histogram, image_grid
    from tasks.validation import summarize_validation, validate_images, worker_detector

    generated = ctx.read_table("generate", "generated.parquet")
    with ctx.stage_run("validate") as run_id, ctx.sharding("validate") as map_shards:
        # The copy preflight loaded, if this process ran it; in-process shards use the same one.
        detector = worker_detector(ctx.params.validate_.model, ctx.params.validate_.device)
        ctx.tracker.set_tags(run_id, {"validator.model": detector.path, "validator.hash": detector.model_hash})
        labels = ctx.out("validate", "labels")
        shutil.rmtree(labels, ignore_errors=True)  # labels are per run; stale ones would mislead
        validated = validate_images(
            detector,
            generated,
            ctx.params.validate_,
            class_names(ctx.params),
            labels,
            ctx.ws.detections,
            ctx.progress,
            map_shards,
            ctx.params.runner.shard_size,
        )
        path = ctx.out("validate", "validated.parquet")
        write_parquet_atomic(validated, path)
        metrics = summarize_validation(validated)
        ctx.tracker.log_metrics(run_id, metrics)
        ctx.tracker.log_artifact(run_id, path)
        chart = histogram(
            validated["confidence"], f"intended-class confidence (accept at >= {ctx.params.validate_.conf})"
        )
        ctx.tracker.log_image(run_id, chart, "confidence_histogram.png")
        # The grids go to the flow's run too: the first thing a reviewer opens.
        runs = [run_id, ctx.parent_run] if ctx.parent_run else [run_id]
        accepted = validated[validated["accepted"]].head(GRID_SIZE)
        if len(accepted):
            captions = [f"{c} {p:.2f}" for c, p in zip(accepted["class"], accepted["confidence"], strict=True)]
            grid = image_grid(accepted["path"], captions)
            ctx.tracker.log_image(runs, grid, "accepted_grid.png")
        rejected = validated[~validated["accepted"] & (validated["path"] != "")].head(GRID_SIZE)
        if len(rejected):
            captions = [f"{c}: {r}" for c, r in zip(rejected["class"], rejected["reject_reason"], strict=True)]
            grid = image_grid(rejected["path"], captions)
            ctx.tracker.log_image(runs, grid, "rejected_grid.png")
    return {
        "accepted": int(metrics["accepted"]),
        "validated": len(validated),
        "acceptance_rate": metrics["acceptance_rate"],
        "path": str(path),
    }


def dataset(ctx: StageContext) -> dict[str, Any]:
    """Assemble the accepted images into a YOLO dataset at ``dataset/``."""
    from tasks.dataset import build_dataset

    validated = ctx.read_table("validate", "validated.parquet")
    with ctx.stage_run("dataset") as run_id:
        result = build_dataset(validated, class_names(ctx.params), ctx.params.dataset, ctx.out("dataset"))
        ctx.tracker.log_metrics(
            run_id,
            {"train": result.train, "val": result.val, "synthetic": result.synthetic, "real": result.real,
             "restyled": result.restyled},
        )  # fmt: skip
        ctx.tracker.log_artifact(run_id, result.data_yaml)
        ctx.tracker.log_artifact(run_id, result.path / "manifest.parquet")
    return {
        "train": result.train,
        "val": result.val,
        "synthetic": result.synthetic,
        "real": result.real,
        "restyled": result.restyled,
        "path": str(result.path),
    }


def registry_and_remote(ctx: StageContext) -> tuple[Path, str]:
    cfg = ctx.params.version
    return (cfg.registry or ctx.ws.registry).resolve(), (cfg.remote or str(ctx.ws.remote))


def version(ctx: StageContext) -> dict[str, Any]:
    """Version ``dataset/`` in the DVC data registry; the version goes to ``version/version.json``."""
    from tasks.versioning import list_versions, version_dataset

    source = ctx.out("dataset")
    if not (source / "data.yaml").is_file():
        raise FileNotFoundError(f"{source}: missing; run the dataset stage first")
    registry, remote = registry_and_remote(ctx)
    with ctx.stage_run("version") as run_id:
        known = (
            {v.tag for v in list_versions(registry, ctx.params.dataset.name)} if (registry / ".git").is_dir() else set()
        )
        made = version_dataset(
            source,
            ctx.params.dataset.name,
            registry,
            remote,
            push=ctx.params.version.push,
            message=f"run {ctx.params.run_name}",
        )
        # new: False when the content equals the latest version's, which is then returned as is
        record = {**made.__dict__, "new": made.tag not in known, "registry": str(registry), "remote": remote}
        write_text_atomic(ctx.out("version", "version.json"), json.dumps(record, indent=2))
        ctx.tracker.set_tags(run_id, {"dataset.version": made.tag, "dataset.md5": made.dvc_md5})
        ctx.tracker.log_metrics(run_id, {"files": made.files, "version": made.number, "pushed": int(made.pushed)})
        if ctx.parent_run:
            ctx.tracker.set_tags(ctx.parent_run, {"dataset.version": made.tag, "dataset.md5": made.dvc_md5})
    return record


def finetune(ctx: StageContext, dataset_version: str | None = None) -> dict[str, Any]:
    """Fine-tune on a dataset version (this run's, or ``dataset_version``) and register the model."""
    from tasks.finetune import evaluate_detector, finetune_detector
    from tasks.versioning import checkout_version, resolve_version

    registry, _ = registry_and_remote(ctx)
    name = ctx.params.dataset.name
    if dataset_version is None:
        version_file = ctx.out("version", "version.json")
        dataset_version = json.loads(version_file.read_text())["tag"] if version_file.is_file() else "latest"
    made = resolve_version(registry, dataset_version, name=name)
    cfg = ctx.params.finetune
    out = ctx.out("finetune")
    key = finetune_key(cfg, made.tag, made.dvc_md5)
    previous = reusable_finetune(ctx.out("finetune", "metrics.json"), key) if cfg.reuse else None
    if previous is not None:
        with ctx.stage_run("finetune") as run_id:
            ctx.tracker.set_tags(run_id, {"dataset.version": made.tag, "dataset.md5": made.dvc_md5,
                                          "synthdet.reused": previous["mlflow_run_id"]})  # fmt: skip
            ctx.tracker.log_metrics(run_id, {k: previous[k] for k in ("mAP50-95", "mAP50") if k in previous})
        log.info("finetune: %s with these settings was fine-tuned already (run %s): reused; finetune.reuse=false "
                 "trains again", made.tag, previous["mlflow_run_id"])  # fmt: skip
        return {**previous, "reused": True}
    with ctx.stage_run("finetune") as run_id:
        data = out / "data"
        shutil.rmtree(data, ignore_errors=True)
        checkout_version(registry, made.tag, data, name=name)
        ctx.tracker.set_tags(run_id, {"dataset.version": made.tag, "dataset.md5": made.dvc_md5})

        def on_epoch(epoch: int, figures: dict[str, float]) -> None:
            ctx.tracker.log_metrics(run_id, figures, step=epoch)

        # What fine-tuning gained: the starting weights on the same evaluation set (none for a .yaml).
        eval_data, start = cfg.eval_data or data / "data.yaml", None
        if Path(cfg.model).suffix == ".pt":
            start, _ = evaluate_detector(cfg.model, eval_data, cfg.eval_split, cfg, out / "start")
            ctx.tracker.log_metrics(run_id, {"start.mAP50-95": start["mAP50-95"], "start.mAP50": start["mAP50"]})
        result = finetune_detector(cfg, data / "data.yaml", out, on_epoch=on_epoch)
        ctx.tracker.log_metrics(run_id, {**result.metrics, **{f"mAP50-95.{k}": v for k, v in result.per_class.items()}})
        for plot in result.plots:
            ctx.tracker.log_artifact(run_id, plot, "plots")
        ctx.tracker.log_artifact(run_id, result.weights, "weights")
        model_version = ctx.tracker.register_model(
            run_id, result.weights, cfg.registered_model, tags={"dataset.version": made.tag}
        )
        summary = {
            **promote(ctx, run_id, result.metrics["mAP50-95"], model_version, data / "data.yaml", result.weights),
            **result.metrics,
            "per_class": result.per_class,
            "weights": str(result.weights),
            "dataset_version": made.tag,
            "eval_set": str(cfg.eval_data) if cfg.eval_data else f"{made.tag} {cfg.eval_split} split",
            "start_mAP50-95": start["mAP50-95"] if start else None,
            "registered_model": cfg.registered_model,
            "model_version": model_version,
            "mlflow_run_id": run_id,
            "key": key,
        }
        write_text_atomic(ctx.out("finetune", "metrics.json"), json.dumps(summary, indent=2))
    return summary


def finetune_key(cfg: FinetuneConfig, dataset_tag: str, dataset_md5: str) -> str:
    """What a fine-tune's result depends on: its settings, the starting weights' bytes and the dataset version.

    ``finetune.eval_data`` counts by its path, not its images: re-scoring on a changed held-out set
    needs ``finetune.reuse: false``.
    """
    import hashlib

    from tasks.generation import file_sha256

    start = Path(cfg.model)
    weights = file_sha256(start) if start.is_file() else cfg.model
    settings = cfg.model_dump(mode="json", exclude={"reuse"})
    blob = json.dumps({"settings": settings, "weights": weights, "dataset": [dataset_tag, dataset_md5]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reusable_finetune(metrics_file: Path, key: str) -> dict[str, Any] | None:
    """The last fine-tune's summary if it was made with ``key`` and its weights are still there."""
    if not metrics_file.is_file():
        return None
    try:
        previous = json.loads(metrics_file.read_text())
    except json.JSONDecodeError:
        return None
    if previous.get("key") != key or not Path(previous.get("weights", "")).is_file():
        return None
    return previous


def guard_check(ctx: StageContext, run_id: str, weights: Path) -> Guard | None:
    """What fine-tuning cost on what the detector already knew: the starting and the new weights on
    ``finetune.guard_data``, logged on the run. None without a guard set or starting weights."""
    from tasks.finetune import evaluate_detector

    cfg = ctx.params.finetune
    if cfg.guard_data is None:
        return None
    if Path(cfg.model).suffix != ".pt":
        log.warning("finetune.guard_data: no guard for a model trained from %s (no starting weights)", cfg.model)
        return None
    out = ctx.out("finetune")
    before, _ = evaluate_detector(cfg.model, cfg.guard_data, cfg.guard_split, cfg, out / "guard-start")
    after, _ = evaluate_detector(weights, cfg.guard_data, cfg.guard_split, cfg, out / "guard")
    guard = Guard(after["mAP50-95"], before["mAP50-95"], cfg.guard_margin)
    ctx.tracker.log_metrics(run_id, {"guard.mAP50-95": guard.after, "guard.start.mAP50-95": guard.before})
    return guard


def promote(
    ctx: StageContext, run_id: str, score: float, model_version: str, data_yaml: Path, weights: Path
) -> dict[str, Any]:
    """Move the champion alias to the new model version (``weights``) if it beats the champion on the
    same data and, with ``finetune.guard_data`` set, lost no more than ``finetune.guard_margin`` there
    against its starting weights (:func:`guard_check`).

    The champion is re-evaluated here on this run's evaluation set, so the two scores compare like
    with like even when the dataset has changed since the champion was trained. The decision and its
    reason are tagged on the finetune run.
    """
    from tasks.finetune import evaluate_detector, promotion_decision

    cfg = ctx.params.finetune
    guard = guard_check(ctx, run_id, weights)
    current = ctx.tracker.champion(cfg.registered_model, cfg.champion_alias)
    champion_score = None
    if current is not None:
        weights = ctx.tracker.download_weights(current.run_id, ctx.out("finetune", "champion"))
        metrics, _ = evaluate_detector(weights, cfg.eval_data or data_yaml, cfg.eval_split, cfg, ctx.out("finetune"))
        champion_score = metrics["mAP50-95"]
    promoted, reason = promotion_decision(score, champion_score, cfg.promote_margin, guard)
    if promoted:
        ctx.tracker.set_alias(cfg.registered_model, cfg.champion_alias, model_version)
    # None when the guard stopped the first model: there is no champion yet.
    champion_version = model_version if promoted else current.version if current else None
    ctx.tracker.set_tags(
        run_id,
        {"promotion.promoted": promoted, "promotion.reason": reason,
         "promotion.champion_version": champion_version or "none"},
    )  # fmt: skip
    if champion_score is not None:
        ctx.tracker.log_metrics(run_id, {"champion.mAP50-95": champion_score})
    log.info("promotion: %s", reason)
    return {
        "promoted": promoted,
        "promotion_reason": reason,
        "champion_version": None if champion_version is None else str(champion_version),
        "champion_score": champion_score,
        "guard": None
        if guard is None
        else {
            "mAP50-95": guard.after,
            "start_mAP50-95": guard.before,
            "margin": guard.margin,
            "set": str(cfg.guard_data),
        },  # fmt: skip
    }


def world(ctx: StageContext, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    """Render the procedural world's "real" data sets under ``out`` (``only`` these, if given)."""
    from tasks.world import DEFAULT_SIZES, build_world

    cfg = ctx.params.world
    sizes = cfg.model_dump(exclude={"seed"})
    if only:
        unknown = sorted(set(only) - set(DEFAULT_SIZES))
        if unknown:
            raise ValueError(f"--only: unknown world sets {unknown}; known: {', '.join(DEFAULT_SIZES)}")
        sizes = {name: n if name in only else 0 for name, n in sizes.items()}
    with ctx.stage_run("world") as run_id:
        sets = build_world(out, cfg.seed, sizes)
        ctx.tracker.log_metrics(
            run_id, {f"images.{name}": sum(1 for _ in (path / "images").iterdir()) for name, path in sets.items()}
        )
    return {name: str(path) for name, path in sets.items()}


def train_validator(
    ctx: StageContext, data: Path, out: Path, tests: Path | None = None, epochs: int | None = None
) -> dict[str, Any]:
    """Train the default validator (YOLO26n from its yaml) on ``data``; copy its weights to ``out``.

    Evaluates it on every ``<tests>/<condition>/data.yaml`` too, when ``tests`` is given.
    """
    from tasks.finetune import evaluate_detector, finetune_detector

    cfg = ctx.params.train_validator
    if epochs is not None:
        cfg = cfg.model_copy(update={"epochs": epochs})
    work = ctx.out("train-validator")
    with ctx.stage_run("train-validator") as run_id:

        def on_epoch(epoch: int, figures: dict[str, float]) -> None:
            ctx.tracker.log_metrics(run_id, figures, step=epoch)

        began = time.perf_counter()
        result = finetune_detector(cfg, data, work, on_epoch=on_epoch)
        seconds = time.perf_counter() - began
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            shutil.copyfile(result.weights, tmp)
        figures: dict[str, float] = {f"val.{k}": v for k, v in result.metrics.items()}
        for test in sorted(tests.glob("*/data.yaml")) if tests else []:
            metrics, _ = evaluate_detector(out, test, "val", cfg, work / "tests" / test.parent.name)
            figures[f"test.{test.parent.name}.mAP50-95"] = metrics["mAP50-95"]
        figures["size_mb"] = out.stat().st_size / 1e6
        figures["train_seconds"] = seconds
        ctx.tracker.log_metrics(run_id, figures)
        ctx.tracker.log_artifact(run_id, out, "weights")
        command = f"synthdet train-validator --data {data} --out {out}" + (f" --tests {tests}" if tests else "")
        command += f" --epochs {epochs}" if epochs is not None else ""
        write_training_record(out, seconds, figures["size_mb"], command, cfg.model_dump(mode="json"), figures)
    return {**figures, "path": str(out)}


def train_generator(ctx: StageContext, data: Path, out: Path) -> dict[str, Any]:
    """Train the default latent diffusion model on a captioned folder; save the pipeline at ``out``."""
    from tasks.train_generator import load_captioned
    from tasks.train_generator import train_generator as train

    images, captions, layout_captions = load_captioned(data)
    with ctx.stage_run("train-generator") as run_id:
        ctx.tracker.set_tags(run_id, {"data": str(data), "images": len(images)})

        def on_step(phase: str, step: int, loss: float) -> None:
            ctx.tracker.log_metrics(run_id, {f"{phase}_loss": loss}, step=step)

        began = time.perf_counter()
        cfg = ctx.params.train_generator
        classes = class_names(ctx.params)
        result = train(images, captions, cfg, out, ctx.progress, on_step, layout_captions, classes)
        seconds = time.perf_counter() - began  # every phase, the latents and saving
        figures = {
            "vae_seconds": result.vae_seconds,
            "unet_seconds": result.unet_seconds,
            "vae_loss": result.vae_loss,
            "unet_loss": result.unet_loss,
            **(guide_figures(result.guide) if result.guide else {}),
            "train_seconds": seconds,
            "size_mb": result.size_bytes / 1e6,
            "images": len(images),
        }
        ctx.tracker.log_metrics(run_id, figures)
        command = f"synthdet train-generator --data {data} --out {out}"
        write_training_record(out, seconds, figures["size_mb"], command, cfg.model_dump(mode="json"), figures)
    return {**figures, "path": str(result.path)}


def guide_figures(guide: GuideResult) -> dict[str, float]:
    """A class guide's training time, last loss and held-out accuracy per timestep, as flat metrics."""
    accuracy = {f"guide_accuracy_t{t}": value for t, value in guide.accuracy.items()}
    return {"guide_seconds": guide.seconds, "guide_loss": guide.loss, **accuracy}


def train_guide(ctx: StageContext, data: Path, generator: Path) -> dict[str, Any]:
    """Train the class guide of the pipeline at ``generator`` on a captioned folder; save it in the pipeline.

    Its settings are train-generator's ``guide_*``, its classes the prompts' classes. The pipeline's
    training record (``<generator>.json``), if there is one, gains a ``class_guide`` entry.
    """
    from tasks.train_generator import load_captioned, train_guide_for

    if not (generator / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"--generator: {generator}: not a pipeline folder with an autoencoder (vae/)")
    images, captions, _ = load_captioned(data)
    cfg = ctx.params.train_generator
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k.startswith("guide_") or k == "seed"}
    tags = {"synthdet.stage": "train-guide", "data": str(data), "generator": str(generator), **ctx.owner_tags()}
    with ctx.tracker.run("train-guide", tags=tags) as run_id:
        ctx.tracker.log_params(run_id, settings)
        guide = train_guide_for(generator, images, captions, class_names(ctx.params), cfg, ctx.progress)
        figures = guide_figures(guide)
        ctx.tracker.log_metrics(run_id, figures)
        record = training_record_path(generator)
        if record.is_file():
            entry = json.loads(record.read_text())
            entry["class_guide"] = {
                "command": f"synthdet train-guide --data {data} --generator {generator}",
                "code": git_sha(),
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": settings,
                "figures": {k: round(v, 4) for k, v in figures.items()},
            }
            write_text_atomic(record, json.dumps(entry, indent=2) + "\n")
    return {**figures, "path": str(generator / GUIDE_DIR)}


def training_record_path(model: Path) -> Path:
    """Where a trained model's record lives: ``models/validator.pt`` -> ``models/validator.json``."""
    return model.parent / f"{model.stem}.json"


def write_training_record(
    model: Path, seconds: float, size_mb: float, command: str, settings: dict[str, Any], figures: dict[str, Any]
) -> Path:
    """Beside a trained model: how long it took, its size, the command and settings, and its figures."""
    record = {
        "model": model.name,
        "seconds": round(seconds, 1),
        "size_mb": round(size_mb, 2),
        "command": command,
        "code": git_sha(),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": settings,
        "figures": {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
    }
    path = training_record_path(model)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


STAGE_FUNCTIONS = {
    "prompts": prompts,
    "generate": generate,
    "validate": validate,
    "dataset": dataset,
    "version": version,
    "finetune": finetune,
}


def evaluate_default(
    ctx: StageContext,
    world: Path,
    generator: Path,
    validator: Path,
    reference: Path,
    out: Path,
    per_cell: int = 24,
    conf: float = 0.25,
    command: str = "synthdet evaluate-default",
) -> dict[str, Any]:
    """Measure the embedded default (see tasks/evaluate_default.py); write the report, grid and JSON to ``out``.

    Writes ``default-model.md``, ``default-model.json`` and ``default-samples.png``; logs them to MLflow.
    Work files (images, detections) go to ``<workspace>/evaluate-default`` and are reused by a re-run.
    """
    from tasks import evaluate_default as ev
    from tasks.config import GenerateConfig, ValidateConfig
    from tasks.finetune import evaluate_detector
    from tasks.generation import generate_images, load_pipeline
    from tasks.validation import detect, load_detector
    from tasks.world import CONDITIONS

    tests = {c: world / "test" / c / "data.yaml" for c in CONDITIONS}
    needed = [("--generator", generator / "model_index.json", ""), ("--validator", validator, ""),
              ("--reference", reference, " (train it: see docs/default-model.md)"),
              *(("--world", path, " (run `synthdet world --only test`)") for path in tests.values())]  # fmt: skip
    for option, path, hint in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{option}: {path}: no such file{hint}")
    classes = class_names(ctx.params)
    work = ctx.out("evaluate-default")
    with ctx.tracker.run("evaluate-default", tags={"synthdet.stage": "evaluate-default", **ctx.owner_tags()}) as run_id:
        # 1. The three image sources, one table.
        prompts = ev.prompt_table(classes, CONDITIONS, per_cell, seed=0)
        gen_cfg = GenerateConfig.model_validate({**ctx.params.generate.model_dump(), "model": str(generator)})
        began = time.perf_counter()
        generated = generate_images(load_pipeline(gen_cfg), prompts, gen_cfg, work / "generated", ctx.progress)
        generate_seconds = time.perf_counter() - began
        bad = generated[generated["status"] != "ok"]
        if len(bad):
            raise RuntimeError(f"the generator produced {len(bad)} unusable images, e.g. {bad['reason'].iloc[0]}")
        real = ev.render_real(classes, CONDITIONS, per_cell, work / "real")
        roundtrip = real.assign(
            path=ev.autoencoder_round_trip(generator / "vae", real["path"].tolist(), work / "roundtrip")
        )
        table = pd.concat(
            [
                generated[["class", "condition", "prompt", "path"]].assign(source="generated"),
                real.rename(columns={"caption": "prompt"}).assign(source="real"),
                roundtrip.rename(columns={"caption": "prompt"}).assign(source="roundtrip"),
            ],
            ignore_index=True,
        )
        # 2. Two judges.
        for judge, weights in (("validator", validator), ("reference", reference)):
            cfg = ValidateConfig(model=str(weights), conf=conf, imgsz=ctx.params.validate_.imgsz, batch=64)
            detections = detect(load_detector(str(weights)), [Path(p) for p in table["path"]], cfg,
                                work / "detections", ctx.progress)  # fmt: skip
            table[f"found_{judge}"] = ev.found(detections, table["class"].tolist())
            table[f"detections_{judge}"] = [json.dumps(d) for d in detections]
        # 3. The detectors on the held-out world test sets.
        map50_95: dict[str, dict[str, float]] = {}
        for name, weights in (
            ("validator (common conditions only)", validator),
            ("reference (every condition)", reference),
        ):
            map50_95[name] = {}
            for condition, data in tests.items():
                metrics, _ = evaluate_detector(weights, data, "val", ctx.params.train_validator,
                                               work / "map" / f"{weights.stem}-{condition}")  # fmt: skip
                map50_95[name][condition] = round(metrics["mAP50-95"], 4)
        training = {}
        for name, model in (("generator", generator), ("validator", validator), ("reference", reference)):
            record = training_record_path(model)
            training[name] = json.loads(record.read_text()) if record.is_file() else None
        result = {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "code": git_sha(),
            "per_cell": per_cell,
            "conf": conf,
            "generate_seconds_per_image": round(generate_seconds / max(1, len(generated)), 3),
            "generation": gen_cfg.model_dump(
                mode="json", include={"num_inference_steps", "guidance_scale", "scheduler", "class_guidance"}
            ),
            "fidelity": ev.fidelity_summary(table),
            "map50_95": map50_95,
            "training": training,
        }
        out.mkdir(parents=True, exist_ok=True)
        grid = ev.sample_grid(table[table["source"] == "generated"], classes, CONDITIONS)
        with atomic_path(out / "default-samples.png") as tmp:
            grid.save(tmp, format="PNG")
        write_text_atomic(out / "default-model.json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(out / "default-model.md", ev.markdown_report(result, classes, CONDITIONS))
        write_parquet_atomic(table, work / "judged.parquet")
        fid = result["fidelity"]
        ctx.tracker.log_metrics(run_id, {f"fidelity.{s}": fid[s]["overall"] for s in ev.SOURCES})
        ctx.tracker.log_metrics(run_id, {f"fidelity.generated.{k}": v for k, v in fid["generated"]["by_cell"].items()})
        for name in ("default-model.md", "default-model.json", "default-samples.png"):
            ctx.tracker.log_artifact(run_id, out / name)
        ctx.tracker.log_table(
            run_id, table.drop(columns=["detections_validator", "detections_reference"]), "judged.json"
        )
    return {
        "fidelity": {s: fid[s]["overall"] for s in ev.SOURCES},
        "lowest_generated_cell": min(fid["generated"]["by_cell"].items(), key=lambda kv: kv[1]),
        "report": str(out / "default-model.md"),
    }
