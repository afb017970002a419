"""generate: render one image per prompt row with a diffusers text-to-image pipeline.

Every image gets an id derived from everything that determines its pixels (prompt, negative prompt,
seed, the weights' hash and the sampler settings), and is stored content-addressed as
``<images_dir>/<id>.png`` plus a ``<id>.json`` record. A re-run, a resumed crash and a larger run
all find finished images by id and skip them, so nothing is generated twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from tasks.config import GUIDE_DIR, GenerateConfig, ImagesByValue
from tasks.dataset import IMAGE_SUFFIXES
from tasks.retry import with_retries
from tasks.shards import MapShards, chunks, shard_device, torch_threads, worker_cache
from tasks.workspace import atomic_path, write_text_atomic

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from tasks.class_guide import LatentClassifier

log = logging.getLogger(__name__)

# Weight files whose bytes define a pipeline; configs and tokenizers are hashed too, since they
# change outputs as surely as weights do.
_HASHED_SUFFIXES = {".safetensors", ".bin", ".json", ".txt", ".model"}
# An image whose pixel standard deviation is below this (on a 0-1 scale) is blank.
MIN_PIXEL_STD = 1e-3


@dataclass(frozen=True)
class PipelineIdentity:
    """What identifies a pipeline in image ids and manifests."""

    model: str
    model_hash: str
    scheduler: str
    guide_hash: str = ""  # the class guide's, when generate.class_guidance uses one


@dataclass(frozen=True)
class LoadedPipeline(PipelineIdentity):
    """A pipeline ready to sample, with what identifies it."""

    pipe: DiffusionPipeline = field(repr=False, kw_only=True)
    guide: LatentClassifier | None = field(default=None, repr=False, kw_only=True)


def resolve_model_dir(model: str) -> Path:
    """A local directory for ``model``: the path itself, or the hub snapshot (downloaded only when online).

    Raises:
        FileNotFoundError: ``model`` looks like a path but no such directory exists, or it is not a
            diffusers pipeline directory (no ``model_index.json``).
    """
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(f"generate.model: {model}: no such directory")
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"generate.model: {model}: not a diffusers pipeline (no model_index.json)")
        return path
    from huggingface_hub import snapshot_download

    # Honours HF_HUB_OFFLINE: offline, this finds a cached snapshot or fails at once.
    try:
        return Path(snapshot_download(model))
    except Exception as exc:  # the hub raises many kinds; the user needs one message
        raise FileNotFoundError(
            f"generate.model: {model}: no such directory, and no hub snapshot ({type(exc).__name__})"
        ) from exc


def hash_model_dir(model_dir: Path, skip: str | None = GUIDE_DIR) -> str:
    """sha256 over the relative paths and bytes of the files that define a pipeline (16 hex chars).

    The class guide (``skip``) is left out: adding one changes no unguided image. Guided images' ids
    hash it separately (:func:`guide_hash`).
    """
    digest = hashlib.sha256()
    files = (p for p in model_dir.rglob("*") if p.is_file() and p.suffix in _HASHED_SUFFIXES)
    for file in sorted(p for p in files if not skip or p.relative_to(model_dir).parts[0] != skip):
        digest.update(file.relative_to(model_dir).as_posix().encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def guide_dir(cfg: GenerateConfig) -> Path:
    """The class guide folder of ``cfg.model``; FileNotFoundError (naming generate.class_guidance) if absent."""
    path = resolve_model_dir(cfg.model) / GUIDE_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"generate.class_guidance: {cfg.class_guidance} needs a class guide at {path}, and there is none "
            "(train one: `synthdet train-guide --generator DIR`; or set class_guidance: 0)"
        )
    return path


def guide_hash(cfg: GenerateConfig) -> str:
    """The class guide's hash when ``cfg`` guides by class, else ""."""
    return hash_model_dir(guide_dir(cfg), skip=None) if cfg.class_guidance else ""


def check_guide_classes(cfg: GenerateConfig, prompts: pd.DataFrame) -> None:
    """Raise ValueError, before any image is made, if a prompt's class is one the guide does not know."""
    if not cfg.class_guidance:
        return
    path = guide_dir(cfg)
    known = json.loads((path / "config.json").read_text())["classes"]
    if "class" not in prompts.columns:
        raise ValueError("generate.class_guidance: the prompts table has no 'class' column to guide toward")
    unknown = sorted(set(prompts["class"].astype(str)) - set(known))
    if unknown:
        raise ValueError(f"generate.class_guidance: the guide at {path} knows {known}, not the prompts' {unknown}")


