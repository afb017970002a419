"""Fine detail the autoencoder cannot carry, added back to generated images from real images' spectrum.

A latent diffusion model draws through its autoencoder's latent grid: the shipped one maps 64 x 64
pixels to 16 x 16 latents, so almost nothing above 0.125 cycles per pixel survives. Rain streaks,
sensor grain and texture live there: at 0.3-0.5 cycles per pixel the generated rare-condition images
have 2 (fog) to 170 (noise) times less power than real ones (docs/experiment.md).

This module measures, for each value of a prompt axis (here the condition), how much power per
spatial frequency real images have above a cutoff and generated ones lack. It adds that much
random-phase noise to each generated image: grain with the real images' spectrum (so banding and streak
direction survive) and their correlation between colour channels, but none of their content. Pixels
change, boxes do not, so the labels made on the clean image stay true.

Measured in the ablation (docs/experiment.md, "Real fine detail"), it made the shipped generator's
data worse (-0.6 to -1.2 points): it helps sensor noise a little and hurts fog, whose real detail is
sharp edges, not grain. So ``dataset.detail`` is off by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.config import AddDetail


@dataclass(frozen=True)
class Grain:
    """Noise to add to the generated images of one attribute value.

    amplitude: (3, H, W) per channel and frequency (numpy's fft2 order): sqrt of the power real images
        have and generated ones lack, zero below the cutoff.
    mix: (3, 3) lower-triangular: correlates white noise across channels as the real images' residuals are.
    """

    amplitude: np.ndarray
    mix: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """The standard deviation the grain adds, per channel (pixel values in [0, 1])."""
        return np.sqrt((self.amplitude**2).mean(axis=(1, 2)))


def load_pixels(paths: Sequence[Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1]; resized (bicubic) to ``size`` = (width, height) if given."""
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.BICUBIC)
        images.append(np.asarray(image, dtype=np.float64) / 255.0)
    return np.stack(images)


def power_spectrum(pixels: np.ndarray) -> np.ndarray:
    """Mean power per channel and frequency, (3, H, W), of (N, H, W, 3) images with each image's
    mean removed, scaled so that its mean over frequencies is the pixels' variance."""
    n, h, w, _ = pixels.shape
    centred = pixels - pixels.mean(axis=(1, 2), keepdims=True)
    spectrum = np.fft.fft2(centred, axes=(1, 2))
    return (np.abs(spectrum) ** 2).mean(axis=0).transpose(2, 0, 1) / (h * w)


def high_pass(height: int, width: int, above: float) -> np.ndarray:
    """(H, W) mask of the frequencies at or above ``above`` cycles per pixel, in fft2 order."""
    fy, fx = np.fft.fftfreq(height), np.fft.fftfreq(width)
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) >= above


def fit_grain(real: np.ndarray, generated: np.ndarray, above: float) -> Grain:
    """The grain that gives ``generated`` images the power ``real`` ones have at or above ``above``
    cycles per pixel. Both (N, H, W, 3) in [0, 1], of one size.

    Raises:
        ValueError: the two sets differ in image size.
    """
    if real.shape[1:] != generated.shape[1:]:
        raise ValueError(f"real images are {real.shape[2]}x{real.shape[1]}, generated {generated.shape[2]}x"
                         f"{generated.shape[1]}: fit_grain needs one size")  # fmt: skip
    mask = high_pass(real.shape[1], real.shape[2], above)
    missing = np.clip(power_spectrum(real) - power_spectrum(generated), 0.0, None) * mask
    # The real images' residual above the cutoff, to measure how the channels' grain correlates.
    residual = np.fft.ifft2(np.fft.fft2(real, axes=(1, 2)) * mask[None, :, :, None], axes=(1, 2)).real
    covariance = np.cov(residual.reshape(-1, 3), rowvar=False)
    scale = np.sqrt(np.clip(np.diag(covariance), 1e-12, None))
    correlation = covariance / np.outer(scale, scale) + np.eye(3) * 1e-6
    return Grain(amplitude=np.sqrt(missing), mix=np.linalg.cholesky(correlation))


