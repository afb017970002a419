"""Typed parameters: the only reader of ``params.yaml``.

Every stage has one section, validated once at the edge into a frozen pydantic model with
``extra="forbid"``, so a typo or a bad value fails at load with the field's dotted name instead of
forty minutes into a run. Pass-through knobs keep their upstream names (``num_inference_steps``,
``guidance_scale``, ``conf``, ``epochs``, ``imgsz``, ``batch``, ``lr0``).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The stage names: one vocabulary for params.yaml sections, CLI subcommands, Prefect task names,
# dvc.yaml stages and MLflow run names.
STAGES = ("prompts", "generate", "validate", "dataset", "version", "finetune")
# Stages that make the embedded default models; they run once, not in every pipeline run.
TRAINING_STAGES = ("world", "train-generator", "train-validator")

# A name that ends up in a path, a git tag or a column: no separators, no "..", no spaces.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
# An attribute axis is also a template placeholder, so it must be a Python identifier.
AxisName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
class ClassSpec(Section):
    """One object class to synthesise."""

    name: Name
    phrase: str | None = Field(None, description="Text used in prompts; defaults to the name.")
    count: PositiveInt | None = Field(None, description="Exact number of prompts for this class.")
    weight: Weight | None = Field(None, description="Share of prompts.total, if no count.")

    @model_validator(mode="after")
    def _count_or_weight(self) -> ClassSpec:
        if self.count is not None and self.weight is not None:
            raise ValueError("give either count or weight, not both")
        return self

    @property
    def text(self) -> str:
        return self.phrase or self.name.replace("_", " ")


class PromptsConfig(Section):
    """Expansion of classes x attribute axes x templates into a table of prompts."""

    seed: int = 0
    classes: list[ClassSpec] = Field(..., description="Object classes, in dataset id order.")
    # axis -> {value: weight}; rare edge cases get small weights.
    axes: dict[AxisName, dict[str, Weight]] = Field(default_factory=dict)
    templates: list[str] = Field(default_factory=lambda: ["a photo of {phrase}"], min_length=1)
    negative_prompt: str = ""
    total: PositiveInt | None = Field(None, description="Prompts in all, shared out by weight.")
    allow_repeats: bool = Field(False, description="Reuse a prompt (with a new seed) if a quota exceeds the grid.")

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[ClassSpec]) -> list[ClassSpec]:
        if not value:
            raise ValueError("the class list is empty: name at least one class")
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError(f"class names repeat: {names}")
        return value

    @field_validator("axes")
    @classmethod
    def _axes(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for axis, values in value.items():
            if axis in RESERVED_COLUMNS:
                raise ValueError(f"axis name {axis!r} is reserved (it names a column)")
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
        return value

    @model_validator(mode="after")
    def _templates_and_quotas(self) -> PromptsConfig:
        known = {"phrase", "class", *self.axes}
        for template in self.templates:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            missing = fields - known
            if missing:
                raise ValueError(
                    f"template {template!r} uses {sorted(missing)} but no such axis exists (axes: {sorted(self.axes)})"
                )
        for c in self.classes:
            if c.count is None and self.total is None:
                raise ValueError(f"class {c.name!r} has no count: give it one or set prompts.total")
        return self


RESERVED_COLUMNS = {"prompt_id", "class", "class_id", "prompt", "negative_prompt", "seed", "template", "phrase"}


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
class ImagesByValue(Section):
    """Real images per value of a prompt attribute (an axis of prompts, e.g. condition)."""

    axis: AxisName = Field(
        "condition", description="The prompt column (an axis of prompts) whose value picks the images."
    )
    images: str | dict[str, str] = Field(
        ...,
        description="A folder with images and a captions.parquet (columns file and <axis>), "
        "or {value: folder of images}. Values without images are left alone.",
    )
    max_images: PositiveInt | None = Field(None, description="Use at most the first N images of each value.")

    @field_validator("images")
    @classmethod
    def _images(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(value, dict) and not value:
            raise ValueError("give a folder, or at least one value: folder")
        return value


class StartMeans(ImagesByValue):
    """Real images whose mean latent starts the sampling of each prompt with the same attribute value.

    A noise schedule that keeps some signal at its last step (Stable Diffusion's keeps
    sqrt(alpha_bar) = 0.068) teaches the UNet to read an image's overall brightness and colour from
    the starting noise, which has none, so every image drifts toward mid-grey: fog comes out too
    dark, night too bright. Adding the mean latent of a few real images of the prompt's condition
    at that signal level gives the UNet what it expects (docs/experiment.md).
    """

    strength: Annotated[float, Field(ge=0, le=4)] = Field(
        1.0,
        description="Multiplies the mean latent before it is added: 1 adds it at the schedule's signal level; "
        "0.8 matched the scarce real images' brightness better, without raising mAP (docs/experiment.md).",
    )


GUIDE_DIR = "class_guide"  # a pipeline's class guide (tasks/class_guide.py), beside its diffusers parts


class GenerateConfig(Section):
    """A diffusers text-to-image pipeline and how to sample from it."""

    model: str = Field(..., description="Local pipeline directory or a hub id.")
    device: str = Field("cpu", description="cpu, cuda:N, or cuda: each shard worker then takes a GPU of its own.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    scheduler: str | None = Field(None, description="A diffusers scheduler class name, e.g. DDIMScheduler.")
    num_inference_steps: PositiveInt = 30
    guidance_scale: float = Field(4.0, ge=0)
    guidance_until: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="Share of the sampling steps guided at guidance_scale; the rest run unguided, on half the "
        "UNet work (python -m bench.guidance --until).",
    )
    height: PositiveInt = 64
    width: PositiveInt = 64
    batch_size: Annotated[int, Field(gt=0, le=1024)] = 16
    start_means: StartMeans | None = Field(None, description="Start sampling from real images' mean latent.")
    class_guidance: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="Classifier guidance: after each step the latents move toward the prompt's class, by the "
        "gradient of the pipeline's class_guide/ (train-generator.guide_steps, `synthdet train-guide`) times this "
        "scale. 0: off. Needs a guide that knows every prompt's class and a DDIM-like sampler "
        "(python -m bench.guidance --class-guidance compares scales).",
    )
    class_guidance_from: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="Share of the sampling steps run before class guidance starts: 0 steers at every step; 0.5 "
        "only over the second half, where outlines are drawn, leaving the colours and haze laid down early.",
    )
    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        2, description="Retries of a failing batch before the run fails."
    )
    retry_backoff_s: Annotated[float, Field(ge=0, le=600)] = Field(2.0, description="First wait; doubles per retry.")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8 or value > 4096:
            raise ValueError("must be a multiple of 8 and at most 4096")
        return value


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------
class Standardise(Section):
    """Reference images whose colour statistics every image is rescaled to before the validator sees it.

    A validator trained on common conditions misses objects in scenes that are only darker or washed
    out (night, fog): each channel of each image is shifted and scaled to the mean and spread of these
    images, the kind the validator was trained on. Only what the validator sees changes: the dataset keeps
    the generated image, and the boxes are the same in both.
    """

    images: Path = Field(..., description="A folder of images like the validator's training images (searched "
                                          "recursively, in name order).")  # fmt: skip
    max_images: PositiveInt = Field(200, description="Use at most the first N images.")


class ValidateConfig(Section):
    """A YOLO detector that accepts or rejects each generated image and labels the accepted."""

    model: str = Field(..., description="Ultralytics weights (.pt) or a model .yaml (tests).")
    conf: Fraction = 0.25
    iou: Fraction = 0.7
    imgsz: PositiveInt = 64
    batch: Annotated[int, Field(gt=0, le=1024)] = 16
    device: str = Field("cpu", description="cpu, cuda:N, or cuda: each shard worker then takes a GPU of its own.")
    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        2, description="Retries of a failing batch before the run fails."
    )
    retry_backoff_s: Annotated[float, Field(ge=0, le=600)] = Field(2.0, description="First wait; doubles per retry.")
    # prompt class -> detector class names that count as it; a class missing here maps to itself.
    class_map: dict[str, list[str]] = Field(default_factory=dict)
    max_objects: PositiveInt | None = Field(None, description="Reject images with more detections.")
    min_box_area: Fraction = Field(0.0, description="Smallest box of the intended class, as a share of the image.")
    reject_unexpected: bool = Field(False, description="Reject images where a class not prompted is detected.")
    standardise: Standardise | None = Field(
        None, description="Rescale each image's colours to these reference images' before detecting (night, fog)."
    )
    check_layout: bool = Field(
        True,
        description="Where prompts ask for a place or a size (prompt axes 'position' and 'size', in the words of "
        "tasks/layout.py: 'top left', 'small'), reject an image unless an intended-class box is there and that size.",
    )


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------
class AddDetail(ImagesByValue):
    """Real images whose fine detail is added back to the accepted images of the same attribute value.

    A latent diffusion model cannot draw finer than its autoencoder's latent grid: rain streaks, sensor
    grain and texture are lost (the shipped generator's images have 2-170 times less power than real
    ones at 0.3-0.5 cycles per pixel). The dataset stage adds, after validation, random-phase noise with
    the power real images have and generated ones lack above ``above`` (tasks/detail.py), so the labels
    made on the clean image stay true. In the ablation it made the data worse (sensor noise gained a
    little, fog lost more: docs/experiment.md), so it is off by default.
    """

    above: Annotated[float, Field(gt=0, le=0.71)] = Field(
        0.125,
        description="Cycles per pixel from which detail is added: 0.5 / the autoencoder's downsampling "
        "(0.125 for the shipped generator's 4x, 0.0625 for Stable Diffusion's 8x).",
    )


class DatasetConfig(Section):
    """Assembly of accepted images into a YOLO-format dataset."""

    name: Name = "synthetic"
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    seed: int = 0
    real: Path | None = Field(None, description="A YOLO folder (images/, labels/) of real labelled data to mix in.")
    real_ratio: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        0.0, description="Real images added per accepted synthetic image."
    )
    detail: AddDetail | None = Field(
        None,
        description="Add real images' fine detail to the accepted images (after validation); off: it "
        "made worse training data in the ablation (docs/experiment.md).",
    )
    restyle: Restyle | None = Field(
        None, description="Add real images recoloured to the colours of each value's reference images (needs real)."
    )

    @model_validator(mode="after")
    def _restyle_needs_real(self) -> DatasetConfig:
        if self.restyle is not None and self.real is None:
            raise ValueError("dataset.restyle: recolours the real images of dataset.real, which is not set")
        return self


class Restyle(ImagesByValue):
    """Real labelled images recoloured to the colours of a few real images of each attribute value.

    Each copy of a real image (``dataset.real``; in the experiment, its replay images) keeps its true
    boxes and takes the per-channel mean and spread of the reference images of one value, the values
    taken in turn: common scenes given the colours of fog, of night. The cheapest synthetic rare image
    there is, and the baseline a generator has to beat (docs/experiment.md, "Recoloured common images").
    """

    share: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        1.0,
        description="Recoloured images per accepted synthetic image (the experiment: per real training image, "
        "as its synthetic share).",
    )


# ---------------------------------------------------------------------------------------------
# version
# ---------------------------------------------------------------------------------------------
class VersionConfig(Section):
    """The DVC data registry the datasets are versioned in."""

    registry: Path | None = Field(None, description="A git+DVC repository; default <workspace>/registry.")
    remote: str | None = Field(None, description="Any DVC remote URL; default <workspace>/remote.")
    push: bool = True


# ---------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------
class FinetuneConfig(Section):
    """Fine-tuning of a YOLO26 detector on a dataset version, and its evaluation."""

    model: str = Field(..., description="Starting weights (.pt) or a model .yaml.")
    epochs: PositiveInt = 10
    imgsz: PositiveInt = 64
    batch: Annotated[int, Field(gt=0, le=1024)] = 16
    nbs: Annotated[int, Field(gt=0, le=4096)] = Field(
        64, description="Ultralytics' nominal batch: gradients of nbs/batch batches make one optimizer step."
    )
    device: str = Field("cpu", description='cpu, 0 (a GPU), or "0,1" for DDP over several GPUs.')
    lr0: Annotated[float, Field(gt=0, le=1)] = 0.001
    lrf: Annotated[float, Field(gt=0, le=1)] = Field(
        0.01,
        description="The learning rate falls linearly to lr0 x lrf by the end (ultralytics' lrf, over the epochs; "
        "the experiment's one-epoch trials, over the steps); 1: lr0 throughout.",
    )
    warmup_epochs: Annotated[float, Field(ge=0)] = Field(
        3.0,
        description="Ultralytics' warm-up (its bias learning rate starts at 0.1); 0 keeps trained weights steady.",
    )
    optimizer: str = "AdamW"
    patience: PositiveInt = 50
    select: Literal["best", "last"] = Field(
        "best",
        description="The weights kept: best, ultralytics' best epoch on the dataset's val split; last, the final "
        "epoch's (a fixed budget, for when that split does not look like the target, e.g. synthetic images).",
    )
    seed: int = 0
    freeze: Literal["head"] | Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Layers kept as they are: head, the detection head (the model's last layer); n, the first n "
        "layers; a list, those layer indices (ultralytics' freeze); null trains every layer.",
    )
    mosaic: Fraction = 0.0
    scale: Fraction = Field(0.5, description="Random zoom range (ultralytics' scale); 0.5 can halve a small object.")
    workers: Annotated[int, Field(ge=0, le=64)] = 0
    plots: bool = True
    eval_data: Path | None = Field(None, description="data.yaml of a held-out (real) set; default the val split.")
    eval_split: Literal["train", "val", "test"] = "val"
    registered_model: Name = "synthdet-detector"
    champion_alias: Name = Field("champion", description="Registry alias moved to a model that wins.")
    promote_margin: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="mAP50-95 a new model must gain over the champion to replace it."
    )
    guard_data: Path | None = Field(
        None,
        description="data.yaml of a held-out set the model must not get worse on (e.g. the common conditions "
        "it already knew); null: no guard.",
    )
    guard_split: Literal["train", "val", "test"] = "val"
    guard_margin: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.01,
        description="The most mAP50-95 a new model may lose on guard_data against its starting weights; one that "
        "loses more is registered but not promoted.",
    )
    reuse: bool = Field(
        True,
        description="A re-run with the same dataset version, settings and starting weights reuses the last "
        "fine-tune of this run name instead of training again; false always trains.",
    )

    @field_validator("freeze", mode="before")
    @classmethod
    def _one_kind_of_freeze(cls, value: Any) -> Any:
        """One clear message for a bad value, not one per kind the field accepts."""
        whole = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        listed = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
        if value is None or value == "head" or whole or listed:
            return value
        raise ValueError(f"{value!r}: give head, a number of first layers, a list of layer indices, or null")


# ---------------------------------------------------------------------------------------------
# world, train-generator, train-validator (the embedded default)
# ---------------------------------------------------------------------------------------------
class WorldConfig(Section):
    """The procedural world's "real" data sets (see tasks/world.py): images per set."""

    seed: int = 0
    common_train: Annotated[int, Field(ge=0, le=1_000_000)] = 2000
    common_val: Annotated[int, Field(ge=0, le=1_000_000)] = 200
    rare_scarce: Annotated[int, Field(ge=0, le=1_000_000)] = Field(30, description="Per rare condition.")
    test: Annotated[int, Field(ge=0, le=1_000_000)] = Field(200, description="Per condition.")
    captioned: Annotated[int, Field(ge=0, le=1_000_000)] = Field(20000, description="For train-generator.")
    reference_train: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        2000, description="Every condition, labelled: trains the reference detector of evaluate-default."
    )