def load_pipeline(cfg: GenerateConfig) -> LoadedPipeline:
    """Load any diffusers text-to-image pipeline from a local directory or a hub id (and its class guide,
    if ``cfg.class_guidance``)."""
    import diffusers
    import torch

    model_dir = resolve_model_dir(cfg.model)
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
        model_dir, dtype=getattr(torch, cfg.dtype), local_files_only=True, use_safetensors=True
    )
    if cfg.scheduler:
        scheduler_cls = getattr(diffusers, cfg.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise ValueError(f"generate.scheduler: {cfg.scheduler!r} is not a diffusers scheduler class")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    guide = None
    if cfg.class_guidance:
        from tasks.class_guide import LatentClassifier, check_scheduler

        check_scheduler(pipe.scheduler)
        guide = LatentClassifier.from_pretrained(guide_dir(cfg), local_files_only=True).to(cfg.device)
        guide.eval().requires_grad_(False)
    pipe = pipe.to(cfg.device)
    pipe.set_progress_bar_config(disable=True)
    scheduler = type(pipe.scheduler).__name__
    return LoadedPipeline(cfg.model, hash_model_dir(model_dir), scheduler, guide_hash(cfg), pipe=pipe, guide=guide)


def image_id(
    row: dict[str, Any], loaded: PipelineIdentity, cfg: GenerateConfig, start_digests: dict[str, str] | None = None
) -> str:
    """The content address of one image: a hash of everything that determines its pixels.

    ``start_digests`` (from :func:`images_digests`) adds the hash of the real images whose mean
    latent starts this row's sampling, if its attribute value has any.
    """
    key = [
        row["prompt"],
        row["negative_prompt"],
        int(row["seed"]),
        loaded.model_hash,
        loaded.scheduler,
        cfg.num_inference_steps,
        cfg.guidance_scale,
        cfg.height,
        cfg.width,
        cfg.dtype,
    ]
    if start_digests and cfg.start_means and str(row[cfg.start_means.axis]) in start_digests:
        key.append(start_digests[str(row[cfg.start_means.axis])])
        if cfg.start_means.strength != 1.0:  # 1.0 leaves ids as they were before the field existed
            key.append(cfg.start_means.strength)
    if cfg.guidance_until != 1.0:  # likewise
        key.append(["guidance_until", cfg.guidance_until])
    if cfg.class_guidance:
        key.append(["class_guidance", cfg.class_guidance, loaded.guide_hash])
        if cfg.class_guidance_from:
            key.append(["class_guidance_from", cfg.class_guidance_from])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def start_mean_sources(cfg: GenerateConfig) -> dict[str, list[Path]]:
    """The real images ``generate.start_means`` names, per attribute value, in file order (see
    :func:`images_by_value`)."""
    if cfg.start_means is None:
        return {}
    return images_by_value(cfg.start_means, "generate.start_means.images")


def images_by_value(spec: ImagesByValue, field: str) -> dict[str, list[Path]]:
    """The real images ``spec`` names, per attribute value, in file order.

    Args:
        field: the spec's place in params.yaml, for errors.

    Raises:
        FileNotFoundError: a folder, its captions.parquet or a listed image is missing, or a folder
            holds no images.
        ValueError: captions.parquet lacks the ``file`` or the axis column.
    """
    sources: dict[str, list[Path]] = {}
    if isinstance(spec.images, dict):
        for value, folder in spec.images.items():
            path = Path(folder)
            if not path.is_dir():
                raise FileNotFoundError(f"{field}.{value}: {folder}: no such folder")
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"{field}.{value}: {folder}: no images in it")
            sources[value] = files
    else:
        folder = Path(spec.images)
        table_path = folder / "captions.parquet"
        if not table_path.is_file():
            raise FileNotFoundError(
                f"{field}: {table_path}: no such file (a folder needs a captions.parquet with the columns "
                f"file and {spec.axis}; or give {{value: folder}})"
            )
        table = pd.read_parquet(table_path)
        missing = {"file", spec.axis} - set(table.columns)
        if missing:
            raise ValueError(f"{field}: {table_path} has no column {sorted(missing)}")
        for file, value in zip(table["file"], table[spec.axis], strict=True):
            sources.setdefault(str(value), []).append(folder / file)
        absent = next((f for files in sources.values() for f in files if not f.is_file()), None)
        if absent is not None:
            raise FileNotFoundError(f"{field}: {absent}: listed in {table_path} but missing")
    if spec.max_images:
        sources = {value: files[: spec.max_images] for value, files in sources.items()}
    return sources


