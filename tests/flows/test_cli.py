"""The CLI: help everywhere, one line per error (no traceback), stages that name what is missing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import STAGES

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["datasets"], ["datasets", "checkout"], *[[s] for s in STAGES]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


def test_bad_params_give_one_line_per_error_and_exit_2(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "prompts: {classes: []}\ngenerate: {model: m, num_inference_steps: 0}\nvalidate: {model: v.pt}\n"
        "finetune: {model: f.pt, epohcs: 3}\n"
    )
    result = runner.invoke(app, ["run", "--params", str(params)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {params}: prompts.classes: the class list is empty: name at least one class",
        f"error: {params}: generate.num_inference_steps: Input should be greater than 0",
        f"error: {params}: finetune.epohcs: unknown key (check the spelling)",
    ]
    assert "Traceback" not in result.output
    assert not (tmp_path / "workspace").exists(), "nothing is written before params are valid"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prompts", "--params", str(tmp_path / "missing.yaml"), "--debug"])
    assert result.exit_code != 0 and "cannot read params file" in str(result.exception)


def test_stages_run_alone_and_name_what_is_missing(smoke_params: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--params", str(smoke_params)])
    assert result.exit_code == 1
    assert "prompts.parquet: missing; run the prompts stage first" in result.stderr

    result = runner.invoke(app, ["prompts", "--params", str(smoke_params)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "workspace" / "runs" / "default" / "prompts" / "prompts.parquet")
    assert len(table) == 12


def test_workspace_option_overrides_params(smoke_params: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    result = runner.invoke(app, ["prompts", "--params", str(smoke_params), "--workspace", str(other)])
    assert result.exit_code == 0, result.output
    assert (other / "runs" / "default" / "prompts" / "prompts.parquet").is_file()
    assert not (tmp_path / "workspace" / "runs").exists()


def test_datasets_commands_on_an_empty_workspace(smoke_params: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["datasets", "list", "--params", str(smoke_params)])
    assert result.exit_code == 0 and "no dataset versions yet" in result.output
    raw = yaml.safe_load(smoke_params.read_text())
    assert raw["workspace"] == str(tmp_path / "workspace")
    result = runner.invoke(
        app, ["datasets", "checkout", "synthetic-v9", "--to", str(tmp_path / "x"), "--params", str(smoke_params)]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"error: {tmp_path / 'workspace' / 'registry'}: data registry not found\n"


def test_unknown_flow_is_refused() -> None:
    result = runner.invoke(app, ["run", "--flow", "nope"])
    assert result.exit_code == 1 and "--flow: 'nope'" in result.stderr
