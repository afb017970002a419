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
    """Wraps a pipeline to count the images it is asked for (and keep the last call's arguments)."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)  # unet, vae, scheduler: what start_latents reads

    def __call__(self, **kwargs):
        self.images += len(kwargs["prompt"])
        self.kwargs = kwargs
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


def test_guidance_until_guides_the_first_steps_on_twice_the_batch(cfg: GenerateConfig, tmp_path: Path) -> None:
    loaded = load_pipeline(cfg)
    batches: list[int] = []
    hook = loaded.pipe.unet.register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
    guided = cfg.model_copy(update={"num_inference_steps": 4, "guidance_scale": 5.0})
    try:
        full = generate_images(loaded, prompt_table(2), guided, tmp_path / "full", progress=False)
        assert batches == [4] * 4  # unconditional + conditional, every step
        batches.clear()
        half_cfg = guided.model_copy(update={"guidance_until": 0.5})
        half = generate_images(loaded, prompt_table(2), half_cfg, tmp_path / "half", progress=False)
        assert batches == [4, 4, 2, 2]  # guided for two steps, then the conditional half only
    finally:
        hook.remove()
    assert not set(full["image_id"]) & set(half["image_id"])  # other pixels, other ids
    assert (half["guidance_until"] == 0.5).all()
    a, b = (np.asarray(Image.open(t["path"].iloc[0]), dtype=int) for t in (full, half))
    assert np.abs(a - b).max() > 0


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


def with_start(cfg: GenerateConfig, spec: dict) -> GenerateConfig:
    return GenerateConfig.model_validate({**cfg.model_dump(), "start_means": spec})


def image_folder(folder: Path, value: int, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 24), (value, value, (value + 60 * i) % 256)).save(folder / f"{i}.png")
    return folder


def test_start_means_shift_only_the_rows_whose_value_has_real_images(cfg: GenerateConfig, tmp_path: Path) -> None:
    import torch

    from tasks.generation import start_latents, start_mean_latents, start_mean_sources

    images = {"fog": str(image_folder(tmp_path / "fog", 230)), "night": str(image_folder(tmp_path / "night", 20))}
    shifted_cfg = with_start(cfg, {"axis": "condition", "images": images})
    prompts = prompt_table(3).assign(condition=["fog", "plain", "night"])
    loaded = load_pipeline(cfg)
    plain = generate_images(loaded, prompts, cfg, tmp_path / "plain", progress=False)
    capturing = CountingPipe(loaded.pipe)
    shifted = generate_images(
        replace(loaded, pipe=capturing), prompts, shifted_cfg, tmp_path / "shifted", progress=False
    )

    # "plain" has no images: same id, same pixels (the noise is drawn as the pipeline draws it).
    assert list(plain["image_id"] == shifted["image_id"]) == [False, True, False]
    pixels = [np.asarray(Image.open(p), dtype=int) for p in (*plain["path"], *shifted["path"])]
    assert np.abs(pixels[1] - pixels[4]).max() <= 2

    # The start is the seed's noise plus the value's mean latent at the first step's signal level.
    means = start_mean_latents(loaded.pipe, start_mean_sources(shifted_cfg), shifted_cfg)
    assert means["fog"].shape == (loaded.pipe.unet.config.in_channels,)
    assert not torch.allclose(means["fog"], means["night"])
    rows = prompts.to_dict("records")

    def generators_for(rows: list[dict]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(r["seed"])) for r in rows]

    start = start_latents(loaded.pipe, rows, generators_for(rows), means, shifted_cfg)
    torch.testing.assert_close(capturing.kwargs["latents"], start)  # what the pipeline started from
    noise = torch.cat([torch.randn(1, *start.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2)])
    scheduler = loaded.pipe.scheduler
    scheduler.set_timesteps(cfg.num_inference_steps)
    signal = scheduler.alphas_cumprod[int(scheduler.timesteps[0])].sqrt()
    assert signal > 0
    torch.testing.assert_close(start[0] - noise[0], (signal * means["fog"])[:, None, None].expand_as(start[0]))
    torch.testing.assert_close(start[1], noise[1])
    torch.testing.assert_close(start[2] - noise[2], (signal * means["night"])[:, None, None].expand_as(start[2]))

    # strength scales the mean; the ids follow it (1.0 keeps the ids above).
    weaker_cfg = with_start(cfg, {"axis": "condition", "images": images, "strength": 0.5})
    weaker = start_latents(loaded.pipe, rows, generators_for(rows), means, weaker_cfg)
    torch.testing.assert_close(weaker[0] - noise[0], (0.5 * signal * means["fog"])[:, None, None].expand_as(start[0]))
    torch.testing.assert_close(weaker[1], noise[1])
    weaker_ids = generate_images(loaded, prompts, weaker_cfg, tmp_path / "weaker", progress=False)["image_id"]
    assert list(weaker_ids == shifted["image_id"]) == [False, True, False]

    # New image bytes are a new start: the ids follow them.
    Image.new("RGB", (40, 24), (0, 0, 0)).save(tmp_path / "fog" / "0.png")
    again = generate_images(loaded, prompts, shifted_cfg, tmp_path / "shifted", progress=False)
    assert list(again["image_id"] == shifted["image_id"]) == [False, True, True]


def test_start_means_from_a_captioned_folder_and_bad_inputs(cfg: GenerateConfig, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tasks.generation import start_mean_sources

    folder = image_folder(tmp_path / "real" / "images", 100, n=3).parent
    captions = pd.DataFrame({"file": [f"images/{i}.png" for i in range(3)], "condition": ["fog", "rain", "fog"]})
    captions.to_parquet(folder / "captions.parquet")
    spec = {"axis": "condition", "images": str(folder), "max_images": 1}
    sources = start_mean_sources(with_start(cfg, spec))
    assert sources == {"fog": [folder / "images/0.png"], "rain": [folder / "images/1.png"]}

    def sources_for(**change) -> dict:
        return start_mean_sources(with_start(cfg, {**spec, **change}))

    with pytest.raises(
        ValueError, match=r"generate.start_means.images: .*captions.parquet has no column \['weather'\]"
    ):
        sources_for(axis="weather")
    with pytest.raises(FileNotFoundError, match=r"generate.start_means.images.fog: .*missing: no such folder"):
        sources_for(images={"fog": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match=r"generate.start_means.images: .*captions.parquet: no such file"):
        sources_for(images=str(tmp_path))
    (folder / "images" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/2.png: listed in .* but missing"):
        sources_for(max_images=None)
    with pytest.raises(ValidationError, match="start_means.images"):
        with_start(cfg, {**spec, "images": {}})
    with pytest.raises(ValueError, match="generate.start_means.axis: 'condition' is not a prompt column"):
        bad = with_start(cfg, {"axis": "condition", "images": {"fog": str(folder / "images")}})
        generate_images(load_pipeline(cfg), prompt_table(1), bad, tmp_path / "out", progress=False)