def images_digests(sources: dict[str, list[Path]]) -> dict[str, str]:
    """sha256 (16 hex chars) of each value's image bytes, in order: part of the image ids."""
    digests = {}
    for value, files in sources.items():
        digest = hashlib.sha256()
        for file in files:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        digests[value] = digest.hexdigest()[:16]
    return digests


def pixels_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 images -> (B, 3, H, W) floats in [-1, 1], as diffusers' autoencoders take them."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def start_mean_latents(pipe: DiffusionPipeline, sources: dict[str, list[Path]], cfg: GenerateConfig) -> dict[str, Any]:
    """The mean latent (one value per latent channel) of each value's images, as the UNet sees latents."""
    import torch

    vae = pipe.vae
    means = {}
    for value, files in sources.items():
        total, count = 0, 0
        for batch in chunks(files, 32):
            pixels = np.stack(
                [np.asarray(Image.open(f).convert("RGB").resize((cfg.width, cfg.height), Image.BICUBIC)) for f in batch]
            )
            x = pixels_to_tensor(pixels).to(vae.device, vae.dtype)
            with torch.inference_mode():
                z = vae.encode(x).latent_dist.mean
            z = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
            total, count = total + z.float().sum((0, 2, 3)), count + z.shape[0] * z.shape[2] * z.shape[3]
        means[value] = total / count
    return means


def start_latents(
    pipe: DiffusionPipeline,
    rows: list[dict[str, Any]],
    generators: list[Any],
    means: dict[str, Any],
    cfg: GenerateConfig,
) -> Any:
    """Each row's starting latents: its seed's noise plus its value's mean latent (times
    ``start_means.strength``) at the signal level the schedule keeps at the first sampling step (none
    for a zero-terminal-SNR schedule).

    The noise is drawn exactly as the pipeline draws it, so a row whose value has no mean gets the
    same image as without ``start_means``.
    """
    import torch

    assert cfg.start_means is not None
    scheduler = pipe.scheduler
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"generate.start_means: {type(scheduler).__name__} has no alphas_cumprod (not a DDPM-family schedule)"
        )
    device = pipe.unet.device
    factor = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, cfg.height // factor, cfg.width // factor)
    noise = torch.cat([torch.randn(shape, generator=g, device=g.device, dtype=pipe.unet.dtype) for g in generators])
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)
    # Scaled by the pipeline's init_noise_sigma, this is sqrt(alpha_bar) * mean + noise at the first
    # step for DDPM-style schedules and mean + sigma * noise for Euler-style ones: the same state.
    signal = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])].sqrt()) * cfg.start_means.strength
    zero = torch.zeros(shape[1])
    shift = torch.stack([means.get(str(row[cfg.start_means.axis]), zero) for row in rows])
    return noise.to(device) + signal * shift.to(device, noise.dtype)[:, :, None, None]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finished_record(images_dir: Path, image: str) -> dict[str, Any] | None:
    """The stored record of an image if it is complete and intact, else None (so it is redone)."""
    record_path = images_dir / f"{image}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("status") == "ok":
        png = images_dir / f"{image}.png"
        if not png.is_file() or file_sha256(png) != record.get("file_sha256"):
            return None
    return record


def degenerate_reason(pixels: np.ndarray) -> str | None:
    """Why an image (H, W, C floats in [0, 1]) is unusable, or None if it is fine."""
    if not np.isfinite(pixels).all():
        return "non-finite pixels (NaN or inf)"
    std = float(pixels.std())
    if std < MIN_PIXEL_STD:
        return f"constant image (pixel std {std:.5f})"
    return None


