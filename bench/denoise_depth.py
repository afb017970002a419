"""At which noise level does the generator lose the shapes? Real scenes noised, then denoised.

Renders ``--per-cell`` single-object world scenes per class x condition (those ``synthdet
evaluate-default`` uses), noises each one's latent to a depth (img2img ``strength``: 0 is the plain
autoencoder round trip, 1 is pure noise, as text-to-image), lets the generator denoise it back with the
scene's own caption, and counts the images in which the judge finds the scene's class at conf >= 0.25
(the validator for common conditions, the reference detector for rare ones, as evaluate-default).

If shapes survive shallow noise but not deep noise, the generator cannot lay out a shape from scratch;
if even shallow noise loses them, its last, fine-detail steps blur them (capacity at the finest latent
level, or a latent space too sharp for it to hit).

    python -m bench.denoise_depth                       # about 5 min on a 2-core CPU
    python -m bench.denoise_depth --strengths 0,0.3,0.6 --per-cell 6 --generator DIR

Prints a table and writes ``bench/results/denoise_depth.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.guidance import judge_all, to_bgr
from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment

CLASSES = ["circle", "square", "triangle", "star"]


def round_trip(vae, pixels):
    """(N, H, W, 3) uint8 images encoded (posterior mean) and decoded by ``vae``: floats in [0, 1], NHWC."""
    import torch

    from tasks.generation import pixels_to_tensor

    with torch.inference_mode():
        z = vae.encode(pixels_to_tensor(pixels)).latent_dist.mean
        out = (vae.decode(z).sample.clamp(-1, 1) + 1) / 2
    return out.permute(0, 2, 3, 1).numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=ROOT / "models" / "generator")
    parser.add_argument("--validator", type=Path, default=ROOT / "models" / "validator.pt")
    parser.add_argument("--reference", type=Path, default=ROOT / "models" / "reference.pt")
    parser.add_argument("--strengths", default="0,0.2,0.4,0.6,0.8,1", help="comma-separated img2img strengths")
    parser.add_argument("--per-cell", type=int, default=8, help="real scenes per class x condition cell")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of a full (strength 1) run")
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/denoise_depth.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    work = Path(tempfile.mkdtemp(prefix="synthdet-bench-denoise-"))
    prepare_environment(work)

    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image
    from ultralytics import YOLO

    from tasks import evaluate_default as ev
    from tasks.world import CONDITIONS

    real = ev.render_real(CLASSES, CONDITIONS, args.per_cell, work / "real")
    pixels = [Image.open(p).convert("RGB") for p in real["path"]]
    seeds = [ev.cell_seed(0, c, k, i) for i, (c, k) in enumerate(zip(real["class"], real["condition"], strict=True))]
    pipe = StableDiffusionPipeline.from_pretrained(args.generator, dtype=torch.float32, local_files_only=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    judges = {"validator": YOLO(str(args.validator)), "reference": YOLO(str(args.reference))}
    rows = []
    for strength in (float(s) for s in args.strengths.split(",")):
        began = time.perf_counter()
        images = []
        for start in range(0, len(real), 32):
            end = min(start + 32, len(real))
            if strength == 0:  # the round trip: the autoencoder alone
                out = round_trip(pipe.vae, np.stack([np.asarray(p) for p in pixels[start:end]]))
            else:
                out = img2img(list(real["caption"][start:end]), image=pixels[start:end], strength=strength,
                              num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                              generator=[torch.Generator().manual_seed(s) for s in seeds[start:end]]).images  # fmt: skip
            images += to_bgr(out)
        seconds = time.perf_counter() - began
        fidelity, _ = judge_all(judges, real, images)
        row = {"strength": strength, "images": len(images), "found": round(fidelity["overall"], 3)}
        row |= {k: round(v, 2) for k, v in {**fidelity["by_condition"], **fidelity["by_class"]}.items()}
        row["s/image"] = round(seconds / len(images), 3)
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    write_result("denoise_depth", argv, settings, {"rows": rows}, load, args.out)
    return {"rows": rows}


if __name__ == "__main__":
    main()
