"""validate on a tiny real YOLO26n (random weights: it scores every image alike, class 0 only)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import Standardise, ValidateConfig
from tasks.validation import (
    _batch_file,
    _settings_key,
    load_detector,
    read_cached,
    reference_stats,
    standardised,
    validate_images,
)

CLASSES = ["circle", "square"]


@pytest.fixture
def generated(tmp_path: Path) -> pd.DataFrame:
    rows = []
    for i in range(4):
        path = tmp_path / "images" / f"id{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(path)
        rows.append({"image_id": f"id{i}", "class": CLASSES[i % 2], "path": str(path), "status": "ok", "reason": ""})
    rows.append({"image_id": "id9", "class": "circle", "path": "", "status": "rejected", "reason": "constant image"})
    return pd.DataFrame(rows)


def test_accepts_intended_class_labels_it_and_caches_detections(
    tiny_models: dict[str, Path], generated: pd.DataFrame, tmp_path: Path
) -> None:
    detector = load_detector(str(tiny_models["validator"]))
    cfg = ValidateConfig(model="x", conf=0.005, imgsz=64, batch=2)
    table = validate_images(detector, generated, cfg, CLASSES, tmp_path / "labels", tmp_path / "cache", progress=False)

    assert list(table["accepted"]) == [True, False, True, False, False]
    assert table["reject_reason"][1].startswith("no square at conf >= 0.005")
    assert table["reject_reason"][4] == "not generated: constant image"
    for row in table[table["accepted"]].itertuples():
        lines = Path(row.label_path).read_text().splitlines()
        assert lines and all(line.split()[0] == "0" for line in lines)
    assert sorted(p.stem for p in (tmp_path / "labels").iterdir()) == ["id0", "id2"]

    def refuse(*args, **kwargs):
        raise AssertionError("detections should come from the cache")

    detector.model.predict = refuse
    again = validate_images(
        detector,
        generated,
        cfg.model_copy(update={"max_objects": 1}),
        CLASSES,
        tmp_path / "labels",
        tmp_path / "cache",
        progress=False,
    )
    assert not again["accepted"].any()  # new rules, same cached detections
    assert not list((tmp_path / "labels").iterdir()), "labels of images no longer accepted are removed"


def test_unmatched_class_fails_before_inference(
    tiny_models: dict[str, Path], generated: pd.DataFrame, tmp_path: Path
) -> None:
    detector = load_detector(str(tiny_models["validator"]))
    detector.model.predict = None  # would raise TypeError if called
    with pytest.raises(ValueError, match="class 'square' maps to \\['box'\\]"):
        validate_images(
            detector,
            generated,
            ValidateConfig(model="x", class_map={"square": ["box"]}),
            CLASSES,
            tmp_path / "labels",
            tmp_path / "cache",
        )


def test_bad_detector_files_are_named(tmp_path: Path, yolo_env: Path) -> None:
    with pytest.raises(FileNotFoundError, match="validate.model: .*missing.pt: no such file"):
        load_detector(str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt: not a loadable ultralytics model"):
        load_detector(str(corrupt))


def test_a_failing_detector_batch_is_retried_then_named_and_finished_batches_stay_cached(
    tiny_models: dict[str, Path], generated: pd.DataFrame, tmp_path: Path
) -> None:
    from tasks.retry import ShardFailed

    detector = load_detector(str(tiny_models["validator"]))
    real_predict, calls = detector.model.predict, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in failing:
            raise OSError(f"injected fault in call {len(calls)}")
        return real_predict(*args, **kwargs)

    detector.model.predict = flaky
    cfg = ValidateConfig(model="x", conf=0.005, imgsz=64, batch=2, retries=1, retry_backoff_s=0.0)
    failing = {2, 3}  # batch 2 fails on both of its attempts
    with pytest.raises(ShardFailed, match=r"validate batch 2/2 \(id2.png..id3.png\): failed 2 times.*injected"):
        validate_images(detector, generated, cfg, CLASSES, tmp_path / "labels", tmp_path / "cache", progress=False)
    key = _settings_key(detector, cfg)
    paths = [Path(p) for p in generated["path"][:4]]
    cached = read_cached(tmp_path / "cache", key, paths)
    assert [c is not None for c in cached] == [True, True, False, False]  # batch 1's detections were kept
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [_batch_file(tmp_path / "cache", key, paths[:2]).name]
    calls.clear()
    failing = {1}  # now a single transient fault: the retry absorbs it
    table = validate_images(detector, generated, cfg, CLASSES, tmp_path / "labels", tmp_path / "cache", progress=False)
    assert list(table["accepted"]) == [True, False, True, False, False] and len(calls) == 2  # 1 failed + batch 2


def test_worker_detector_is_loaded_once_per_file_version(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight, the validate stage and in-process shards share one copy; replaced weights load afresh."""
    import os
    import shutil

    from flows.stages import preflight
    from tasks import validation
    from tasks.config import load_params
    from tasks.shards import release_worker_cache
    from tasks.validation import worker_detector

    loads: list[str] = []

    def counting_load(path: str, field: str = "validate.model") -> validation.LoadedDetector:
        loads.append(field)
        return load_detector(path, field)

    monkeypatch.setattr(validation, "load_detector", counting_load)

    weights = tmp_path / "validator.pt"
    shutil.copy(tiny_models["validator"], weights)
    smoke = Path(__file__).resolve().parents[2] / "params.smoke.yaml"
    params = load_params(smoke, {"validate.model": str(weights), "finetune.model": str(weights)})
    release_worker_cache()
    try:
        preflight(params, ("validate", "finetune"))  # finetune.model is the same file: checked once
        first = worker_detector(str(weights), "cpu")
        assert worker_detector(str(weights), "cpu") is first
        release_worker_cache("pipeline")  # the generate stage's end, between preflight and validate
        assert worker_detector(str(weights), "cpu") is first
        assert loads == ["validate.model"]
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file is replaced
        second = worker_detector(str(weights), "cpu")
        assert second is not first and second.model_hash == first.model_hash
        assert len(loads) == 2
    finally:
        release_worker_cache()


