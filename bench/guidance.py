"""How does the generator's fidelity depend on the classifier-free guidance scale?

Generates ``--per-cell`` images for every class x condition cell of the world (the prompts
``synthdet evaluate-default`` uses) at each guidance scale, with the same seeds, and counts the images
in which a judge finds the prompted class at conf >= 0.25: the default validator for common conditions,
the reference detector (trained on every condition) for rare ones, as in docs/default-model.md. Use it
to choose ``generate.guidance_scale`` for a generator.

    python -m bench.guidance                                   # about 4 min on a 2-core CPU
    python -m bench.guidance --scales 1,4,7.5,10,14 --per-cell 12
    python -m bench.guidance --scales 10 --until 1,0.5,0.3     # guide only the first steps
    python -m bench.guidance --scales 10 --layout --generator DIR   # prompts that ask for size and place
    python -m bench.guidance --scales 10 --class-guidance 0,50,100  # steer by the pipeline's class guide
    python -m bench.guidance --scales 10 --class-guidance 50 --start-means params.yaml   # as the pipeline samples

``--start-means`` starts each image from its condition's mean real latent as ``generate.start_means`` in
the given params file does (it needs that file's images, e.g. ``synthdet world --only rare_scarce``).
Beside fidelity, each row shows every condition's tone: the mean brightness and the mean per-image
contrast (pixel standard deviation) of its images, and the real test images' tone where
``data/world/test/<condition>/images`` exists, since strong class guidance darkens fog and brightens
night (docs/generator.md).

Prints a table and writes ``bench/results/guidance.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment

CLASSES = ["circle", "square", "triangle", "star"]
SCHEDULERS = {"ddim": None, "dpm++": "DPMSolverMultistepScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


def to_bgr(pixels) -> list:
    """A pipeline's float images in [0, 1] as uint8 BGR arrays, the layout ultralytics reads."""
    import numpy as np

    return [np.ascontiguousarray((x * 255).round().astype(np.uint8)[..., ::-1]) for x in pixels]


def tone(images: list, conditions: list[str]) -> dict[str, str]:
    """Each condition's mean brightness and mean per-image contrast (pixel std), as "0.69/0.061".

    The std is over every pixel and channel, so colour counts as contrast; ``bench.appearance.image_stats``
    takes it over grey. The figures in docs/benchmarks.md section 7 use this one.
    """
    import numpy as np

    out = {}
    for condition in dict.fromkeys(conditions):
        pixels = np.stack([im for im, c in zip(images, conditions, strict=True) if c == condition]) / 255.0
        out[condition] = f"{pixels.mean():.2f}/{pixels.reshape(len(pixels), -1).std(1).mean():.3f}"
    return out


def real_tone(folder: Path, conditions: list[str], limit: int = 200) -> dict[str, str] | None:
    """:func:`tone` of the real test images ``folder/<condition>/images``; None if any is missing."""
    import numpy as np
    from PIL import Image

    images, labels = [], []
    for condition in conditions:
        files = sorted((folder / condition / "images").glob("*.png"))[:limit]
        if not files:
            return None
        images += [np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files]
        labels += [condition] * len(files)
    return tone(images, labels)


def detect_all(judges: dict, images: list) -> dict[str, list[list[dict]]]:
    """Each judge's detections per image at conf >= 0.25: ``{"name", "box"}`` (box as normalised cx, cy, w, h).

    Leaves torch's thread count as it found it: an ultralytics ``predict`` sets ``cpu_count - 1``, and a
    bench that trains or denoises after judging would otherwise go on with one thread on two cores.
    """
    import torch

    threads = torch.get_num_threads()
    out = {}
    for name, judge in judges.items():
        results = judge.predict(images, imgsz=64, conf=0.25, verbose=False, batch=64)
        torch.set_num_threads(threads)
        out[name] = [
            [{"name": judge.names[int(c)], "box": b.tolist()} for c, b in zip(r.boxes.cls, r.boxes.xywhn, strict=True)]
            for r in results
        ]
    return out


