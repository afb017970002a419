"""The ``experiment`` flow: does the synthetic data help? (tasks/experiment.py holds the logic.)

One MLflow parent run ``experiment``; each trial (arm x k x seed, and the sweeps) a nested run named
by its key. Everything goes to ``<workspace>/experiments/<name>/``: ``results.parquet`` (one row per
trial, written after each, so a re-run skips finished trials), ``comparison.md``, the plots and one
folder per trial with its last weights and evaluation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import stages
from flows.pipeline import LOCK_WAIT_S, open_context, reap_crashed
from tasks import experiment as ex
from tasks.config import ARMS, ExperimentConfig, FinetuneConfig
from tasks.workspace import workspace_lock, write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)


def trained(ctx: stages.StageContext, cfg: ExperimentConfig) -> FinetuneConfig:
    """The finetune section every trained arm uses: the pipeline's, at the experiment's learning rate."""
    return ctx.params.finetune.model_copy(update={"lr0": cfg.lr0 or ctx.params.finetune.lr0})


def fingerprint_of(ctx: stages.StageContext, cfg: ExperimentConfig, arm: str) -> str:
    """What an arm's stored trials depend on besides their key (:func:`tasks.experiment.fingerprint`)."""
    uses = ex.arm_uses_generator(arm)
    return ex.fingerprint(cfg, trained(ctx, cfg), ctx.params.generate if uses else None, ctx.params.validate_,
                          ctx.params.dataset.detail if uses else None,
                          ctx.params.dataset.restyle if ex.arm_uses_restyle(arm) else None)  # fmt: skip


@task(name="synthetic", cache_policy=NO_CACHE)
def make_synthetic(ctx: stages.StageContext, cfg: ExperimentConfig, out_dir: Path, parent: str) -> pd.DataFrame:
    """Generate the rare-condition synthetic images every synthetic arm draws from (cached by content)."""
    from tasks.generation import generate_images, load_pipeline
    from tasks.grids import image_grid
    from tasks.prompts import expand_prompts

    prompts = expand_prompts(ex.synthetic_prompts(ctx.params.prompts, cfg))
    generated = generate_images(load_pipeline(ctx.params.generate), prompts, ctx.params.generate, ctx.ws.images,
                                ctx.progress)  # fmt: skip
    write_parquet_atomic(generated, out_dir / "synthetic.parquet")
    ok = generated[generated["status"] == "ok"]
    if len(ok):
        sample = ok.head(stages.GRID_SIZE)
        ctx.tracker.log_image(parent, image_grid(sample["path"], sample["prompt"]), "synthetic_grid.png")
    return ok.reset_index(drop=True)


@task(name="trial", cache_policy=NO_CACHE)
def run_trial(
    ctx: stages.StageContext,
    trial: ex.Trial,
    cfg: ExperimentConfig,
    sources: ex.Sources,
    sets: dict[str, Path],
    out_dir: Path,
    done: pd.DataFrame,
    parent: str,
) -> dict[str, Any]:
    """One trial as a nested MLflow run: pick its labeller and candidates, train, score, log."""
    ft = trained(ctx, cfg)
    candidates: list[ex.Item] = []
    if trial.uses_synthetic:
        labeller = ft.model
        if trial.arm == "adapted" and cfg.labeller:
            labeller = cfg.labeller
        elif trial.arm == "adapted":  # the real arm's model of the same k and seed labels for it
            labeller = str(out_dir / ex.Trial("real", trial.k, trial.seed, cfg.synthetic_share, cfg.conf).key
                           / "train" / "weights" / "last.pt")  # fmt: skip
        candidates = ex.synthetic_candidates(trial, labeller, sources, ctx.params.validate_, cfg, ctx.ws.detections,
                                             ctx.ws.detailed)  # fmt: skip
    ceiling_n = ex.adapted_count(done, trial) if trial.arm == "ceiling" else None
    tags = {"synthdet.stage": "experiment", "synthdet.experiment": cfg.name, **ctx.owner_tags()}
    with ctx.tracker.run(trial.key, parent=parent, tags=tags) as run_id:
        row, _ = ex.run_trial(trial, cfg, ft, sources, sets, out_dir / trial.key, candidates, ceiling_n)
        row["candidates"] = len(candidates)
        ctx.tracker.log_params(run_id, {**{k: row[k] for k in ("arm", "k", "seed", "share", "conf")},
                                        "steps": cfg.steps, "lr0": ft.lr0, "batch": ft.batch})  # fmt: skip
        ctx.tracker.log_metrics(run_id, {k: v for k, v in row.items() if isinstance(v, int | float) and k != "seed"})
        row["mlflow_run_id"] = run_id
    return row


