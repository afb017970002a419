import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.rescore import compare, main


def test_compare_takes_each_arms_margin_over_real_at_the_same_k_on_both_test_sets() -> None:
    def row(arm: str, k: int, seed: int, rare: float) -> dict:
        return {"key": f"{arm}-k{k}-s{seed}", "arm": arm, "k": k, "seed": seed, "share": 1.0, "conf": 0.25,
                "rare.mAP50-95": rare, "common.mAP50-95": 0.8}  # fmt: skip

    old = pd.DataFrame([row("real", 0, 0, 0.50), row("real", 0, 1, 0.52), row("restyled", 0, 0, 0.60),
                        row("restyled", 0, 1, 0.62), row("restyled", 10, 0, 0.70)])  # fmt: skip
    new = old.assign(**{"rare.mAP50-95": old["rare.mAP50-95"] - 0.05})
    new.loc[new["key"] == "restyled-k0-s1", "rare.mAP50-95"] = 0.61
    rows = {(r["arm"], r["k"]): r for r in compare(old, new)}
    assert rows[("restyled", 0)]["margin old"] == pytest.approx(10.0)
    assert rows[("restyled", 0)]["rare new"] == pytest.approx(0.58)  # (0.55 + 0.61) / 2
    assert rows[("restyled", 0)]["margin new"] == pytest.approx(12.0)  # 0.58 - 0.46
    assert rows[("restyled", 10)]["margin old"] is None  # no real arm at k = 10 to compare with
    assert rows[("real", 0)]["seeds"] == 2


@pytest.mark.slow
def test_rescore_scores_stored_weights_on_new_tests_and_resumes(tmp_path: Path, tiny_models: dict) -> None:
    from tasks.experiment import score
    from tasks.tiny_models import build_tiny_detector
    from tasks.world import CLASSES, write_split

    start = build_tiny_detector(tmp_path / "start.pt", list(CLASSES), seed=0)
    params = yaml.safe_load((Path(__file__).parents[2] / "params.smoke.yaml").read_text())
    params["finetune"]["model"] = str(start)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    tests = tmp_path / "holdout" / "test"
    for n, condition in enumerate(["fog", "night", "rain", "noise", "plain"]):
        write_split(tests / condition, 4, [condition], seed=n, val="images")
    folder = tmp_path / "experiments" / "probe"
    trained = folder / "real-k0-s0" / "train" / "weights" / "last.pt"
    trained.parent.mkdir(parents=True)
    build_tiny_detector(trained, list(CLASSES), seed=1)  # another model: its figures must be its own
    pd.DataFrame([{"key": key, "arm": key.split("-")[0], "k": 0, "seed": 0, "share": 1.0, "conf": 0.25, "n_extra": 0,
                   "rare.mAP50-95": 0.5, "common.mAP50-95": 0.8} for key in ("start-k0-s0", "real-k0-s0")]
                 ).to_parquet(folder / "results.parquet")  # fmt: skip

    figures = main([str(folder), "--tests", str(tests), "--params", str(params_path),
                    "--result", str(tmp_path / "rescore.json")])  # fmt: skip

    stored = pd.read_parquet(folder / "rescored" / "holdout.parquet").set_index("key")
    assert sorted(stored.index) == ["real-k0-s0", "start-k0-s0"]
    from tasks.config import load_params

    loaded = load_params(params_path)
    cfg = loaded.experiment.model_copy(update={"tests": tests})
    sets = {c: tests / c / "data.yaml" for c in [*cfg.rare_conditions, *cfg.common_conditions]}
    expected = score(trained, sets, loaded.finetune, cfg, tmp_path / "direct")
    assert stored.at["real-k0-s0", "rare.mAP50-95"] == pytest.approx(expected["rare.mAP50-95"])
    assert stored.at["real-k0-s0", "plain.mAP50-95"] == pytest.approx(expected["plain.mAP50-95"])
    assert [r["arm"] for r in figures["probe"]] == ["start", "real"]

    shutil.rmtree(folder / "real-k0-s0")  # a scored trial is not scored again: its weights are not needed
    main([str(folder), "--tests", str(tests), "--params", str(params_path), "--result", str(tmp_path / "r2.json")])
    assert len(pd.read_parquet(folder / "rescored" / "holdout.parquet")) == 2
