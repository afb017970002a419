"""How good are the validator's labels, and what do they cost a fine-tune? Real images, labelled by it.

The ablation's synthetic arms differ from its ceiling in two ways at once: their images are generated,
and their boxes come from the validator, not from the truth. This splits the two. It takes the real
rare-condition images of the ceiling's pool (``experiment.ceiling_pool``), whose true boxes are known,
and labels them as the validated arm labels its synthetic images: the validator's detections at
``validate.conf``, every image kept. It prints how the labels compare with the truth (recall and
false boxes at IoU >= 0.5, the share of images labelled exactly right, the IoU of the matched boxes),
per condition, as the images are and, with ``--standardise``, as ``validate.standardise`` shows them.

With ``--out DIR`` it writes those images with the validator's labels as a YOLO folder. The ceiling arm
pointed at it (``experiment.ceiling_pool: DIR``) is then "real images, the validator's labels": the
same images as the ceiling, the same labels as the synthetic arms (docs/experiment.md, "Where the
synthetic images lose to real ones").

    python -m bench.relabel --standardise data/world/common_train                         # about 30 s
    python -m bench.relabel --out /tmp/relabelled --standardise data/world/common_train   # and the folder
    python -m bench.relabel --standardise data/world/common_train --tests                 # about 1.5 min

``--tests`` also scores the validator itself on the held-out test sets, as they are and standardised:
how much of each condition's difficulty is only its overall colour and contrast.

Prints its tables and writes ``bench/results/relabel.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment


def quality(detections: list[list[dict]], truth: list[list[tuple[str, list[float]]]], conf: float) -> dict[str, float]:
    """The labels ``detections`` make at ``conf`` against the true boxes (same class, IoU >= 0.5)."""
    import numpy as np

    from tasks.experiment import box_iou

    objects = missed = false = clean = 0
    ious: list[float] = []
    for found, boxes in zip(detections, truth, strict=True):
        kept = [(d["name"], d["box"]) for d in found if d["conf"] >= conf]
        best = [max((box_iou(b, c) for m, c in kept if m == n), default=0.0) for n, b in boxes]
        lost = sum(i < 0.5 for i in best)
        extra = sum(not any(m == n and box_iou(b, c) >= 0.5 for n, b in boxes) for m, c in kept)
        objects, missed, false = objects + len(boxes), missed + lost, false + extra
        clean += lost == 0 and extra == 0
        ious += [i for i in best if i >= 0.5]
    n = max(len(truth), 1)
    return {
        "images": len(truth),
        "recall": 1 - missed / max(objects, 1),
        "false boxes per image": false / n,
        "labelled exactly": clean / n,
        "matched IoU": float(np.mean(ious)) if ious else float("nan"),
    }


def test_scores(validator: str, tests: Path, conditions: list[str], standardise, scratch: Path) -> list[dict]:
    """The validator's mAP50-95 on each condition's held-out set, as the images are and, with
    ``standardise``, on copies standardised as ``validate.standardise`` would show them."""
    from PIL import Image

    from tasks.colour import rescaled
    from tasks.config import FinetuneConfig
    from tasks.finetune import evaluate_detector
    from tasks.validation import reference_stats

    ft = FinetuneConfig(model=validator, batch=32)
    stats = reference_stats(standardise) if standardise else None
    rows = []
    for condition in conditions:
        row = {"condition": condition}
        row["as they are"], _ = evaluate_detector(
            validator, tests / condition / "data.yaml", "val", ft, scratch / "eval"
        )
        if stats:
            copy = scratch / "standardised" / condition
            shutil.copytree(tests / condition / "labels", copy / "labels", dirs_exist_ok=True)
            (copy / "images").mkdir(parents=True, exist_ok=True)
            for image in sorted((tests / condition / "images").iterdir()):
                Image.fromarray(rescaled(image, stats)).save(copy / "images" / image.name)
            (copy / "data.yaml").write_text((tests / condition / "data.yaml").read_text())
            row["standardised"], _ = evaluate_detector(validator, copy / "data.yaml", "val", ft, scratch / "eval")
        rows.append({k: round(v["mAP50-95"], 3) if isinstance(v, dict) else v for k, v in row.items()})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--pool", type=Path, default=None, help="a labelled YOLO folder with captions.parquet "
                                                                "(default experiment.ceiling_pool)")  # fmt: skip
    parser.add_argument("--standardise", type=Path, default=None, metavar="FOLDER",
                        help="also label as validate.standardise with these reference images would")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the relabelled YOLO folder here")
    parser.add_argument("--tests", action="store_true", help="also score the validator on experiment.tests, "
                                                             "as they are and standardised (about 1 min)")  # fmt: skip
    parser.add_argument("--result", type=Path, default=None, help="default bench/results/relabel.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    scratch = Path(tempfile.mkdtemp(prefix="synthdet-bench-relabel-"))
    prepare_environment(scratch)

    import pandas as pd

    from tasks.config import Standardise, load_params
    from tasks.experiment import read_yolo_folder
    from tasks.validation import detect, label_lines, load_detector, resolve_class_map

    params = load_params(args.params)
    cfg, rules = params.experiment, params.validate_
    pool = args.pool or cfg.ceiling_pool
    items = read_yolo_folder(pool, cfg.rare_conditions)
    if not items:
        raise SystemExit(f"--pool: {pool}: no images of the rare conditions {cfg.rare_conditions}")
    names = [c.name for c in params.prompts.classes]
    truth = [[(names[int(line.split()[0])], [float(v) for v in line.split()[1:]]) for line in i.lines] for i in items]
    detector = load_detector(rules.model)
    to_dataset = resolve_class_map(names, detector.names, rules.class_map)
    views = {"as they are": rules.model_copy(update={"standardise": None})}
    if args.standardise:
        views["standardised"] = rules.model_copy(update={"standardise": Standardise(images=args.standardise)})
    rows, found = [], {}
    for view, settings in views.items():
        found[view] = detect(detector, [Path(i.path) for i in items], settings, scratch / "detections", progress=False)
        for condition in [*cfg.rare_conditions, "all"]:
            pick = [j for j, i in enumerate(items) if condition in ("all", i.condition)]
            figures = quality([found[view][j] for j in pick], [truth[j] for j in pick], rules.conf)
            rows.append({"validator sees": view, "condition": condition, **figures})
    print(f"{len(items)} real rare-condition images of {pool}, labelled by {rules.model} at conf >= {rules.conf}")
    print(table(rows))
    if args.out:
        view = list(views)[-1]
        root = pool.resolve()
        for item, detections in zip(items, found[view], strict=True):
            relative = Path(item.path).relative_to(root)
            image, label = (
                args.out / relative,
                (args.out / "labels" / relative.relative_to("images")).with_suffix(".txt"),
            )
            for path in (image, label):
                path.parent.mkdir(parents=True, exist_ok=True)
            if not image.exists():
                shutil.copyfile(item.path, image)
            label.write_text("".join(f"{line}\n" for line in label_lines([d for d in detections if d["conf"] >= rules.conf],
                                                                           to_dataset)))  # fmt: skip
        captions = pd.read_parquet(pool / "captions.parquet")
        kept = {Path(i.path).relative_to(root).as_posix() for i in items}
        captions[captions["file"].isin(kept)].to_parquet(args.out / "captions.parquet")
        print(f"wrote {len(items)} images with the labels the validator made {view} to {args.out}")
    figures = {"labels": rows}
    if args.tests:
        standardise = Standardise(images=args.standardise) if args.standardise else None
        conditions = [*cfg.rare_conditions, *cfg.common_conditions]
        figures["test mAP50-95"] = test_scores(rules.model, cfg.tests, conditions, standardise, scratch)
        print()
        print(f"{rules.model}: mAP50-95 on the held-out sets of {cfg.tests}")
        print(table(figures["test mAP50-95"]))
    settings = {k: str(v) for k, v in vars(args).items() if k != "result"}
    write_result("relabel", argv, settings, figures, load, args.result)
    return figures


if __name__ == "__main__":
    main()