# ---------------------------------------------------------------------------------------------
# train-generator (the embedded default model)
# ---------------------------------------------------------------------------------------------
class TrainGeneratorConfig(Section):
    """Training of the default latent diffusion model; sizes from the CPU feasibility trial."""

    seed: int = 0
    image_size: PositiveInt = 64
    vae_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 64], min_length=2, max_length=4)
    latent_channels: Annotated[int, Field(ge=1, le=64)] = 8
    vae_steps: Annotated[int, Field(ge=0)] = 1500
    vae_batch: PositiveInt = 32
    vae_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    vae_from: Path | None = Field(
        None,
        description="An AutoencoderKL folder (e.g. models/generator/vae) to reuse instead of training one, so UNet "
        "variants can be compared on one autoencoder (runs of the same settings make different ones).",
    )
    vae_lr_decay: bool = Field(
        False,
        description="Warm the autoencoder's learning rate up over warmup_steps and decay it to 0 on a cosine, "
        "as the UNet's; off, it stays at vae_lr to the end and the weights stop wherever the last steps left them.",
    )
    vae_ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="Keep an exponential moving average of the autoencoder's weights and save it instead of the "
        "last step's (0.995 averages about the last 200 steps); None saves the last step's. It trailed the last "
        "step while the autoencoder still learnt (docs/benchmarks.md section 9).",
    )
    vae_clip_grad: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Clip the autoencoder's gradient to this norm each step, as the UNet's is clipped to 1.0; None "
        "leaves it unclipped (docs/generator.md, 'Clipping the autoencoder's gradient').",
    )
    vae_sample: bool = Field(
        True,
        description="Decode a sample of the posterior while training (a KL autoencoder, as Stable Diffusion's); "
        "false decodes its mean (no sampling noise, no KL term) and saves a posterior pinned to that mean. False "
        "learns faster (round trip 0.80 in 1,500 steps against 0.53), but its images carried stripes and made worse "
        "training data in the ablation (docs/generator.md).",
    )
    kl_weight: Annotated[float, Field(ge=0)] = 1e-7
    edge_weight: Annotated[float, Field(ge=0)] = 1.0
    max_tokens: Annotated[int, Field(ge=4, le=77)] = 20
    text_width: PositiveInt = 64
    text_layers: PositiveInt = 2
    train_text_encoder: bool = Field(
        True,
        description="Train the text encoder with the UNet; false keeps it as it starts (seeded random weights, or "
        "those of text_pretrain_steps). Trained jointly, it drew the shape words together (circle beside square, "
        "triangle beside star); kept random, they stay apart, yet the UNet hardly responds to them either "
        "(docs/generator.md).",
    )
    text_pretrain_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Steps of CLIP's contrastive objective (captions matched to their images' latents) that "
        "train the text encoder before the UNet starts, so every caption word is told apart; 0 skips them.",
    )
    text_pretrain_batch: Annotated[int, Field(ge=2)] = 256
    text_pretrain_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    unet_channels: list[PositiveInt] = Field(default_factory=lambda: [48, 96, 96], min_length=2, max_length=4)
    unet_layers: PositiveInt = 1
    unet_plain_levels: Annotated[int, Field(ge=0)] = Field(
        1,
        description="UNet levels, from the finest, built without cross-attention to the caption (plain residual "
        "blocks); the coarser ones attend to it. 0 attends at every level, which cost the rare conditions most "
        "of their fidelity (docs/generator.md); 2 suits a 32 x 32 latent, whose finest attention would be costly.",
    )
    unet_steps: Annotated[int, Field(ge=0)] = 2600
    unet_batch: PositiveInt = 64
    unet_lr: Annotated[float, Field(gt=0, le=1)] = 5e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    caption_dropout: Fraction = 0.1
    single_object_share: Fraction | None = Field(
        None,
        description="Share of each UNet batch drawn from one-object captions (prompts ask for one object); "
        "None draws every caption alike.",
    )
    layout_caption_share: Fraction = Field(
        0.0,
        description="Share of the UNet's samples shown the layout caption (sizes and places: 'a small red "
        "circle at top left, fog') instead of the plain one, so prompts can ask where and how large.",
    )
    min_snr_gamma: Annotated[float, Field(gt=0)] = 5.0
    zero_terminal_snr: bool = Field(
        False,
        description="Rescale the noise schedule so its last step keeps no signal, predict v and sample with "
        "trailing timesteps (Lin et al., 'Common diffusion noise schedules and sample steps are flawed'). "
        "Otherwise the last step leaks each image's mean, the UNet learns to rely on it, and sampling from "
        "pure noise pulls every image toward mid-grey: pale nights, thin fog.",
    )
    v_prediction: bool = Field(
        False,
        description="Train the UNet to predict v (the velocity) instead of the noise, on the usual schedule; "
        "zero_terminal_snr implies it.",
    )
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.998
    guide_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Steps that train the class guide after the UNet: a classifier of noisy latents, told by the "
        "captions which classes each image shows, that generate.class_guidance samples with "
        "(tasks/class_guide.py; `synthdet train-guide` adds one to an existing pipeline); 0: no guide.",
    )
    guide_batch: PositiveInt = 128
    guide_lr: Annotated[float, Field(gt=0, le=1)] = 2e-3
    guide_widths: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 128], min_length=1, max_length=4)

    @field_validator("guide_widths")
    @classmethod
    def _group_norm_widths(cls, value: list[int]) -> list[int]:
        if any(width % 8 for width in value):
            raise ValueError(f"every width must be a multiple of 8 (group norm in groups of 8), got {value}")
        return value

    @model_validator(mode="after")
    def _some_level_attends(self) -> TrainGeneratorConfig:
        if self.unet_plain_levels >= len(self.unet_channels):
            raise ValueError(
                f"train-generator.unet_plain_levels: {self.unet_plain_levels} of the UNet's {len(self.unet_channels)} "
                "levels without the caption leaves none to read it; give fewer"
            )
        return self


