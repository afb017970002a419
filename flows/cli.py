"""The ``synthdet`` command line: ``run`` for a whole flow, one subcommand per stage, and dataset tools.

Heavy libraries are imported inside the commands, after :func:`flows.env.configure_environment`
has set the offline switches and tool homes, so ``synthdet --help`` is instant and nothing is
written to the user's home.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tasks.config import STAGES, ConfigError, load_params
from tasks.workspace import Workspace, workspace_lock

app = typer.Typer(
    help="Turn a text-to-image diffusion model into a validated, versioned synthetic YOLO dataset, "
    "and fine-tune a detector on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(
    help="List, restore and push dataset versions in the DVC data registry.", no_args_is_help=True
)
app.add_typer(datasets_app, name="datasets")

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file (one section per stage).")]
WorkspaceOption = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Write everything here instead of params' workspace.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]

EXPECTED_ERRORS = (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError)


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    for line in str(exc).strip().splitlines() or [type(exc).__name__]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _guarded(debug: bool, work: Callable[[], Any]) -> Any:
    """Run ``work``; expected errors become one line each on stderr and a non-zero exit."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return work()
    except EXPECTED_ERRORS as exc:
        _fail(exc, debug)
    except Exception as exc:  # noqa: BLE001 - anything else is reported the same way, with its type
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


def _prepare(params: Path, workspace: Path | None, stages: tuple[str, ...] = ()) -> None:
    """Validate params (writing nothing), set the environment, then check the stages' inputs: every
    error a user can fix shows up before any heavy work starts."""
    from flows.env import configure_environment

    overrides = {"workspace": str(workspace)} if workspace else None
    loaded = load_params(params, overrides)
    # Before the checks: loading a detector imports ultralytics, which must find its config dir set.
    configure_environment(Workspace(Path(loaded.workspace), loaded.run_name))
    if stages:
        from flows.stages import preflight

        preflight(loaded, stages)


