"""train-generator for a few steps at a tiny size: the saved pipeline loads through the generate stage."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config import GenerateConfig, TrainGeneratorConfig
from tasks.generation import generate_images, load_pipeline
from tasks.train_generator import draw_batch, load_captioned, train_generator

TINY = TrainGeneratorConfig(
    vae_channels=[8, 16, 16],
    vae_steps=3,
    vae_batch=4,
    unet_channels=[16, 32],
    unet_steps=3,
    unet_batch=4,
    warmup_steps=1,
    text_width=16,
    max_tokens=12,
)


def captioned(n: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    images = (rng.random((n, 64, 64, 3)) * 255).astype(np.uint8)
    return images, [f"a {['red', 'blue'][i % 2]} circle, {['fog', 'night', 'plain'][i % 3]}" for i in range(n)]


def weights(folder: Path, part: str) -> bytes:
    """The saved safetensors of one part (unet, vae, text_encoder) of a pipeline folder."""
    (path,) = (folder / part).glob("*.safetensors")
    return path.read_bytes()


def drawn_size(loaded, cfg: GenerateConfig, out_dir: Path) -> tuple[int, int]:
    """The size of the image a loaded pipeline draws for one prompt through the generate stage's code."""
    prompts = pd.DataFrame({"prompt": ["a red circle, fog"], "negative_prompt": [""], "seed": [1]})
    table = generate_images(loaded, prompts, cfg, out_dir, progress=False)
    with Image.open(table["path"][0]) as image:
        return image.size


def test_trains_saves_and_loads_like_any_pipeline(tmp_path: Path) -> None:
    images, captions = captioned(8)
    steps: list[tuple[str, int]] = []
    result = train_generator(
        images,
        captions,
        TINY,
        tmp_path / "generator",
        progress=False,
        on_step=lambda phase, step, loss: steps.append((phase, step)),
    )
    assert (tmp_path / "generator" / "model_index.json").is_file()
    assert steps == [("vae", 0), ("unet", 0)]
    assert np.isfinite([result.vae_loss, result.unet_loss]).all()
    assert not list(tmp_path.glob(".generator*")), "no staging folder left"

    cfg = GenerateConfig(model=str(tmp_path / "generator"), num_inference_steps=2, batch_size=2)
    loaded = load_pipeline(cfg)
    assert loaded.pipe.tokenizer("a red circle, fog").input_ids[1:5] != [loaded.pipe.tokenizer.unk_token_id] * 4
    assert loaded.pipe.vae.config.scaling_factor > 0 and loaded.pipe.unet.dtype.is_floating_point
    assert drawn_size(loaded, cfg, tmp_path / "images") == (64, 64)


def test_zero_terminal_snr_trains_v_prediction_and_samples_from_the_last_step(tmp_path: Path) -> None:
    images, captions = captioned(6)
    cfg = TINY.model_copy(update={"zero_terminal_snr": True})
    result = train_generator(images, captions, cfg, tmp_path / "generator", progress=False)
    assert np.isfinite(result.unet_loss)
    gen = GenerateConfig(model=str(tmp_path / "generator"), num_inference_steps=4, batch_size=2)
    scheduler = load_pipeline(gen).pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-6)  # no signal left at the end
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == 999  # sampling starts where the schedule keeps no signal


def test_the_unet_learns_v_at_zero_terminal_snr_and_epsilon_otherwise() -> None:
    import torch

    from tasks.train_generator import build_parts, target_and_weight

    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 0])
    zero = build_parts(TINY.model_copy(update={"zero_terminal_snr": True}), ["a"])[-1]
    target, weight = target_and_weight(zero, z0, eps, t, gamma=5.0)
    assert torch.allclose(target[0], -z0[0], atol=1e-5)  # no signal left: v is minus the image
    assert weight[0] == pytest.approx(1.0) and 0 < weight[1] < 0.01  # the last step keeps its weight
    plain = build_parts(TINY, ["a"])[-1]
    target, weight = target_and_weight(plain, z0, eps, t, gamma=5.0)
    assert torch.equal(target, eps)
    velocity = build_parts(TINY.model_copy(update={"v_prediction": True}), ["a"])[-1]
    assert velocity.config.prediction_type == "v_prediction"
    assert float(velocity.alphas_cumprod[-1]) > 1e-3  # the usual schedule: some signal left at the end
    assert torch.allclose(target_and_weight(velocity, z0, eps, t, 5.0)[0], velocity.get_velocity(z0, eps, t))
    assert weight[0] == pytest.approx(1.0) and 0 < weight[1] < 0.01  # min-SNR: easy steps count less


