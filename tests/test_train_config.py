"""TrainConfig, the generic config helpers (sftdata/config.py) and the `sftdata train` flags / --config recipes.

No model is loaded here: the CLI tests replace `sftdata.train.train` by a recorder.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from sftdata.cli_train import train_command
from sftdata.config import ConfigError, click_options, config_section, dataclass_from_dict, given_options, \
    read_config_file
from sftdata.train_config import TrainConfig


@dataclasses.dataclass
class Toy:
    name: str = dataclasses.field(default="a", metadata={"help": "a name", "choices": ("a", "b")})
    steps: int = 3
    rate: float | None = None
    flag: bool = False
    modules: list[str] | str = "all"


def test_dataclass_from_dict_names_unknown_keys_and_valid_ones():
    with pytest.raises(ConfigError) as err:
        dataclass_from_dict(Toy, {"steps": 2, "stpes": 4, "colour": "red"}, source="r.yaml")
    assert str(err.value) == ("r.yaml: unknown keys 'stpes', 'colour'; valid keys: name, steps, rate, flag, "
                              "modules")


def test_dataclass_from_dict_types_and_choices():
    toy = dataclass_from_dict(Toy, {"steps": 2.0, "rate": "2e-4", "flag": "yes", "modules": ["q", "v"]})
    assert toy == Toy(name="a", steps=2, rate=2e-4, flag=True, modules=["q", "v"])
    assert dataclass_from_dict(Toy, {"rate": None}).rate is None
    with pytest.raises(ConfigError, match=r"^cfg: steps: 'many' is not valid \(expected an integer\)$"):
        dataclass_from_dict(Toy, {"steps": "many"}, source="cfg")
    with pytest.raises(ConfigError, match=r"steps: None is not valid"):
        dataclass_from_dict(Toy, {"steps": None})
    with pytest.raises(ConfigError, match=r"^config: name: 'c' is not one of a, b$"):
        dataclass_from_dict(Toy, {"name": "c"})
    base = Toy(steps=9)
    assert dataclass_from_dict(Toy, {"flag": True}, base=base) == Toy(steps=9, flag=True)


def test_config_files_yaml_json_and_sections(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("build:\n  template: chatml\ntrain:\n  lora_r: 8\n  learning_rate: 1e-4\n")
    data = read_config_file(recipe)
    assert config_section(data, "train") == {"lora_r": 8, "learning_rate": "1e-4"}  # YAML 1.1: a string
    assert dataclass_from_dict(TrainConfig, config_section(data, "train")).learning_rate == 1e-4
    flat = tmp_path / "train.json"
    flat.write_text(json.dumps({"lora_r": 4}))
    assert config_section(read_config_file(flat), "train") == {"lora_r": 4}  # no section: the whole file
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        config_section(read_config_file(bad), "train", source=str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON"):
        read_config_file(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config_file(listing)


def test_click_options_cover_every_field_and_keep_unset_apart():
    import click

    seen = {}

    @click.command()
    @click_options(Toy)
    def cmd(**kw):
        seen.update(given_options(Toy, kw))

    assert {p.name for p in cmd.params} == {f.name for f in dataclasses.fields(Toy)}
    assert CliRunner().invoke(cmd, []).exit_code == 0 and seen == {}
    result = CliRunner().invoke(cmd, ["--steps", "5", "--flag", "--rate", "none", "--name", "b"])
    assert result.exit_code == 0, result.output
    assert seen == {"steps": 5, "flag": True, "rate": None, "name": "b"}
    assert "[default: 3]" in CliRunner().invoke(cmd, ["--help"]).output


def test_every_train_config_field_is_a_train_flag():
    options = {p.name for p in train_command.params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= options
    # the four fields that used to have no flag, and the new switches
    help_text = CliRunner().invoke(train_command, ["--help"], terminal_width=200).output
    for flag in ("--eval-batch-size", "--max-grad-norm", "--double-quant", "--quant-type", "--report-to",
                 "--early-stopping-patience", "--use-dora", "--use-rslora", "--overwrite", "--config"):
        assert flag in help_text, flag


@pytest.fixture
def recorded(monkeypatch):
    """Replace sftdata.train.train by a recorder; the CLI still validates and resolves everything before it."""
    pytest.importorskip("torch")
    import sftdata.train as train_module

    calls = []

    def fake_train(data_dir, model, output, **kwargs):
        calls.append(dict(data_dir=data_dir, model=model, output=output, **kwargs))
        raise train_module.TrainError("recorded")

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(train_module, "require_train_deps", lambda method="qlora": None)
    return calls


def test_cli_flags_reach_train_config(recorded):
    args = ["data", "--model", "m", "-o", "out", "--max-grad-norm", "0.5", "--report-to", "tensorboard",
            "--early-stopping-patience", "3", "--eval-steps", "10", "--use-dora", "--use-rslora", "--overwrite",
            "--eval-batch-size", "8", "--no-double-quant", "--quant-type", "fp4", "--lr", "3e-4",
            "--save-total-limit", "none", "--scheduler", "linear", "--run-name", "exp1", "-q"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 2 and "recorded" in result.output
    call = recorded[0]
    cfg = call["config"]
    assert (cfg.max_grad_norm, cfg.report_to, cfg.early_stopping_patience, cfg.eval_steps) == (0.5, "tensorboard", 3, 10)
    assert (cfg.use_dora, cfg.use_rslora, cfg.eval_batch_size, cfg.double_quant, cfg.quant_type) == \
        (True, True, 8, False, "fp4")
    assert (cfg.learning_rate, cfg.save_total_limit, cfg.lr_scheduler, cfg.run_name) == (3e-4, None, "linear", "exp1")
    assert call["overwrite"] is True and call["resume"] is None and call["progress"] == "none"
    assert (call["data_dir"], call["model"], call["output"]) == ("data", "m", "out")


def test_cli_recipe_file_train_section_and_flag_precedence(recorded, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("build:\n  template: chatml\n  inputs: [a.jsonl]\n"
                      "train:\n  data: built\n  model: base\n  output: adapter\n  lora_r: 8\n  max_steps: 50\n"
                      "  learning_rate: 1e-4\n")
    result = CliRunner().invoke(train_command, ["--config", str(recipe), "--lora-r", "32"])
    assert result.exit_code == 2 and "recorded" in result.output, result.output
    call = recorded[0]
    assert (call["data_dir"], call["model"], call["output"]) == ("built", "base", "adapter")
    assert (call["config"].lora_r, call["config"].max_steps, call["config"].learning_rate) == (32, 50, 1e-4)


def test_cli_recipe_errors_are_one_line(recorded, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lora_rank: 8\n")
    result = CliRunner().invoke(train_command, ["--config", str(recipe), "d", "--model", "m", "-o", "o"])
    assert result.exit_code == 2
    assert f"{recipe}: unknown train key 'lora_rank'; valid keys: data, model, output, tokenizer, method, lora_r" \
        in result.output.replace("\n", "")
    recipe.write_text("train:\n  lora_r: eight\n")
    result = CliRunner().invoke(train_command, ["--config", str(recipe), "d", "--model", "m", "-o", "o"])
    assert result.exit_code == 2 and "lora_r: 'eight' is not valid (expected an integer)" in result.output
    result = CliRunner().invoke(train_command, ["d", "--model", "m"])
    assert result.exit_code == 2 and "missing --output" in result.output
    result = CliRunner().invoke(train_command, ["d", "--model", "m", "-o", "o", "--report-to", "comet"])
    assert result.exit_code == 2 and "--report-to: unknown comet" in result.output
    assert recorded == []


def test_learning_rate_and_grad_norm_defaults_of_the_literature():
    assert TrainConfig().resolved_learning_rate(8_030_000_000) == 2e-4
    assert TrainConfig().resolved_learning_rate(70_000_000_000) == 1e-4  # QLoRA used 1e-4 for 33B and 65B
    assert TrainConfig(method="full").resolved_learning_rate(8_030_000_000) == 1e-5
    assert TrainConfig(learning_rate=5e-5).resolved_learning_rate(70e9) == 5e-5
    assert TrainConfig().resolved_max_grad_norm() == 0.3 and TrainConfig(method="full").resolved_max_grad_norm() == 1.0
    assert TrainConfig(max_grad_norm=0.0).resolved_max_grad_norm() == 0.0
    with pytest.raises(ValueError, match="LoRA options"):
        TrainConfig(method="full", use_dora=True).validate()
    assert TrainConfig(report_to="tensorboard, wandb").trackers() == ["tensorboard", "wandb"]
    assert TrainConfig().trackers() == []
