"""Tiny real models with random weights, for tests and for the demo until trained defaults exist.

Both builders make the same architectures the pipeline runs in production, only shrunk: a
``StableDiffusionPipeline`` of 25k to 67k parameters per part, and a YOLO26n detector from
ultralytics' own ``yolo26n.yaml``. Nothing is downloaded; the outputs load back with the ordinary
``DiffusionPipeline.from_pretrained(..., local_files_only=True)`` and ``YOLO(path)`` calls.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from tasks.tokenizer import MAX_PROMPT_TOKENS, build_clip_tokenizer

logger = logging.getLogger(__name__)

# Words the default tokenizer knows as single tokens: prompt scaffolding, the smoke profile's words and
# a few object names, so that demo prompts map to distinct embeddings instead of runs of <|unk|>.
DEFAULT_VOCABULARY = [
    *("a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "image", "view"),
    *("realistic", "detailed", "close", "up", "plain", "night", "day", "street", "road", "park", "table"),
    *("room", "kitchen", "grass", "sky", "indoor", "outdoor", "background"),
    *("red", "blue", "yellow", "green", "black", "white", "circle", "square", "triangle"),
    *("dog", "cat", "car", "bird", "person", "bicycle", "cup", "bottle", "apple", "chair", ",", "."),
]

# Image pixels per latent pixel: the VAE below has 3 blocks, i.e. 2 downsamplings.
VAE_SCALE_FACTOR = 4


def build_tiny_pipeline(
    out_dir: Path, vocabulary: list[str] | None = None, seed: int = 0, sample_size: int = 64
) -> Path:
    """Save a random-weight ``StableDiffusionPipeline`` that generates ``sample_size`` square images.

    Parts: a 2-block UNet (8, 16 channels) on 4-channel latents of ``sample_size / 4`` pixels, a
    3-block VAE (8, 16, 16 channels), a 2-layer CLIP text encoder of width 32, a DDIM scheduler and
    a CLIP BPE tokenizer trained on ``vocabulary``: each vocabulary word is one token, other words
    split into learned pieces, and characters absent from the vocabulary become ``<|unk|>``.
    About 0.7 MB of fp32 safetensors in all.

    Args:
        out_dir: Directory to write: ``model_index.json`` and one subfolder per part (``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler``). Written beside it under ``.tmp``, then
            renamed; an existing pipeline there is replaced, any other non-empty directory refused.
        vocabulary: Words for the tokenizer (lowercased, as CLIP does); defaults to ``DEFAULT_VOCABULARY``.
        seed: Seed for the random weights; the same seed gives the same weights.
        sample_size: Image height and width in pixels; a multiple of 8 (the VAE divides by 4, the
            UNet by 2 more).

    Returns:
        ``out_dir``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if sample_size <= 0 or sample_size % (VAE_SCALE_FACTOR * 2) != 0:
        raise ValueError(f"sample_size must be a positive multiple of 8, got {sample_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise FileExistsError(f"refusing to replace {out_dir}: not empty and not a diffusers pipeline")

    tokenizer = build_clip_tokenizer(list(vocabulary) if vocabulary is not None else list(DEFAULT_VOCABULARY))
    # fork_rng: seed the weights without changing the caller's global torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_PROMPT_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size // VAE_SCALE_FACTOR,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,  # = the text encoder's hidden size
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=4,
        )
    # steps_offset and clip_sample as in Stable Diffusion's own scheduler config (DDIM warns otherwise).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Write beside out_dir, then rename: a crash never leaves a directory that looks complete.
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipeline.save_pretrained(tmp_dir, safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    logger.info("wrote tiny pipeline (seed %d, %dx%d) to %s", seed, sample_size, sample_size, out_dir)
    return out_dir


def build_tiny_detector(out_path: Path, class_names: list[str], seed: int = 0) -> Path:
    """Save a random-weight YOLO26n detector for ``class_names`` as an ultralytics checkpoint.

    The model is ultralytics' ``yolo26n.yaml`` with ``nc = len(class_names)``; ``YOLO(out_path)``
    loads it with those names and can predict, train and validate.

    Untrained, it ignores its input: PyTorch's default init shrinks activations at every layer, so
    the head sees near-zero features and scores every box at its bias prior,
    ``sigmoid(log(5 / nc / (640 / stride)**2))`` - at most ``5 / nc / 400`` (0.0062 for two classes,
    0.0123 for one) - with ties resolved to class 0. Every image thus gets the same boxes, all of
    class 0, and only a ``conf`` below that bound returns any.

    Args:
        out_path: ``.pt`` file to write; written under a temporary name, then renamed.
        class_names: Class names in class-id order; non-empty and unique.
        seed: Seed for the random weights; the same seed gives the same weights.

    Returns:
        ``out_path``.
    """
    from ultralytics import __version__
    from ultralytics.nn.tasks import DetectionModel

    out_path = Path(out_path)
    if out_path.suffix != ".pt":
        raise ValueError(f"out_path must end in .pt for YOLO() to load it, got {out_path}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {class_names}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetectionModel(cfg="yolo26n.yaml", nc=len(class_names), verbose=False)
    model.names = dict(enumerate(class_names))
    model.task = "detect"
    model.eval()
    # The keys ultralytics' Model.save writes; load_checkpoint reads "model" (or "ema") and
    # "train_args", and the model itself carries its yaml (with nc) and names. fp16 like every
    # ultralytics checkpoint; load_checkpoint casts back to fp32.
    # No "date" key, unlike Model.save: the same seed and path give a byte-identical file (the zip
    # inside a .pt is named after the file).
    checkpoint = {
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "model": model.half(),
        "ema": None,
        "train_args": {"model": "yolo26n.yaml", "task": "detect"},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    torch.save(checkpoint, tmp_path)
    tmp_path.replace(out_path)
    logger.info("wrote tiny YOLO26n detector (seed %d, %d classes) to %s", seed, len(class_names), out_path)
    return out_path