def test_same_seed_same_weights(tmp_path: Path) -> None:
    images, captions = captioned(6)
    train_generator(images, captions, TINY, tmp_path / "a", progress=False)
    train_generator(images, captions, TINY, tmp_path / "b", progress=False)
    for part in ("unet", "vae", "text_encoder"):
        assert weights(tmp_path / "a", part) == weights(tmp_path / "b", part), part


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    images, captions = captioned(4)
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        train_generator(images, captions[:3], TINY, tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="uint8"):
        train_generator(images[:, :32, :32], captions, TINY, tmp_path / "g", progress=False)
    with pytest.raises(FileNotFoundError, match="no captions.parquet"):
        load_captioned(tmp_path)


def test_layout_captions_join_the_vocabulary_and_are_checked(tmp_path: Path) -> None:
    images, captions = captioned(6)
    layout = [c.replace("a ", "a small ", 1).replace(",", " at top left,") for c in captions]
    cfg = TINY.model_copy(update={"layout_caption_share": 0.5, "max_tokens": 12})
    with pytest.raises(ValueError, match="layout_caption_share is 0.5 but the data has no layout captions"):
        train_generator(images, captions, cfg, tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="max_tokens: 8 tokens cannot hold the caption 'a small red circle at top"):
        train_generator(images, captions, cfg.model_copy(update={"max_tokens": 8}), tmp_path / "g", False, None, layout)
    train_generator(images, captions, cfg, tmp_path / "g", progress=False, layout_captions=layout)
    tokenizer = load_pipeline(GenerateConfig(model=str(tmp_path / "g"))).pipe.tokenizer
    ids = tokenizer("a small red circle at top left, fog").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 11  # every layout word is in the vocabulary


def test_the_unets_settings_leave_the_autoencoder_alone(tmp_path: Path) -> None:
    images, captions = captioned(6)
    train_generator(images, captions, TINY, tmp_path / "a", progress=False)
    other = TINY.model_copy(update={"unet_channels": [32, 32], "unet_layers": 2, "text_layers": 1})
    train_generator(images, [c + " and more" for c in captions], other, tmp_path / "b", progress=False)
    # another UNet, text encoder and vocabulary: the same autoencoder
    assert weights(tmp_path / "a", "vae") == weights(tmp_path / "b", "vae")
    assert weights(tmp_path / "a", "unet") != weights(tmp_path / "b", "unet")


def test_the_finest_level_can_attend_to_the_caption(tmp_path: Path) -> None:
    images, captions = captioned(6)
    cfg = TINY.model_copy(update={"unet_plain_levels": 0})
    train_generator(images, captions, cfg, tmp_path / "g", progress=False)
    unet = load_pipeline(GenerateConfig(model=str(tmp_path / "g"))).pipe.unet
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 2
    assert unet.config.up_block_types == ["CrossAttnUpBlock2D"] * 2
    assert hasattr(unet.down_blocks[0], "attentions")  # the 16 x 16 level attends to the text


def test_a_32_pixel_latent_keeps_its_two_finest_levels_plain(tmp_path: Path) -> None:
    images, captions = captioned(6)
    cfg = TINY.model_copy(
        update={"vae_channels": [8, 16], "latent_channels": 4, "unet_channels": [16, 16, 32], "unet_plain_levels": 2}
    )
    train_generator(images, captions, cfg, tmp_path / "g", progress=False)
    gen = GenerateConfig(model=str(tmp_path / "g"), num_inference_steps=2, batch_size=2)
    loaded = load_pipeline(gen)
    unet = loaded.pipe.unet
    assert unet.config.sample_size == 32 and loaded.pipe.vae_scale_factor == 2  # one downsampling: 32 x 32 latents
    assert unet.config.down_block_types == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert drawn_size(loaded, gen, tmp_path / "images") == (64, 64)