def add_grain(pixels: np.ndarray, grain: Grain, rng: np.random.Generator) -> np.ndarray:
    """``pixels`` (H, W, 3 uint8) with one draw of ``grain`` added, clipped, as uint8."""
    h, w, _ = pixels.shape
    if grain.amplitude.shape[1:] != (h, w):
        raise ValueError(f"grain fitted on {grain.amplitude.shape[2]}x{grain.amplitude.shape[1]} images, "
                         f"this one is {w}x{h}")  # fmt: skip
    white = rng.standard_normal((h * w, 3)) @ grain.mix.T
    spectrum = np.fft.fft2(white.reshape(h, w, 3), axes=(0, 1)) * grain.amplitude.transpose(1, 2, 0)
    noise = np.fft.ifft2(spectrum, axes=(0, 1)).real
    out = pixels.astype(np.float64) / 255.0 + noise
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def fit_grains(real: dict[str, list[Path]], generated: dict[str, list[Path]], above: float) -> dict[str, Grain]:
    """One grain per value that has both real and generated images (real images resized to the
    generated ones' size)."""
    grains = {}
    for value, files in generated.items():
        if not files or not real.get(value):
            continue
        made = load_pixels(files)
        size = (made.shape[2], made.shape[1])
        grains[value] = fit_grain(load_pixels(real[value], size), made, above)
    return grains


def grain_digest(grains: dict[str, Grain]) -> str:
    """16 hex chars that change with any grain: names the folder of grained images."""
    digest = hashlib.sha256()
    for value in sorted(grains):
        digest.update(value.encode())
        digest.update(np.ascontiguousarray(grains[value].amplitude, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(grains[value].mix, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def grained_copy(source: Path, grain: Grain, seed: int, dest: Path) -> Path:
    """Write ``source`` with grain added to ``dest`` (PNG), unless it is there; the draw is seeded by
    ``seed`` and the source's file name, so a re-run writes the same bytes."""
    if dest.is_file():
        return dest
    key = int.from_bytes(hashlib.sha256(f"{seed}:{source.name}".encode()).digest()[:8], "little")
    pixels = np.asarray(Image.open(source).convert("RGB"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    Image.fromarray(add_grain(pixels, grain, np.random.default_rng(key))).save(partial, format="PNG")
    partial.replace(dest)
    return dest


def detail_grains(spec: AddDetail, generated: pd.DataFrame) -> dict[str, Grain]:
    """The grain of each value of ``spec.axis`` from the real images ``spec`` names and the
    ``generated`` images (a generate table: ``path`` and the axis column) of that value.

    Raises:
        ValueError: the generated images have no such column (their prompts lack the axis).
    """
    from tasks.generation import images_by_value

    real = images_by_value(spec, "dataset.detail.images")
    if spec.axis not in generated.columns:
        raise ValueError(f"dataset.detail.axis: the generated images have no column {spec.axis!r} "
                         f"(the prompts need an axis of that name)")  # fmt: skip
    made = {str(value): [Path(p) for p in rows["path"]] for value, rows in generated.groupby(spec.axis)}
    return fit_grains(real, made, spec.above)


def add_detail(
    paths: Sequence[str], values: Sequence[str], grains: dict[str, Grain], seed: int, folder: Path
) -> list[str]:
    """Each image with its value's grain, written under ``folder/<grain digest>/`` (kept there, so a
    re-run reuses it); an image whose value has no grain comes back as it is."""
    out_dir = folder / grain_digest(grains)
    out = []
    for path, value in zip(paths, values, strict=True):
        grain = grains.get(str(value))
        if grain is None:
            out.append(path)
            continue
        source = Path(path)
        out.append(str(grained_copy(source, grain, seed, out_dir / f"{source.stem}.png")))
    return out