def log_reused(ctx: stages.StageContext, row: dict[str, Any], cfg: ExperimentConfig, parent: str) -> None:
    """A trial finished by an earlier run, logged again under this parent (tagged as reused)."""
    tags = {"synthdet.stage": "experiment", "synthdet.experiment": cfg.name, "synthdet.reused_from":
            str(row.get("mlflow_run_id", "")), **ctx.owner_tags()}  # fmt: skip
    with ctx.tracker.run(row["key"], parent=parent, tags=tags) as run_id:
        ctx.tracker.log_params(run_id, {k: row[k] for k in ("arm", "k", "seed", "share", "conf")})
        ctx.tracker.log_metrics(run_id, {k: v for k, v in row.items() if isinstance(v, int | float) and k != "seed"})


@flow(name="experiment")
def experiment(
    params: str = "params.yaml",
    workspace: str | None = None,
    name: str | None = None,
    arms: list[str] | None = None,
    k: list[int] | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
) -> dict:
    """The ablation of the synthetic data on held-out real test sets (params: experiment).

    Args:
        params: The params file, relative to the folder the flow runs in.
        workspace: Write everything here instead of the params file's workspace.
        name: Names the results folder, experiments/NAME (default experiment.name).
        arms: Arms to run, from start, real, restyled, unfiltered, validated, adapted, ceiling.
        k: Numbers of scarce real rare images.
        seeds: Seeds; every arm runs once per seed.
        steps: Optimizer steps per fine-tuned trial.
    """
    changes = {"name": name, "arms": arms, "k": k, "seeds": seeds, "steps": steps}
    ctx = open_context(params, workspace, changes={f"experiment.{key}": value for key, value in changes.items()
                                                   if value is not None})  # fmt: skip
    cfg = ctx.params.experiment
    with workspace_lock(ctx.ws.root, wait_s=LOCK_WAIT_S):
        reap_crashed(ctx)
        return _run(ctx, cfg)