def test_a_shard_run_again_reads_its_finished_batches_and_old_per_image_files_still_count(
    tiny_models: dict[str, Path], generated: pd.DataFrame, tmp_path: Path
) -> None:
    """A shard retried after its worker died re-runs no finished batch; a workspace cached with one file
    per image (before 2026-11-30) is still read, and count_cached counts both layouts."""
    from tasks.validation import count_cached, detect, detect_shard

    detector = load_detector(str(tiny_models["validator"]))
    cfg = ValidateConfig(model="x", conf=0.005, imgsz=64, batch=2)
    key, cache = _settings_key(detector, cfg), tmp_path / "cache"
    paths = [Path(p) for p in generated["path"][:4]]
    first = detect_shard(paths, cfg, cache, key, detector.path, detector.model_hash, detector=detector)
    assert len(list(cache.iterdir())) == 2 and count_cached(cache) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("a finished batch was detected again")

    real_predict, detector.model.predict = detector.model.predict, refuse
    assert detect_shard(paths, cfg, cache, key, detector.path, detector.model_hash, detector=detector) == first

    # The old layout: image 0 and 1 as one file each; images 2 and 3 are detected afresh.
    for file in cache.iterdir():
        file.unlink()
    for path, found in zip(paths[:2], first[:2], strict=True):
        (cache / f"{path.stem}.{key}.json").write_text(json.dumps(found))
    predicted: list[str] = []

    def recording(images, **kwargs):
        predicted.extend(images)
        return real_predict(images, **kwargs)

    detector.model.predict = recording
    assert detect(detector, paths, cfg, cache, progress=False) == first
    assert predicted == [str(p) for p in paths[2:]]
    assert count_cached(cache) == 4


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    """Three noisy images of known colour statistics (and a file that is not an image)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "reference" / "images"
    folder.mkdir(parents=True)
    for i in range(3):
        pixels = rng.normal([120, 110, 100], [40, 35, 30], (64, 64, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder.parent / "notes.txt").write_text("not an image")
    return folder.parent


def test_standardise_rescales_each_image_to_the_reference_colours(reference: Path, tmp_path: Path) -> None:
    stats = reference_stats(Standardise(images=reference))
    assert np.allclose(stats[0], [120, 110, 100], atol=2) and np.allclose(stats[1], [40, 35, 30], atol=2)
    night = tmp_path / "night.png"  # a scene at a third of its brightness and contrast
    Image.fromarray((np.asarray(Image.open(reference / "images" / "0.png")) * 0.3).astype(np.uint8)).save(night)
    rgb = standardised(night, stats)[..., ::-1].astype(float)  # ultralytics takes BGR
    assert np.allclose(rgb.mean(axis=(0, 1)), stats[0], atol=2)
    assert np.allclose(rgb.std(axis=(0, 1)), stats[1], atol=2)


def test_detect_with_standardise_shows_the_detector_the_rescaled_images_and_keys_them_apart(
    tiny_models: dict[str, Path], generated: pd.DataFrame, reference: Path, tmp_path: Path
) -> None:
    from tasks.validation import detect

    detector = load_detector(str(tiny_models["validator"]))
    plain = ValidateConfig(model="x", conf=0.005, imgsz=64, batch=2)
    cfg = plain.model_copy(update={"standardise": Standardise(images=reference)})
    seen: list = []
    real_predict = detector.model.predict

    def recording(images, **kwargs):
        seen.extend(images)
        return real_predict(images, **kwargs)

    detector.model.predict = recording
    paths = [Path(p) for p in generated["path"][:4]]
    detect(detector, paths, cfg, tmp_path / "cache", progress=False)
    stats = reference_stats(cfg.standardise)
    assert len(seen) == 4 and all(np.array_equal(a, standardised(p, stats)) for a, p in zip(seen, paths, strict=True))
    # Unstandardised detections keep the cache key they had before the option existed.
    old_key = json.dumps([detector.model_hash, plain.conf, plain.iou, plain.imgsz])
    assert _settings_key(detector, plain) == hashlib.sha256(old_key.encode()).hexdigest()[:12]
    assert _settings_key(detector, cfg, stats) != _settings_key(detector, plain)


def test_standardise_lets_the_shipped_validator_find_objects_in_fog_and_night(tmp_path: Path) -> None:
    """The shipped validator learnt common conditions only; rescaled to common images' colours, fog and
    night scenes of the world show it more of their objects (world images seeded, so the same every run)."""
    from tasks.experiment import box_iou
    from tasks.validation import detect
    from tasks.world import render_scene

    root = Path(__file__).resolve().parents[2]
    detector = load_detector(str(root / "models" / "validator.pt"))
    names = ["circle", "square", "triangle", "star"]
    truth, paths = [], []
    for i in range(32):
        scene = render_scene(np.random.default_rng(i), ("fog", "night")[i % 2])
        paths.append(tmp_path / "scenes" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        scene.image.save(paths[-1])
        truth.append([(names[int(b[0])], list(b[1:])) for b in scene.boxes])
        if i < 16:  # common-condition scenes of other seeds are the reference
            (tmp_path / "common").mkdir(exist_ok=True)
            render_scene(np.random.default_rng(1000 + i), "plain").image.save(tmp_path / "common" / f"{i}.png")
    plain = ValidateConfig(model="x", conf=0.25, imgsz=64, batch=16)

    def found(cfg: ValidateConfig) -> int:
        detections = detect(detector, paths, cfg, tmp_path / "cache", progress=False)
        return sum(
            any(d["name"] == n and box_iou(d["box"], b) >= 0.5 for d in ds)
            for ds, boxes in zip(detections, truth, strict=True)
            for n, b in boxes
        )

    raw = found(plain)
    rescaled = found(plain.model_copy(update={"standardise": Standardise(images=tmp_path / "common")}))
    total = sum(len(t) for t in truth)
    assert rescaled >= raw + total // 10, f"found {raw} of {total} objects as they are, {rescaled} rescaled"
