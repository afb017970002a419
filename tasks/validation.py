"""validate: keep a generated image only if a YOLO detector sees the object it was prompted for.

Detections are cached per (image, detector weights, settings), so re-running with other acceptance
rules costs no inference. The cache holds one file per detected batch (``batch-<digest>.<key>.json``,
image id -> detections), written whole after the batch: creating a file costs 0.3-0.9 ms on this
machine's disk, as much as detecting an image at 64 px, and a crash loses at most the batch under way.
Accepted images get YOLO-format pseudo-labels from the detections, in the dataset's own class ids (the
order of ``prompts.classes``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tasks.colour import Stats, colour_stats, rescaled
from tasks.config import Standardise, ValidateConfig
from tasks.layout import agrees, position_word, size_word
from tasks.retry import with_retries
from tasks.shards import MapShards, chunks, shard_device, worker_cache
from tasks.workspace import write_text_atomic

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedDetector:
    model: YOLO
    path: str
    model_hash: str

    @property
    def names(self) -> list[str]:
        return [self.model.names[i] for i in sorted(self.model.names)]


def load_detector(path: str, field: str = "validate.model") -> LoadedDetector:
    """Load ultralytics weights (``.pt``) or build a model from a ``.yaml`` (random weights, for tests).

    ``.pt`` files are pickles: they are loaded only from the path the user configured.

    Raises:
        FileNotFoundError: no such file (``.yaml`` names known to ultralytics, like ``yolo26n.yaml``,
            need no file).
        ValueError: the file is not an ultralytics detector.
    """
    from ultralytics import YOLO

    file = Path(path)
    if file.suffix == ".pt" and not file.is_file():
        raise FileNotFoundError(f"{field}: {path}: no such file")
    try:
        model = YOLO(path, task="detect")
    except Exception as exc:  # torch/ultralytics raise many kinds for a bad checkpoint
        raise ValueError(f"{field}: {path}: not a loadable ultralytics model ({type(exc).__name__}: {exc})") from None
    if model.task != "detect":
        raise ValueError(f"{field}: {path}: a {model.task} model, not a detector")
    digest = hashlib.sha256(file.read_bytes() if file.is_file() else path.encode()).hexdigest()[:16]
    return LoadedDetector(model, path, digest)


def resolve_class_map(
    class_names: list[str], detector_names: list[str], class_map: dict[str, list[str]]
) -> dict[str, int]:
    """Map each detector class name that stands for a dataset class to that class's id.

    Raises:
        ValueError: before any inference, for a class with no matching detector class, or a mapping
            key that is not a class.
    """
    unknown = sorted(set(class_map) - set(class_names))
    if unknown:
        raise ValueError(f"validate.class_map: {unknown} are not classes in prompts.classes {class_names}")
    detector_to_dataset: dict[str, int] = {}
    for class_id, name in enumerate(class_names):
        targets = class_map.get(name, [name])
        missing = [t for t in targets if t not in detector_names]
        if missing or not targets:
            shown = detector_names if len(detector_names) <= 20 else detector_names[:20] + ["..."]
            raise ValueError(
                f"validate.class_map: class {name!r} maps to {missing or targets}, which the detector "
                f"does not know; its classes are {shown}"
            )
        for target in targets:
            detector_to_dataset[target] = class_id
    return detector_to_dataset


def _settings_key(detector: LoadedDetector, cfg: ValidateConfig, stats: Stats | None = None) -> str:
    settings: list[Any] = [detector.model_hash, cfg.conf, cfg.iou, cfg.imgsz]
    if stats is not None:  # appended only when set, so the keys of unstandardised detections stay as they were
        settings.append(stats)
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


def reference_stats(spec: Standardise, field: str = "validate.standardise.images") -> Stats:
    """The colour statistics ``validate.standardise`` rescales every image to.

    Raises:
        FileNotFoundError: naming ``field``, when the folder is missing or holds no images.
    """
    from tasks.dataset import IMAGE_SUFFIXES

    if not spec.images.is_dir():
        raise FileNotFoundError(f"{field}: {spec.images}: no such folder")
    files = sorted(p for p in spec.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: spec.max_images]
    if not files:
        raise FileNotFoundError(f"{field}: {spec.images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return colour_stats(files)


def standardised(path: Path, stats: Stats) -> np.ndarray:
    """The image at ``path`` rescaled to ``stats`` (:func:`tasks.colour.rescaled`), as the BGR array
    ultralytics takes (it reads a numpy image as OpenCV does)."""
    return np.ascontiguousarray(rescaled(path, stats)[..., ::-1])


def worker_detector(path: str, device: str, field: str = "validate.model") -> LoadedDetector:
    """This process's detector for ``path``, loaded on first use (on its own GPU, if it has several).

    The file's size and modification time are part of the key, so weights replaced at the same path
    are loaded afresh. The flow's preflight check, the validate stage and its in-process shards all
    share the one copy.
    """
    stat = Path(path).stat() if Path(path).is_file() else None
    stamp = (stat.st_size, stat.st_mtime_ns) if stat else None
    return worker_cache(("detector", path, shard_device(device), stamp), lambda: load_detector(path, field))


def _batch_file(cache_dir: Path, key: str, paths: list[Path]) -> Path:
    """Where the detections of one batch of images go: named by the batch's image ids, so a shard run
    again finds the batches it finished."""
    digest = hashlib.sha256("\n".join(p.stem for p in paths).encode()).hexdigest()[:16]
    return cache_dir / f"batch-{digest}.{key}.json"


def read_cached(cache_dir: Path, key: str, paths: list[Path]) -> list[list[dict[str, Any]] | None]:
    """Each image's cached detections under settings ``key``, or None.

    Reads every batch file of ``key``, and for images not in them the one-file-per-image cache that
    workspaces made before 2026-11-30 (``<image id>.<key>.json``).
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for file in cache_dir.glob(f"batch-*.{key}.json"):
        found.update(json.loads(file.read_text()))
    results = []
    for path in paths:
        single = cache_dir / f"{path.stem}.{key}.json"
        if path.stem not in found and single.is_file():
            found[path.stem] = json.loads(single.read_text())
        results.append(found.get(path.stem))
    return results


