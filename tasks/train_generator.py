"""train-generator: train the embedded default text-to-image latent diffusion model on this CPU.

Three parts, trained from scratch on captioned images (captions only, no boxes: the analogue of a
web-scale image-text corpus), saved as a standard diffusers ``StableDiffusionPipeline`` folder:

1. an ``AutoencoderKL`` (64x64 RGB <-> 16x16x8 latents: 8 channels, not Stable Diffusion's 4, keep small
   shapes through the round trip), trained first with L1, an edge loss that keeps
   small shapes sharp (the autoencoder is the usual fidelity bottleneck) and a tiny KL term;
2. a CLIP text encoder with a word-level tokenizer built from the captions' vocabulary;
3. a ``UNet2DConditionModel`` trained on precomputed latents with DDPM epsilon prediction, min-SNR-gamma
   weighting, captions dropped at random for classifier-free guidance, an EMA of the weights and,
   optionally, batches weighted toward one-object captions (what the prompts ask for).

The recipe follows the trial in ``shared/research/tiny-ldm-feasibility.md``. Steps, not wall time,
bound each phase, so a seed reproduces the weights on one machine (another CPU's kernels round
differently). Each phase draws its batches and noise from generators of its own, so settings on the
UNet's side (its size, the vocabulary) leave the autoencoder unchanged, and ``vae_from`` (reuse an
autoencoder outright) pointed at a run's autoencoder trains that run's very UNet. Before 2026-11-30 the
phases shared one generator, and autoencoders of the same settings kept 0.62 to 0.80 of objects through
their round trip (docs/generator.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasks.class_guide import GUIDE_DIR, GuideResult, train_class_guide
from tasks.config import TrainGeneratorConfig
from tasks.generation import pixels_to_tensor
from tasks.tokenizer import build_clip_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorResult:
    path: Path
    vae_seconds: float
    unet_seconds: float
    vae_loss: float
    unet_loss: float
    size_bytes: int
    guide: GuideResult | None = None


def load_captioned(folder: Path) -> tuple[np.ndarray, list[str], list[str] | None]:
    """Images, captions and layout captions of a captioned folder (``captions.parquet``).

    The table holds ``file`` and ``caption``, and ``layout_caption`` where the world wrote one (None
    otherwise: folders from before layout captions).

    Raises:
        FileNotFoundError / ValueError: naming the folder or the first unusable image.
    """
    import pandas as pd
    from PIL import Image

    table_path = Path(folder) / "captions.parquet"
    if not table_path.is_file():
        raise FileNotFoundError(f"{folder}: no captions.parquet (run `synthdet world` first)")
    table = pd.read_parquet(table_path)
    images = []
    for file in table["file"]:
        try:
            with Image.open(Path(folder) / file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{Path(folder) / file}: not a readable image ({exc})") from None
    layout = [str(c) for c in table["layout_caption"]] if "layout_caption" in table else None
    return np.stack(images), [str(c) for c in table["caption"]], layout


def _edges(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical finite differences: where shapes' outlines are."""
    return torch.cat([x[..., 1:, :] - x[..., :-1, :], (x[..., :, 1:] - x[..., :, :-1]).transpose(-1, -2)], dim=-2)


def draw_batch(rng: np.random.Generator, single: np.ndarray, size: int, share: float | None) -> np.ndarray:
    """Indices of one UNet batch: ``round(share * size)`` from one-object captions, the rest from the others.

    ``single`` marks the one-object captions. With ``share`` None, or when either kind is missing, every
    caption is drawn alike.
    """
    ones, many = np.flatnonzero(single), np.flatnonzero(~single)
    if share is None or not len(ones) or not len(many):
        return rng.integers(0, len(single), size)
    k = round(share * size)
    return np.concatenate([ones[rng.integers(0, len(ones), k)], many[rng.integers(0, len(many), size - k)]])


def _vocabulary(captions: list[str]) -> list[str]:
    words = {w for caption in captions for w in caption.replace(",", " , ").split()}
    return sorted(words)


