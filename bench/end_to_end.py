"""The default demo end to end: wall time and peak memory of the whole process tree.

Runs what ``make demo`` runs after set-up, in a temporary folder so ``workspace/`` and ``data/`` are not
touched: ``synthdet world --only test --only common_train --only rare_scarce --out TMP/world`` (the
held-out test sets the demo evaluates on, the common images its dataset mixes in and the scarce rare
images whose mean latents start its generation), then ``synthdet run --params TMP/params.yaml``
(``params.yaml`` with the workspace, ``finetune.eval_data``, ``dataset.real``,
``generate.start_means.images`` and ``dataset.restyle.images`` moved into TMP; ``common_train`` and ``rare_scarce`` only if the params
use them). Memory is the sum of the
resident set sizes of the command and all its child processes, sampled every 0.2 s; shared pages count
once per process, so it overstates a little. Goals on a 2-core CPU: 10 minutes or less, 4 GB or less.

    python -m bench.end_to_end                 # about 3 min here
    python -m bench.end_to_end --params params.smoke.yaml

Prints a table and writes ``bench/results/end_to_end.json``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench.report import ROOT, LoadWatch, median, table, write_result
from bench.workload import derive_params

GOAL_S = 600
GOAL_GB = 4.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeat", type=int, default=1, help="whole demos, each in a fresh folder")
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    synthdet = str(Path(sys.executable).parent / "synthdet")
    reps = []
    for rep in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix="synthdet-bench-e2e-"))
        try:
            changes = {
                "workspace": str(root / "workspace"),
                "finetune.eval_data": str(root / "world" / "test" / "rare.yaml"),
            }
            sets = ["--only", "test"]
            raw = yaml.safe_load(args.params.read_text())
            if (raw.get("dataset") or {}).get("real"):
                changes["dataset.real"] = str(root / "world" / "common_train")
                sets += ["--only", "common_train"]
            start_means = (raw.get("generate") or {}).get("start_means")
            if start_means and str(start_means.get("images", "")).endswith("rare_scarce"):
                changes["generate.start_means.images"] = str(root / "world" / "rare_scarce")
                sets += ["--only", "rare_scarce"]
            restyle = (raw.get("dataset") or {}).get("restyle")
            if restyle and str(restyle.get("images", "")).endswith("rare_scarce"):
                changes["dataset.restyle.images"] = str(root / "world" / "rare_scarce")
                sets += [] if "rare_scarce" in sets else ["--only", "rare_scarce"]
            params = derive_params(args.params, root / "params.yaml", changes)
            steps = {
                "world": [synthdet, "world", *sets, "--out", str(root / "world")],
                "run": [synthdet, "run", "--params", str(params)],
            }
            rep_figures = {name: measure(command) for name, command in steps.items()}
        finally:
            shutil.rmtree(root, ignore_errors=True)
        total = {
            "wall_s": round(sum(f["wall_s"] for f in rep_figures.values()), 1),
            "peak_tree_rss_gb": max(f["peak_tree_rss_gb"] for f in rep_figures.values()),
        }
        reps.append({**rep_figures, "total": total})
        print(f"demo {rep + 1}/{args.repeat}: {total['wall_s']:.0f} s, peak {total['peak_tree_rss_gb']:.2f} GB")
    rows = []
    for step in ("world", "run", "total"):
        wall = median([r[step]["wall_s"] for r in reps])
        peak = max(r[step]["peak_tree_rss_gb"] for r in reps)
        rows.append({"step": step, "median wall s": wall, "peak tree RSS GB": peak})
    wall, peak = rows[-1]["median wall s"], rows[-1]["peak tree RSS GB"]
    rows[-1]["goal"] = f"<= {GOAL_S} s, <= {GOAL_GB} GB"
    rows[-1]["met"] = wall <= GOAL_S and peak <= GOAL_GB
    print(table(rows))
    figures = {
        "table": rows,
        "wall_s": wall,
        "peak_tree_rss_gb": peak,
        "goal_met": rows[-1]["met"],
        "repetitions": reps,
    }
    write_result("end_to_end", argv, {"params": str(args.params), "repeat": args.repeat}, figures, load, args.out)
    return figures


def measure(command: list[str], interval_s: float = 0.2) -> dict:
    """Run ``command`` in the project root; its wall time and the peak summed RSS of its process tree."""
    with tempfile.TemporaryFile() as log:
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak, peak_single = _watch(process, interval_s)
        wall = time.perf_counter() - began
        log.seek(0)
        output = log.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {
        "command": " ".join(command),
        "wall_s": round(wall, 1),
        "peak_tree_rss_gb": round(peak / 1e9, 3),
        "peak_single_process_rss_gb": round(peak_single / 1e9, 3),
        "output_tail": output.strip().splitlines()[-14:],
    }


def _watch(process: subprocess.Popen, interval_s: float) -> tuple[int, int]:
    """Poll until ``process`` ends: the peak RSS summed over it and its descendants, and of any one."""
    parent = psutil.Process(process.pid)
    peak = peak_single = 0
    while process.poll() is None:
        try:
            members = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for member in members:
            try:
                rss = member.memory_info().rss
            except psutil.Error:  # it ended between the listing and the reading
                continue
            total += rss
            peak_single = max(peak_single, rss)
        peak = max(peak, total)
        time.sleep(interval_s)
    process.wait()
    return peak, peak_single


if __name__ == "__main__":
    main()
