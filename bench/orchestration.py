"""What does running a stage through the Prefect flow cost, next to the bare library loop?

generate: images per second of the generate stage run as a Prefect flow (``run_stages`` with only
``generate``, on a fresh workspace so nothing is cached) against a bare diffusers loop over the same
loaded pipeline, prompts, seeds, batch size, steps and size, saving the same PNGs. validate: the validate
stage through the flow (detection cache emptied first) against bare ``model.predict`` batches over the
same images. Each repetition measures both side by side (alternating which goes first); the ratios
are medians over repetitions. Goals: generate >= 0.95 of bare, validate >= 0.90.

The flow figure is the whole flow call (Prefect flow run, MLflow runs, preflight, lock, loading the
model, writing tables and grids); ``inner`` leaves out the Prefect flow run's own start and end.
CPU seconds (this process and its children, such as the local Prefect server) are recorded beside
wall seconds: on a machine shared with other jobs, wall time swings several-fold with their load,
and the CPU-time ratio is the steadier figure.

    python -m bench.orchestration                        # about 5 min on a quiet 2-core CPU (20 min shared)
    python -m bench.orchestration --gen-images 16 --val-images 64 --repeat 2   # a quick look

Prints a table and writes ``bench/results/orchestration.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.report import ROOT, LoadWatch, median, table, write_result
from bench.workload import class_counts, derive_params, prepare_environment, stage_flow, timed_cpu

TINY_GENERATOR = ROOT / "models" / "tiny" / "generator"  # `synthdet tiny-models`


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="generator, steps, batch, validator")
    parser.add_argument("--gen-images", type=int, default=16, help="images generated per repetition")
    parser.add_argument("--val-images", type=int, default=256, help="images validated per repetition")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stages", default="generate,validate", help="which of generate,validate to measure")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/orchestration.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    root = Path(tempfile.mkdtemp(prefix="synthdet-bench-orch-"))
    try:
        prepare_environment(root / "env")
        wanted = args.stages.split(",")
        figures: dict = {}
        if "generate" in wanted:
            figures["generate"] = bench_generate(args.params, root, args.gen_images, args.repeat)
        if "validate" in wanted:
            figures["validate"] = bench_validate(args.params, root, args.val_images, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        {
            "stage": stage,
            "images": f["images"],
            "bare img/s": f["bare_images_per_s"],
            "flow img/s": f["flow_images_per_s"],
            "ratio": f["ratio_median"],
            "inner ratio": f["inner_ratio_median"],
            "CPU-time ratio": f["cpu_ratio_median"],
            "overhead s": f["overhead_s_median"],
            "goal": f["goal"],
            "met": f["ratio_median"] >= f["goal"],
        }
        for stage, f in figures.items()
    ]
    print(table(rows))
    settings = {
        "params": str(args.params),
        "gen_images": args.gen_images,
        "val_images": args.val_images,
        "repeat": args.repeat,
        "torch_threads": os.cpu_count(),
    }
    write_result("orchestration", argv, settings, {"table": rows, **figures}, load, args.out)
    return figures


def _summarise(images: int, bare: list, flow: list, inner: list[float], goal: float) -> dict:
    """Figures from (wall, cpu) seconds of the bare and flow runs, paired by repetition."""
    bare_wall, bare_cpu = [b[0] for b in bare], [b[1] for b in bare]
    flow_wall, flow_cpu = [f[0] for f in flow], [f[1] for f in flow]
    ratios = [b / f for b, f in zip(bare_wall, flow_wall, strict=True)]
    cpu_ratios = [b / f for b, f in zip(bare_cpu, flow_cpu, strict=True)]
    inner_ratios = [b / i for b, i in zip(bare_wall, inner, strict=True)]
    return {
        "images": images,
        "bare_s": [round(s, 3) for s in bare_wall],
        "flow_s": [round(s, 3) for s in flow_wall],
        "flow_inner_s": [round(s, 3) for s in inner],
        "bare_cpu_s": [round(s, 3) for s in bare_cpu],
        "flow_cpu_s": [round(s, 3) for s in flow_cpu],
        "bare_images_per_s": round(images / median(bare_wall), 3),
        "flow_images_per_s": round(images / median(flow_wall), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ratio_median": round(median(ratios), 3),
        "inner_ratio_median": round(median(inner_ratios), 3),
        "cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "cpu_ratio_median": round(median(cpu_ratios), 3),
        "overhead_s_median": round(median([f - b for b, f in zip(bare_wall, flow_wall, strict=True)]), 2),
        "overhead_cpu_s_median": round(median([f - b for b, f in zip(bare_cpu, flow_cpu, strict=True)]), 2),
        "goal": goal,
    }


def bench_generate(params: Path, root: Path, images: int, repeat: int) -> dict:
    import pandas as pd
    import torch

    from tasks.config import load_params
    from tasks.generation import load_pipeline

    run = stage_flow()
    # start_means only adds given starting latents; the bare loop draws its own noise, so leave it out of both.
    changes = {"prompts.classes": class_counts(params, images), "generate.start_means": None}
    derived = derive_params(params, root / "generate.yaml", changes)
    cfg = load_params(derived).generate
    loaded = load_pipeline(cfg)
    bare_s, flow_s, inner_s, in_loop_s = [], [], [], []
    for rep in range(repeat):
        workspace = root / f"gen-{rep}"
        summary = run(str(derived), str(workspace), ["prompts"])  # untimed: the prompt table the stage reads
        prompts = pd.read_parquet(summary["prompts"]["path"])
        assert len(prompts) == images, f"{len(prompts)} prompts, expected {images}"
        for which in ("bare", "flow") if rep % 2 == 0 else ("flow", "bare"):
            torch.set_num_threads(os.cpu_count() or 1)  # as the stage sets it; ultralytics leaves one fewer
            if which == "bare":
                seconds, cpu, _ = timed_cpu(_bare_generate, loaded.pipe, prompts, cfg, workspace / "bare", torch)
                bare_s.append((seconds, cpu))
            else:
                seconds, cpu, summary = timed_cpu(run, str(derived), str(workspace), ["generate"])
                assert summary["generate"]["generated"] + summary["generate"]["degenerate"] == images
                flow_s.append((seconds, cpu))
                inner_s.append(summary["inner_s"])
                # The stage's own per-image seconds (its pipeline calls), when its table records them.
                table = pd.read_parquet(summary["generate"]["path"])
                if "seconds" in table:
                    in_loop_s.append(float(table["seconds"].astype(float).sum()))
            print(
                f"generate rep {rep + 1}/{repeat} {which}: {seconds:.2f} s ({cpu:.1f} CPU s) for {images} images",
                flush=True,
            )
    in_loop = {"stage_pipeline_call_s": [round(s, 3) for s in in_loop_s]} if in_loop_s else {}
    return {
        **_summarise(images, bare_s, flow_s, inner_s, 0.95),
        **in_loop,
        "settings": {
            "model": cfg.model,
            "num_inference_steps": cfg.num_inference_steps,
            "batch_size": cfg.batch_size,
            "height": cfg.height,
            "width": cfg.width,
            "dtype": cfg.dtype,
            "guidance_scale": cfg.guidance_scale,
        },
    }


def _bare_generate(pipe, prompts, cfg, out: Path, torch) -> None:
    """The loop one would write by hand: batches through the pipeline, one PNG per image."""
    out.mkdir(parents=True, exist_ok=True)
    rows = prompts.to_dict("records")
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        with torch.inference_mode():
            result = pipe(
                prompt=[r["prompt"] for r in batch],
                negative_prompt=[r["negative_prompt"] for r in batch],
                generator=[torch.Generator(cfg.device).manual_seed(int(r["seed"])) for r in batch],
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                height=cfg.height,
                width=cfg.width,
            )
        for row, image in zip(batch, result.images, strict=True):
            image.save(out / f"{row['prompt_id']}.png")


def bench_validate(params: Path, root: Path, images: int, repeat: int) -> dict:
    import torch

    from tasks.config import load_params
    from tasks.workspace import Workspace

    run = stage_flow()
    # The images to validate: made once, untimed, at 2 steps by the tiny random generator when it is
    # built (else the params' one): pixels do not change the detector's cost. More prompts than the
    # grid has cells need repeats (new seeds).
    changes = {
        "prompts.classes": class_counts(params, images),
        "prompts.allow_repeats": True,
        "generate.num_inference_steps": 2,
    }
    if (TINY_GENERATOR / "model_index.json").is_file():
        changes["generate.model"] = str(TINY_GENERATOR)
    derived = derive_params(params, root / "validate.yaml", changes)
    cfg = load_params(derived).validate_
    workspace = root / "val"
    summary = run(str(derived), str(workspace), ["prompts", "generate"])
    paths = sorted(str(p) for p in Workspace(workspace).images.glob("*.png"))
    assert len(paths) == images, f"{len(paths)} images, expected {images}"
    from ultralytics import YOLO

    model = YOLO(cfg.model, task="detect")
    bare_s, flow_s, inner_s = [], [], []
    for rep in range(repeat):
        for which in ("bare", "flow") if rep % 2 == 0 else ("flow", "bare"):
            torch.set_num_threads(os.cpu_count() or 1)
            if which == "bare":
                seconds, cpu, _ = timed_cpu(_bare_validate, model, paths, cfg)
                bare_s.append((seconds, cpu))
            else:
                shutil.rmtree(Workspace(workspace).detections, ignore_errors=True)  # no cached detections
                seconds, cpu, summary = timed_cpu(run, str(derived), str(workspace), ["validate"])
                assert summary["validate"]["validated"] == images
                flow_s.append((seconds, cpu))
                inner_s.append(summary["inner_s"])
            print(
                f"validate rep {rep + 1}/{repeat} {which}: {seconds:.2f} s ({cpu:.1f} CPU s) for {images} images",
                flush=True,
            )
    return {
        **_summarise(images, bare_s, flow_s, inner_s, 0.90),
        "settings": {
            "model": cfg.model,
            "imgsz": cfg.imgsz,
            "batch": cfg.batch,
            "conf": cfg.conf,
            "device": cfg.device,
        },
    }


def _bare_validate(model, paths: list[str], cfg) -> None:
    for start in range(0, len(paths), cfg.batch):
        model.predict(
            paths[start : start + cfg.batch],
            imgsz=cfg.imgsz,
            conf=cfg.conf,
            iou=cfg.iou,
            device=cfg.device,
            batch=cfg.batch,
            verbose=False,
        )


if __name__ == "__main__":
    main()
