from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from bench.forgetting import linear_decay, plot


def test_linear_decay_falls_from_lr0_to_zero_over_the_batches() -> None:
    groups = [{"initial_lr": 1e-3, "lr": 1e-3}, {"initial_lr": 2e-3, "lr": 2e-3}]
    trainer = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups), train_loader=[None] * 4)
    seen = []
    for _ in range(4):
        linear_decay(trainer)
        seen.append([g["lr"] for g in groups])
    assert seen == [[1e-3, 2e-3], [7.5e-4, 1.5e-3], [5e-4, 1e-3], [2.5e-4, 5e-4]]


def test_plot_writes_a_png_from_a_results_file(tmp_path: Path) -> None:
    rows = [
        {"arm": arm, "k": 0, "seed": seed, "rare.mAP50-95": 0.5 + seed / 100, "common.mAP50-95": 0.8}
        for arm in ("start", "restyled")
        for seed in range(4)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    out = tmp_path / "plot.png"
    plot([f"shipped={tmp_path / 'a.parquet'}"], ["restyled"], [0], 3, out)
    assert out.stat().st_size > 1000
