"""Does a re-run do only the new work?

On a fresh workspace: a first run of a flow; the same run again with unchanged params (``--reruns``
times; goal: at most 5% of the first run's time); then a run with 10% more prompts (goal: it makes
only the new images and detections, and costs about their share). Flows run in this process through
``flows.pipeline`` after a warm-up, so the figures leave out Python's start and imports (which
``bench.end_to_end`` measures); ``--via cli`` runs ``synthdet run`` in a new process each time instead.
CPU seconds (this process and its live children) are recorded beside wall seconds: on a shared
machine they are the steadier figure (with ``--via cli`` they cover the parent only: ignore them).

    python -m bench.reruns                         # synthesize flow on params.yaml; about 5 min here
    python -m bench.reruns --flow pipeline         # with finetune: is the fine-tune redone?
    python -m bench.reruns --via cli --repeat 1

Prints a table and writes ``bench/results/reruns.json`` (or ``reruns-<flow>-<via>.json`` for others).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.report import ROOT, LoadWatch, median, table, write_result
from bench.workload import derive_params, prepare_environment, stage_flow, timed_cpu

GOAL_RERUN_SHARE = 0.05


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--flow", default="synthesize", choices=["synthesize", "pipeline"])
    parser.add_argument("--via", default="flow", choices=["flow", "cli"], help="in this process, or `synthdet run`")
    parser.add_argument("--repeat", type=int, default=2, help="fresh workspaces, each: first, same, +10%%")
    parser.add_argument("--reruns", type=int, default=3, help="unchanged re-runs per workspace")
    parser.add_argument("--more", type=float, default=0.10, help="share of prompts added in the last run")
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    root = Path(tempfile.mkdtemp(prefix="synthdet-bench-reruns-"))
    try:
        prepare_environment(root / "env")
        more = derive_params(args.params, root / "more.yaml", {"prompts.classes": _more_counts(args.params, args.more)})
        run = _runner(args.via, args.flow, root)
        reps = [_one_workspace(run, args.params, more, root / f"ws-{rep}", args.reruns) for rep in range(args.repeat)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = median([r["first_s"] for r in reps])
    same = median([s for r in reps for s in r["same_s"]])
    grown = median([r["more_s"] for r in reps])
    first_cpu = median([r["first_cpu_s"] for r in reps])
    same_cpu = median([s for r in reps for s in r["same_cpu_s"]])
    grown_cpu = median([r["more_cpu_s"] for r in reps])
    figures = {
        "first_s": first,
        "same_s": same,
        "same_share_of_first": round(same / first, 4),
        "first_cpu_s": first_cpu,
        "same_cpu_s": same_cpu,
        "more_cpu_s": grown_cpu,
        "same_cpu_share_of_first": round(same_cpu / first_cpu, 4),
        "more_cpu_share_of_first": round(grown_cpu / first_cpu, 4),
        "same_goal": GOAL_RERUN_SHARE,
        "same_goal_met": same / first <= GOAL_RERUN_SHARE,
        "more_s": grown,
        "more_share_of_first": round(grown / first, 4),
        "repetitions": reps,
    }
    last = reps[-1]
    rows = [
        {
            "run": "first",
            "median s": first,
            "share of first": 1.0,
            "CPU s": first_cpu,
            "CPU share": 1.0,
            "new images": last["first_images"],
            "new detections": last["first_detections"],
        },
        {
            "run": "same params",
            "median s": same,
            "share of first": same / first,
            "CPU s": same_cpu,
            "CPU share": same_cpu / first_cpu,
            "new images": last["same_images"],
            "new detections": last["same_detections"],
        },
        {
            "run": f"+{args.more:.0%} prompts",
            "median s": grown,
            "share of first": grown / first,
            "CPU s": grown_cpu,
            "CPU share": grown_cpu / first_cpu,
            "new images": last["more_images"],
            "new detections": last["more_detections"],
        },
    ]
    print(table(rows))
    print(
        f"prompts: {last['prompts']} then {last['more_prompts']}; the same run again costs "
        f"{same / first:.1%} of the first (goal <= {GOAL_RERUN_SHARE:.0%})"
    )
    figures["table"] = rows
    settings = {
        "params": str(args.params),
        "flow": args.flow,
        "via": args.via,
        "repeat": args.repeat,
        "reruns": args.reruns,
        "more": args.more,
    }
    name = "reruns" if (args.flow, args.via) == ("synthesize", "flow") else f"reruns-{args.flow}-{args.via}"
    write_result("reruns", argv, settings, figures, load, args.out or ROOT / "bench" / "results" / f"{name}.json")
    return figures


def _more_counts(params: Path, more: float) -> dict[str, int]:
    """The class counts of ``params`` with ``more`` of their total added, spread over the classes."""
    classes = yaml.safe_load(params.read_text())["prompts"]["classes"]
    if any("count" not in c for c in classes):
        raise ValueError(f"{params}: --more needs explicit class counts (prompts.classes[].count)")
    counts = {c["name"]: int(c["count"]) for c in classes}
    extra = round(sum(counts.values()) * more)
    for i in range(extra):
        name = list(counts)[i % len(counts)]
        counts[name] += 1
    return counts


def _runner(via: str, flow: str, root: Path):
    """A function (params, workspace) -> summary-or-None that runs the flow once."""
    if via == "cli":
        synthdet = Path(sys.executable).parent / "synthdet"

        def run_cli(params: Path, workspace: Path) -> None:
            command = [str(synthdet), "run", "--params", str(params), "--workspace", str(workspace), "--flow", flow]
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)

        return run_cli

    # Warm-up: Prefect's local API, and the heavy imports a first run in a fresh process pays once.
    import diffusers.pipelines.auto_pipeline  # noqa: F401
    import mlflow  # noqa: F401
    import ultralytics  # noqa: F401

    from flows.pipeline import FLOWS

    stage_flow()(str(ROOT / "params.yaml"), str(root / "warm-up"), ["prompts"])

    def run_flow(params: Path, workspace: Path) -> dict:
        return FLOWS[flow](params=str(params), workspace=str(workspace))

    return run_flow


def _counts(workspace: Path) -> tuple[int, int]:
    from tasks.validation import count_cached
    from tasks.workspace import Workspace

    ws = Workspace(workspace)
    images = sum(1 for _ in ws.images.glob("*.png")) if ws.images.is_dir() else 0
    detections = count_cached(ws.detections)
    return images, detections


def _one_workspace(run, params: Path, more: Path, workspace: Path, reruns: int) -> dict:
    """First run, ``reruns`` unchanged re-runs and one larger run on a fresh ``workspace``."""
    import pandas as pd

    from tasks.workspace import Workspace

    record: dict = {"same_s": [], "same_cpu_s": []}
    before = (0, 0)
    first_s, first_cpu, _ = timed_cpu(run, params, workspace)
    after = _counts(workspace)
    record.update(
        first_s=round(first_s, 2), first_cpu_s=round(first_cpu, 2), first_images=after[0], first_detections=after[1]
    )
    print(f"first run: {first_s:.1f} s ({first_cpu:.1f} CPU s), {after[0]} images", flush=True)
    for _ in range(reruns):
        before = after
        seconds, cpu, _ = timed_cpu(run, params, workspace)
        after = _counts(workspace)
        record["same_s"].append(round(seconds, 2))
        record["same_cpu_s"].append(round(cpu, 2))
        print(f"same run again: {seconds:.1f} s ({cpu:.1f} CPU s), {after[0] - before[0]} new images", flush=True)
    record.update(same_images=after[0] - before[0], same_detections=after[1] - before[1])
    before = after
    more_s, more_cpu, _ = timed_cpu(run, more, workspace)
    after = _counts(workspace)
    record.update(
        more_s=round(more_s, 2),
        more_cpu_s=round(more_cpu, 2),
        more_images=after[0] - before[0],
        more_detections=after[1] - before[1],
    )
    print(f"+prompts run: {more_s:.1f} s ({more_cpu:.1f} CPU s), {after[0] - before[0]} new images", flush=True)
    prompts = Workspace(workspace).stage_dir("prompts") / "prompts.parquet"
    record["more_prompts"] = len(pd.read_parquet(prompts)) if prompts.is_file() else None
    record["prompts"] = record["first_images"]  # one image per distinct prompt and seed
    return record


if __name__ == "__main__":
    main()