def count_cached(cache_dir: Path) -> int:
    """How many (image, settings) detections ``cache_dir`` holds, in either layout."""
    count = 0
    for file in cache_dir.glob("*.json") if cache_dir.is_dir() else ():
        count += len(json.loads(file.read_text())) if file.name.startswith("batch-") else 1
    return count


def detect(
    detector: LoadedDetector,
    paths: list[Path],
    cfg: ValidateConfig,
    cache_dir: Path,
    progress: bool = True,
    map_shards: MapShards | None = None,
    shard_size: int = 64,
) -> list[list[dict[str, Any]]]:
    """Detections per image: ``[{"name", "conf", "box": [cx, cy, w, h] normalised}]``, from cache or inference.

    Args:
        map_shards: runs :func:`detect_shard` over shards of the uncached images (a Prefect task
            runner; each worker loads the detector from its path); None runs them here with ``detector``.
        shard_size: images per shard (rounded up to whole batches).
    """
    stats = reference_stats(cfg.standardise) if cfg.standardise else None
    key = _settings_key(detector, cfg, stats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results = read_cached(cache_dir, key, paths)
    todo = [i for i, r in enumerate(results) if r is None]
    shards = chunks(todo, -(-shard_size // cfg.batch) * cfg.batch)
    work = functools.partial(
        detect_shard,
        cfg=cfg,
        cache_dir=cache_dir,
        key=key,
        model=detector.path,
        expected_hash=detector.model_hash,
        stats=stats,
    )
    if map_shards is None:
        with tqdm(total=len(todo), desc="validate", unit="img", disable=not progress) as bar:
            found = [work([paths[i] for i in shard], detector=detector, on_batch=bar.update) for shard in shards]
    else:
        found = map_shards(work, [[paths[i] for i in shard] for shard in shards])
    for shard, detections in zip(shards, found, strict=True):
        for i, one in zip(shard, detections, strict=True):
            results[i] = one
    return [r or [] for r in results]


def detect_shard(
    paths: list[Path],
    cfg: ValidateConfig,
    cache_dir: Path,
    key: str,
    model: str,
    expected_hash: str,
    detector: LoadedDetector | None = None,
    on_batch: Callable[[int], Any] | None = None,
    stats: Stats | None = None,
) -> list[list[dict[str, Any]]]:
    """Detect objects in one shard of images, in batches, caching each image's detections under ``key``.

    Idempotent: the batches another attempt at this shard finished are read, not re-run.

    Args:
        model: the detector's path, loaded once per process when ``detector`` is None.
        expected_hash: the weights' hash ``key`` was made with; a worker whose copy differs refuses.
        stats: from :func:`reference_stats`: the detector sees each image :func:`standardised` to them.
    """
    device = cfg.device if detector else shard_device(cfg.device)
    detector = detector or worker_detector(model, cfg.device)
    if detector.model_hash != expected_hash:
        raise RuntimeError(
            f"validate.model: {model} on this worker hashes to {detector.model_hash}, not {expected_hash}: "
            "every worker needs the same weights"
        )
    results: list[list[dict[str, Any]] | None] = [None] * len(paths)
    batches = chunks(range(len(paths)), cfg.batch)
    for number, chunk in enumerate(batches, 1):
        file = _batch_file(cache_dir, key, [paths[i] for i in chunk])
        if file.is_file():  # another attempt at this shard got this far
            done = json.loads(file.read_text())
            for i in chunk:
                results[i] = done[paths[i].stem]
            if on_batch is not None:
                on_batch(len(chunk))
            continue

        def predict(chunk: list[int] = chunk) -> list[Any]:
            images = [standardised(paths[i], stats) if stats else str(paths[i]) for i in chunk]
            return detector.model.predict(
                images,
                imgsz=cfg.imgsz,
                conf=cfg.conf,
                iou=cfg.iou,
                device=device,
                batch=cfg.batch,
                verbose=False,
            )

        name = f"validate batch {number}/{len(batches)} ({paths[chunk[0]].name}..{paths[chunk[-1]].name})"
        predictions = with_retries(predict, name, cfg.retries, cfg.retry_backoff_s)
        for i, pred in zip(chunk, predictions, strict=True):
            boxes = pred.boxes
            found = [
                {"name": pred.names[int(c)], "conf": round(float(p), 4), "box": [round(float(v), 5) for v in b]}
                for c, p, b in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xywhn.tolist(), strict=True)
            ]
            found.sort(key=lambda d: -d["conf"])
            results[i] = found
        write_text_atomic(file, json.dumps({paths[i].stem: results[i] for i in chunk}))
        if on_batch is not None:
            on_batch(len(chunk))
    return [r or [] for r in results]


def judge(
    detections: list[dict[str, Any]],
    intended: str,
    detector_to_dataset: dict[str, int],
    class_names: list[str],
    cfg: ValidateConfig,
    position: str = "",
    size: str = "",
) -> str:
    """The reason to reject an image, or "" to accept it. Detections are already above ``cfg.conf``.

    ``position`` and ``size`` are the layout words the prompt asked for ("" for none), checked against
    the intended-class boxes when ``cfg.check_layout`` is on.
    """

    def shown(d: dict[str, Any]) -> str:
        return f"{d['name']} {d['conf']:.2f}"

    if not detections:
        return f"nothing detected at conf >= {cfg.conf}"
    intended_id = class_names.index(intended)
    hits = [d for d in detections if detector_to_dataset.get(d["name"]) == intended_id]
    if not hits:
        return f"no {intended} at conf >= {cfg.conf} (saw {', '.join(shown(d) for d in detections[:3])})"
    if cfg.max_objects is not None and len(detections) > cfg.max_objects:
        return f"{len(detections)} objects > max_objects {cfg.max_objects}"
    if cfg.check_layout and (position or size) and not any(agrees(d["box"], position, size) for d in hits):
        best = hits[0]["box"]  # detections come sorted by confidence
        asked = " ".join(w for w in (size, position and f"at {position}") if w)
        return f"{intended} is {size_word(*best[2:])} at {position_word(*best[:2])}, asked for {asked}"
    area = max(d["box"][2] * d["box"][3] for d in hits)
    if area < cfg.min_box_area:
        return f"{intended} box covers {area:.4f} of the image < min_box_area {cfg.min_box_area}"
    if cfg.reject_unexpected:
        unexpected = [d for d in detections if d["name"] not in detector_to_dataset]
        if unexpected:
            return f"unexpected class {shown(unexpected[0])}"
    return ""


def label_lines(detections: list[dict[str, Any]], detector_to_dataset: dict[str, int]) -> list[str]:
    """YOLO label lines (``class cx cy w h``) for the detections of dataset classes."""
    lines = []
    for d in detections:
        class_id = detector_to_dataset.get(d["name"])
        if class_id is not None:
            cx, cy, w, h = (min(max(v, 0.0), 1.0) for v in d["box"])
            lines.append(f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def validate_images(
    detector: LoadedDetector,
    generated: pd.DataFrame,
    cfg: ValidateConfig,
    class_names: list[str],
    labels_dir: Path,
    cache_dir: Path,
    progress: bool = True,
    map_shards: MapShards | None = None,
    shard_size: int = 64,
) -> pd.DataFrame:
    """Accept or reject every generated image and write labels for the accepted.

    Args:
        detector: from :func:`load_detector`.
        generated: the generate stage's table (image_id, class, path, status, reason).
        cfg: thresholds and rules.
        class_names: the dataset's classes, in id order.
        labels_dir: gets ``<image_id>.txt`` for each accepted image (and loses stale ones).
        cache_dir: detection cache shared across runs.
        map_shards, shard_size: how detection is spread over workers (see :func:`detect`).

    Returns:
        ``generated`` plus accepted (bool), reject_reason, confidence (best score of the intended
        class, 0 if none), n_detections, detections (JSON) and label_path.
    """
    detector_to_dataset = resolve_class_map(class_names, detector.names, cfg.class_map)
    ok = generated["status"] == "ok"
    paths = [Path(p) for p in generated.loc[ok, "path"]]
    detections = detect(detector, paths, cfg, cache_dir, progress, map_shards, shard_size)
    by_row = dict(zip(generated.index[ok], detections, strict=True))

    labels_dir.mkdir(parents=True, exist_ok=True)
    out = generated.copy()
    accepted, reasons, confidence, counts, dumps, label_paths = [], [], [], [], [], []
    for index, row in zip(generated.index, generated.to_dict("records"), strict=True):  # not iterrows: half the time
        found = by_row.get(index, [])
        layout = (row.get("position") or "", row.get("size") or "")
        reason = (
            judge(found, row["class"], detector_to_dataset, class_names, cfg, *layout)
            if ok[index]
            else (f"not generated: {row['reason']}")
        )
        hits = [d["conf"] for d in found if detector_to_dataset.get(d["name"]) == class_names.index(row["class"])]
        label = labels_dir / f"{row['image_id']}.txt"
        if reason:
            label.unlink(missing_ok=True)
        else:
            write_text_atomic(label, "\n".join(label_lines(found, detector_to_dataset)) + "\n")
        accepted.append(not reason)
        reasons.append(reason)
        confidence.append(max(hits, default=0.0))
        counts.append(len(found))
        dumps.append(json.dumps(found))
        label_paths.append("" if reason else str(label))
    out["accepted"] = accepted
    out["reject_reason"] = reasons
    out["confidence"] = confidence
    out["n_detections"] = counts
    out["detections"] = dumps
    out["label_path"] = label_paths
    return out


def summarize_validation(table: pd.DataFrame) -> dict[str, float]:
    """Acceptance rate overall and per class, and a 10-bin histogram of intended-class confidence."""
    metrics: dict[str, float] = {
        "validated": float(len(table)),
        "accepted": float(table["accepted"].sum()),
        "acceptance_rate": float(table["accepted"].mean()) if len(table) else 0.0,
    }
    for name, group in table.groupby("class", sort=True):
        metrics[f"acceptance_rate.{name}"] = float(group["accepted"].mean())
    counts, _ = np.histogram(table["confidence"], bins=10, range=(0.0, 1.0))
    for i, count in enumerate(counts):
        metrics[f"confidence_hist.{i / 10:.1f}-{(i + 1) / 10:.1f}"] = float(count)
    return metrics
