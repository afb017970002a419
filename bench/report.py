"""What every benchmark records beside its figures: the machine, the versions, the code and the load.

A figure without its hardware and its command cannot be re-run or compared, so each benchmark writes
``bench/results/<name>.json`` through :func:`write_result` and prints its table with :func:`table`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "diffusers", "transformers", "ultralytics", "prefect", "mlflow", "dvc", "numpy")


def hardware() -> dict[str, Any]:
    """CPU model and count, memory, GPU (if torch sees one) and the 1-minute load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpus": os.cpu_count(), "system": platform.platform()}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if "torch" in sys.modules:  # only report a GPU when the benchmark loaded torch anyway
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class LoadWatch:
    """The load averages at start and end: on a 2-core machine a load above ~0.5 means another job ran."""

    def __init__(self) -> None:
        self.start = [round(x, 2) for x in os.getloadavg()]
        self.began = time.time()

    def summary(self) -> dict[str, Any]:
        return {
            "load_average_1_5_15_min_at_start": self.start,
            "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
            "benchmark_wall_s": round(time.time() - self.began, 1),
        }


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table of ``rows`` (floats shown with 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[show(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_result(
    name: str,
    argv: Sequence[str],
    settings: dict[str, Any],
    figures: dict[str, Any],
    load: LoadWatch,
    out: Path | None = None,
) -> Path:
    """Write ``bench/results/<name>.json`` (or ``out``): command, date, hardware, versions, code, figures."""
    from flows.stages import git_sha  # imports mlflow: only once the benchmark has set the environment

    result = {
        "benchmark": name,
        "command": " ".join(["python -m", f"bench.{name}", *argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware(),
        "versions": versions(),
        "code": git_sha(),
        "settings": settings,
        **load.summary(),
        "figures": figures,
    }
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
