"""generate on a tiny real diffusers pipeline: manifest, seeds, resume, degenerate outputs."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import GenerateConfig
from tasks.generation import (
    degenerate_reason,
    generate_images,
    hash_model_dir,
    image_id,
    load_pipeline,
    resolve_model_dir,
)


def prompt_table(n: int, seed0: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "class": ["cat"] * n,
            "prompt": [f"a photo of a cat {i % 3}" for i in range(n)],
            "negative_prompt": [""] * n,
            "seed": [seed0 + i for i in range(n)],
        }
    )


@pytest.fixture
def cfg(tiny_models: dict[str, Path]) -> GenerateConfig:
    return GenerateConfig(model=str(tiny_models["generator"]), num_inference_steps=2, height=32, width=32, batch_size=3)


class CountingPipe:
    """Wraps a pipeline to count the images it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def __call__(self, **kwargs):
        self.images += len(kwargs["prompt"])
        return self.pipe(**kwargs)


def test_one_manifest_row_and_one_png_per_prompt(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg)
    table = generate_images(loaded, prompt_table(5), cfg, tmp_path, progress=False)

    assert len(table) == 5 and table["image_id"].is_unique
    assert (table["status"] == "ok").all()
    for row in table.itertuples():
        with Image.open(row.path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
        assert json.loads((tmp_path / f"{row.image_id}.json").read_text())["file_sha256"] == row.file_sha256
    assert set(table["model_hash"]) == {hash_model_dir(Path(cfg.model))}
    assert set(table["scheduler"]) == {"DDIMScheduler"}
    assert (table["seconds"] > 0).all()


def test_same_seed_same_image_whatever_the_batch(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg)
    batched = generate_images(loaded, prompt_table(3), cfg, tmp_path / "a", progress=False)
    single_cfg = cfg.model_copy(update={"batch_size": 1})
    single = generate_images(loaded, prompt_table(3), single_cfg, tmp_path / "b", progress=False)
    for a, b in zip(batched["path"], single["path"], strict=True):
        pixels_a = np.asarray(Image.open(a), dtype=int)
        pixels_b = np.asarray(Image.open(b), dtype=int)
        assert np.abs(pixels_a - pixels_b).max() <= 2  # batched convolutions may round differently
    other = generate_images(loaded, prompt_table(3, seed0=100), cfg, tmp_path / "c", progress=False)
    assert not np.array_equal(np.asarray(Image.open(batched["path"][0])), np.asarray(Image.open(other["path"][0])))


def test_rerun_skips_finished_images_and_redoes_broken_ones(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg)
    first = generate_images(loaded, prompt_table(4), cfg, tmp_path, progress=False)

    counting = CountingPipe(loaded.pipe)
    resumed = replace(loaded, pipe=counting)
    again = generate_images(resumed, prompt_table(4), cfg, tmp_path, progress=False)
    assert counting.images == 0
    pd.testing.assert_frame_equal(first, again)

    Path(first["path"][1]).write_bytes(b"truncated")  # a damaged file is regenerated, not trusted
    (tmp_path / f"{first['image_id'][2]}.json").unlink()  # a crash before the record: redone too
    grown = generate_images(resumed, prompt_table(6), cfg, tmp_path, progress=False)
    assert counting.images == 2 + 2
    assert grown["file_sha256"][1] == first["file_sha256"][1]


def test_image_id_depends_on_what_determines_the_pixels(cfg: GenerateConfig) -> None:
    loaded = load_pipeline(cfg)
    row = prompt_table(1).iloc[0].to_dict()
    base = image_id(row, loaded, cfg)
    assert image_id(row, loaded, cfg) == base
    assert image_id({**row, "seed": 7}, loaded, cfg) != base
    assert image_id(row, loaded, cfg.model_copy(update={"guidance_scale": 9.0})) != base
    assert image_id(row, loaded, cfg.model_copy(update={"batch_size": 1})) == base  # batching is not content


def test_degenerate_outputs_are_rejected_with_a_reason(cfg: GenerateConfig, tmp_path: Path) -> None:
    assert "NaN" in degenerate_reason(np.full((4, 4, 3), np.nan))
    assert "constant image" in degenerate_reason(np.full((4, 4, 3), 0.5))
    assert degenerate_reason(np.random.default_rng(0).random((4, 4, 3))) is None

    class NanPipe:
        def __call__(self, **kwargs):
            return type("Out", (), {"images": np.full((len(kwargs["prompt"]), 32, 32, 3), np.nan)})()

    loaded = load_pipeline(cfg)
    broken = replace(loaded, pipe=NanPipe())
    table = generate_images(broken, prompt_table(2), cfg, tmp_path, progress=False)
    assert (table["status"] == "rejected").all() and (table["path"] == "").all()
    assert table["reason"].str.contains("non-finite").all()
    assert not list(tmp_path.glob("*.png"))


def test_scheduler_override_and_bad_model_paths(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg.model_copy(update={"scheduler": "EulerDiscreteScheduler"}))
    assert loaded.scheduler == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="generate.scheduler: 'NoSuchScheduler'"):
        load_pipeline(cfg.model_copy(update={"scheduler": "NoSuchScheduler"}))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline"):
        resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no hub snapshot"):
        resolve_model_dir("someone/not-cached-model")  # offline: fails at once, names the id


class FlakyPipe(CountingPipe):
    """Fails the calls whose numbers (1-based) are in ``failing``, like a transient device error."""

    def __init__(self, pipe, failing: set[int]):
        super().__init__(pipe)
        self.calls, self.failing = 0, failing

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError(f"injected fault in call {self.calls}")
        return super().__call__(**kwargs)


def test_a_failing_batch_is_retried_with_backoff(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg)
    loaded = replace(loaded, pipe=FlakyPipe(loaded.pipe, failing={2, 3}))  # batch 2 fails twice, then works
    cfg = cfg.model_copy(update={"retries": 2, "retry_backoff_s": 0.01})
    table = generate_images(loaded, prompt_table(7), cfg, tmp_path, progress=False)
    assert (table["status"] == "ok").all() and loaded.pipe.calls == 5  # 3 batches + 2 retries


def test_a_batch_that_keeps_failing_names_itself_and_finished_batches_are_reused(
    cfg: GenerateConfig, tmp_path: Path
) -> None:
    from tasks.retry import ShardFailed

    base = load_pipeline(cfg)
    loaded = replace(base, pipe=FlakyPipe(base.pipe, failing={2, 3}))
    cfg = cfg.model_copy(update={"retries": 1, "retry_backoff_s": 0.0})
    with pytest.raises(ShardFailed, match=r"generate batch 2/3 \(images \w+\.\.\w+\): failed 2 times.*injected"):
        generate_images(loaded, prompt_table(7), cfg, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.png"))) == 3  # batch 1 is kept
    loaded = replace(base, pipe=CountingPipe(base.pipe))
    table = generate_images(loaded, prompt_table(7), cfg, tmp_path, progress=False)
    assert (table["status"] == "ok").all() and loaded.pipe.images == 4  # only the 4 missing images are made
