"""Flow parameters are typed, so the Prefect UI shows a real form and refuses bad values up front."""

from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from flows.pipeline import FLOWS
from tasks.config import ConfigError, RunOverrides, load_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_parameter_has_a_description_and_a_default(name: str) -> None:
    schema = parameter_schema(FLOWS[name].fn).model_dump()
    for field, spec in schema["properties"].items():
        assert spec.get("description"), f"{name}.{field} has no description"
        assert "default" in spec, f"{name}.{field} has no default"
    overrides = schema["definitions"]["RunOverrides"]["properties"]
    assert {"exclusiveMinimum": 0, "type": "integer"} in overrides["epochs"]["anyOf"]
    assert overrides["classes"]["description"]


@pytest.mark.parametrize(
    "bad", [{"epochs": -1}, {"conf": 1.5}, {"classes": {"../x": 3}}, {"classes": {"circle": 0}}, {"typo": 1}]
)
def test_invalid_overrides_are_refused_before_the_flow_runs(bad: dict) -> None:
    with pytest.raises(ParameterTypeError):
        FLOWS["pipeline"].validate_parameters({"overrides": bad})


def test_overrides_replace_the_params_they_name() -> None:
    overrides = RunOverrides(classes={"star": 5}, conditions={"night": 2.0}, epochs=3, conf=0.5, run_name="night",
                             guard_margin=0.02)  # fmt: skip
    params = load_params(ROOT / "params.yaml", overrides.dotted())
    assert params.finetune.guard_margin == 0.02
    assert [(c.name, c.count) for c in params.prompts.classes] == [("star", 5)]
    assert params.prompts.axes["condition"] == {"night": 2.0}
    assert params.prompts.axes["colour"]  # untouched axes stay
    assert (params.finetune.epochs, params.validate_.conf, params.run_name) == (3, 0.5, "night")
    assert load_params(ROOT / "params.yaml", RunOverrides().dotted()) == load_params(ROOT / "params.yaml")


def test_an_override_that_breaks_the_params_names_the_field() -> None:
    with pytest.raises(ConfigError, match="prompts: template .* but no such axis exists"):
        # an axis a template needs cannot be dropped by replacing it with nothing
        load_params(ROOT / "params.yaml", {"prompts.axes": {}})