def judge_all(judges: dict, table, images: list) -> tuple[dict, dict[str, list[list[dict]]]]:
    """How often the judge that counts finds each image's intended class, as ``synthdet evaluate-default``
    summarises it (overall, by condition, by class), and each judge's detections.

    ``table`` holds one row per image with its ``class`` and ``condition``.
    """
    from tasks import evaluate_default as ev

    judged = table.assign(source="generated")
    detections = detect_all(judges, images)
    for name, found in detections.items():
        judged[f"found_{name}"] = ev.found(found, table["class"].tolist())
    return ev.fidelity_summary(judged)["generated"], detections


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=ROOT / "models" / "generator")
    parser.add_argument("--validator", type=Path, default=ROOT / "models" / "validator.pt")
    parser.add_argument("--reference", type=Path, default=ROOT / "models" / "reference.pt")
    parser.add_argument("--scales", default="4,6,8,10,14", help="comma-separated guidance scales")
    parser.add_argument("--per-cell", type=int, default=6, help="images per class x condition cell and scale")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim",
                        help="sampler: ddim (the generator's own), dpm++ (DPMSolverMultistep), euler_a")  # fmt: skip
    parser.add_argument("--until", default="1",
                        help="comma-separated shares of the steps to guide, the rest unguided (generate.guidance_until)")  # fmt: skip
    parser.add_argument("--layout", action="store_true",
                        help="prompts also ask for a size and a place ('a small red star at top left, fog'); "
                        "reports how often the found box agrees with them")  # fmt: skip
    parser.add_argument("--negative", choices=["none", "others"], default="none",
                        help="others: each prompt's negative prompt names the other classes in its colour and "
                        "condition ('a red square and a red triangle and a red star, fog' for a red circle)")  # fmt: skip
    parser.add_argument("--class-guidance", default="0",
                        help="comma-separated scales of classifier guidance by the generator's class_guide/ "
                        "(generate.class_guidance; 0: none)")  # fmt: skip
    parser.add_argument("--class-from", default="0",
                        help="comma-separated shares of the steps run before class guidance starts "
                        "(generate.class_guidance_from)")  # fmt: skip
    parser.add_argument("--start-means", type=Path, default=None, metavar="PARAMS",
                        help="start each image from its condition's mean real latent, as generate.start_means in "
                        "this params file (default: from noise)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/guidance.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    prepare_environment(Path(tempfile.mkdtemp(prefix="synthdet-bench-guidance-")))

    import torch
    from diffusers import StableDiffusionPipeline
    from ultralytics import YOLO

    from tasks import evaluate_default as ev
    from tasks.class_guide import GUIDE_DIR, LatentClassifier, chain, guidance_step
    from tasks.config import load_params
    from tasks.generation import guidance_cutoff, start_latents, start_mean_latents, start_mean_sources
    from tasks.layout import agrees
    from tasks.world import COMMON_CONDITIONS, CONDITIONS

    sampling = None  # the params' generate section, with --start-means
    if args.start_means:
        sampling = load_params(args.start_means).generate.model_copy(update={"num_inference_steps": args.steps})
        if sampling.start_means is None:
            parser.error(f"--start-means: {args.start_means} sets no generate.start_means")
    prompts = ev.prompt_table(CLASSES, CONDITIONS, args.per_cell, seed=0, layout=args.layout)
    if args.negative == "others":
        prompts["negative_prompt"] = [
            " and ".join(f"a {p['colour']} {c}" for c in CLASSES if c != p["class"]) + f", {p['condition']}"
            for p in prompts.to_dict("records")
        ]
    pipe = StableDiffusionPipeline.from_pretrained(args.generator, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if SCHEDULERS[args.scheduler]:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    judges = {"validator": YOLO(str(args.validator)), "reference": YOLO(str(args.reference))}
    means = None  # each condition's mean latent, with --start-means
    if sampling is not None:
        means = start_mean_latents(pipe, start_mean_sources(sampling), sampling)

    real = real_tone(ROOT / "data" / "world" / "test", list(CONDITIONS))
    if real:
        print("real test images' tone (brightness/contrast):", real, flush=True)
    rows = []
    untils = [float(u) for u in args.until.split(",")]
    steers = [(float(c), float(f)) for c in args.class_guidance.split(",") for f in args.class_from.split(",")]
    guide = (
        LatentClassifier.from_pretrained(args.generator / GUIDE_DIR, local_files_only=True)
        if any(c for c, _ in steers)
        else None
    )
    settings = ((float(s), u, c) for s in args.scales.split(",") for u in untils for c in steers)
    for scale, until, (steer, steer_from) in settings:
        began = time.perf_counter()
        images = []
        for start in range(0, len(prompts), 32):
            chunk = prompts.iloc[start : start + 32]
            seeds = [torch.Generator().manual_seed(int(s)) for s in chunk["seed"]]
            ids = [guide.config.classes.index(c) for c in chunk["class"]] if guide else []
            steering = guidance_step(guide, ids, steer, steer_from) if steer else None
            step = chain(guidance_cutoff(args.steps, until), steering)
            latents = None
            if means is not None:  # draws each seed's noise as the pipeline would, plus its condition's mean
                latents = start_latents(pipe, chunk.to_dict("records"), seeds, means, sampling)
            out = pipe(list(chunk["prompt"]), negative_prompt=list(chunk["negative_prompt"]),  # "" = unconditional
                       num_inference_steps=args.steps, guidance_scale=scale, height=64, width=64, generator=seeds,
                       latents=latents, output_type="np",
                       callback_on_step_end=step,
                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images  # fmt: skip
            images += to_bgr(out)
        seconds = time.perf_counter() - began
        fidelity, detections = judge_all(judges, prompts, images)  # the judge that counts, as evaluate-default
        row = {"guidance": scale, "until": until, "class guidance": steer, "from": steer_from, "images": len(images),
               "fidelity": round(fidelity["overall"], 3)}  # fmt: skip
        if args.layout:  # found with the size and place asked for, by the judge that counts
            judge = ["validator" if c in COMMON_CONDITIONS else "reference" for c in prompts["condition"]]
            placed = [
                any(d["name"] == p["class"] and agrees(d["box"], p["position"], p["size"]) for d in detections[j][i])
                for i, (p, j) in enumerate(zip(prompts.to_dict("records"), judge, strict=True))
            ]
            row["as asked"] = round(sum(placed) / len(placed), 3)
        row |= {k: round(v, 2) for k, v in {**fidelity["by_condition"], **fidelity["by_class"]}.items()}
        row |= {f"{c} tone": v for c, v in tone(images, list(prompts["condition"])).items() if c != "plain"}
        row["s/image"] = round(seconds / len(images), 3)
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    best = max(rows, key=lambda r: r["fidelity"])
    figures = {"rows": rows, "best": {k: best[k] for k in ("guidance", "until", "class guidance", "from")}}
    if real:
        figures["real tone"] = real
    write_result("guidance", argv, settings, figures, load, args.out)
    return figures


if __name__ == "__main__":
    main()