# ---------------------------------------------------------------------------------------------
# runner: where the generate and validate shards run (flows only; stage commands run in-process)
# ---------------------------------------------------------------------------------------------
class RunnerConfig(Section):
    """The Prefect task runner that maps generation and validation over shards of images."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local", description="local: this process; dask: prefect-dask; ray: prefect-ray (docs/scale-out.md)."
    )
    address: str | None = Field(
        None, description="An existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001)."
    )
    workers: Annotated[int, Field(gt=0, le=1024)] = Field(2, description="Worker processes of a local cluster.")
    shard_size: Annotated[int, Field(gt=0, le=100_000)] = Field(
        64, description="Images per shard: the unit that is mapped, retried and re-run."
    )


# ---------------------------------------------------------------------------------------------
# experiment: does the synthetic data help? (tasks/experiment.py, `synthdet experiment`)
# ---------------------------------------------------------------------------------------------
# start: the starting weights as they are; real: k scarce real rare images (+ replay); unfiltered:
# real + synthetic labelled at a low threshold, no filter; validated: real + synthetic the starting
# detector accepted and labelled; adapted: real + synthetic accepted and labelled by the `real` arm's
# model (a labeller adapted on the scarce real set), balanced by class and condition; ceiling: real +
# as many more real rare images with true labels as the synthetic arms get; restyled (not run unless
# asked): real + common images recoloured to the rare conditions' colours (dataset.restyle), no generator.
ARMS = ("start", "real", "restyled", "unfiltered", "validated", "adapted", "ceiling")
Arm = Literal["start", "real", "restyled", "unfiltered", "validated", "adapted", "ceiling"]


class ExperimentConfig(Section):
    """The ablation: arms fine-tuned from ``finetune.model`` with one step budget, scored on held-out real sets."""

    name: Name = Field("ablation", description="Results go to <workspace>/experiments/<name>/.")
    arms: list[Arm] = Field(default_factory=lambda: [a for a in ARMS if a != "restyled"], min_length=1)
    k: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 10, 30], min_length=1, description="Scarce real rare images (first k of `real`)."
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    real: Path = Field(Path("data/world/rare_scarce"), description="YOLO folder of scarce real rare images.")
    ceiling_pool: Path = Field(
        Path("data/world/reference_train"), description="More real labelled images; only rare conditions are used."
    )
    replay: Path | None = Field(Path("data/world/common_train"), description="Common images mixed into every arm.")
    replay_images: Annotated[int, Field(ge=0)] = 64
    tests: Path = Field(Path("data/world/test"), description="Held-out sets: <tests>/<condition>/data.yaml.")
    rare_conditions: list[str] = Field(default_factory=lambda: ["fog", "night", "rain", "noise"], min_length=1)
    common_conditions: list[str] = Field(default_factory=lambda: ["plain"])
    synthetic_images: PositiveInt = Field(256, description="Generated for the rare conditions, shared by all arms.")
    synthetic_share: Annotated[float, Field(gt=0, le=100)] = Field(
        1.0, description="Synthetic (or ceiling) images per real training image (k + replay)."
    )
    conf: Fraction = Field(0.25, description="Validation threshold of the validated and adapted arms.")
    unfiltered_conf: Fraction = Field(0.05, description="Label threshold of the unfiltered arm.")
    shares: list[Annotated[float, Field(gt=0, le=100)]] = Field(default_factory=list, description="Share sweep.")
    thresholds: list[Fraction] = Field(default_factory=list, description="Validation threshold sweep.")
    sweep_arm: Arm = "validated"
    sweep_k: Annotated[int, Field(ge=0)] = 10
    steps: PositiveInt = Field(100, description="Optimizer steps of every fine-tuned arm (batch finetune.batch).")
    lr0: Annotated[float, Field(gt=0, le=1)] | None = Field(
        0.0001, description="Learning rate of every trained arm; null: finetune.lr0."
    )
    val_images: PositiveInt = Field(16, description="Common images ultralytics validates on after training.")
    refine_boxes: bool = Field(
        True, description="adapted arm: average each box with the labeller's on the mirror image."
    )
    labeller: str | None = Field(
        None, description="adapted arm: weights that accept and label, e.g. the champion's; null: the real arm's model."
    )


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------
class Params(Section):
    """The whole ``params.yaml``."""

    workspace: Path = Path("workspace")
    run_name: Name = "default"
    prompts: PromptsConfig
    generate: GenerateConfig
    validate_: ValidateConfig = Field(..., alias="validate")
    dataset: DatasetConfig = DatasetConfig()
    version: VersionConfig = VersionConfig()
    finetune: FinetuneConfig
    runner: RunnerConfig = RunnerConfig()
    world: WorldConfig = Field(default_factory=WorldConfig)
    train_generator: TrainGeneratorConfig = Field(default_factory=TrainGeneratorConfig, alias="train-generator")
    # The validator is a YOLO26n trained from its yaml: a fine-tune from random weights.
    train_validator: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(model="yolo26n.yaml", epochs=40, registered_model="synthdet-validator"),
        alias="train-validator",
    )
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _restyled_arm_needs_restyle(self) -> Params:
        if "restyled" in self.experiment.arms and self.dataset.restyle is None:
            raise ValueError(
                "experiment.arms: the restyled arm needs dataset.restyle (the images whose colours it takes)"
            )
        return self

    @model_validator(mode="after")
    def _layout_words(self) -> Params:
        from tasks.layout import POSITIONS, SIZES

        if self.validate_.check_layout:
            for axis, known in (("position", POSITIONS), ("size", SIZES)):
                unknown = sorted(set(self.prompts.axes.get(axis, {})) - set(known))
                if unknown:
                    raise ValueError(
                        f"prompts.axes.{axis}: {unknown} are not layout words that validate.check_layout can check "
                        f"({', '.join(known)}); use those, rename the axis, or set validate.check_layout: false"
                    )
        return self

    def section(self, stage: str) -> Section:
        """The config section of a stage, by its one name."""
        if stage not in (*STAGES, *TRAINING_STAGES):
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join((*STAGES, *TRAINING_STAGES))}")
        return getattr(self, {"validate": "validate_"}.get(stage, stage.replace("-", "_")))


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file.

    Args:
        path: a YAML file with one section per stage.
        overrides: dotted keys to set after reading, e.g. ``{"workspace": "/tmp/ws"}``.

    Raises:
        ConfigError: one line per problem, each naming the file and the dotted field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None


def format_validation_error(exc: ValidationError, path: Path | str) -> str:
    """One line per error: ``file: dotted.field: message``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        loc = re.sub(r"\.(\d+)", r"[\1]", loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        lines.append(f"{path}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


class RunOverrides(BaseModel):
    """Changes to ``params.yaml`` for one run: the form the Prefect UI shows when a run is triggered.

    Every field is optional; what is set replaces the matching params entry, and the result is
    validated like the file itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: Name | None = Field(None, description="Names the run folder, runs/RUN_NAME in the workspace.")
    classes: dict[Name, PositiveInt] | None = Field(
        None, description="Class name -> number of prompts; replaces prompts.classes.", examples=[{"circle": 16}]
    )
    conditions: dict[str, Weight] | None = Field(
        None, description="Condition -> weight; replaces prompts.axes.condition.", examples=[{"night": 1, "fog": 1}]
    )
    generator: str | None = Field(None, description="generate.model: a diffusers folder or hub id.")
    num_inference_steps: PositiveInt | None = Field(None, description="generate.num_inference_steps.")
    validator: str | None = Field(None, description="validate.model: ultralytics weights.")
    conf: Fraction | None = Field(None, description="validate.conf: acceptance threshold.")
    start_weights: str | None = Field(None, description="finetune.model: weights to fine-tune from.")
    epochs: PositiveInt | None = Field(None, description="finetune.epochs.")
    seed: int | None = Field(None, description="prompts.seed: a new seed draws new prompts and images.")
    promote_margin: Fraction | None = Field(
        None, description="finetune.promote_margin: mAP50-95 a new model must gain to become champion."
    )
    guard_margin: Fraction | None = Field(
        None, description="finetune.guard_margin: mAP50-95 a new model may lose on finetune.guard_data at most."
    )

    def dotted(self) -> dict[str, Any]:
        """The overrides as dotted params keys, for :func:`load_params`."""
        out: dict[str, Any] = {}
        if self.classes is not None:
            out["prompts.classes"] = [{"name": name, "count": count} for name, count in self.classes.items()]
        if self.conditions is not None:
            out["prompts.axes.condition"] = dict(self.conditions)
        fields = {"run_name": "run_name", "generator": "generate.model", "num_inference_steps":
                  "generate.num_inference_steps", "validator": "validate.model", "conf": "validate.conf",
                  "start_weights": "finetune.model", "epochs": "finetune.epochs", "seed": "prompts.seed",
                  "promote_margin": "finetune.promote_margin", "guard_margin": "finetune.guard_margin"}  # fmt: skip
        for field, key in fields.items():
            value = getattr(self, field)
            if value is not None:
                out[key] = value
        return out
