"""The tiny random-weight models: they save, reload offline, run, and depend only on their seed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.tiny_models import build_tiny_detector, build_tiny_pipeline
from tasks.tokenizer import UNK_TOKEN

VOCABULARY = ["a", "photo", "of", "dog", "cat"]
CLASS_NAMES = ["circle", "square"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", vocabulary=VOCABULARY, seed=0)


def _load(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompts: list[str], **kwargs) -> list[np.ndarray]:
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=2, guidance_scale=4.0, generator=generators, **kwargs)
    return [np.asarray(image) for image in out.images]


def test_pipeline_reloads_offline_and_generates_requested_size(pipeline_dir: Path) -> None:
    pipe = _load(pipeline_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe(["a photo of a dog", "a cat"], height=32, width=32, num_inference_steps=2, guidance_scale=4.0)
    assert [image.size for image in out.images] == [(32, 32), (32, 32)]
    assert all(isinstance(image, Image.Image) for image in out.images)
    # Default size comes from the saved configs: sample_size 64.
    pixels = _generate(pipe, ["a photo of a dog"])[0]
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 5, "a constant image means a broken decoder or NaNs clipped away"


def test_sample_size_sets_default_image_size(tmp_path: Path) -> None:
    pipe = _load(build_tiny_pipeline(tmp_path / "pipe", vocabulary=VOCABULARY, sample_size=32))
    assert _generate(pipe, ["a dog"])[0].shape == (32, 32, 3)


def test_saved_tokenizer_knows_vocabulary_and_maps_unseen_characters_to_unk(pipeline_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer", local_files_only=True)
    assert tokenizer.unk_token == UNK_TOKEN
    assert tokenizer.model_max_length == 77
    known = tokenizer("dog").input_ids
    assert known == [tokenizer.bos_token_id, tokenizer.get_vocab()["dog</w>"], tokenizer.eos_token_id]
    # "xyz": none of its letters occur in VOCABULARY, so BPE has no piece for any of them.
    unknown = tokenizer("xyz").input_ids[1:-1]
    assert unknown and set(unknown) == {tokenizer.unk_token_id}
    # The pipeline's own tokenizer is the same one.
    assert _load(pipeline_dir).tokenizer("a photo of a dog").input_ids == tokenizer("a photo of a dog").input_ids


def test_pipeline_weights_depend_only_on_seed(tmp_path: Path, pipeline_dir: Path) -> None:
    same = build_tiny_pipeline(tmp_path / "same", vocabulary=VOCABULARY, seed=0)
    other = build_tiny_pipeline(tmp_path / "other", vocabulary=VOCABULARY, seed=1)
    weights = sorted(p.relative_to(pipeline_dir) for p in pipeline_dir.rglob("*.safetensors"))
    assert len(weights) == 3
    for rel in weights:
        assert (same / rel).read_bytes() == (pipeline_dir / rel).read_bytes()
        assert (other / rel).read_bytes() != (pipeline_dir / rel).read_bytes()
    prompts = ["a photo of a dog", "a cat"]
    reference = _generate(_load(pipeline_dir), prompts)
    assert all(np.array_equal(a, b) for a, b in zip(_generate(_load(same), prompts), reference, strict=True))
    assert not np.array_equal(_generate(_load(other), prompts)[0], reference[0])


def test_pipeline_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(tmp_path / "pipe", vocabulary=VOCABULARY)
    assert torch.equal(torch.rand(3), expected)


def test_pipeline_rebuild_replaces_a_pipeline_but_refuses_other_folders(tmp_path: Path) -> None:
    target = build_tiny_pipeline(tmp_path / "pipe", vocabulary=VOCABULARY, seed=0)
    build_tiny_pipeline(target, vocabulary=VOCABULARY, seed=1)
    assert not (tmp_path / "pipe.tmp").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes"):
        build_tiny_pipeline(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="sample_size"):
        build_tiny_pipeline(tmp_path / "bad", sample_size=60)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory: pytest.TempPathFactory, yolo_env: Path) -> Path:
    return build_tiny_detector(tmp_path_factory.mktemp("det") / "tiny.pt", CLASS_NAMES, seed=0)


def test_detector_reloads_with_names_and_predicts(detector_path: Path) -> None:
    from ultralytics import YOLO

    model = YOLO(detector_path)
    assert model.task == "detect"
    assert model.names == {0: "circle", 1: "square"}
    assert model.model.yaml["nc"] == 2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (result,) = model.predict(image, imgsz=64, conf=0.001, verbose=False)
    assert len(result.boxes) > 0
    assert result.names == {0: "circle", 1: "square"}


def test_random_detector_scores_every_image_at_the_head_prior(detector_path: Path) -> None:
    # validate.conf in the smoke profile must sit below this bound, or nothing is ever accepted.
    from ultralytics import YOLO

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    images.append(Image.new("RGB", (64, 64), (128, 128, 128)))
    results = YOLO(detector_path).predict(images, imgsz=64, conf=0.001, verbose=False)
    prior = 5 / len(CLASS_NAMES) / (640 / 32) ** 2  # Detect.bias_init at the coarsest stride
    for result in results:
        assert float(result.boxes.conf.max()) == pytest.approx(prior, rel=0.02)
        assert set(result.boxes.cls.tolist()) == {0.0}
    assert math.isclose(float(results[0].boxes.conf.sum()), float(results[2].boxes.conf.sum()), rel_tol=1e-3)


def test_detector_weights_depend_only_on_seed(tmp_path: Path, detector_path: Path) -> None:
    from ultralytics import YOLO

    reference = YOLO(detector_path).model.state_dict()
    same = YOLO(build_tiny_detector(tmp_path / "same.pt", CLASS_NAMES, seed=0)).model.state_dict()
    other = YOLO(build_tiny_detector(tmp_path / "other.pt", CLASS_NAMES, seed=1)).model.state_dict()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)
    with pytest.raises(ValueError, match="unique"):
        build_tiny_detector(tmp_path / "dup.pt", ["a", "a"])


@pytest.mark.slow
def test_detector_trains_and_validates(tmp_path: Path, detector_path: Path) -> None:
    from ultralytics import YOLO

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.png")
            (tmp_path / "labels" / split / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.4 0.4\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {CLASS_NAMES}\n")
    run = {"imgsz": 64, "batch": 4, "device": "cpu", "workers": 0, "plots": False, "project": str(tmp_path)}

    model = YOLO(detector_path)
    model.train(data=str(data), epochs=1, name="train", verbose=False, **run)
    assert (tmp_path / "train" / "weights" / "last.pt").is_file()
    assert model.names == {0: "circle", 1: "square"}
    metrics = YOLO(detector_path).val(data=str(data), name="val", verbose=False, **run)
    assert 0.0 <= metrics.box.map50 <= 1.0
