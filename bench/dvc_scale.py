"""DVC at scale: what does versioning cost, from scratch and for a version that adds a few files?

Builds a YOLO-layout dataset of ``--images`` random 64x64 PNGs (about 12 KB each) with a label file
each, versions it from scratch with ``tasks.versioning.version_dataset`` into a new registry (pushing to
a local remote), adds ``--add`` more images and labels, and versions again. The second version should
cost in proportion to the new files: it is set beside the time to read and md5-hash those new files
alone (what DVC must do for them at least) and all files. Each repetition uses a fresh registry.
Where the calls go (copying into the registry, ``dvc add`` or the in-process update of the changed
files, the push, git) is timed too, and CPU seconds (this process and the DVC and git processes it
waited for) beside wall seconds. DVC's modules are imported before the clock starts (once per process,
as in the pipeline); the JSON records what that costs.

    python -m bench.dvc_scale                       # 5,000 + 500 images; about 4 min here
    python -m bench.dvc_scale --images 500 --add 50 --repeat 1

Prints a table and writes ``bench/results/dvc_scale.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from bench.report import LoadWatch, median, table, write_result
from bench.workload import timed, timed_cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images in the first version")
    parser.add_argument("--add", type=int, default=500, help="images the second version adds")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    # DVC's Python modules load once per process (the pipeline's too); load them before the clock starts
    # so that neither version pays for them, and record what it costs.
    import_s, _ = timed(importlib.import_module, "dvc.repo")
    from tasks.versioning import version_dataset

    reps = []
    root = Path(tempfile.mkdtemp(prefix="synthdet-bench-dvc-"))
    try:
        dataset = root / "dataset"
        _write_images(dataset, 0, args.images)
        for rep in range(args.repeat):
            shutil.rmtree(dataset, ignore_errors=True)
            _write_images(dataset, 0, args.images)
            registry, remote = root / f"registry-{rep}", root / f"remote-{rep}"
            with _phases() as first_phases:
                first_s, first_cpu, first = timed_cpu(version_dataset, dataset, "synthetic", registry, str(remote))
            new_files = _write_images(dataset, args.images, args.add)
            hash_new_s, _ = timed(_md5_files, new_files)
            hash_all_s, _ = timed(_md5_files, sorted(p for p in dataset.rglob("*") if p.is_file()))
            with _phases() as second_phases:
                second_s, second_cpu, second = timed_cpu(version_dataset, dataset, "synthetic", registry, str(remote))
            assert (first.files, second.files) == (2 * args.images, 2 * (args.images + args.add)), (first, second)
            assert second.pushed and second.number == 2
            reps.append(
                {
                    "first_s": round(first_s, 2),
                    "second_s": round(second_s, 2),
                    "first_cpu_s": round(first_cpu, 2),
                    "second_cpu_s": round(second_cpu, 2),
                    "hash_new_files_s": round(hash_new_s, 3),
                    "hash_all_files_s": round(hash_all_s, 3),
                    "first_phases_s": first_phases,
                    "second_phases_s": second_phases,
                }
            )
            print(
                f"rep {rep + 1}/{args.repeat}: from scratch {first_s:.1f} s, +{args.add} images {second_s:.1f} s, "
                f"hashing the new files {hash_new_s:.2f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first_s = median([r["first_s"] for r in reps])
    second_s = median([r["second_s"] for r in reps])
    first_cpu = median([r["first_cpu_s"] for r in reps])
    second_cpu = median([r["second_cpu_s"] for r in reps])
    hash_new = median([r["hash_new_files_s"] for r in reps])
    hash_all = median([r["hash_all_files_s"] for r in reps])
    share_new = args.add / (args.images + args.add)
    rows = [
        {"step": f"version {args.images} images from scratch", "median s": first_s, "CPU s": first_cpu},
        {
            "step": f"version +{args.add} images (v2)",
            "median s": second_s,
            "CPU s": second_cpu,
            "share of from-scratch": second_s / first_s,
            "CPU share": second_cpu / first_cpu,
            "new files' share": round(share_new, 3),
        },
        {"step": f"md5 of the {2 * args.add} new files alone", "median s": hash_new},
        {"step": f"md5 of all {2 * (args.images + args.add)} files", "median s": hash_all},
    ]
    phase_rows = []
    for key in ("first_phases_s", "second_phases_s"):
        phases = sorted({p for r in reps for p in r[key]})
        phase_rows.append(
            {"version": key.split("_")[0], **{p: median([r[key].get(p, 0.0) for r in reps]) for p in phases}}
        )
    print(table(rows, ["step", "median s", "CPU s", "share of from-scratch", "CPU share", "new files' share"]))
    columns = ["version", *sorted({key for row in phase_rows for key in row} - {"version"})]
    print(table(phase_rows, columns))
    figures = {
        "table": rows,
        "phases_median_s": phase_rows,
        "first_s": first_s,
        "second_s": second_s,
        "second_share_of_first": round(second_s / first_s, 3),
        "first_cpu_s": first_cpu,
        "second_cpu_s": second_cpu,
        "second_cpu_share_of_first": round(second_cpu / first_cpu, 3),
        "new_files_share": round(share_new, 3),
        "second_over_hash_new": round(second_s / hash_new, 1),
        "import_dvc_s": round(import_s, 2),
        "repetitions": reps,
    }
    settings = {
        "images": args.images,
        "add": args.add,
        "repeat": args.repeat,
        "files_per_image": 2,
        "image": "64x64 RGB PNG of noise",
    }
    write_result("dvc_scale", argv, settings, figures, load, args.out)
    return figures


def _write_images(dataset: Path, start: int, count: int) -> list[Path]:
    """``count`` noise PNGs and label files under ``dataset/{images,labels}/train``; returns the paths."""
    rng = np.random.default_rng(start)
    images, labels = dataset / "images" / "train", dataset / "labels" / "train"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        png, txt = images / f"{i:06d}.png", labels / f"{i:06d}.txt"
        Image.fromarray(pixels).save(png)
        txt.write_text(f"{i % 4} 0.5 0.5 0.25 0.25\n")
        written += [png, txt]
    return written


def _md5_files(paths: list[Path]) -> None:
    for path in paths:
        hashlib.md5(path.read_bytes()).hexdigest()


@contextmanager
def _phases():
    """Seconds spent per kind of call inside ``tasks.versioning`` (copying, each dvc and git verb).

    Diagnostic only: it wraps the module's private helpers and yields an empty breakdown if they change.
    """
    from tasks import versioning

    spent: dict[str, float] = defaultdict(float)
    timed_helpers = {
        "_replace_tree": "copy into registry",
        "_add_changed_files": "add changed files",
        "_transfer_to_remote": "push",
    }
    originals = {name: getattr(versioning, name, None) for name in ("_run", *timed_helpers)}
    if None in originals.values():
        yield spent
        return

    def run(command, registry, check):
        tool = "dvc" if command[0] == sys.executable else "git"
        verb = command[3] if tool == "dvc" else command[1]
        began = time.perf_counter()
        try:
            return originals["_run"](command, registry, check)
        finally:
            spent[f"{tool} {verb}"] += time.perf_counter() - began

    def timing(name: str, label: str):
        def call(*args):
            began = time.perf_counter()
            try:
                return originals[name](*args)
            finally:
                spent[label] += time.perf_counter() - began

        return call

    versioning._run = run
    for name, label in timed_helpers.items():
        setattr(versioning, name, timing(name, label))
    try:
        yield spent
    finally:
        for name, original in originals.items():
            setattr(versioning, name, original)
        for key in list(spent):
            spent[key] = round(spent[key], 2)


if __name__ == "__main__":
    main()
