"""One vocabulary: a stage's name is the same in params.yaml, the CLI, the Prefect flow and dvc.yaml."""

import subprocess
import sys
from pathlib import Path

import yaml

from tasks.config import STAGES, TRAINING_STAGES, Params

ROOT = Path(__file__).resolve().parents[1]


def test_params_sections_are_the_stages() -> None:
    sections = [field.alias or name for name, field in Params.model_fields.items()]
    settings = ("workspace", "run_name", "runner", "experiment")  # not a stage of the DAG
    assert [s for s in sections if s not in settings] == [*STAGES, *TRAINING_STAGES]


def test_params_files_spell_out_every_section() -> None:
    # dvc.yaml declares each stage's section as a parameter: DVC refuses a file that leaves one out.
    for name in ("params.yaml", "params.smoke.yaml"):
        raw = yaml.safe_load((ROOT / name).read_text())
        assert [s for s in STAGES if s not in raw] == [], name


def test_dvc_stages_call_the_cli_subcommand_of_the_same_name() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [*STAGES, *TRAINING_STAGES]
    for name, stage in stages.items():
        assert stage["cmd"].split()[:2] == ["synthdet", name]
        assert name in stage["params"], f"dvc stage {name} must depend on its params section"


def test_cli_has_one_subcommand_per_stage() -> None:
    from flows.cli import app

    commands = {command.name for command in app.registered_commands}
    assert {*STAGES, *TRAINING_STAGES} <= commands


def test_prefect_tasks_are_named_after_the_stages() -> None:
    from flows.pipeline import FINETUNE, SYNTHESIZE, TASKS

    assert SYNTHESIZE + FINETUNE == STAGES
    assert {name: t.name for name, t in TASKS.items()} == {s: s for s in STAGES}


def test_tasks_import_without_prefect_or_flows() -> None:
    # Poison prefect and flows: importing any tasks module must not need them.
    modules = sorted(p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        "sys.modules['prefect'] = None\nsys.modules['flows'] = None\n"
        + "".join(f"import tasks.{m}\n" for m in modules)
        + "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_only_tracking_imports_mlflow_and_only_versioning_runs_dvc() -> None:
    for path in (ROOT / "tasks").glob("*.py"):
        text = path.read_text()
        if path.stem != "tracking":
            assert "import mlflow" not in text and "from mlflow" not in text, path
        if path.stem != "versioning":
            assert '"dvc"' not in text and "import dvc" not in text, path


def test_prefect_deployments_point_at_the_flows() -> None:
    from flows.experiment import experiment
    from flows.pipeline import FLOWS

    flows = {**FLOWS, "experiment": experiment}
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == set(flows)
    for deployment in deployments:
        path, function = deployment["entrypoint"].split(":")
        module = "flows/experiment.py" if deployment["name"] == "experiment" else "flows/pipeline.py"
        assert path == module and flows[deployment["name"]].fn.__name__ == function
        flows[deployment["name"]].validate_parameters(deployment.get("parameters", {}))
    (retrain,) = [d for d in deployments if d["name"] == "retrain"]
    assert retrain["schedules"][0]["active"] is False  # paused until the user enables it
