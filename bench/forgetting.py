"""Does any change to the ablation's fine-tune keep the rare-condition gain and forget less?

Every trained arm of `synthdet experiment` loses 0.4-2 points on the common (plain) test set against the
starting detector, the ceiling's true labels included (docs/experiment.md, "Forgetting"). This runs the
experiment with the fine-tune changed in one way, without touching the pipeline, so the change can be
judged on the same trials:

    none      no change: the fine-tune the params set (tasks.experiment.train_detector; since the
              linear decay was adopted, the learning rate falls from lr0 to lr0 x finetune.lrf)
    linear    the learning rate falls linearly from lr0 to 0 over the steps, as the pipeline's own
              fine-tune does over its epochs (ultralytics' linear schedule). Measured with
              finetune.lrf: 1 (lr0 throughout, the experiment's fine-tune before the decay was
              adopted); with lrf < 1 the experiment's own decay overrides it
    ema       the weights kept are a moving average of the steps' weights with a fixed decay
              (--ema-decay; ultralytics' own average ramps up over 2,000 steps, so over 60 it is none)
    lwf       learning without forgetting: on the common replay images, an extra loss keeps the class
              scores and boxes near the starting detector's (--lwf weight; the starting detector's
              BatchNorm in eval mode)

Each variant applies on top of the params' fine-tune; for the fine-tune the first runs compared against
(lr0 throughout), give a params file with ``finetune.lrf: 1``. Results go to
``<workspace>/experiments/<name>-<variant>/`` like any experiment (``<name>`` for ``none``; the variant is not part of a trial's fingerprint, hence the separate name). ``--plot`` draws the result files it is given as rare
against common mAP50-95, one marker per variant, for one arm and k per panel:

    python -m bench.forgetting --variant linear -- -p P -w W --name fg --arms start,real,restyled,adapted --k 0,10 --seeds 3 --steps 60
    python -m bench.forgetting --plot shipped=W/experiments/fg/results.parquet linear=W/experiments/fg-linear/results.parquet

A variant's run takes what the experiment takes (19 trials: about 5 min here; lwf about 7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.report import ROOT

VARIANTS = ("none", "linear", "ema", "lwf")


def linear_decay(trainer) -> None:
    """on_train_batch_start: lr0 * (1 - i / n) at the i-th of n batches (one optimizer step each)."""
    i = getattr(trainer, "bench_step", 0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1 - i / len(trainer.train_loader))
    trainer.bench_step = i + 1


def fixed_ema(decay: float):
    """on_train_start: make the trainer's weight average use ``decay`` from the first step."""

    def callback(trainer) -> None:
        trainer.ema.decay = lambda updates: decay

    return callback


def learning_without_forgetting(weight: float, mark: str):
    """on_train_start: add ``weight`` x (a distillation loss to the starting detector) on the batch's
    replay images: the class scores' cross-entropy against the start's (minus the start's own entropy,
    so 0 when equal) and the boxes' L1 distance weighted by the start's top score, for both YOLO26
    heads. Replay images are those whose file name holds ``mark``: tasks.experiment names each
    training file ``<n>_<source>_<stem>``, and a replay image's source is its folder's name."""

    def callback(trainer) -> None:
        import copy

        import torch
        import torch.nn.functional as F

        student = trainer.model
        teacher = copy.deepcopy(student).train()  # the head returns raw scores and boxes in train mode
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        teacher.requires_grad_(False)
        detection_loss = student.loss

        def loss(batch, preds=None):
            preds = student.forward(batch["img"]) if preds is None else preds
            total, items = detection_loss(batch, preds)
            replay = [i for i, name in enumerate(batch["im_file"]) if mark in Path(name).name]
            if not replay:
                return total, items
            index = torch.tensor(replay)
            with torch.no_grad():
                target = teacher(batch["img"][index])
            extra = 0.0
            for head in ("one2many", "one2one"):
                ours, theirs = preds[head]["scores"][index], target[head]["scores"]
                p = theirs.sigmoid()
                cross = F.binary_cross_entropy_with_logits(ours, p, reduction="none").sum(1).mean()
                entropy = F.binary_cross_entropy_with_logits(theirs, p, reduction="none").sum(1).mean()
                boxes = (p.max(1).values * (preds[head]["boxes"][index] - target[head]["boxes"]).abs().sum(1)).mean()
                extra = extra + cross - entropy + boxes
            return total + weight * extra * batch["img"].shape[0], items  # the detection loss is x batch too

        student.loss = loss

    return callback


