"""The class guide: it learns classes from captions, its step raises the prompted class, and generation
uses it through the generate stage's code, with ids that tell guided images apart."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from tasks.class_guide import caption_targets, chain, guidance_step, train_class_guide
from tasks.config import GUIDE_DIR, GenerateConfig
from tasks.generation import generate_images, hash_model_dir, load_pipeline
from tasks.train_generator import train_generator, train_guide_for
from tests.tasks.test_train_generator import TINY, captioned

CLASSES = ["circle", "square"]
GUIDE = TINY.model_copy(update={"guide_steps": 200, "guide_batch": 32, "guide_lr": 3e-3, "guide_widths": [8, 16]})


def test_caption_targets_are_whole_words() -> None:
    captions = ["a red square and a blue circle, fog", "a starfish, night", "a green traffic light, plain"]
    targets = caption_targets(captions, ["circle", "square", "star", "traffic light"])
    assert targets.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


def toy_latents(n: int) -> tuple[torch.Tensor, list[str]]:
    """Latents whose first channel is bright where a circle is named and the second where a square is."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 8, 8, generator=g) * 0.5
    captions = []
    for i in range(n):
        names = [c for c, bit in zip(CLASSES, (i % 2, (i // 2) % 2), strict=True) if bit] or ["cross"]
        for name in names[:2]:
            if name in CLASSES:
                latents[i, CLASSES.index(name), 2:6, 2:6] += 2.0
        captions.append(" and ".join(f"a red {name}" for name in names) + ", fog")
    return latents, captions


@pytest.fixture(scope="module")
def trained():
    latents, captions = toy_latents(400)
    return train_class_guide(latents, captions, CLASSES, DDPMScheduler(), GUIDE, progress=False)


def test_the_guide_learns_which_classes_the_captions_name(trained) -> None:
    assert trained.model.config.classes == CLASSES
    assert trained.accuracy[0] > 0.9  # held-out toy latents, unnoised
    assert trained.accuracy[900] < trained.accuracy[0]  # noise hides the class


def test_a_class_no_caption_names_is_an_error() -> None:
    latents, captions = toy_latents(40)
    with pytest.raises(ValueError, match=r"no caption names \['star'\]"):
        train_class_guide(latents, captions, [*CLASSES, "star"], DDPMScheduler(), GUIDE, progress=False)


def test_the_step_raises_the_prompted_class(trained) -> None:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    pipe = SimpleNamespace(scheduler=scheduler)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    wanted = [0, 1, 0, 1]
    i = 5
    following = torch.full((4,), int(scheduler.timesteps[i + 1]))
    before = trained.model(latents, following).gather(1, torch.tensor(wanted)[:, None])
    moved = guidance_step(trained.model, wanted, scale=20.0)(pipe, i, scheduler.timesteps[i], {"latents": latents})
    after = trained.model(moved["latents"], following).gather(1, torch.tensor(wanted)[:, None])
    assert (after > before).all()
    # Nothing moves at scale 0, before the start or after the last step; chained callbacks run in order.
    still = guidance_step(trained.model, wanted, scale=0.0)(pipe, i, scheduler.timesteps[i], {"latents": latents})
    assert torch.equal(still["latents"], latents)
    early = guidance_step(trained.model, wanted, 20.0, start=0.7)(pipe, i, scheduler.timesteps[i], {"latents": latents})
    assert torch.equal(early["latents"], latents)  # step 5 of 10 comes before the last 30%
    last = len(scheduler.timesteps) - 1
    end = guidance_step(trained.model, wanted, 20.0)(pipe, last, scheduler.timesteps[last], {"latents": latents})
    assert torch.equal(end["latents"], latents)
    seen = []
    both = chain(lambda p, i, t, k: seen.append(1) or k, None, lambda p, i, t, k: seen.append(2) or k)
    both(pipe, 0, 0, {})
    assert seen == [1, 2] and chain(None) is None


def guided_prompts() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": ["a red circle, fog", "a blue square, night"],
            "negative_prompt": ["", ""],
            "seed": [1, 2],
            "class": ["circle", "square"],
        }  # fmt: skip
    )


def test_generation_guided_by_a_guide_trained_with_the_generator(tmp_path: Path) -> None:
    images, captions = captioned(8)
    captions = [c.replace("circle", "square") if i % 2 else c for i, c in enumerate(captions)]
    cfg = TINY.model_copy(update={"guide_steps": 3, "guide_batch": 4, "guide_widths": [8, 16]})
    out = tmp_path / "generator"
    result = train_generator(images, captions, cfg, out, progress=False, classes=CLASSES)
    assert result.guide is not None and (out / GUIDE_DIR / "config.json").is_file()
    # The same guide again for the saved pipeline: train-guide adds to a pipeline what train-generator would.
    trained_with = (out / GUIDE_DIR / "diffusion_pytorch_model.safetensors").read_bytes()
    unet_hash = hash_model_dir(out)
    train_guide_for(out, images, captions, CLASSES, cfg, progress=False)
    assert (out / GUIDE_DIR / "diffusion_pytorch_model.safetensors").read_bytes() == trained_with
    assert hash_model_dir(out) == unet_hash  # the guide is not part of the pipeline's hash

    plain = GenerateConfig(model=str(out), num_inference_steps=3, guidance_scale=2.0)
    guided = plain.model_copy(update={"class_guidance": 50.0})
    unguided = generate_images(load_pipeline(plain), guided_prompts(), plain, tmp_path / "images", progress=False)
    steered = generate_images(load_pipeline(guided), guided_prompts(), guided, tmp_path / "images", progress=False)
    assert (steered["status"] == "ok").all() and (steered["class_guidance"] == 50.0).all()
    assert set(steered["image_id"]).isdisjoint(unguided["image_id"])
    pixels = [[np.asarray(Image.open(path)) for path in table["path"]] for table in (unguided, steered)]
    assert any(not np.array_equal(a, b) for a, b in zip(*pixels, strict=True))


def test_guidance_without_a_guide_or_for_an_unknown_class_fails_early(tmp_path: Path) -> None:
    images, captions = captioned(4)
    out = tmp_path / "generator"
    train_generator(images, captions, TINY, out, progress=False)
    cfg = GenerateConfig(model=str(out), num_inference_steps=2, class_guidance=10.0)
    with pytest.raises(FileNotFoundError, match=r"generate.class_guidance: 10.0 needs a class guide at .*class_guide"):
        load_pipeline(cfg)
    with pytest.raises(ValueError, match="guide_steps is set but no class names"):
        train_generator(images, captions, TINY.model_copy(update={"guide_steps": 2}), out, progress=False)
    train_guide_for(out, images, captions, ["circle"], TINY.model_copy(update={"guide_steps": 2}), progress=False)
    loaded = load_pipeline(cfg)
    with pytest.raises(ValueError, match=r"knows \['circle'\], not the prompts' \['square'\]"):
        generate_images(loaded, guided_prompts(), cfg, tmp_path / "images", progress=False)
    assert not list((tmp_path / "images").glob("*.png"))  # refused before any image
    euler = cfg.model_copy(update={"scheduler": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="class_guidance needs a sampler on unit-variance latents"):
        load_pipeline(euler)


def test_an_experiments_fingerprint_counts_the_guide_only_when_it_steers(tmp_path: Path) -> None:
    from tasks.config import ExperimentConfig, FinetuneConfig, ValidateConfig
    from tasks.experiment import fingerprint

    model = tmp_path / "generator"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    (model / "model_index.json").write_text("{}")
    weights = tmp_path / "a.pt"
    weights.write_bytes(b"weights")
    ft, validate = FinetuneConfig(model=str(weights)), ValidateConfig(model=str(weights))
    plain = GenerateConfig(model=str(model))
    steered = plain.model_copy(update={"class_guidance": 100.0})

    def both() -> tuple[str, str]:
        return tuple(fingerprint(ExperimentConfig(), ft, g, validate) for g in (plain, steered))

    with pytest.raises(FileNotFoundError, match="needs a class guide"):
        both()
    (model / GUIDE_DIR).mkdir()
    (model / GUIDE_DIR / "config.json").write_text('{"classes": ["circle"]}')
    first = both()
    assert first[0] != first[1]
    (model / GUIDE_DIR / "config.json").write_text('{"classes": ["circle", "square"]}')
    second = both()
    assert second[0] == first[0] and second[1] != first[1]  # a new guide re-runs only the guided trials