def build_parts(cfg: TrainGeneratorConfig, vocabulary: list[str]):
    """The untrained autoencoder, tokenizer, text encoder, UNet and noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = len(cfg.vae_channels)
    vae = AutoencoderKL(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=min(16, min(cfg.vae_channels)),
        mid_block_add_attention=False,
    )
    tokenizer = build_clip_tokenizer(vocabulary, max_length=cfg.max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    plain = cfg.unet_plain_levels  # levels without cross-attention, from the finest
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - plain)
    up = ("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - plain) + ("UpBlock2D",) * plain
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (blocks - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=8,
        norm_num_groups=min(16, min(cfg.unet_channels)),
    )
    zero = cfg.zero_terminal_snr
    noise = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=zero,
        prediction_type="v_prediction" if zero or cfg.v_prediction else "epsilon",
        timestep_spacing="trailing" if zero else "leading",
    )
    return vae, tokenizer, text_encoder, unet, noise


def load_autoencoder(cfg: TrainGeneratorConfig):
    """The ``AutoencoderKL`` at ``cfg.vae_from``, in float32, checked against the UNet's settings.

    Raises:
        FileNotFoundError / ValueError: naming ``train-generator.vae_from``.
    """
    from diffusers import AutoencoderKL

    folder = Path(cfg.vae_from)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"train-generator.vae_from: {folder}: no autoencoder here (no config.json)")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    got = (vae.config.latent_channels, len(vae.config.block_out_channels), vae.config.sample_size)
    want = (cfg.latent_channels, len(cfg.vae_channels), cfg.image_size)
    if got != want:
        raise ValueError(
            f"train-generator.vae_from: {folder} has {got[0]} latent channels, {got[1]} levels and "
            f"{got[2]} px images; this config wants {want[0]}, {want[1]} and {want[2]}"
        )
    return vae


def _tokens(tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids, padded to ``max_tokens``; a longer caption is an error, not silently cut."""
    lengths = [len(ids) for ids in tokenizer(captions).input_ids]
    if max(lengths) > max_tokens:
        longest = captions[int(np.argmax(lengths))]
        raise ValueError(
            f"train-generator.max_tokens: {max_tokens} tokens cannot hold the caption {longest!r} "
            f"({max(lengths)} with start and end); raise it"
        )
    return tokenizer(
        captions, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
    ).input_ids


def target_and_weight(noise, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, gamma: float):
    """What the UNet learns to predict at timesteps ``t`` (per sample) and each sample's loss weight.

    epsilon: the noise, weighted min(SNR, gamma) / SNR (min-SNR-gamma). v: the velocity; v's loss weighs
    the image error by SNR + 1, clamped here at gamma, so the last, zero-SNR step keeps weight 1 and the
    overall brightness is learnt there, from the caption.
    """
    alphas = noise.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    if noise.config.prediction_type == "v_prediction":
        return noise.get_velocity(z0, eps, t), torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return eps, torch.clamp(snr, max=gamma) / snr


