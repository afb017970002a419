"""Generation throughput through the flow's task runner: local, and Dask with 1 and 2 workers.

Each setting renders the same prompts into a fresh workspace through ``flows.pipeline.run_stages``
(so the shards go through the real Prefect task runner) and reports images per second of the
generate stage: over the whole stage, with the cluster's start-up and the workers' model loading
(``stage``), and steady (``steady``: the images finished after every worker's first batch, over
the time they took, from the images' file times). Repeats alternate the settings; medians reported.

    python -m bench.scale_out                       # 96 images of params.yaml, 2 repeats: ~6 min here
    python -m bench.scale_out --images 48 --repeat 1

On a 2-core machine two workers get one core each, as the local runner's one process gets both:
the figure shows what the split costs or gains here; on a machine with more cores or GPUs, more
workers add throughput. Prints a table and writes ``bench/results/scale_out.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.report import LoadWatch, median, table, write_result
from bench.workload import class_counts, derive_params, prepare_environment, stage_flow

SETTINGS = {
    "local": {"kind": "local"},
    "dask-1": {"kind": "dask", "workers": 1},
    "dask-2": {"kind": "dask", "workers": 2},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    root = Path(tempfile.mkdtemp(prefix="synthdet-bench-scale-"))
    runs: dict[str, list[dict]] = {name: [] for name in args.settings}
    try:
        prepare_environment(root / "env")
        flow = stage_flow()
        for rep in range(args.repeat):
            for name in args.settings:
                ws = root / f"{name}-{rep}"
                params = derive_params(
                    args.params,
                    root / f"{name}.yaml",
                    {
                        "prompts.classes": class_counts(args.params, args.images),
                        "prompts.allow_repeats": True,
                        "runner": {**SETTINGS[name], "shard_size": args.shard_size},
                    },
                )
                flow(str(params), str(ws), ["prompts"])
                began = time.perf_counter()
                flow(str(params), str(ws), ["generate"])
                wall = time.perf_counter() - began
                batch = yaml.safe_load(params.read_text())["generate"]["batch_size"]
                runs[name].append(_figures(ws, wall, batch * SETTINGS[name].get("workers", 1)))
                print(f"{name} #{rep + 1}: {runs[name][-1]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, done in runs.items():
        rows.append(
            {
                "runner": name,
                "images": done[0]["images"],
                "img/s (stage)": median([d["images"] / d["wall_s"] for d in done]),
                "img/s (steady)": median([d["steady_img_s"] for d in done]),
                "stage s": median([d["wall_s"] for d in done]),
            }
        )
    for key in ("img/s (stage)", "img/s (steady)"):
        for row in rows:
            row[f"{key} vs {rows[0]['runner']}"] = row[key] / rows[0][key]
    print(table(rows))
    figures = {"rows": rows, "runs": runs}
    write_result("scale_out", argv, vars(args) | {"params": str(args.params)}, figures, load)
    return figures


def _figures(ws: Path, wall: float, first: int) -> dict:
    """Images made, the stage's wall time, and the steady rate: the images finished after every
    worker's first batch, over the time from that point to the last image (start-up left out)."""
    done = sorted(p.stat().st_mtime for p in (ws / "cache" / "images").glob("*.png"))
    steady = (len(done) - first) / (done[-1] - done[first - 1]) if len(done) > first else float("nan")
    return {"images": len(done), "wall_s": round(wall, 2), "steady_img_s": round(steady, 3)}


if __name__ == "__main__":
    main()