# -- whole flows ------------------------------------------------------------------------------
@app.command()
def run(
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    flow: Annotated[str, typer.Option(help="pipeline, synthesize, finetune or retrain.")] = "pipeline",
    dataset_version: Annotated[str, typer.Option(help="For --flow finetune: a tag or 'latest'.")] = "latest",
    debug: DebugOption = False,
) -> None:
    """Run a whole flow through Prefect (a local temporary API unless PREFECT_API_URL is set)."""

    def work() -> dict:
        if flow not in ("pipeline", "synthesize", "finetune", "retrain"):
            raise ValueError(f"--flow: {flow!r} is not one of pipeline, synthesize, finetune, retrain")
        synthesize, finetune = STAGES[:5], STAGES[5:]
        checked = {"pipeline": STAGES, "synthesize": synthesize, "finetune": finetune, "retrain": finetune}
        _prepare(params, workspace, checked[flow])  # before prefect is imported: it reads its settings once
        from flows.pipeline import FLOWS

        ws = str(workspace) if workspace else None
        extra = {"dataset_version": dataset_version} if flow == "finetune" else {}  # retrain: always latest
        return FLOWS[flow](params=str(params), workspace=ws, **extra)

    summary = _guarded(debug, work)
    typer.echo(format_summary(summary))


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines a user wants after a run."""
    lines = [f"synthdet {summary['flow']}: done"]
    if "prompts" in summary:
        lines.append(f"  prompts      {summary['prompts']['prompts']}")
    if "generate" in summary:
        g = summary["generate"]
        lines.append(f"  generated    {g['generated']} (degenerate {g['degenerate']})")
    if "validate" in summary:
        v = summary["validate"]
        lines.append(f"  accepted     {v['accepted']} of {v['validated']} ({v['acceptance_rate']:.0%})")
    if "dataset" in summary:
        d = summary["dataset"]
        restyled = f", {d['restyled']} of them recoloured" if d.get("restyled") else ""
        lines.append(f"  dataset      {d['train']} train / {d['val']} val ({d['real']} real{restyled})")
    if "version" in summary:
        v = summary["version"]
        pushed = "pushed" if v["pushed"] else "NOT pushed (synthdet datasets push)"
        lines.append(f"  version      {v['tag']} ({v['dvc_md5']}, {pushed})")
    if "finetune" in summary:
        f = summary["finetune"]
        start = "" if f.get("start_mAP50-95") is None else f"; starting weights {f['start_mAP50-95']:.3f}"
        reused = " (reused: same data, settings and start weights; finetune.reuse=false trains again)"
        lines.append(f"  fine-tuned   on {f['dataset_version']}{reused if f.get('reused') else ''}")
        lines.append(f"  mAP50-95     {f['mAP50-95']:.3f} (mAP50 {f['mAP50']:.3f}){start}, on {f['eval_set']}")
        lines.append(f"  model        {f['registered_model']} v{f['model_version']}  {f['weights']}")
        if f.get("guard"):
            g = f["guard"]
            change = g["mAP50-95"] - g["start_mAP50-95"]
            lines.append(f"  guard        mAP50-95 {g['mAP50-95']:.3f}; starting weights {g['start_mAP50-95']:.3f} "
                         f"({change:+.3f}, at most -{g['margin']} allowed), on {g['set']}")  # fmt: skip
        champion = f"v{f['champion_version']}" if f.get("champion_version") else "none"
        lines.append(f"  champion     {champion}: {f['promotion_reason']}")
    lines.append(f"  mlflow run   {summary['mlflow_run_id']}  ({summary['mlflow_uri']})")
    lines.append(f"  workspace    {summary['workspace']}  (run files in {summary['run_dir']})")
    return "\n".join(lines)


# -- one subcommand per stage -----------------------------------------------------------------
def _run_stage(params: Path, workspace: Path | None, debug: bool, stage: str, **kwargs: Any) -> None:
    def work() -> dict:
        _prepare(params, workspace, (stage,) if stage in STAGES else ())
        from flows import stages
        from flows.pipeline import open_context, reap_crashed

        ctx = open_context(str(params), str(workspace) if workspace else None)
        with workspace_lock(ctx.ws.root):
            reap_crashed(ctx)
            return getattr(stages, stage.replace("-", "_"))(ctx, **kwargs)

    typer.echo(json.dumps(_guarded(debug, work), indent=2, default=str))


def _stage_command(stage: str, doc: str) -> None:
    def command(
        params: ParamsOption = Path("params.yaml"), workspace: WorkspaceOption = None, debug: DebugOption = False
    ) -> None:
        _run_stage(params, workspace, debug, stage)

    command.__doc__ = doc
    app.command(name=stage)(command)


for _stage, _doc in {
    "prompts": "Expand classes x attributes x templates into the prompt table.",
    "generate": "Render one image per prompt with the diffusers pipeline (resumable).",
    "validate": "Accept or reject each image with the YOLO detector; write pseudo-labels.",
    "dataset": "Assemble accepted (and real) images into a YOLO dataset.",
    "version": "Version the dataset in the DVC data registry and push it.",
    "finetune": "Fine-tune the detector on this run's dataset version, evaluate and register it.",
}.items():
    _stage_command(_stage, _doc)
assert tuple(c.name for c in app.registered_commands if c.name in STAGES) == STAGES


# -- datasets ---------------------------------------------------------------------------------
def _registry(params: Path, workspace: Path | None) -> tuple[Path, str, str]:
    overrides = {"workspace": str(workspace)} if workspace else None
    loaded = load_params(params, overrides)
    ws = Workspace(Path(loaded.workspace).resolve())
    remote = loaded.version.remote or str(ws.remote)
    return (loaded.version.registry or ws.registry).resolve(), remote, loaded.dataset.name


@datasets_app.command("list")
def datasets_list(
    params: ParamsOption = Path("params.yaml"), workspace: WorkspaceOption = None, debug: DebugOption = False
) -> None:
    """Show every dataset version in the registry."""
    from tasks.versioning import list_versions

    def work() -> list:
        registry, _, _ = _registry(params, workspace)
        return list_versions(registry) if registry.exists() else []

    versions = _guarded(debug, work)
    if not versions:
        typer.echo("no dataset versions yet")
    for v in versions:
        typer.echo(
            f"{v.tag:24} {v.files:6d} files  {v.dvc_md5}  {v.git_rev[:10]}  {v.created}"
            f"  {'pushed' if v.pushed else 'NOT pushed'}"
        )


@datasets_app.command("checkout")
def datasets_checkout(
    version: Annotated[str, typer.Argument(help="A version tag, e.g. synthetic-v1, or 'latest'.")],
    to: Annotated[Path, typer.Option("--to", help="An empty or new directory to restore into.")],
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Restore a dataset version byte for byte."""
    from tasks.versioning import checkout_version

    def work() -> Path:
        registry, _, name = _registry(params, workspace)
        return checkout_version(registry, version, to.resolve(), name=name)

    typer.echo(f"restored {version} into {_guarded(debug, work)}")


