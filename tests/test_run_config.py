"""Tests of the run config (lamda_edge/train/config.py): YAML, flags and key=value merged, validated, typo hints;
the `lamda:` block and its flat aliases; the one table of flags."""

from __future__ import annotations

import dataclasses

import pytest

from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.errors import ConfigError
from lamda_edge.train.config import RunConfig, cli_flags, field_help, load_run_config, parse_overrides


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_flags_then_overrides(tmp_path):
    path = write(tmp_path, "rank: 4\nlr: 5e-4\nmax_steps: 10\nseq_len: 128\n")
    config = load_run_config(path, {"rank": 16, "seq_len": None}, ["max_steps=20", "target_modules=[q_proj, v_proj]"])
    assert config.rank == config.lamda["rank"] == 16  # the flag beats the file (both name `lamda.rank`)
    assert config.max_steps == 20  # key=value beats the file
    assert config.seq_len == 128  # a flag left unset (None) does not override
    assert config.lr == pytest.approx(5e-4)  # YAML 1.1 reads 5e-4 as a string; it is coerced
    assert config.lamda["target_modules"] == ["q_proj", "v_proj"]
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
        pytest.param("override", "", ["lora.rank=3"], "training_args", id="dotted-not-training-args-or-lamda"),
        pytest.param("override", "", ["lamda.rnak=3"], "Did you mean `rank`", id="lamda-block-typo"),
        pytest.param("yaml", "lamda:\n  min_rnak: 2\n", [], "Did you mean `min_rank`", id="yaml-lamda-block-typo"),
        pytest.param("yaml", "rank: 4\nlamda:\n  rank: 8\n", [], "both at the top and in `lamda:`",
                     id="flat-and-nested-in-one-file"),
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
        RunConfig.from_dict(values)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"rank": 0, "lr": -1.0, "seq_len": 0})
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
    config = RunConfig.from_dict({"rank": 4, "data": "x/train.jsonl", "target_modules": ["q_proj"],
                                  "training_args": {"max_grad_norm": 0.5}})
    again = RunConfig.from_dict(config.to_dict())
    assert again == config
    assert config.to_dict()["lamda"] == {"rank": 4, "target_modules": ["q_proj"]}
    assert str(config.output_dir()) == "runs/train"
    assert str(RunConfig().output_dir()) == "runs/demo"
    assert str(RunConfig(output=str(tmp_path)).output_dir()) == str(tmp_path)


def test_every_lamda_field_is_reachable(tmp_path):
    path = write(tmp_path, "lamda:\n  rank: 8\n  modules_to_save: [classifier]\n  svd: randomized\n")
    config = load_run_config(path, {}, ["lamda.rank=16", "lamda.min_rank=4", "lamda.svd=full", "max_rank=32"])
    lamda = config.lamda_config()
    assert (lamda.rank, lamda.min_rank, lamda.max_rank, lamda.svd) == (16, 4, 32, "full")
    assert lamda.modules_to_save == ("classifier",)  # a key=value on one adapter key keeps the file's others
    given = load_run_config(None, {}, [f"lamda.{key}={value}" for key, value in LaMDAConfig().to_dict().items()
                                       if value is not None and value != []])
    assert given.lamda_config(rank=99) == LaMDAConfig()  # every field set from key=value comes through as given


@pytest.mark.parametrize(
    "lamda, planner_rank, expected",
    [
        pytest.param({}, None, (8, 16.0), id="nothing-given-default-rank"),
        pytest.param({}, 32, (32, 64.0), id="planner-rank-alpha-2r"),
        pytest.param({"rank": 4}, 32, (4, 8.0), id="pinned-rank-beats-planner"),
        pytest.param({"rank": 4, "alpha": 5}, None, (4, 5.0), id="alpha-given"),
    ],
)
def test_alpha_is_twice_the_rank_unless_given(lamda, planner_rank, expected):
    config = RunConfig(lamda=lamda, seed=7)
    adapter = config.lamda_config(planner_rank)
    assert (adapter.rank, adapter.alpha) == expected
    assert adapter.seed == 7  # the run's seed, unless `lamda.seed` is given
    assert RunConfig(lamda={"seed": 3}, seed=7).lamda_config().seed == 3


@pytest.mark.parametrize(
    "lamda, task, expected",
    [
        pytest.param({}, "causal-lm", (0.8, 48), id="causal-lm-late"),
        pytest.param({}, "sequence-classification", (0.3, 18), id="classifier-paper"),
        pytest.param({}, "seq2seq", (0.3, 18), id="seq2seq-paper"),
        pytest.param({}, None, (0.3, 18), id="no-task-lamdaconfig-default"),
        pytest.param({"freeze_b_fraction": 0.5}, "causal-lm", (0.5, 30), id="fraction-given"),
        pytest.param({"freeze_b_steps": 7}, "causal-lm", (0.3, 7), id="steps-given"),
    ],
)
def test_t_i_follows_the_task_unless_given(lamda, task, expected):
    """A causal LM's B freezes over 80% of the run, a classifier's over the paper's 30% (docs/method.md)."""
    adapter = RunConfig(lamda=lamda).lamda_config(16, task)
    assert (adapter.freeze_b_fraction, adapter.resolved_freeze_b_steps(60)) == expected


