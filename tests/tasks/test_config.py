from pathlib import Path

import pytest

from tasks.config import STAGES, ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["params.yaml", "params.smoke.yaml"])
def test_shipped_params_files_load(name: str) -> None:
    params = load_params(ROOT / name)
    assert isinstance(params, Params)
    for stage in STAGES:
        assert params.section(stage) is not None


def test_validate_section_keeps_its_yaml_name() -> None:
    params = load_params(ROOT / "params.smoke.yaml")
    assert params.section("validate") is params.validate_
    assert "validate" in params.model_dump(by_alias=True)


def test_params_are_frozen() -> None:
    params = load_params(ROOT / "params.smoke.yaml")
    with pytest.raises(Exception, match="frozen"):
        params.generate.num_inference_steps = 3


def test_overrides_use_dotted_keys(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.smoke.yaml", {"workspace": str(tmp_path), "generate.guidance_scale": 7.5})
    assert params.workspace == tmp_path and params.generate.guidance_scale == 7.5


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


BASE = """
prompts: {classes: [{name: cat, count: 2}]}
generate: {model: m}
validate: {model: v.pt}
finetune: {model: f.pt}
"""


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("generate: {model: m, num_inference_steps: 0}", "generate.num_inference_steps", "greater than 0"),
        ("generate: {model: m, heigth: 64}", "generate.heigth", "unknown key"),
        ("generate: {model: m, height: 65}", "generate.height", "multiple of 8"),
        ("generate: {model: m, batch_size: 100000}", "generate.batch_size", "less than or equal"),
        ("validate: {model: v.pt, conf: 1.5}", "validate.conf", "less than or equal to 1"),
        ("finetune: {model: f.pt, epochs: -1}", "finetune.epochs", "greater than 0"),
        ("finetune: {model: f.pt, epochs: many}", "finetune.epochs", "valid integer"),
        ("finetune: {model: f.pt, freeze: neck}", "finetune.freeze", "'neck': give head, a number of first layers"),
        ("finetune: {model: f.pt, lrf: 0}", "finetune.lrf", "greater than 0"),
        (
            "train-generator: {unet_channels: [32, 64], unet_plain_levels: 2}",
            "train-generator",
            "unet_plain_levels: 2 of the UNet's 2 levels without the caption leaves none",
        ),
        ("train-generator: {guide_widths: [12, 24]}", "train-generator.guide_widths", "multiple of 8"),
        ("generate: {model: m, class_guidance: -1}", "generate.class_guidance", "greater than or equal to 0"),
        ("dataset: {name: ../escape}", "dataset.name", "should match pattern"),
        ("run_name: a/b", "run_name", "should match pattern"),
        ("prompts: {classes: []}", "prompts.classes", "class list is empty"),
        ("prompts: {classes: [{name: cat}]}", "prompts", "has no count"),
        ("prompts: {classes: [{name: 'a/b', count: 1}]}", "prompts.classes[0].name", "should match pattern"),
        ("prompts: {classes: [{name: cat, count: 1}], templates: ['{size} {phrase}']}", "prompts", "no such axis"),
        ("wrkspace: x", "wrkspace", "unknown key"),
    ],
)
def test_bad_values_fail_at_load_naming_the_dotted_field(tmp_path: Path, extra: str, field: str, message: str) -> None:
    path = write(tmp_path, BASE + extra + "\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = str(info.value)
    assert f"{path}: {field}: " in text and message in text
    assert "\n" not in text or all(line.startswith(str(path)) for line in text.splitlines())


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts:\n  classes: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}: malformed YAML at line \d+"):
        load_params(path)


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "workspace: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_params(path)