@datasets_app.command("push")
def datasets_push(
    version: Annotated[str, typer.Argument(help="A version tag, or 'latest'.")],
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Push a version's data to the DVC remote (for versions made while it was unreachable)."""
    from tasks.versioning import push_version

    def work() -> Any:
        registry, _, name = _registry(params, workspace)
        return push_version(registry, version, name=name)

    made = _guarded(debug, work)
    typer.echo(f"{made.tag}: {'pushed' if made.pushed else 'NOT pushed'}")


# -- the embedded default models --------------------------------------------------------------
@app.command("world")
def world(
    out: Annotated[Path, typer.Option(help="Folder for the data sets.")] = Path("data/world"),
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Build only this set (repeatable): common_train, common_val, rare_scarce, test, "
            "captioned, reference_train."
        ),
    ] = None,  # fmt: skip
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Render the procedural world's labelled and captioned data sets (params: world)."""
    _run_stage(params, workspace, debug, "world", out=out, only=only)


@app.command("train-validator")
def train_validator(
    data: Annotated[Path, typer.Option(help="data.yaml to train on.")] = Path("data/world/common_train/data.yaml"),
    out: Annotated[Path, typer.Option(help="Where the .pt goes.")] = Path("models/validator.pt"),
    tests: Annotated[Path | None, typer.Option(help="Folder of <condition>/data.yaml test sets.")] = Path(
        "data/world/test"
    ),
    epochs: Annotated[int | None, typer.Option(min=1, help="Override train-validator.epochs.")] = None,
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Train the default validator, a YOLO26n from its yaml (params: train-validator).

    The reference detector of evaluate-default is the same recipe on every condition:
    --data data/world/reference_train/data.yaml --out models/reference.pt --epochs 30
    """
    _run_stage(params, workspace, debug, "train-validator", data=data, out=out, tests=tests, epochs=epochs)


@app.command("train-generator")
def train_generator(
    data: Annotated[Path, typer.Option(help="A captioned folder: images/ and captions.parquet.")] = Path(
        "data/world/captioned"
    ),
    out: Annotated[Path, typer.Option(help="Where the diffusers pipeline folder goes.")] = Path("models/generator"),
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Train the default text-to-image latent diffusion model (params: train-generator)."""
    _run_stage(params, workspace, debug, "train-generator", data=data, out=out)


@app.command("train-guide")
def train_guide(
    generator: Annotated[Path, typer.Option(help="The pipeline folder that gains class_guide/.")] = Path(
        "models/generator"
    ),
    data: Annotated[Path, typer.Option(help="A captioned folder: images/ and captions.parquet.")] = Path(
        "data/world/captioned"
    ),
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Train a pipeline's class guide, which generate.class_guidance samples with (params: train-generator.guide_*).

    A classifier of noisy latents, taught by the captions which of the prompts' classes each image shows
    (tasks/class_guide.py). It needs the pipeline's own autoencoder, not its UNet: train-generator trains
    the same guide when its guide_steps is set.
    """
    _run_stage(params, workspace, debug, "train-guide", data=data, generator=generator)


@app.command("evaluate-default")
def evaluate_default(
    world: Annotated[Path, typer.Option(help="The world's data sets (needs test/<condition>/).")] = Path("data/world"),
    generator: Annotated[Path, typer.Option(help="The diffusers pipeline folder.")] = Path("models/generator"),
    validator: Annotated[Path, typer.Option(help="The default validator .pt.")] = Path("models/validator.pt"),
    reference: Annotated[Path, typer.Option(help="A detector trained on every condition, to judge rare ones.")] = Path(
        "models/reference.pt"
    ),
    out: Annotated[Path, typer.Option(help="Where the report, JSON and sample grid go.")] = Path("docs"),
    per_cell: Annotated[int, typer.Option(min=1, help="Images per class x condition cell and source.")] = 24,
    conf: Annotated[float, typer.Option(min=0.0, max=1.0, help="Confidence a judge needs to count a find.")] = 0.25,
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    debug: DebugOption = False,
) -> None:
    """Measure the default models: generator fidelity per class x condition, detector mAP, training cost.

    Writes docs/default-model.md, docs/default-model.json and docs/default-samples.png.
    """
    command = "synthdet evaluate-default" + ("" if per_cell == 24 else f" --per-cell {per_cell}")
    _run_stage(params, workspace, debug, "evaluate-default", world=world, generator=generator, validator=validator,
               reference=reference, out=out, per_cell=per_cell, conf=conf, command=command)  # fmt: skip


# -- the ablation -----------------------------------------------------------------------------
def _csv(text: str | None, cast: Callable[[str], Any] = str) -> list | None:
    return None if text is None else [cast(part.strip()) for part in text.split(",") if part.strip()]


@app.command("experiment")
def experiment(
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    name: Annotated[str | None, typer.Option(help="Results folder experiments/NAME (default experiment.name).")] = None,
    arms: Annotated[
        str | None,
        typer.Option(help="Comma-separated: start, real, restyled, unfiltered, validated, adapted, ceiling."),
    ] = None,
    k: Annotated[str | None, typer.Option("--k", help="Comma-separated numbers of scarce real rare images.")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Run seeds 0..N-1 (default experiment.seeds).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per fine-tuned trial.")] = None,
    debug: DebugOption = False,
) -> None:
    """Does the synthetic data help? An ablation on held-out real test sets (params: experiment).

    Each arm is fine-tuned from finetune.model with the same number of optimizer steps:
    start: the starting weights as they are (not trained)
    real: k scarce real rare images plus common-image replay
    restyled: real + common images recoloured to the rare conditions' colours (dataset.restyle; no generator)
    unfiltered: real + synthetic rare images labelled at a low threshold, no filter
    validated: real + synthetic images the starting detector accepted and labelled
    adapted: real + synthetic images accepted and labelled by the real arm's model, balanced by class x condition
    ceiling: real + as many real rare images with true labels

    Writes <workspace>/experiments/NAME/: results.parquet, comparison.md, map_vs_*.png,
    map_rare_vs_common.png; one MLflow run per trial under an `experiment` parent. A re-run skips the
    trials already in results.parquet.
    """

    def work() -> dict:
        loaded = load_params(params, {"workspace": str(workspace)} if workspace else None)
        chosen = _csv(arms) or loaded.experiment.arms
        needs = ("generate", "finetune") if {"unfiltered", "validated", "adapted"} & set(chosen) else ("finetune",)
        _prepare(params, workspace, needs)  # before prefect is imported: it reads its settings once
        from flows.experiment import experiment as flow

        return flow(params=str(params), workspace=str(workspace) if workspace else None, name=name, arms=_csv(arms),
                    k=_csv(k, int), seeds=list(range(seeds)) if seeds else None, steps=steps)  # fmt: skip

    summary = _guarded(debug, work)
    typer.echo(summary["report"])
    typer.echo(f"{summary['trials']} trials ({summary['ran']} run now) in {summary['seconds'] / 60:.1f} min")
    typer.echo(f"results      {summary['results']}\ncomparison   {summary['comparison']}")
    typer.echo(f"plots        {', '.join(summary['plots'])}")
    typer.echo(f"mlflow run   {summary['mlflow_run_id']}  ({summary['mlflow_uri']})")


# -- local services ---------------------------------------------------------------------------
PrefectPort = Annotated[int, typer.Option(help="Prefect server port.")]
MlflowPort = Annotated[int, typer.Option(help="MLflow server port.")]
HostOption = Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the servers.")]


def _services(params: Path, workspace: Path | None, prefect_port: int, mlflow_port: int, host: str):
    from flows.env import configure_environment
    from flows.services import Ports

    overrides = {"workspace": str(workspace)} if workspace else None
    loaded = load_params(params, overrides)
    ws = Workspace(Path(loaded.workspace).resolve())
    configure_environment(ws)
    return ws, Ports(prefect=prefect_port, mlflow=mlflow_port, host=host)


@app.command()
def up(
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    prefect_port: PrefectPort = 4200,
    mlflow_port: MlflowPort = 5000,
    host: HostOption = "127.0.0.1",
    debug: DebugOption = False,
) -> None:
    """Start a Prefect server, a worker with the deployments, and an MLflow server (idempotent)."""
    from flows import services

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: binding {host}: the servers have no authentication; anyone who can reach "
                   "this address can run flows and read runs", err=True)  # fmt: skip

    def work() -> dict:
        ws, ports = _services(params, workspace, prefect_port, mlflow_port, host)
        return services.up(ws, ports, Path.cwd())

    pids = _guarded(debug, work)
    typer.echo(f"prefect  http://{host}:{prefect_port}   (pid {pids['prefect']}, worker pid {pids['worker']})")
    typer.echo(f"mlflow   http://{host}:{mlflow_port}   (pid {pids['mlflow']})")


@app.command()
def status(
    params: ParamsOption = Path("params.yaml"),
    workspace: WorkspaceOption = None,
    prefect_port: PrefectPort = 4200,
    mlflow_port: MlflowPort = 5000,
    host: HostOption = "127.0.0.1",
    debug: DebugOption = False,
) -> None:
    """Report each service `up` started: its pid and whether it answers."""
    from flows import services

    def work() -> dict:
        return services.status(*_services(params, workspace, prefect_port, mlflow_port, host))

    report = _guarded(debug, work)
    for name, state in report.items():
        health = "healthy" if state["healthy"] else ("running" if state["running"] else "stopped")
        typer.echo(f"{name:8} {health:8} pid {state['pid'] or '-'}  {state['url'] or ''}")
    if not all(state["healthy"] for state in report.values()):
        raise typer.Exit(1)


@app.command()
def down(params: ParamsOption = Path("params.yaml"), workspace: WorkspaceOption = None,
         debug: DebugOption = False) -> None:  # fmt: skip
    """Stop exactly the processes `up` started."""
    from flows import services

    def work() -> list:
        ws, _ = _services(params, workspace, 0, 0, "127.0.0.1")
        return services.down(ws)

    stopped = _guarded(debug, work)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


# -- benchmarks -------------------------------------------------------------------------------
# Everything after NAME, --help included, goes to the benchmark.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A module of bench/, e.g. orchestration, dvc_scale.")] = None,
) -> None:
    """Run a benchmark: `python -m bench.NAME [ARGS]`; `synthdet bench NAME --help` for its options.

    Benchmarks print a table and write bench/results/NAME.json; docs/benchmarks.md has the figures.
    """
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    known = sorted(p.stem for p in (root / "bench").glob("*.py") if "def main(" in p.read_text())
    if name in (None, "--help", "-h"):
        typer.echo(ctx.get_help())
        typer.echo(f"\nbenchmarks: {', '.join(known)}")
        return
    module = name.replace("-", "_")
    if module not in known:
        typer.echo(f"error: no benchmark {name!r}; known: {', '.join(known)}", err=True)
        raise typer.Exit(2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    raise typer.Exit(subprocess.run([sys.executable, "-m", f"bench.{module}", *ctx.args], env=env).returncode)


# -- placeholder models -----------------------------------------------------------------------
@app.command("tiny-models")
def tiny_models(
    out: Annotated[Path, typer.Option(help="Folder for generator/ and validator.pt.")] = Path("models/tiny"),
    classes: Annotated[str, typer.Option(help="Comma-separated detector class names.")] = "circle,square,triangle,star",
    seed: int = 0,
    debug: DebugOption = False,
) -> None:
    """Build tiny random-weight models from configs (a diffusers pipeline and a YOLO26n detector)."""

    def work() -> None:
        import tempfile

        from flows.env import configure_environment

        configure_environment(Workspace(Path(tempfile.mkdtemp(prefix="synthdet-"))))  # tool state only
        from tasks.tiny_models import build_tiny_detector, build_tiny_pipeline

        names = [c.strip() for c in classes.split(",") if c.strip()]
        build_tiny_pipeline(out / "generator", seed=seed)
        build_tiny_detector(out / "validator.pt", names, seed=seed)

    _guarded(debug, work)
    typer.echo(f"built {out}/generator and {out}/validator.pt")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM (`kill`, a scheduler, a container stopping) unwinds like Ctrl-C: locks are released and the
    # temporary Prefect API server a run starts is stopped by its exit hook instead of being left running.
    # Inside a flow, Prefect's own handler takes over and hands back to this one when the run ends.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app(prog_name="synthdet")


if __name__ == "__main__":
    sys.exit(main())
