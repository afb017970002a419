"""The experiment's pure rules: the plan, the balanced draw, the training list, the goals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.config import ExperimentConfig
from tasks.experiment import (
    Item,
    Trial,
    TrialData,
    adapted_count,
    balanced_sample,
    box_iou,
    goal_lines,
    merge_mirrored,
    plan_trials,
    write_training_set,
)


def test_plan_orders_inputs_first_and_runs_start_once() -> None:
    cfg = ExperimentConfig(arms=["adapted", "start"], k=[0, 10], seeds=[0, 1], shares=[0.5], thresholds=[0.5])
    trials = plan_trials(cfg)
    arms = [t.arm for t in trials]
    assert arms.count("start") == 1 and arms[0] == "start"
    assert arms.index("real") < arms.index("adapted")  # the adapted arm's labeller is trained first
    assert Trial("validated", 10, 1, 0.5, 0.25) in trials  # the share sweep runs the sweep arm at sweep_k
    assert Trial("validated", 10, 0, 1.0, 0.5) in trials  # and the threshold sweep
    assert len({t.key for t in trials}) == len(trials)


def test_unknown_arm_fails_at_load() -> None:
    with pytest.raises(ValueError, match="arms"):
        ExperimentConfig(arms=["validatd"])


def test_ceiling_size_follows_the_adapted_twin_or_the_nominal_share() -> None:
    ceiling = Trial("ceiling", 10, 1, 1.0, 0.25)
    fresh = pd.DataFrame(columns=["key", "fingerprint"])  # what the flow starts from in a new experiment
    assert adapted_count(fresh, ceiling) is None
    done = pd.DataFrame(
        [
            {"key": "a", "arm": "adapted", "k": 10, "seed": 0, "n_extra": 61},
            {"key": "b", "arm": "adapted", "k": 10, "seed": 1, "n_extra": 70},
            {"key": "c", "arm": "real", "k": 10, "seed": 1, "n_extra": 0},
        ]
    )
    assert adapted_count(done, ceiling) == 70
    assert adapted_count(done, Trial("ceiling", 30, 1, 1.0, 0.25)) is None


def test_balanced_sample_takes_every_cell_in_turn() -> None:
    items = [Item(f"{i}.png", (), "synthetic", "fog", "circle") for i in range(10)]
    items += [Item("s.png", (), "synthetic", "night", "star")]
    picked = balanced_sample(items, 2, np.random.default_rng(0))
    assert {(i.cls, i.condition) for i in picked} == {("circle", "fog"), ("star", "night")}


def test_training_list_has_exactly_steps_times_batch_images(tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    data = TrialData([Item(str(image), ("0 0.5 0.5 0.2 0.2",), "real")], [Item(str(image), (), "replay")])
    data_yaml = write_training_set(data, data.real, ["circle"], steps=3, batch=4, seed=0, out_dir=tmp_path / "set")
    train = tmp_path / "set" / "images" / "train"
    assert len(list(train.iterdir())) == 12 and len(list((tmp_path / "set" / "labels" / "train").iterdir())) == 12
    assert yaml.safe_load(data_yaml.read_text())["names"] == {0: "circle"}


def test_goals_report_met_missed_and_unmeasured() -> None:
    rows = [
        ("start", 0, 0.50, 0.90),
        ("real", 10, 0.55, 0.89),
        ("adapted", 10, 0.61, 0.895),
        ("validated", 10, 0.6, 0.8),
    ]
    main = pd.DataFrame([{"arm": a, "k": k, "rare.mAP50-95 mean": r, "common.mAP50-95 mean": c} for a, k, r, c in rows])
    lines = "\n".join(goal_lines(main))
    assert "MET: adapted beats real by >= 0.05 at k=10: +0.060" in lines
    assert "UNMEASURED: adapted closes >= half the real-to-ceiling gap at k=30" in lines
    assert "MET: adapted beats validated at every k: k=10 +0.010" in lines
    assert "MET: adapted costs <= 0.01 on the common set" in lines
    assert "adapted against real at the same k (what the added images cost): k=10 +0.005" in lines


def test_goals_give_the_margin_over_real_with_its_standard_error() -> None:
    rows = [
        ("real", 10, 0.55, 0.02, 4),
        ("adapted", 10, 0.61, 0.01, 4),
        ("real", 0, 0.5, 0.02, 1),
        ("adapted", 0, 0.6, 0.01, 1),
    ]
    main = pd.DataFrame([{"arm": a, "k": k, "rare.mAP50-95 mean": r, "rare.mAP50-95 std": s, "seeds": n}
                         for a, k, r, s, n in rows])  # fmt: skip
    lines = goal_lines(main)
    # sqrt(0.02^2 / 4 + 0.01^2 / 4) = 0.0112; one seed has no spread, so no error at k = 0
    assert "- MET: adapted beats real by >= 0.05 at k=10: +0.060 (± 0.011 standard error)" in lines
    assert any(line.endswith(": +0.100 at k=0, +0.060 (± 0.011 standard error) at k=10") for line in lines)


def test_mirrored_boxes_are_averaged_only_when_they_match() -> None:
    lines = ["0 0.300000 0.500000 0.200000 0.200000", "1 0.700000 0.500000 0.100000 0.100000"]
    # the same circle seen on the mirror image (cx 0.7 there), a bit wider; a square far from the other box
    mirrored = [(0, [0.7, 0.5, 0.24, 0.2]), (1, [0.9, 0.9, 0.1, 0.1]), (1, [0.7, 0.5, 0.2, 0.2])]
    assert merge_mirrored(lines, mirrored) == ["0 0.300000 0.500000 0.220000 0.200000", lines[1]]
    assert box_iou([0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]) == pytest.approx(1.0)
    assert box_iou([0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]) == 0.0


def test_fingerprint_follows_the_settings_not_the_grid(tmp_path: Path) -> None:
    from PIL import Image

    from tasks.config import AddDetail, FinetuneConfig, GenerateConfig, Restyle, Standardise, ValidateConfig
    from tasks.experiment import fingerprint

    weights = tmp_path / "a.pt"
    weights.write_bytes(b"weights 1")
    ft, validate = FinetuneConfig(model=str(weights)), ValidateConfig(model=str(weights))
    gen = GenerateConfig(model="gen")
    base = fingerprint(ExperimentConfig(), ft, gen, validate)
    assert fingerprint(ExperimentConfig(arms=["real"], seeds=[5], k=[3]), ft, gen, validate) == base
    assert fingerprint(ExperimentConfig(), ft, gen.model_copy(update={"batch_size": 3}), validate) == base
    assert fingerprint(ExperimentConfig(lr0=0.01), ft, gen, validate) != base
    pipeline_only = {"epochs": 3, "warmup_epochs": 0.0, "nbs": 16, "registered_model": "other"}
    assert fingerprint(ExperimentConfig(), ft.model_copy(update=pipeline_only), gen, validate) == base
    assert fingerprint(ExperimentConfig(), ft.model_copy(update={"scale": 0.1}), gen, validate) != base
    constant = fingerprint(ExperimentConfig(), ft.model_copy(update={"lrf": 1.0}), gen, validate)
    assert (
        len({base, constant, fingerprint(ExperimentConfig(), ft.model_copy(update={"lrf": 0.1}), gen, validate)}) == 3
    )
    assert fingerprint(ExperimentConfig(), ft, GenerateConfig(model="other-generator"), validate) != base
    assert fingerprint(ExperimentConfig(), ft, gen.model_copy(update={"guidance_scale": 9.0}), validate) != base
    unaffected = fingerprint(ExperimentConfig(), ft, None, validate)  # e.g. the real arm: no generator
    assert fingerprint(ExperimentConfig(), ft, None, validate) == unaffected != base
    (tmp_path / "fog").mkdir()
    (tmp_path / "fog" / "a.png").write_bytes(b"image 1")
    started = GenerateConfig(model="gen", start_means={"images": {"fog": str(tmp_path / "fog")}})
    with_means = fingerprint(ExperimentConfig(), ft, started, validate)
    assert with_means != base
    (tmp_path / "fog" / "a.png").write_bytes(b"image 2")  # same folder, other images: other starts
    assert fingerprint(ExperimentConfig(), ft, started, validate) != with_means
    detail = AddDetail(images={"fog": str(tmp_path / "fog")})
    with_detail = fingerprint(ExperimentConfig(), ft, gen, validate, detail)
    assert with_detail != base
    assert fingerprint(ExperimentConfig(), ft, gen, validate, detail.model_copy(update={"above": 0.2})) != with_detail
    (tmp_path / "fog" / "a.png").write_bytes(b"image 3")  # other real images: other detail
    assert fingerprint(ExperimentConfig(), ft, gen, validate, detail) != with_detail
    assert fingerprint(ExperimentConfig(), ft, None, validate, None) == unaffected  # the real arm ignores it
    (tmp_path / "common").mkdir()
    Image.new("RGB", (8, 8), (90, 100, 110)).save(tmp_path / "common" / "a.png")
    rescaled = validate.model_copy(update={"standardise": Standardise(images=tmp_path / "common")})
    with_standardise = fingerprint(ExperimentConfig(), ft, gen, rescaled)
    assert with_standardise != base
    Image.new("RGB", (8, 8), (30, 100, 110)).save(tmp_path / "common" / "a.png")  # other colours: other labels
    assert fingerprint(ExperimentConfig(), ft, gen, rescaled) != with_standardise
    restyle = Restyle(images={"fog": str(tmp_path / "common")})
    with_restyle = fingerprint(ExperimentConfig(), ft, None, validate, None, restyle)  # e.g. the restyled arm
    assert with_restyle != unaffected
    assert fingerprint(ExperimentConfig(), ft, None, validate, None, restyle.model_copy(update={"share": 2.0})) != (
        with_restyle
    )
    Image.new("RGB", (8, 8), (200, 100, 110)).save(tmp_path / "common" / "a.png")  # other colours to take
    assert fingerprint(ExperimentConfig(), ft, None, validate, None, restyle) != with_restyle
    weights.write_bytes(b"weights 2")  # retrained in place: same path, other figures
    assert fingerprint(ExperimentConfig(), ft, gen, validate) != base
    assert fingerprint(ExperimentConfig(), ft, None, validate) != unaffected


def test_step_decay_falls_from_lr0_to_lr0_times_lrf_over_the_batches() -> None:
    from types import SimpleNamespace

    from tasks.experiment import step_decay

    groups = [{"initial_lr": 1e-3, "lr": 1e-3}, {"initial_lr": 2e-3, "lr": 2e-3}]
    trainer = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups), train_loader=[None] * 5)
    callback, seen = step_decay(0.2), []
    for _ in range(5):
        callback(trainer)
        seen += [g["lr"] for g in groups]
    assert seen == pytest.approx([1e-3, 2e-3, 8e-4, 1.6e-3, 6e-4, 1.2e-3, 4e-4, 8e-4, 2e-4, 4e-4])


def test_tests_digest_follows_the_held_out_images_and_labels(tmp_path: Path) -> None:
    from tasks.experiment import tests_digest
    from tasks.world import write_split

    sets = {c: write_split(tmp_path / c, 3, [c], seed=n, val="images") / "data.yaml"
            for n, c in enumerate(["fog", "plain"])}  # fmt: skip
    first = tests_digest(sets)
    assert tests_digest(sets) == first
    label = sorted((tmp_path / "fog" / "labels").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    relabelled = tests_digest(sets)
    assert relabelled != first
    image = sorted((tmp_path / "plain" / "images").glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert tests_digest(sets) != relabelled
