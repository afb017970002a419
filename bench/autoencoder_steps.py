"""Does the autoencoder stop at a lucky point? Its round trip, measured along one training run.

Trains only the autoencoder of ``synthdet train-generator`` (the ``train-generator`` settings of
``--params``; ``--steps``, ``--ema``, ``--mean``, ``--seed``, ``--clip`` and ``--lr`` override theirs) on the captioned world images. Every
``--every`` steps it measures the round trip: the share of real single-object scenes (``--per-cell`` per
class x condition, the scenes ``synthdet evaluate-default`` uses) in which the judge still finds the class
after encoding and decoding. The judge is the validator for common conditions and the reference detector
for rare ones, at conf >= 0.25. With ``--ema`` each checkpoint measures both the last step's weights and
their moving average, so one run shows whether averaging steadies the end point. Each row also shows
the mean and the largest of the training losses sampled every 50 steps since the last checkpoint, and the
median and largest norm of the gradient at those steps (after clipping, with ``--clip``).

    python -m bench.autoencoder_steps --steps 3000 --every 250 --ema 0.995    # 27 min here, half of it beside another run
    python -m bench.autoencoder_steps --steps 2000 --every 250 --mean --threads 2 --clip 0.5  # 23 min beside another run
    python -m bench.autoencoder_steps --steps 100 --every 50 --per-cell 2     # a smoke run

``--save DIR`` keeps the weights the run returns (the average with ``--ema``), for
``train-generator.vae_from``. Prints a table and writes ``bench/results/autoencoder_steps.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.denoise_depth import CLASSES, round_trip
from bench.guidance import judge_all, to_bgr
from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "world" / "captioned",
                        help="captioned world images (`synthdet world --only captioned`)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="autoencoder steps (default: the params')")
    parser.add_argument("--every", type=int, default=250, help="steps between round-trip measurements")
    parser.add_argument("--ema", type=float, default=None, help="also average the weights with this decay")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the params')")
    parser.add_argument(
        "--mean", action="store_true", help="decode the posterior mean, not a sample (vae_sample: false)"
    )
    parser.add_argument(
        "--clip", type=float, default=None, help="clip each step's gradient to this norm (vae_clip_grad)"
    )
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the params' vae_lr)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--per-cell", type=int, default=24, help="real scenes per class x condition cell")
    parser.add_argument("--validator", type=Path, default=ROOT / "models" / "validator.pt")
    parser.add_argument("--reference", type=Path, default=ROOT / "models" / "reference.pt")
    parser.add_argument("--save", type=Path, default=None, help="save the returned autoencoder here")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/autoencoder_steps.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    work = Path(tempfile.mkdtemp(prefix="synthdet-bench-autoencoder-"))
    prepare_environment(work)

    import numpy as np
    import torch
    from PIL import Image
    from ultralytics import YOLO

    from tasks import evaluate_default as ev
    from tasks.config import load_params
    from tasks.train_generator import build_parts, load_captioned, train_autoencoder
    from tasks.world import CONDITIONS

    cfg = load_params(args.params).train_generator
    update = {"vae_from": None, "vae_ema_decay": args.ema} | ({"vae_sample": False} if args.mean else {})
    overrides = {"vae_steps": args.steps, "seed": args.seed, "vae_clip_grad": args.clip, "vae_lr": args.lr}
    update |= {k: v for k, v in overrides.items() if v is not None}
    cfg = cfg.model_copy(update=update)
    real = ev.render_real(CLASSES, CONDITIONS, args.per_cell, work / "real")
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in real["path"]])
    judges = {"validator": YOLO(str(args.validator)), "reference": YOLO(str(args.reference))}
    images, captions, _ = load_captioned(args.data)

    torch.set_num_threads(args.threads)  # importing ultralytics leaves torch on cpu_count - 1 threads
    torch.manual_seed(cfg.seed)
    vae = build_parts(cfg, ["a"])[0]  # the vocabulary does not touch the autoencoder
    rows = []
    losses: list[float] = []  # the loss every 50 steps since the last checkpoint
    norms: list[float] = []  # and the gradient's norm at those steps (after clipping, with --clip)
    began = time.perf_counter()

    def trace(phase: str, step: int, loss: float) -> None:
        losses.append(loss)
        norms.append(float(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]).norm()))

    def measure(step: int, weights: str, model) -> None:
        decoded = [out for i in range(0, len(pixels), 64) for out in round_trip(model, pixels[i : i + 64])]
        kept, _ = judge_all(judges, real, to_bgr(decoded))
        row = {"step": step, "weights": weights, "kept": round(kept["overall"], 3)}
        row |= {k: round(v, 2) for k, v in kept["by_condition"].items()}
        if losses:
            row |= {"loss": round(float(np.mean(losses)), 4), "max loss": round(max(losses), 4)}
            row |= {"grad norm": round(float(np.median(norms)), 3), "max grad norm": round(max(norms), 3)}
        if weights == "ema" or args.ema is None:  # both rows of a checkpoint show the same stretch
            losses.clear()
            norms.clear()
        row["minutes"] = round((time.perf_counter() - began) / 60, 1)
        rows.append(row)
        print(table([row]), flush=True)

    vae, loss = train_autoencoder(vae, images, cfg, on_step=trace, on_checkpoint=measure, checkpoint_every=args.every)
    print(table(rows))
    if args.save:
        vae.save_pretrained(args.save, safe_serialization=True)
        print(f"saved the autoencoder at {args.save}")
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    settings |= {
        k: getattr(cfg, k) for k in ("vae_steps", "vae_batch", "vae_lr", "vae_sample", "vae_clip_grad", "seed")
    }
    write_result("autoencoder_steps", argv, settings, {"rows": rows, "last_loss": loss}, load, args.out)
    return {"rows": rows}


if __name__ == "__main__":
    main()