@pytest.mark.parametrize(
    "lamda, task, tokens, expected",
    [
        pytest.param({}, "causal-lm", 32.0, (0.5, 8.0, 0.125), id="causal-lm-32-tokens-half"),
        pytest.param({}, "causal-lm", 50.0, (0.625, 10.0, 0.15625), id="causal-lm-50-tokens"),
        pytest.param({}, "causal-lm", 130.6, (1.0, 16.0, 0.25), id="causal-lm-gsm-batch-unscaled"),
        pytest.param({}, "causal-lm", 271.0, (1.0, 16.0, 0.25), id="causal-lm-default-job-unscaled"),
        pytest.param({}, "causal-lm", 0.0, (1.0, 16.0, 0.25), id="tokens-unknown"),
        pytest.param({}, "sequence-classification", 8.0, (1.0, 16.0, 0.25), id="classifier-tuned-rates"),
        pytest.param({"s_lr_scale": 8.0}, "causal-lm", 64.0, (1.0, 8.0, 0.25), id="s-rate-given-as-is"),
        pytest.param({"b_lr_scale": 0.1}, "causal-lm", 64.0, (1.0, 16.0, 0.1), id="b-rate-given-as-is"),
        pytest.param({"rate_scale": 0.8}, "causal-lm", 64.0, (0.8, 12.8, 0.2), id="scale-given"),
    ],
)
def test_rates_scale_with_supervised_tokens_unless_given(lamda, task, tokens, expected):
    """Below 128 loss tokens per optimizer step a causal LM's S and B rates shrink by sqrt(tokens / 128)
    (docs/method.md, "Rates for small batches"); pinned rates are used as given."""
    adapter = RunConfig(lamda=lamda).lamda_config(16, task, tokens)
    assert (adapter.rate_scale, adapter.s_lr_multiplier(), adapter.b_lr_multiplier()) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("rank: 4\nalpha: 8.0\ndropout: 0.1\ntarget_modules: [q_proj, v_proj]\ninit: principal\n"
                     "freeze_b_steps: 2\nrank_allocation: uniform\nseed: 0\nbatch_size: 4\nmax_steps: 6\n",
                     id="saved-before-the-lamda-block"),
        pytest.param("lamda:\n  rank: 4\n  alpha: 8.0\n  dropout: 0.1\n  target_modules: [q_proj, v_proj]\n"
                     "  modules_to_save: []\n  init: principal\n  freeze_b_steps: 2\n  rank_allocation: uniform\n"
                     "  min_rank: null\n  max_rank: null\n  svd: auto\n  seed: 0\nseed: 0\nbatch_size: 4\n"
                     "max_steps: 6\n", id="saved-with-the-lamda-block"),
    ],
)
def test_a_saved_run_config_loads_in_either_form(tmp_path, text):
    config = load_run_config(write(tmp_path, text), {"rank": None}, [])
    lamda = config.lamda_config()
    assert (lamda.rank, lamda.alpha, lamda.dropout, lamda.freeze_b_steps) == (4, 8.0, 0.1, 2)
    assert lamda.target_modules == ("q_proj", "v_proj") and (config.batch_size, config.max_steps) == (4, 6)
    assert RunConfig.from_dict(config.to_dict()) == config


def test_one_table_of_flags():
    flags = {flag: (key, kind) for flag, key, kind, _ in cli_flags()}
    assert flags == {
        "--model": ("model", str), "--task": ("task", str), "--data": ("data", str), "--eval-data": ("eval_data", str),
        "--output": ("output", str), "--device": ("device", str), "--quantize": ("quantize", str),
        "--precision": ("precision", str), "--rank": ("rank", int), "--seq-len": ("seq_len", int),
        "--batch-size": ("batch_size", int), "--grad-accum": ("grad_accum", int), "--max-steps": ("max_steps", int),
        "--lr": ("lr", float), "--seed": ("seed", int), "--activation-offload": ("activation_offload", bool),
    }  # the flags of `lamda-edge train` (a user contract)
    adapter_help = {f.name: f.metadata["help"] for f in dataclasses.fields(LaMDAConfig)}
    assert field_help("rank").startswith(adapter_help["rank"]) and "planner" in field_help("rank")
    assert dict((flag, text) for flag, _, _, text in cli_flags())["--seq-len"] == field_help("seq_len")


def test_cli_flags_set_the_run_config(monkeypatch):
    import lamda_edge.cli as cli
    import lamda_edge.train.recipe as recipe

    seen = {}
    monkeypatch.setattr(recipe, "train", lambda config, resume=False, callbacks=None, progress=True:
                        seen.setdefault("config", config))
    assert cli.main(["train", "--rank", "16", "--seq-len", "64", "--lr", "5e-4", "lamda.init=minor", "alpha=3"]) == 0
    config = seen["config"]
    assert config.lamda == {"rank": 16, "init": "minor", "alpha": 3.0}
    assert (config.seq_len, config.lr) == (64, 5e-4)