def patch_training(variant: str, ema_decay: float, lwf: float, replay: str) -> None:
    """Make ``tasks.experiment.train_detector`` add the variant's callback to the model it trains."""
    from ultralytics import YOLO

    callbacks = {
        "none": [],
        "linear": [("on_train_batch_start", linear_decay)],
        "ema": [("on_train_start", fixed_ema(ema_decay))],
        "lwf": [("on_train_start", learning_without_forgetting(lwf, f"_{replay}_"))],
    }[variant]

    class Patched(YOLO):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            for event, callback in callbacks:
                self.add_callback(event, callback)

    import ultralytics

    ultralytics.YOLO = Patched  # tasks.experiment.train_detector imports YOLO from ultralytics when it runs


def plot(runs: list[str], arms: list[str], ks: list[int], seeds: int, out: Path) -> None:
    """One panel per arm x k: each run's mean (± std over its first ``seeds`` seeds) rare against common
    mAP50-95. The dashed line is one point below the starting detector on the common set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from tasks.experiment import METRIC

    figure, axes = plt.subplots(1, len(arms) * len(ks), figsize=(3 * len(arms) * len(ks), 3.6), squeeze=False,
                               sharex=True, sharey=True)  # fmt: skip
    for n_run, run in enumerate(runs):  # one colour per run in every panel, whichever arms it has
        label, path = run.split("=", 1)
        results = pd.read_parquet(path)
        results = results[results["seed"] < seeds]
        start = results[results["arm"] == "start"]
        for n, (arm, k) in enumerate((a, k) for a in arms for k in ks):
            rows = results[(results["arm"] == arm) & (results["k"] == k)]
            if rows.empty:
                continue
            x, y = rows[f"common.{METRIC}"], rows[f"rare.{METRIC}"]
            axes[0, n].errorbar(x.mean(), y.mean(), xerr=x.std(), yerr=y.std(), marker="o", capsize=2, label=label,
                                 color=f"C{n_run % 10}")  # fmt: skip
            if not start.empty:
                axes[0, n].axvline(start[f"common.{METRIC}"].iloc[0] - 0.01, color="gray", linestyle="--", linewidth=1)
            axes[0, n].set_title(f"{arm}, k={k}", fontsize=9)
    for panel in axes[0]:
        panel.set_xlabel("common mAP50-95", fontsize=8)
        panel.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("rare mAP50-95", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run the experiment with this fine-tune")
    parser.add_argument("--ema-decay", type=float, default=0.95, help="for --variant ema (default 0.95)")
    parser.add_argument("--lwf", type=float, default=10.0, help="for --variant lwf: the loss weight (default 10)")
    parser.add_argument("--replay", default="common_train", help="for --variant lwf: experiment.replay's folder name")
    parser.add_argument("--plot", nargs="+", metavar="LABEL=RESULTS", help="draw these results.parquet files")
    parser.add_argument("--arms", default="restyled,adapted", help="--plot: comma-separated arms")
    parser.add_argument("--k", default="0,10", help="--plot: comma-separated k")
    parser.add_argument("--seeds", type=int, default=3, help="--plot: seeds 0..N-1 of each run (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "forgetting-trade-off.png", help="--plot's PNG")
    parser.add_argument("experiment", nargs="*", help="after --: `synthdet experiment` options (include --name)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot:
        plot(args.plot, args.arms.split(","), [int(k) for k in args.k.split(",")], args.seeds, args.out)
        return
    if not args.variant:
        parser.error("give --variant (with `synthdet experiment` options after --) or --plot")
    rest = list(args.experiment)
    if "--name" not in rest:
        parser.error("pass the experiment's --name after --: the variant's results go to <name>-<variant>")
    at = rest.index("--name") + 1
    rest[at] = f"{rest[at]}-{args.variant}" if args.variant != "none" else rest[at]
    patch_training(args.variant, args.ema_decay, args.lwf, args.replay)
    from flows.cli import main as synthdet

    sys.argv = ["synthdet", "experiment", *rest]
    synthdet()


if __name__ == "__main__":
    main()
