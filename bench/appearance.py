"""How close do an experiment's synthetic images come to the real ones, condition by condition?

For each experiment named (``<workspace>/experiments/<name>/synthetic.parquet``, the rare-condition
images ``synthdet experiment`` generated), per condition, beside the same figures on the real held-out
test images: mean brightness, contrast (the standard deviation of brightness within an image), colour
saturation (max - min channel) and fine detail (mean absolute Laplacian: texture, rain streaks, sensor
noise). Then, for the images the validator accepts (conf >= 0.25, as the validated arm), how far its
labels agree with a reference detector trained on every condition (same class, IoU >= 0.5).

With ``--generators``, it also asks why a generator's overall brightness is off. A noise schedule
whose last step keeps some signal (Stable Diffusion's does: sqrt(alpha_bar) = 0.068 at t = 999) leaks
each training image's mean into the noisiest inputs, and a UNet that learns to rely on it pulls every
image sampled from pure noise toward mid-grey. For 16 fog and 16 night prompts it samples twice from
the same noise, as is and with the real images' mean latent added at the first step's signal level;
if the second comes out at the real brightness, the leak is the cause.

    python -m bench.appearance --experiments ablation ablation-previous-generator   # about 1 min
    python -m bench.appearance --experiments ablation --generators models/generator:10

Prints its tables and writes ``bench/results/appearance.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment


def image_stats(paths: list[str]) -> dict[str, float]:
    """Mean brightness, contrast, saturation and fine detail over ``paths`` (RGB in 0-1)."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    rgb = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths])
    grey = rgb.mean(-1)
    return {
        "images": len(paths),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std(axis=(1, 2)).mean()),
        "saturation": float((rgb.max(-1) - rgb.min(-1)).mean()),
        "detail": float(np.mean([np.abs(ndimage.laplace(g)).mean() for g in grey])),
    }


def label_agreement(generated, validator: str, reference: str, cache: Path) -> dict[str, float]:
    """Of the images the validator accepts, the share the reference also finds the prompted class in, and
    the precision and recall of the validator's boxes against the reference's (same class, IoU >= 0.5)."""
    from tasks.config import ValidateConfig
    from tasks.experiment import box_iou, label_synthetic
    from tasks.validation import detect, load_detector

    rules = ValidateConfig(model=validator, conf=0.25)
    detectors = {"validator": load_detector(validator), "reference": load_detector(reference)}
    found = {
        role: detect(
            detector,
            [Path(p) for p in generated["path"]],
            rules.model_copy(update={"model": detector.path}),
            cache,
            progress=False,
        )  # fmt: skip
        for role, detector in detectors.items()
    }
    names = detectors["validator"].names
    accepted = {i.path for i in label_synthetic(generated, found["validator"], names, names, rules, 0.25, True)}
    agree = matched = ours = theirs = 0
    for (_, row), mine, ref in zip(generated.iterrows(), found["validator"], found["reference"], strict=True):
        if row["path"] not in accepted:
            continue
        mine = [(d["name"], d["box"]) for d in mine if d["conf"] >= 0.25]
        ref = [(d["name"], d["box"]) for d in ref if d["conf"] >= 0.25]
        agree += any(name == row["class"] for name, _ in ref)
        matched += sum(any(n == m and box_iou(b, c) >= 0.5 for m, c in ref) for n, b in mine)
        ours, theirs = ours + len(mine), theirs + len(ref)
    n = max(len(accepted), 1)
    return {
        "accepted": len(accepted),
        "reference_agrees": agree / n,
        "box_precision": matched / max(ours, 1),
        "box_recall": matched / max(theirs, 1),
    }


def leak_test(generator: str, guidance: float, tests: Path, seed: int = 0) -> list[dict]:
    """Brightness of fog and night images sampled from plain noise and from noise plus the leaked mean."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from tasks.config import GenerateConfig
    from tasks.generation import start_mean_latents

    pipe = StableDiffusionPipeline.from_pretrained(generator, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    pipe.scheduler.set_timesteps(20)
    signal = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]].sqrt()
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = GenerateConfig(model=generator, height=side, width=side)
    rows = []
    for condition in ("fog", "night"):
        paths = sorted((tests / condition / "images").glob("*.png"))[:64]
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        mean = start_mean_latents(pipe, {condition: paths}, cfg)[condition]  # what generate.start_means adds
        prompts = [f"a {c} {k}, {condition}" for c in ("red", "blue", "white", "green")
                   for k in ("circle", "square", "triangle", "star")]  # fmt: skip
        size = pipe.unet.config.sample_size
        noise = torch.randn(len(prompts), vae.config.latent_channels, size, size,
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        row = {"generator": generator, "guidance": guidance, "condition": condition,
               "real": float(pixels.mean() / 255)}  # fmt: skip
        for name, start in (
            ("plain noise", noise),
            ("noise + leaked mean", noise + signal * mean[None, :, None, None]),
        ):
            images = pipe(prompts, latents=start, num_inference_steps=20, guidance_scale=guidance, output_type="np")
            row[name] = float(images.images.mean())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace" / "experiment")
    parser.add_argument("--experiments", nargs="+", default=["ablation"], help="experiment names")
    parser.add_argument("--tests", type=Path, default=ROOT / "data" / "world" / "test")
    parser.add_argument("--conditions", default="fog,night,rain,noise")
    parser.add_argument("--validator", default=str(ROOT / "models" / "validator.pt"))
    parser.add_argument("--reference", default=str(ROOT / "models" / "reference.pt"))
    parser.add_argument("--generators", nargs="*", default=[], metavar="PATH:GUIDANCE",
                        help="pipelines to run the leak test on, e.g. models/generator:10")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/appearance.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    scratch = Path(tempfile.mkdtemp(prefix="synthdet-bench-appearance-"))
    prepare_environment(scratch)

    import pandas as pd

    tables = {}
    for name in args.experiments:
        table_path = args.workspace / "experiments" / name / "synthetic.parquet"
        if not table_path.is_file():
            raise SystemExit(f"--experiments: {table_path}: no such file (run `synthdet experiment` first)")
        generated = pd.read_parquet(table_path)
        tables[name] = generated[generated["status"] == "ok"].reset_index(drop=True)
    looks = []
    for condition in args.conditions.split(","):
        real = sorted(str(p) for p in (args.tests / condition / "images").glob("*.png"))
        looks.append({"source": "real test", "condition": condition, **image_stats(real)})
        for name, generated in tables.items():
            paths = list(generated.loc[generated["condition"] == condition, "path"])
            looks.append({"source": name, "condition": condition, **image_stats(paths)})
    labels = [
        {"source": name, **label_agreement(generated, args.validator, args.reference, scratch / "detections")}
        for name, generated in tables.items()
    ]
    leaks = [row for spec in args.generators for row in leak_test(*_generator(spec), args.tests)]
    print(table(looks))
    print()
    print(table(labels))
    if leaks:
        print()
        print(table(leaks))
    figures = {"appearance": looks, "labels": labels, "leak": leaks}
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    write_result("appearance", argv, settings, figures, load, args.out)
    return figures


def _generator(spec: str) -> tuple[str, float]:
    path, _, guidance = spec.rpartition(":")
    if not path or not Path(path).is_dir():
        raise SystemExit(f"--generators: {spec!r}: expected PATH:GUIDANCE with PATH a pipeline folder")
    return path, float(guidance)


if __name__ == "__main__":
    main()