def train_autoencoder(
    vae,
    images: np.ndarray,
    cfg: TrainGeneratorConfig,
    progress: bool = True,
    on_step: Callable[[str, int, float], None] | None = None,
    on_checkpoint: Callable[[int, str, object], None] | None = None,
    checkpoint_every: int = 0,
):
    """Train ``vae`` for ``cfg.vae_steps`` steps; return it and the last step's loss.

    L1 plus an edge loss (small shapes stay sharp) on the decoded posterior sample, plus a tiny KL term;
    with ``cfg.vae_sample`` false, on the decoded posterior mean, without one. With ``cfg.vae_ema_decay`` the
    returned weights are an exponential moving average of the steps' weights, not the last step's.
    ``on_checkpoint(step, "last" or "ema", vae)``, a benchmark's hook (``bench.autoencoder_steps``), sees
    the weights every ``checkpoint_every`` steps and after the last step, in eval mode. With
    ``cfg.vae_clip_grad`` each step's gradient is clipped to that norm.

    Its batches and sampling noise come from generators of its own, seeded by ``cfg.seed``, so the result
    depends only on ``vae``'s initial weights and the autoencoder's settings.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    steps = cfg.vae_steps
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, steps) if cfg.vae_lr_decay else None
    ema = EMAModel(vae.parameters(), decay=cfg.vae_ema_decay) if cfg.vae_ema_decay else None
    rng = np.random.default_rng(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed)  # its own: UNet-side settings leave the autoencoder alone

    def checkpoint(step: int) -> None:
        vae.eval()
        with torch.no_grad():
            on_checkpoint(step, "last", vae)
            if ema is not None:
                ema.store(vae.parameters())
                ema.copy_to(vae.parameters())
                on_checkpoint(step, "ema", vae)
                ema.restore(vae.parameters())
        vae.train()

    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc="train vae", disable=not progress):
        x = pixels_to_tensor(images[rng.integers(0, len(images), cfg.vae_batch)])
        posterior = vae.encode(x).latent_dist
        if cfg.vae_sample:
            rec = vae.decode(posterior.sample(generator=noise)).sample
            loss = F.l1_loss(rec, x) + cfg.kl_weight * posterior.kl().mean()
        else:
            rec = vae.decode(posterior.mean).sample
            loss = F.l1_loss(rec, x)
        loss = loss + cfg.edge_weight * F.l1_loss(_edges(rec), _edges(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.vae_clip_grad:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.vae_clip_grad)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.step(vae.parameters())
        if on_step and step % 50 == 0:
            on_step("vae", step, loss.item())
        if on_checkpoint and ((checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == steps):
            checkpoint(step + 1)
    if ema is not None:
        ema.copy_to(vae.parameters())
    if not cfg.vae_sample:
        pin_posterior(vae)
    return vae, loss.item()


def pin_posterior(vae) -> None:
    """Make ``vae``'s posterior a point: its log-variance -30 (std 3e-7) whatever the image.

    An autoencoder trained on its posterior mean never learnt a variance; pipelines that sample the
    posterior (diffusers' img2img) then get the mean, as in training.
    """
    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -30.0


def caption_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """True for each caption's tokens up to and including its first end token (the pad token may equal it)."""
    ends = (ids == eos).cumsum(dim=1)
    return (ends == 0) | ((ids == eos) & (ends == 1))


def pretrain_text_encoder(
    text_encoder,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    cfg: TrainGeneratorConfig,
    eos: int,
    progress: bool = True,
) -> float:
    """Train ``text_encoder`` with CLIP's contrastive objective against the images' latents; return the last loss.

    A small convolutional image encoder on the latents and the text encoder's mean token output are
    trained to match each image with its own caption in a batch of ``cfg.text_pretrain_batch``
    (symmetric cross-entropy over cosine similarities, learned temperature). Images whose captions are
    identical all count as matches. So every caption word must tell images apart, the shape words as
    much as the colours. The image encoder is thrown away afterwards; only the text encoder is kept.
    """
    width = text_encoder.config.hidden_size
    channels = latents.shape[1]
    with torch.random.fork_rng():  # its own initialisation, leaving the caller's random state alone
        torch.manual_seed(cfg.seed + 2)
        image_encoder = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 64, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, width),
        )  # fmt: skip
        text_head = torch.nn.Linear(width, width)
    log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *text_head.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, weight_decay=1e-2)
    rng = np.random.default_rng([cfg.seed, 2])
    text_encoder.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(cfg.text_pretrain_steps), desc="pretrain text encoder", disable=not progress):
        idx = torch.from_numpy(rng.choice(len(latents), size=min(cfg.text_pretrain_batch, len(latents)), replace=False))
        ids = tokens[idx]
        mask = caption_mask(ids, eos).unsqueeze(-1).float()
        hidden = text_encoder(ids)[0]
        text = F.normalize(text_head((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        image = F.normalize(image_encoder(latents[idx]), dim=-1)
        logits = log_scale.exp().clamp(max=100) * image @ text.T
        same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # identical captions all match
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def train_generator(
    images: np.ndarray,
    captions: list[str],
    cfg: TrainGeneratorConfig,
    out_dir: Path,
    progress: bool = True,
    on_step: Callable[[str, int, float], None] | None = None,
    layout_captions: list[str] | None = None,
    classes: Sequence[str] | None = None,
) -> GeneratorResult:
    """Train all three parts (and the class guide, if ``cfg.guide_steps``) and save the pipeline.

    Args:
        images: (N, H, W, 3) uint8 with H = W = ``cfg.image_size``.
        captions: N captions in the prompts' vocabulary.
        cfg: the train_generator section.
        out_dir: replaced by a ``StableDiffusionPipeline`` folder (fp16 safetensors).
        on_step: called with (phase, step, loss) every 50 steps, e.g. to log to MLflow.
        layout_captions: the same N scenes with sizes and places ("a small red circle at top left, fog"),
            shown instead of ``captions`` to a ``cfg.layout_caption_share`` of the UNet's samples.
        classes: the class names the guide tells apart (needed when ``cfg.guide_steps``).

    Raises:
        ValueError: mismatched inputs, layout captions asked for but missing, or a caption longer than
            ``cfg.max_tokens`` tokens (it would be cut silently).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, {cfg.image_size}, {cfg.image_size}, 3) uint8, got {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if cfg.layout_caption_share and layout_captions is None:
        raise ValueError(
            f"train-generator.layout_caption_share is {cfg.layout_caption_share} but the data has no layout "
            "captions (captions.parquet without a layout_caption column: rerun `synthdet world --only captioned`)"
        )
    if layout_captions is not None and len(layout_captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(layout_captions)} layout captions")
    if cfg.guide_steps and not classes:
        raise ValueError("train-generator.guide_steps is set but no class names were given for the class guide")
    layout_captions = layout_captions if cfg.layout_caption_share else None
    torch.set_num_threads(os.cpu_count() or 1)  # importing ultralytics leaves torch on cpu_count - 1 threads
    torch.manual_seed(cfg.seed)
    vae, tokenizer, text_encoder, unet, noise = build_parts(cfg, _vocabulary(captions + (layout_captions or [])))

    # 1. The autoencoder: trained here, or reused.
    began = time.perf_counter()
    if cfg.vae_from is not None:
        vae, vae_loss = load_autoencoder(cfg), float("nan")
    else:
        vae, vae_loss = train_autoencoder(vae, images, cfg, progress, on_step)
    # The UNet learns the latents of the autoencoder as saved (fp16), so a run that reuses this one
    # through vae_from trains the very same UNet.
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        for weight in vae.parameters():
            weight.copy_(weight.half())
    vae_seconds = time.perf_counter() - began

    # Latents once: the posterior mean, scaled to unit variance as Stable Diffusion does.
    latents = posterior_means(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = (latents * scaling).clone()
    tokens, layout_tokens = (_tokens(tokenizer, c, cfg.max_tokens) if c else None for c in (captions, layout_captions))
    empty = tokenizer([""], padding="max_length", max_length=cfg.max_tokens, return_tensors="pt").input_ids
    single = np.array([" and " not in caption for caption in captions])  # the world joins objects with "and"

    # 2 + 3. Text encoder and UNet, together; the text encoder first learns to match captions to images
    # with CLIP's objective when asked.
    began = time.perf_counter()
    if cfg.text_pretrain_steps:
        text_loss = pretrain_text_encoder(text_encoder, latents, tokens, cfg, tokenizer.eos_token_id, progress)
        log.info("text encoder pretrained: contrastive loss %.3f", text_loss)
    unet.to(memory_format=torch.channels_last)  # mkldnn convolutions run 15-25% faster so on this CPU
    text_encoder.requires_grad_(cfg.train_text_encoder)
    params = [*unet.parameters(), *(text_encoder.parameters() if cfg.train_text_encoder else ())]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.unet_steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    rng, draws = np.random.default_rng([cfg.seed, 1]), torch.Generator().manual_seed(cfg.seed + 1)  # its own too
    unet_loss = float("nan")
    for step in tqdm(range(cfg.unet_steps), desc="train unet", disable=not progress):
        idx = torch.from_numpy(draw_batch(rng, single, cfg.unet_batch, cfg.single_object_share))
        z0, ids = latents[idx].contiguous(memory_format=torch.channels_last), tokens[idx].clone()
        if layout_tokens is not None:
            laid_out = torch.rand(len(ids), generator=draws) < cfg.layout_caption_share
            ids[laid_out] = layout_tokens[idx][laid_out]
        ids[torch.rand(len(ids), generator=draws) < cfg.caption_dropout] = empty[0]  # unconditional, for guidance
        eps = torch.randn(z0.shape, generator=draws).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(z0),), generator=draws)
        pred = unet(noise.add_noise(z0, eps, t), t, text_encoder(ids)[0]).sample
        target, weight = target_and_weight(noise, z0, eps, t, cfg.min_snr_gamma)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        unet_loss = loss.item()
        if on_step and step % 50 == 0:
            on_step("unet", step, unet_loss)
    ema.copy_to(params)
    unet.to(memory_format=torch.contiguous_format)
    unet_seconds = time.perf_counter() - began
    guide = train_class_guide(latents, captions, classes, noise, cfg, progress) if cfg.guide_steps else None

    scheduler = DDIMScheduler.from_config(noise.config, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    # fp16 on disk halves the size; loading with dtype=float32 casts back.
    pipe.to(dtype=torch.float16).save_pretrained(staging, safe_serialization=True)
    if guide is not None:
        guide.model.save_pretrained(staging / GUIDE_DIR, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return GeneratorResult(out_dir, vae_seconds, unet_seconds, vae_loss, unet_loss, size, guide)


def posterior_means(vae, images: np.ndarray) -> torch.Tensor:
    """The autoencoder's posterior means of (N, H, W, 3) uint8 images, unscaled, 256 at a time."""
    with torch.inference_mode():
        return torch.cat(
            [vae.encode(pixels_to_tensor(images[i : i + 256])).latent_dist.mean for i in range(0, len(images), 256)]
        )


def train_guide_for(
    pipeline_dir: Path, images: np.ndarray, captions: list[str], classes: Sequence[str], cfg: TrainGeneratorConfig,
    progress: bool = True,
) -> GuideResult:  # fmt: skip
    """Train a class guide for a saved pipeline, on its own autoencoder's latents; save it in the pipeline.

    The guide sees the latents the UNet saw (the posterior mean times the saved scaling factor), so a
    guide trained here equals one that ``train_generator`` trains with the same settings.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    if not cfg.guide_steps:
        raise ValueError("train-generator.guide_steps is 0: give the class guide some training steps")
    torch.set_num_threads(os.cpu_count() or 1)
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae", dtype=torch.float32, local_files_only=True).eval()
    noise = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler", local_files_only=True)
    latents = (posterior_means(vae, images) * vae.config.scaling_factor).clone()
    guide = train_class_guide(latents, captions, classes, noise, cfg, progress)
    staging = pipeline_dir / f".{GUIDE_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    guide.model.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(pipeline_dir / GUIDE_DIR, ignore_errors=True)
    staging.rename(pipeline_dir / GUIDE_DIR)
    return guide