def _run(ctx: stages.StageContext, cfg: ExperimentConfig) -> dict[str, Any]:
    logger = get_run_logger()
    began = time.perf_counter()
    out_dir = ctx.ws.root / "experiments" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = stages.class_names(ctx.params)
    trials = ex.plan_trials(cfg)
    results_path = out_dir / "results.parquet"
    done = pd.read_parquet(results_path) if results_path.is_file() else pd.DataFrame(columns=["key", "fingerprint"])
    detail, restyle = ctx.params.dataset.detail, ctx.params.dataset.restyle
    fp = {arm: fingerprint_of(ctx, cfg, arm) for arm in ARMS}
    sets = ex.held_out_sets(cfg)
    digest = ex.tests_digest(sets)
    stale = pd.Series([row.get("fingerprint") != fp[row["arm"]] for row in done.to_dict("records")], index=done.index,
                      dtype=bool)  # fmt: skip
    if stale.any():
        logger.warning("experiment %s: %d stored trials were made with other settings; they run again",
                       cfg.name, int(stale.sum()))  # fmt: skip
    # A row from before the tests' digest was stored is taken as scored on today's tests, and stamped.
    retested = pd.Series([isinstance(row.get("tests_digest"), str) and row["tests_digest"] != digest
                          for row in done.to_dict("records")], index=done.index, dtype=bool) & ~stale  # fmt: skip
    if retested.any():
        logger.warning("experiment %s: %d stored trials were scored on other held-out sets (the files under %s "
                       "changed); they run again (`python -m bench.rescore` scores stored weights without "
                       "training)", cfg.name, int(retested.sum()), cfg.tests)  # fmt: skip
    legacy = "tests_digest" not in done or done["tests_digest"].isna().any()
    done = done[~(stale | retested)].assign(tests_digest=digest)
    if legacy and len(done):
        write_parquet_atomic(done, results_path)
    tags = {
        "synthdet.flow": "experiment",
        "synthdet.experiment": cfg.name,
        "git.sha": stages.git_sha(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        **ctx.owner_tags(),
    }
    with ctx.tracker.run("experiment", tags=tags) as parent:
        ctx.tracker.log_params(parent, cfg.model_dump(mode="json"))
        ctx.tracker.log_params(parent, {"finetune.model": ctx.params.finetune.model, "generate.model":
                                        ctx.params.generate.model, "trials": len(trials)})  # fmt: skip
        todo = [t for t in trials if t.key not in set(done["key"])]
        synthetic = None
        if any(t.uses_synthetic for t in todo):
            synthetic = make_synthetic(ctx, cfg, out_dir, parent)
        sources = ex.load_sources(cfg, classes, synthetic)
        if detail is not None and synthetic is not None:
            from tasks.detail import detail_grains

            sources.grains, sources.grain_axis = detail_grains(detail, synthetic), detail.axis
            logger.info("experiment %s: real fine detail added to the synthetic images of %s (grain std %s)",
                        cfg.name, ", ".join(sources.grains), {v: round(float(g.std.mean()), 3)
                                                              for v, g in sources.grains.items()})  # fmt: skip
        if restyle is not None and any(t.arm in ex.RESTYLED_ARMS for t in todo):
            from tasks.restyle import restyle_stats

            sources.restyle = ex.Restyling(restyle_stats(restyle), restyle.share, ctx.ws.restyled)
            logger.info("experiment %s: common images recoloured to the colours of %s", cfg.name,
                        ", ".join(sources.restyle.colours))  # fmt: skip
        logger.info("experiment %s: %d trials, %d already done", cfg.name, len(trials), len(trials) - len(todo))
        for row in done[done["key"].isin({t.key for t in trials})].to_dict("records"):
            log_reused(ctx, row, cfg, parent)
        rows = done.to_dict("records")
        for trial in todo:
            row = run_trial(ctx, trial, cfg, sources, sets, out_dir, done, parent)
            rows.append({**row, "fingerprint": fp[trial.arm], "tests_digest": digest})
            done = pd.DataFrame(rows)
            write_parquet_atomic(done, results_path)
        results = done[done["key"].isin({t.key for t in trials})]
        report = ex.comparison_markdown(results, cfg)
        write_text_atomic(out_dir / "comparison.md", report)
        plots = ex.plot_results(results, cfg, out_dir)
        for path in (out_dir / "comparison.md", results_path, *plots):
            ctx.tracker.log_artifact(parent, path)
        ctx.tracker.log_table(parent, results.drop(columns=["extra_conditions"]), "results.json")
        seconds = time.perf_counter() - began
        ctx.tracker.log_metrics(parent, {"trials": len(results), "seconds": seconds})
    logger.info("experiment %s: %d trials, comparison in %s", cfg.name, len(results), out_dir / "comparison.md")
    return {
        "name": cfg.name,
        "trials": len(results),
        "ran": len(todo),
        "seconds": round(seconds, 1),
        "results": str(results_path),
        "comparison": str(out_dir / "comparison.md"),
        "plots": [str(p) for p in plots],
        "report": report,
        "mlflow_run_id": parent,
        "mlflow_uri": ctx.tracker.uri,
    }
