"""Score an experiment's stored trials again, on held-out sets they were never chosen on.

A recipe picked after many tries on one test set is flattered by it: some of its margin is that test
set's luck. This takes the weights every finished trial of ``synthdet experiment`` keeps
(``<experiment>/<key>/train/weights/last.pt``; the ``start`` arm: ``finetune.model``) and scores them on
another set of held-out tests, for example a fresh draw of the world's test sets under another seed:

    synthdet world -p P1 --out /tmp/holdout --only test     # P1: params.yaml with world.seed 1 (13 s)
    python -m bench.rescore --tests /tmp/holdout/test W/experiments/restyle W/experiments/probe-share2-linear

Nothing is trained. Each experiment's new figures go to ``<experiment>/rescored/<label>.parquet``
(``--label``, default the tests folder's parent's name), one row per trial like ``results.parquet``; a
trial already there is not scored again, so an interrupted run resumes. It prints, per experiment, arm
and k, the rare and common mAP50-95 on the experiment's own tests and on the new ones, and each arm's
margin over ``real`` at the same k on both; and writes ``bench/results/rescore.json``. About 3 s per
trial here (5 test sets of 200 images at 64 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment

if TYPE_CHECKING:
    import pandas as pd


def rescore(folder: Path, tests: Path, label: str, params_path: Path) -> pd.DataFrame:
    """Score every trial of the experiment in ``folder`` on ``tests``; returns the new rows, stored too."""
    import pandas as pd
    from tqdm import tqdm

    from tasks.config import load_params
    from tasks.experiment import held_out_sets, score

    results_path = folder / "results.parquet"
    if not results_path.is_file():
        raise SystemExit(f"{folder}: no results.parquet (not a finished `synthdet experiment` folder)")
    params = load_params(params_path)
    cfg = params.experiment.model_copy(update={"tests": tests})
    ft = params.finetune
    sets = held_out_sets(cfg)
    results = pd.read_parquet(results_path)
    out = folder / "rescored" / f"{label}.parquet"
    done = pd.read_parquet(out) if out.is_file() else pd.DataFrame(columns=["key"])
    rows = [r for r in done.to_dict("records")]
    todo = results[~results["key"].isin(set(done["key"]))]
    for _, trial in tqdm(todo.iterrows(), total=len(todo), desc=f"rescore {folder.name}", unit="trial"):
        weights = Path(ft.model) if trial["arm"] == "start" else folder / trial["key"] / "train" / "weights" / "last.pt"
        if not weights.is_file():
            raise SystemExit(f"{folder / trial['key']}: no {weights.name}: the trial's weights were removed")
        figures = score(weights, sets, ft, cfg, folder / "rescored" / label / trial["key"])
        kept = trial[["key", "arm", "k", "seed", "share", "conf", "n_extra"]].to_dict()
        rows.append({**kept, **figures})
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(out)  # after every trial: a crash loses at most the one being scored
    return pd.DataFrame(rows)


def compare(old: pd.DataFrame, new: pd.DataFrame) -> list[dict]:
    """Per arm, k, share and conf (the sweeps have their own rows): mean rare and common
    mAP50-95 on the old and the new tests, and the margin over ``real`` at the same k on each, in points,
    taken over the seeds both have (the start arm, seed 0: against real's seed 0)."""
    metric = "mAP50-95"
    rows = []
    old = old[old["key"].isin(set(new["key"]))]  # the same trials on both
    for (arm, k, share, conf), group in old.groupby(["arm", "k", "share", "conf"], sort=False):
        fresh = new[new["key"].isin(set(group["key"]))]
        row = {"arm": arm, "k": int(k), "share": share, "conf": conf, "seeds": int(group["seed"].nunique())}
        real = old[(old["arm"] == "real") & (old["k"] == k) & old["seed"].isin(set(group["seed"]))]
        for name, frame in (("old", group), ("new", fresh)):
            row[f"rare {name}"] = float(frame[f"rare.{metric}"].mean())
            row[f"common {name}"] = float(frame[f"common.{metric}"].mean())
        for name, table_ in (("old", old), ("new", new)):  # over the seeds both arms have
            base = table_[table_["key"].isin(set(real["key"]))][f"rare.{metric}"].mean() if len(real) else None
            row[f"margin {name}"] = round(100 * (row[f"rare {name}"] - base), 1) if base is not None else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", type=Path, nargs="+", help="experiment folders (<workspace>/experiments/<name>)")
    parser.add_argument("--tests", type=Path, required=True, help="held-out sets, <tests>/<condition>/data.yaml")
    parser.add_argument("--label", default=None, help="name of the new figures (default: the tests' parent folder)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="for finetune.model (the start arm) and the conditions")  # fmt: skip
    parser.add_argument("--result", type=Path, default=None, help="default bench/results/rescore.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    prepare_environment(Path(tempfile.mkdtemp(prefix="synthdet-bench-rescore-")))

    import pandas as pd

    label = args.label or args.tests.resolve().parent.name
    figures = {}
    for folder in args.experiments:
        new = rescore(folder, args.tests, label, args.params)
        figures[folder.name] = compare(pd.read_parquet(folder / "results.parquet"), new)
        print()
        print(f"{folder}: rare and common mAP50-95, mean over seeds; margin over real at the same k, in points;"
              f" old = {folder.name}'s own tests, new = {args.tests}")  # fmt: skip
        print(table(figures[folder.name]))
    settings = {k: str(v) for k, v in vars(args).items() if k != "result"}
    write_result("rescore", argv, settings, figures, load, args.result)
    return figures


if __name__ == "__main__":
    main()
