"""How does the generator's fidelity depend on the classifier-free guidance scale?

Generates ``--per-cell`` images for every class x condition cell of the world (the prompts
``synthdet evaluate-default`` uses) at each guidance scale, with the same seeds, and counts the images
in which a judge finds the prompted class at conf >= 0.25: the default validator for common conditions,
the reference detector (trained on every condition) for rare ones, as in docs/default-model.md. Use it
to choose ``generate.guidance_scale`` for a generator.

    python -m bench.guidance                                   # about 4 min on a 2-core CPU
    python -m bench.guidance --scales 1,4,7.5,10,14 --per-cell 12

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=ROOT / "models" / "generator")
    parser.add_argument("--validator", type=Path, default=ROOT / "models" / "validator.pt")
    parser.add_argument("--reference", type=Path, default=ROOT / "models" / "reference.pt")
    parser.add_argument("--scales", default="4,6,8,10,14", help="comma-separated guidance scales")
    parser.add_argument("--per-cell", type=int, default=6, help="images per class x condition cell and scale")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/guidance.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    prepare_environment(Path(tempfile.mkdtemp(prefix="synthdet-bench-guidance-")))

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from ultralytics import YOLO

    from tasks import evaluate_default as ev
    from tasks.world import CONDITIONS

    prompts = ev.prompt_table(CLASSES, CONDITIONS, args.per_cell, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(args.generator, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    judges = {"validator": YOLO(str(args.validator)), "reference": YOLO(str(args.reference))}
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        began = time.perf_counter()
        images = []
        for start in range(0, len(prompts), 32):
            chunk = prompts.iloc[start : start + 32]
            seeds = [torch.Generator().manual_seed(int(s)) for s in chunk["seed"]]
            out = pipe(list(chunk["prompt"]), num_inference_steps=args.steps, guidance_scale=scale, height=64,
                       width=64, generator=seeds, output_type="np").images  # fmt: skip
            images += [np.ascontiguousarray((x * 255).round().astype(np.uint8)[..., ::-1]) for x in out]  # BGR
        seconds = time.perf_counter() - began
        judged = prompts.assign(source="generated")
        for name, judge in judges.items():
            results = judge.predict(images, imgsz=64, conf=0.25, verbose=False, batch=64)
            detections = [[{"name": judge.names[int(c)]} for c in r.boxes.cls] for r in results]
            judged[f"found_{name}"] = ev.found(detections, prompts["class"].tolist())
        fidelity = ev.fidelity_summary(judged)["generated"]  # the judge that counts, as evaluate-default
        row = {"guidance": scale, "images": len(images), "fidelity": round(fidelity["overall"], 3)}
        row |= {k: round(v, 2) for k, v in {**fidelity["by_condition"], **fidelity["by_class"]}.items()}
        row["s/image"] = round(seconds / len(images), 3)
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    figures = {"rows": rows, "best": max(rows, key=lambda r: r["fidelity"])["guidance"]}
    write_result("guidance", argv, settings, figures, load, args.out)
    return figures


if __name__ == "__main__":
    main()