def test_a_frozen_text_encoder_keeps_its_seeded_weights(tmp_path: Path) -> None:
    images, captions = captioned(6)
    frozen = TINY.model_copy(update={"train_text_encoder": False})
    train_generator(images, captions, frozen, tmp_path / "short", progress=False)
    train_generator(images, captions, frozen.model_copy(update={"unet_steps": 6}), tmp_path / "long", progress=False)
    train_generator(images, captions, TINY, tmp_path / "trained", progress=False)
    assert weights(tmp_path / "short", "text_encoder") == weights(tmp_path / "long", "text_encoder")
    assert weights(tmp_path / "short", "unet") != weights(tmp_path / "long", "unet")
    assert weights(tmp_path / "short", "text_encoder") != weights(tmp_path / "trained", "text_encoder")


def test_caption_mask_keeps_the_tokens_up_to_the_first_end() -> None:
    import torch

    from tasks.train_generator import caption_mask

    ids = torch.tensor([[0, 5, 7, 1, 1, 1], [0, 5, 7, 8, 9, 1]])  # 1 ends a caption and pads it
    assert caption_mask(ids, eos=1).tolist() == [[True] * 4 + [False] * 2, [True] * 6]


def test_contrastive_pretraining_teaches_the_text_encoder_before_the_unet(tmp_path: Path) -> None:
    images, captions = captioned(8)
    frozen = TINY.model_copy(update={"train_text_encoder": False})
    train_generator(images, captions, frozen, tmp_path / "random", progress=False)
    pretrained = frozen.model_copy(update={"text_pretrain_steps": 4, "text_pretrain_batch": 4})
    train_generator(images, captions, pretrained, tmp_path / "a", progress=False)
    train_generator(images, captions, pretrained, tmp_path / "b", progress=False)
    assert weights(tmp_path / "a", "text_encoder") != weights(tmp_path / "random", "text_encoder")
    assert weights(tmp_path / "a", "text_encoder") == weights(tmp_path / "b", "text_encoder")  # seeded
    assert weights(tmp_path / "a", "vae") == weights(tmp_path / "random", "vae")


def test_an_autoencoder_can_be_reused_and_must_fit(tmp_path: Path) -> None:
    images, captions = captioned(6)
    train_generator(images, captions, TINY, tmp_path / "a", progress=False)
    reuse = TINY.model_copy(update={"vae_from": tmp_path / "a" / "vae", "vae_lr_decay": True, "seed": 1})
    result = train_generator(images, captions, reuse, tmp_path / "b", progress=False)
    assert np.isnan(result.vae_loss)  # no autoencoder step was taken
    assert weights(tmp_path / "a", "vae") == weights(tmp_path / "b", "vae")
    with pytest.raises(
        ValueError, match="vae_from: .* has 8 latent channels, 3 levels and 64 px images; this config wants 4"
    ):
        train_generator(images, captions, reuse.model_copy(update={"latent_channels": 4}), tmp_path / "c", False)
    with pytest.raises(FileNotFoundError, match="vae_from: .*nowhere: no autoencoder here"):
        train_generator(
            images, captions, reuse.model_copy(update={"vae_from": tmp_path / "nowhere"}), tmp_path / "c", False
        )


