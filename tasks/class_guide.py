"""Classifier guidance: a small classifier of noisy latents pushes each image toward its prompt's class.

The embedded generator draws colours and conditions but barely hears the class word (docs/generator.md,
"The prompt's shape word barely reaches the image"). Classifier guidance (Dhariwal and Nichol, 2021)
adds the missing signal at sampling time: a classifier that reads a *noisy* latent and its timestep and
says which classes the image shows; after each sampling step the latents move up the gradient of the
log-probability of the prompted class.

The classifier learns from the generator's own training data, captions only: an image's targets are
the class names its caption contains (no boxes). It is saved in the pipeline folder as
``class_guide/`` (diffusers' ``save_pretrained`` layout: ``config.json`` + safetensors), beside the
parts ``StableDiffusionPipeline`` loads, which ignores it.

    guide = train_class_guide(latents, captions, ["circle", "square"], noise, cfg)
    guide.save_pretrained(pipeline_dir / GUIDE_DIR)
    step = guidance_step(LatentClassifier.from_pretrained(pipeline_dir / GUIDE_DIR), [0, 1], scale=100)
    pipe(prompts, callback_on_step_end=step, callback_on_step_end_tensor_inputs=["latents"])
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

from tasks.config import GUIDE_DIR

if TYPE_CHECKING:
    from tasks.config import TrainGeneratorConfig

__all__ = ["GUIDE_DIR", "LatentClassifier", "chain", "check_scheduler", "guidance_step", "train_class_guide"]


def timestep_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of the timesteps ``t`` (batch,), as the UNet embeds them."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    """A residual block whose normalised activations the timestep scales and shifts (FiLM)."""

    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class LatentClassifier(ModelMixin, ConfigMixin):
    """Which of ``classes`` a noisy latent shows: one logit per class (several may be present).

    Two residual blocks per width, halving the resolution between widths, then a global average.
    """

    @register_to_config
    def __init__(
        self,
        classes: Sequence[str] = ("circle", "square", "triangle", "star"),
        in_channels: int = 8,
        widths: Sequence[int] = (32, 64, 128),
        time_dim: int = 128,
    ):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(64, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks, downs, channels = [], [], widths[0]
        for level, width in enumerate(widths):
            blocks.append(nn.ModuleList([_Block(channels, width, time_dim), _Block(width, width, time_dim)]))
            channels = width
            last = level == len(widths) - 1
            downs.append(nn.Identity() if last else nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.norm_out, self.head = nn.GroupNorm(8, channels), nn.Linear(channels, len(classes))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_features(timesteps))
        h = self.conv_in(latents)
        for pair, down in zip(self.blocks, self.downs, strict=True):
            for block in pair:
                h = block(h, emb)
            h = down(h)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


def caption_targets(captions: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    """(N, classes) float targets: 1 where the caption names the class as a whole word (or words)."""
    patterns = [re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE) for name in classes]
    return torch.tensor([[float(bool(p.search(caption))) for p in patterns] for caption in captions])


@dataclass(frozen=True)
class GuideResult:
    """A trained guide, its last loss, its held-out accuracy and its training time."""

    model: LatentClassifier
    loss: float
    accuracy: dict[int, float]
    seconds: float


def train_class_guide(
    latents: torch.Tensor,
    captions: Sequence[str],
    classes: Sequence[str],
    noise: Any,
    cfg: TrainGeneratorConfig,
    progress: bool = True,
) -> GuideResult:
    """Train a :class:`LatentClassifier` on ``latents`` (the UNet's scaled latents) noised by ``noise``.

    Each step noises a batch at random timesteps, as the UNet is trained, and mirrors half of the
    batches (a mirrored shape keeps its class). The accuracy is the share of correct class
    decisions on the first 5% of the latents (at most 1,000), noised to timesteps 0, 500 and 900;
    the model is trained on the rest.

    Raises:
        ValueError: mismatched inputs, or a class no caption names (it could never be learnt).
    """
    if len(captions) != len(latents):
        raise ValueError(f"{len(latents)} latents but {len(captions)} captions")
    targets = caption_targets(captions, classes)
    unnamed = [name for name, count in zip(classes, targets.sum(0).tolist(), strict=True) if not count]
    if unnamed:
        raise ValueError(f"class guide: no caption names {unnamed}; the classes are {list(classes)}")
    held = min(1000, len(latents) // 20)
    train_z, train_y = latents[held:], targets[held:]
    torch.manual_seed(cfg.seed + 2)
    model = LatentClassifier(classes=list(classes), in_channels=latents.shape[1], widths=list(cfg.guide_widths))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.guide_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.guide_lr, total_steps=cfg.guide_steps, pct_start=0.05)
    draws = torch.Generator().manual_seed(cfg.seed + 2)
    began, loss = time.perf_counter(), torch.tensor(float("nan"))
    model.train()
    for _ in tqdm(range(cfg.guide_steps), desc="train class guide", disable=not progress):
        idx = torch.randint(0, len(train_z), (cfg.guide_batch,), generator=draws)
        z0 = train_z[idx]
        if torch.rand(1, generator=draws) < 0.5:
            z0 = z0.flip(3)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(z0),), generator=draws)
        noisy = noise.add_noise(z0, torch.randn(z0.shape, generator=draws), t)
        loss = F.binary_cross_entropy_with_logits(model(noisy, t), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    accuracy = {}
    if held:
        with torch.no_grad():
            for step in (0, 500, 900):
                t = torch.full((held,), step)
                noisy = noise.add_noise(latents[:held], torch.randn(latents[:held].shape, generator=draws), t)
                right = (model(noisy, t) > 0) == (targets[:held] > 0.5)
                accuracy[step] = round(float(right.float().mean()), 4)
    return GuideResult(model, loss.item(), accuracy, time.perf_counter() - began)


def guidance_step(
    guide: LatentClassifier, class_ids: Sequence[int], scale: float, start: float = 0.0
) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end`` that moves each image's latents toward its class.

    After the sampler steps from timestep t to the next one, t', the latents x' move by
    ``scale * (1 - alpha_bar(t')) * grad log p(class | x', t')``: the classifier's score scaled by the
    noise variance left, as classifier guidance shifts the posterior mean. Nothing moves after the
    last step, nor before the first ``start`` share of the steps. ``class_ids`` holds one index into
    ``guide.config.classes`` per image of the batch.

    The pipeline's scheduler must keep latents at unit variance (DDIM, DDPM, DPM-Solver and the like:
    ``init_noise_sigma == 1``), as the guide was trained on them; :func:`check_scheduler` says so early.
    """
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)[:, None]

    def callback(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        timesteps = pipe.scheduler.timesteps
        if scale == 0 or i + 1 >= len(timesteps) or i < start * len(timesteps):
            return tensors
        following = int(timesteps[i + 1])
        left = 1.0 - float(pipe.scheduler.alphas_cumprod[following])
        latents = tensors["latents"]
        with torch.inference_mode(False), torch.enable_grad():  # the pipeline samples without autograd
            x = latents.detach().clone().to(guide.dtype).requires_grad_(True)
            logits = guide(x, torch.full((len(x),), following, device=x.device))
            (grad,) = torch.autograd.grad(F.logsigmoid(logits.gather(1, ids.to(x.device))).sum(), x)
        tensors["latents"] = latents + (scale * left * grad).to(latents.dtype)
        return tensors

    return callback


def check_scheduler(scheduler: Any) -> None:
    """Raise ValueError unless ``scheduler`` samples unit-variance latents with an ``alphas_cumprod``."""
    name = type(scheduler).__name__
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0 or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"generate.class_guidance needs a sampler on unit-variance latents (DDIM, DPM-Solver, ...), not {name}"
        )


def chain(*callbacks: Callable[..., dict[str, Any]] | None) -> Callable[..., dict[str, Any]] | None:
    """One ``callback_on_step_end`` that runs the given ones (None skipped) in order; None if none."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None

    def callback(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        for each in present:
            tensors = each(pipe, i, t, tensors)
        return tensors

    return callback
