"""The run spec: one default per key, typed and frozen; config.json round trips; old and foreign
workdirs load or are refused in one line."""

import dataclasses
import json

import pytest

from configs import demo, tiny
from tests.cli_test import assert_clean_error, run
from trainer.errors import UserError
from trainer.settings.spec import RunSpec, SpecError, default_config, load_config_file
from trainer.training import rundir


def test_the_demo_preset_is_the_spec_defaults_and_every_preset_resolves():
    assert RunSpec.from_config(demo.get_config()) == RunSpec()
    spec = RunSpec.from_config(tiny.get_config())
    assert spec.train.num_steps == 2 and spec.model.hidden_size == 32
    assert isinstance(spec.sharding.rules[0][1], tuple)  # lists of a JSON file become tuples


def test_frozen_and_typed():
    spec = RunSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.num_steps = 3  # type: ignore[misc]
    with pytest.raises(Exception):  # noqa: B017 -- FrozenConfigDict's own error type
        spec.data.synthetic.num_rows = 3
    assert isinstance(RunSpec.from_dict({"optimizer": {"learning_rate": 1}}).optimizer.learning_rate, float)
    assert RunSpec.from_dict({"lora": {"targets": "q, v"}}).lora.targets == ("q", "v")


def test_every_problem_of_a_foreign_config_at_once():
    with pytest.raises(SpecError) as e:
        RunSpec.from_dict({"train": {"num_stpes": 3, "batch_size": "8"}, "extra": 1, "model": 5})
    assert str(e.value).splitlines() == [
        "config: unknown key 'extra'",
        "model: must be a section of keys, got 5",
        "train: unknown key 'num_stpes' (known: allow_num_steps_change, batch_size, checkpoint_every, "
        "eval_batch_size, eval_every, grad_accum_steps, keep_checkpoints, log_every, loss_chunk_tokens, "
        "max_bad_steps, num_steps, progress_bar)",
        "train.batch_size must be a int, got '8'"]


def test_config_json_round_trip_and_an_old_workdir_takes_the_new_keys_defaults(tmp_path):
    spec = RunSpec.from_config(tiny.get_config())
    assert RunSpec.from_dict(json.loads(spec.to_json())) == spec
    assert json.loads(spec.to_json()) == json.loads(json.dumps(tiny.get_config().to_dict()))
    old = spec.to_dict()
    del old["train"]["loss_chunk_tokens"], old["checkpoint"], old["lora"], old["eval"]["baselines"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = rundir.load_config(str(tmp_path))
    assert loaded == spec  # tiny keeps these keys at their defaults


def test_a_workdir_from_another_version_is_refused_in_one_line(tmp_path):
    d = default_config().to_dict()
    d["train"]["future_knob"] = 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    r = run("trainer.eval", "--workdir", str(tmp_path))
    assert_clean_error(r, "config.json was written by another version of flax-ift",
                       "train: unknown key 'future_knob'")


def test_a_config_file_given_as_a_value_loads_or_fails_in_one_line(tmp_path):
    """``load_config_file`` (``trainer.eval --data x.py``, ``topology_table --configs``): a preset's
    ``get_config()``; a file whose ``get_config`` fails is one line naming the flag and the file."""
    assert "gsm8k" in RunSpec.from_config(load_config_file("configs/gsm8k.py")).data.sources
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return 1 / 0\n")
    with pytest.raises(UserError) as e:
        load_config_file(str(bad), "--data")
    assert str(e.value) == f"--data {bad}: cannot load get_config(): ZeroDivisionError: division by zero"