def pipeline_identity(cfg: GenerateConfig) -> PipelineIdentity:
    """What identifies ``cfg.model``'s pipeline in image ids, read from its files without loading it."""
    model_dir = resolve_model_dir(cfg.model)
    scheduler = cfg.scheduler
    if not scheduler:
        config = model_dir / "scheduler" / "scheduler_config.json"
        try:
            scheduler = json.loads(config.read_text())["_class_name"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise FileNotFoundError(f"generate.model: {config}: unreadable scheduler config ({exc})") from None
    return PipelineIdentity(cfg.model, hash_model_dir(model_dir), scheduler, guide_hash(cfg))


def worker_pipeline(cfg: GenerateConfig) -> LoadedPipeline:
    """This process's pipeline for ``cfg``, loaded on first use (on its own GPU, if it has several)."""
    device = shard_device(cfg.device)
    key = ("pipeline", cfg.model, cfg.dtype, cfg.scheduler, bool(cfg.class_guidance), device)
    return worker_cache(key, lambda: load_pipeline(cfg.model_copy(update={"device": device})))


def generate_images(
    loaded: LoadedPipeline | PipelineIdentity,
    prompts: pd.DataFrame,
    cfg: GenerateConfig,
    images_dir: Path,
    progress: bool = True,
    map_shards: MapShards | None = None,
    shard_size: int = 64,
) -> pd.DataFrame:
    """Render every prompt row that has no finished image yet; return one manifest row per prompt.

    Args:
        loaded: the pipeline from :func:`load_pipeline`; with ``map_shards``, its
            :func:`pipeline_identity` is enough, as each worker loads its own.
        prompts: the table from the prompts stage (needs prompt, negative_prompt, seed).
        cfg: sampling settings; ``batch_size`` images go through the pipeline at once.
        images_dir: the content-addressed store; writes ``<id>.png`` (RGB) and ``<id>.json``.
        progress: show a progress bar (without ``map_shards``; a runner shows its own).
        map_shards: runs :func:`render_shard` over the shards (a Prefect task runner); None renders
            them here with ``loaded``.
        shard_size: images per shard (rounded up to whole batches).

    Returns:
        The prompt columns plus image_id, path, status ("ok" or "rejected"), reason, file_sha256,
        seconds (per image, amortised over its batch), model, model_hash, scheduler and settings.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    if cfg.start_means and cfg.start_means.axis not in prompts.columns:
        raise ValueError(
            f"generate.start_means.axis: {cfg.start_means.axis!r} is not a prompt column (columns: {list(prompts.columns)})"
        )
    check_guide_classes(cfg, prompts)
    digests = images_digests(start_mean_sources(cfg))
    rows = prompts.to_dict("records")
    ids = [image_id(row, loaded, cfg, digests) for row in rows]
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, dict[str, Any]]] = []
    for image, row in zip(ids, rows, strict=True):
        if image in records:
            continue  # the same prompt and seed twice: one image serves both rows
        record = _finished_record(images_dir, image)
        if record is None:
            todo.append((image, row))
            records[image] = {}
        else:
            records[image] = record
    log.info("generate: %d images to make, %d already done", len(todo), len(records) - len(todo))

    shards = chunks(todo, -(-shard_size // cfg.batch_size) * cfg.batch_size)
    if map_shards is None:
        assert isinstance(loaded, LoadedPipeline), "rendering in this process needs a loaded pipeline"
        with tqdm(total=len(todo), desc="generate", unit="img", disable=not progress) as bar:
            for shard in shards:
                records.update(render_shard(shard, cfg, images_dir, loaded, on_batch=bar.update))
    else:
        work = functools.partial(render_shard, cfg=cfg, images_dir=images_dir, expected_hash=loaded.model_hash)
        for done in map_shards(work, shards):
            records.update(done)

    table = prompts.copy()
    table["image_id"] = ids
    table["path"] = [str(images_dir / f"{image}.png") if records[image]["status"] == "ok" else "" for image in ids]
    for column in ("status", "reason", "file_sha256", "seconds"):
        table[column] = [records[image].get(column) for image in ids]
    table["model"] = loaded.model
    table["model_hash"] = loaded.model_hash
    table["scheduler"] = loaded.scheduler
    for knob in (
        "num_inference_steps",
        "guidance_scale",
        "guidance_until",
        "class_guidance",
        "height",
        "width",
        "dtype",
    ):
        table[knob] = getattr(cfg, knob)
    return table


def guidance_cutoff(steps: int, until: float) -> Callable[..., dict[str, Any]] | None:
    """A ``callback_on_step_end`` that stops classifier-free guidance after the first ``until`` of
    ``steps``, so the rest run the conditional half of the batch only: half the UNet work. None when
    every step is guided.

    Guidance lays out the prompted object early in sampling; Kynkaenniemi et al. (2024) found it does
    little at the low-noise end. On the default generator, guiding the first 30% of 20 steps found the
    prompted class in 0.41 of the images against 0.42, 1.5x faster (docs/benchmarks.md).
    """
    guided = max(1, round(until * steps))  # steps at full scale
    if guided >= steps:
        return None

    def callback(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if i + 1 != guided or pipe._guidance_scale <= 1:
            return {}
        pipe._guidance_scale = 1.0  # diffusers reads it each step: no guidance from here
        return {"prompt_embeds": tensors["prompt_embeds"].chunk(2)[1]}  # drop the unconditional half

    return callback


def render_shard(
    shard: list[tuple[str, dict[str, Any]]],
    cfg: GenerateConfig,
    images_dir: Path,
    loaded: LoadedPipeline | None = None,
    expected_hash: str | None = None,
    on_batch: Callable[[int], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Render one shard of ``(image_id, prompt row)`` in batches; return each image's stored record.

    Idempotent: images already finished (by an earlier attempt at this shard) are not redone.

    Args:
        loaded: the pipeline to use; None loads (once per process) the one ``cfg`` names.
        expected_hash: the weights' hash the image ids were made with; a worker whose copy of the
            model differs refuses the shard.
        on_batch: called with the number of images after each batch (a progress bar).
    """
    import torch

    device = cfg.device if loaded else shard_device(cfg.device)
    loaded = loaded or worker_pipeline(cfg)
    if expected_hash is not None and loaded.model_hash != expected_hash:
        raise RuntimeError(
            f"generate.model: {cfg.model} on this worker hashes to {loaded.model_hash}, not {expected_hash}: "
            "every worker needs the same model files"
        )
    if device == "cpu":
        torch.set_num_threads(torch_threads())  # importing ultralytics leaves torch on cpu_count - 1 threads
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for image, row in shard:
        record = _finished_record(images_dir, image)
        if record is None:
            todo.append((image, row))
        else:
            records[image] = record
    means = {}
    if cfg.start_means and todo:
        sources = start_mean_sources(cfg)
        key = ("start_means", loaded.model_hash, device, cfg.height, cfg.width, json.dumps(images_digests(sources)))
        means = worker_cache(key, lambda: start_mean_latents(loaded.pipe, sources, cfg))
    batches = chunks(todo, cfg.batch_size)
    for number, batch in enumerate(batches, 1):

        def render(batch: list[tuple[str, dict[str, Any]]] = batch) -> Any:
            generators = [torch.Generator(device).manual_seed(int(row["seed"])) for _, row in batch]
            latents = None
            if cfg.start_means:
                latents = start_latents(loaded.pipe, [row for _, row in batch], generators, means, cfg)
            from tasks.class_guide import chain, guidance_step

            steer = None
            if loaded.guide is not None:
                ids = [loaded.guide.config.classes.index(str(row["class"])) for _, row in batch]
                steer = guidance_step(loaded.guide, ids, cfg.class_guidance, cfg.class_guidance_from)
            cutoff = chain(guidance_cutoff(cfg.num_inference_steps, cfg.guidance_until), steer)
            extra = {"callback_on_step_end": cutoff, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
            with torch.inference_mode():
                return loaded.pipe(
                    prompt=[row["prompt"] for _, row in batch],
                    negative_prompt=[row["negative_prompt"] for _, row in batch],
                    generator=generators,
                    latents=latents,
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    height=cfg.height,
                    width=cfg.width,
                    output_type="np",
                    **(extra if cutoff else {}),  # only when asked: not every pipeline family takes them
                )

        began = time.perf_counter()
        name = f"generate batch {number}/{len(batches)} (images {batch[0][0]}..{batch[-1][0]})"
        out = with_retries(render, name, cfg.retries, cfg.retry_backoff_s)
        seconds = (time.perf_counter() - began) / len(batch)
        for (image, _), pixels in zip(batch, out.images, strict=True):
            records[image] = _store(images_dir, image, np.asarray(pixels, dtype=np.float32), seconds)
        if on_batch is not None:
            on_batch(len(batch))
    return records


def _store(images_dir: Path, image: str, pixels: np.ndarray, seconds: float) -> dict[str, Any]:
    """Write one image and its record; the record goes last, so its presence means both are whole."""
    reason = degenerate_reason(pixels)
    record: dict[str, Any] = {"status": "ok", "reason": "", "file_sha256": "", "seconds": round(seconds, 4)}
    if reason:
        record.update(status="rejected", reason=reason)
    else:
        png = images_dir / f"{image}.png"
        with atomic_path(png) as tmp:
            Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        record["file_sha256"] = file_sha256(png)
    write_text_atomic(images_dir / f"{image}.json", json.dumps(record))
    return record
