"""Tests of the run config (lamda_edge/run_config.py): YAML, flags and key=value merged, validated, typo hints."""

from __future__ import annotations

import pytest

from lamda_edge.errors import ConfigError
from lamda_edge.train.config import RunConfig, load_run_config, parse_overrides


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_flags_then_overrides(tmp_path):
    path = write(tmp_path, "rank: 4\nlr: 5e-4\nmax_steps: 10\nseq_len: 128\n")
    config = load_run_config(path, {"rank": 16, "seq_len": None}, ["max_steps=20", "target_modules=[q_proj, v_proj]"])
    assert config.rank == 16  # the flag beats the file
    assert config.max_steps == 20  # key=value beats the file
    assert config.seq_len == 128  # a flag left unset (None) does not override
    assert config.lr == pytest.approx(5e-4)  # YAML 1.1 reads 5e-4 as a string; it is coerced
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.lamda_config().target_modules == ("q_proj", "v_proj")
    assert config.lamda_config().alpha == 32.0  # default alpha = 2 * rank


@pytest.mark.parametrize(
    "where, text, overrides, expected",
    [
        pytest.param("yaml", "rnak: 8\n", [], "Did you mean `rank`", id="yaml-typo"),
        pytest.param("override", "", ["max_step=5"], "Did you mean `max_steps`", id="override-typo"),
        pytest.param("override", "", ["seqlen=5"], "Did you mean `seq_len`", id="override-typo-seq-len"),
        pytest.param("override", "", ["training_args.max_grad_nrom=1"], "Did you mean `max_grad_norm`",
                     id="training-args-typo"),
        pytest.param("override", "", ["training_args.learning_rate=1"], "use `lr`", id="training-args-owned"),
        pytest.param("override", "", ["lamda.rank=3"], "training_args", id="dotted-not-training-args"),
        pytest.param("override", "", ["rank"], "key=value", id="no-equals-sign"),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path, where, text, overrides, expected):
    path = write(tmp_path, text) if text else None
    with pytest.raises(ConfigError, match=expected.replace("`", "`").replace(".", r"\.")):
        load_run_config(path, {}, overrides)


@pytest.mark.parametrize(
    "values, field",
    [
        pytest.param({"rank": 0}, "rank", id="rank-zero"),
        pytest.param({"lr": -1.0}, "lr", id="negative-lr"),
        pytest.param({"lr": "fast"}, "lr", id="lr-not-a-number"),
        pytest.param({"precision": "fp8"}, "precision", id="bad-precision"),
        pytest.param({"quantize": "nf8"}, "quantize", id="bad-quantize"),
        pytest.param({"eval_fraction": 1.0}, "eval_fraction", id="eval-fraction-one"),
        pytest.param({"seq_len": 2.5}, "seq_len", id="seq-len-float"),
        pytest.param({"batch_size": True}, "batch_size", id="batch-size-bool"),
        pytest.param({"overwrite": "yes"}, "overwrite", id="overwrite-str"),
        pytest.param({"lr_scheduler": "cosin"}, "cosine", id="scheduler-typo"),
        pytest.param({"training_args": [1]}, "training_args", id="training-args-not-mapping"),
    ],
)
def test_invalid_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**values)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        RunConfig(rank=0, lr=-1.0, seq_len=0)
    message = str(info.value)
    assert "`rank`" in message and "`lr`" in message and "`seq_len`" in message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "rank: [1, 2\n"))


def test_overrides_parse_yaml_values():
    assert parse_overrides(["rank=8", "lr=1e-3", "max_steps=null", "data=a b.jsonl", "training_args.max_grad_norm=0.5"]
                           ) == {"rank": 8, "lr": "1e-3", "max_steps": None, "data": "a b.jsonl",
                                 "training_args": {"max_grad_norm": 0.5}}


def test_round_trip_and_output_folder(tmp_path):
    config = RunConfig(rank=4, data="x/train.jsonl", target_modules=["q_proj"], training_args={"max_grad_norm": 0.5})
    again = RunConfig.from_dict(config.to_dict())
    assert again == config
    assert str(config.output_dir()) == "runs/train"
    assert str(RunConfig().output_dir()) == "runs/demo"
    assert str(RunConfig(output=str(tmp_path)).output_dir()) == str(tmp_path)