def test_load_captioned_reads_layout_captions_where_the_world_wrote_them(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    table = pd.DataFrame({"file": ["a.png"], "caption": ["a red circle, fog"]})
    table.to_parquet(tmp_path / "captions.parquet")
    assert load_captioned(tmp_path)[2] is None
    table.assign(layout_caption=["a small red circle at left, fog"]).to_parquet(tmp_path / "captions.parquet")
    images, captions, layout = load_captioned(tmp_path)
    assert images.shape == (1, 64, 64, 3) and captions == ["a red circle, fog"]
    assert layout == ["a small red circle at left, fog"]


def test_batches_weighted_toward_one_object_captions() -> None:
    single = np.array([True] * 10 + [False] * 30)
    batch = draw_batch(np.random.default_rng(0), single, 64, 0.75)
    assert len(batch) == 64 and single[batch].sum() == 48
    uniform = draw_batch(np.random.default_rng(0), single, 400, None)
    assert 60 < single[uniform].sum() < 140  # about a quarter, as in the set
    only_single = draw_batch(np.random.default_rng(0), np.ones(5, bool), 8, 0.75)
    assert len(only_single) == 8 and only_single.max() < 5  # one kind missing: drawn alike, no error


def test_the_autoencoder_can_return_its_weights_average_and_show_each_checkpoint() -> None:
    import torch

    from tasks.train_generator import build_parts, train_autoencoder

    images, _ = captioned(6)
    cfg = TINY.model_copy(update={"vae_steps": 5, "vae_ema_decay": 0.5})

    def trained(cfg, **hooks):
        torch.manual_seed(cfg.seed)
        vae = build_parts(cfg, ["a"])[0]
        vae, loss = train_autoencoder(vae, images, cfg, progress=False, **hooks)
        return torch.nn.utils.parameters_to_vector(vae.parameters()).detach().clone(), loss

    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(step: int, weights: str, vae) -> None:
        assert not vae.training
        seen[step, weights] = torch.nn.utils.parameters_to_vector(vae.parameters()).clone()

    averaged, loss = trained(cfg, on_checkpoint=keep, checkpoint_every=2)
    assert np.isfinite(loss)
    assert sorted(seen) == [(2, "ema"), (2, "last"), (4, "ema"), (4, "last"), (5, "ema"), (5, "last")]
    assert torch.equal(averaged, seen[5, "ema"])  # the run returns the average
    assert not torch.equal(seen[5, "ema"], seen[5, "last"])
    assert torch.equal(trained(cfg)[0], averaged)  # looking at checkpoints leaves training as it was
    last, _ = trained(cfg.model_copy(update={"vae_ema_decay": None}))
    assert torch.equal(last, seen[5, "last"])  # without averaging, the last step's weights


def test_a_run_on_a_reused_autoencoder_trains_the_same_unet_as_the_run_that_made_it(tmp_path: Path) -> None:
    images, captions = captioned(6)
    train_generator(images, captions, TINY, tmp_path / "a", progress=False)
    reuse = TINY.model_copy(update={"vae_from": tmp_path / "a" / "vae"})
    train_generator(images, captions, reuse, tmp_path / "b", progress=False)
    for part in ("unet", "text_encoder", "vae"):
        assert weights(tmp_path / "a", part) == weights(tmp_path / "b", part), part


def test_an_autoencoder_trained_on_its_posterior_mean_saves_a_point_posterior(tmp_path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    images, captions = captioned(6)
    cfg = TINY.model_copy(update={"vae_sample": False})
    result = train_generator(images, captions, cfg, tmp_path / "g", progress=False)
    assert np.isfinite(result.vae_loss)
    vae = AutoencoderKL.from_pretrained(tmp_path / "g" / "vae", torch_dtype=torch.float32, local_files_only=True)
    posterior = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist
    assert float(posterior.std.max()) < 1e-6  # img2img's posterior sample is the mean
    sampled = TINY.model_copy(update={"vae_steps": 3})
    train_generator(images, captions, sampled, tmp_path / "s", progress=False)
    vae = AutoencoderKL.from_pretrained(tmp_path / "s" / "vae", torch_dtype=torch.float32, local_files_only=True)
    assert float(vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist.std.min()) > 1e-3


def test_the_autoencoders_gradient_can_be_clipped() -> None:
    import torch

    from tasks.train_generator import build_parts, train_autoencoder

    images, _ = captioned(6)

    def last_gradient_norm(clip: float | None) -> float:
        cfg = TINY.model_copy(update={"vae_clip_grad": clip})
        torch.manual_seed(cfg.seed)
        vae, loss = train_autoencoder(build_parts(cfg, ["a"])[0], images, cfg, progress=False)
        assert np.isfinite(loss)
        return float(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]).norm())

    free = last_gradient_norm(None)
    assert free > 0.01  # the bound below binds
    assert last_gradient_norm(0.01) == pytest.approx(0.01, rel=1e-3)  # the step saw the clipped gradient
