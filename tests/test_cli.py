"""Tests of lamda_edge/cli.py as a whole: the import cost of the arithmetic commands, plan --config, plan's
key=value (train's words)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "bitsandbytes")

# `python -m lamda_edge.cli ARGS`, then which heavy modules that loaded (also after argparse's SystemExit for --help).
WRAPPER = textwrap.dedent("""
    import runpy, sys
    sys.argv = ["lamda-edge", *sys.argv[1:]]
    try:
        runpy.run_module("lamda_edge.cli", run_name="__main__")
    finally:
        print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
""").format(heavy=HEAVY)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["devices"], id="devices"),
        pytest.param(["plan", "--device", "cpu", "--model", "smollm2-135m", "--json"], id="plan"),
        pytest.param(["--help"], id="help"),
        pytest.param(["plan", "--help"], id="plan-help"),
        pytest.param(["plan", "--config", "examples/cpu-default.yaml", "--json"], id="plan-config"),
        pytest.param(["plan", "--device", "rtx3060", "--model", "llama-3.1-8b", "--seq-len", "1024"],
                     id="plan-text-with-the-qlora-comparison"),
        pytest.param(["plan", "--device", "rtx4090", "--model", "llama-3.1-8b", "--max-seq-len"],
                     id="plan-frontier-with-the-qlora-column"),
        pytest.param(["plan", "--device", "rtx3060", "--model", "llama-3.1-8b", "activation_offload=true", "--json"],
                     id="plan-key-value"),
    ],
)
def test_arithmetic_commands_import_no_torch(args):
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY=\n" in done.stderr, done.stderr[-2000:]
    if args[0] == "plan" and "--json" in args:
        assert json.loads(done.stdout)["fits"] is True


def test_import_lamda_edge_loads_no_trainer():
    code = ("import sys, lamda_edge; from lamda_edge import __all__; "
            "print(sorted(m for m in ('torch', 'transformers', 'transformers.trainer') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_public_names_load_on_first_use():
    import lamda_edge

    for name in lamda_edge.__all__:
        assert getattr(lamda_edge, name) is not None
    from lamda_edge import LaMDAConfig, apply_lamda  # noqa: F401
    with pytest.raises(AttributeError):
        lamda_edge.no_such_name  # noqa: B018


def test_plan_config_plans_as_train_does(tmp_path, capsys):
    """`plan --config` asks the planner what `train` asks: seq_len, the pinned rank, batch_size x grad_accum."""
    from lamda_edge.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("device: cpu\nseq_len: 128\nbatch_size: 2\ngrad_accum: 3\nlamda:\n  rank: 4\n")
    assert main(["plan", "--config", str(path), "--json", "seq_len=64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["seq_len"], result["rank"], result["batch_size"], result["grad_accum"]) == (64, 4, 2, 3)
    assert result["model"] == "smollm2-135m"  # the run's default model


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(["--config", "{run}", "--seq-len", "64"], "seq_len=", id="run-flag-with-config"),
        pytest.param(["--config", "{run}", "rnak=4"], "Did you mean `rank`", id="override-typo"),
        pytest.param(["rnak=4"], "Did you mean `rank`", id="override-typo-without-config"),
        pytest.param(["max_steps=0"], "`max_steps` should be an integer >= 1", id="train-validation-without-config"),
    ],
)
def test_plan_config_bad_input_exits_2(tmp_path, capsys, args, expected):
    from lamda_edge.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("device: cpu\n")
    assert main(["plan", *[a.format(run=path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


PLAN_8B = ["plan", "--device", "rtx3060", "--model", "llama-3.1-8b", "--json"]


@pytest.mark.parametrize(
    "flags, pairs",
    [
        pytest.param(["--activation-offload"], ["activation_offload=true"], id="activation-offload"),
        pytest.param(["--seq-len", "4096", "--rank", "8"], ["seq_len=4096", "lamda.rank=8"], id="seq-len-rank"),
        pytest.param(["--rank", "4"], ["rank=4"], id="flat-rank"),
        pytest.param(["--batch-size", "1", "--checkpointing", "off"], ["batch_size=1", "gradient_checkpointing=false"],
                     id="batch-checkpointing"),
        pytest.param(["--chunk-rows", "0", "--precision", "fp32"], ["chunk_rows=null", "precision=fp32"],
                     id="full-logits-fp32"),
    ],
)
def test_plan_takes_trains_key_values_as_its_flags(capsys, flags, pairs):
    """`plan` with `train`'s key=value words gives the plan of the equivalent flags, and not the default plan."""
    from lamda_edge.cli import main

    def planned(*extra: str) -> tuple[int, dict]:
        code = main([*PLAN_8B, *extra])
        return code, json.loads(capsys.readouterr().out)

    default, by_flags, by_pairs = planned(), planned(*flags), planned(*pairs)
    assert by_pairs == by_flags
    assert by_pairs != default


def test_plan_key_values_come_after_the_flags(capsys):
    """As in `train`, key=value wins over a flag (the later source), wherever it stands on the line."""
    from lamda_edge.cli import main

    assert main([*PLAN_8B, "--seq-len", "512", "seq_len=2048"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 2048
    assert main(["plan", "seq_len=2048", *PLAN_8B[1:], "--seq-len", "512"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 2048


def test_adapters_names_are_not_shadowed_by_their_modules():
    """Importing every adapters submodule first must not turn a lazy name (e.g. `merge`) into a module."""
    import importlib
    import pkgutil
    import types

    import lamda_edge.adapters as adapters

    for info in pkgutil.iter_modules(adapters.__path__):
        importlib.import_module(f"lamda_edge.adapters.{info.name}")
    for name in adapters.__all__:
        assert not isinstance(getattr(adapters, name), types.ModuleType), name


@pytest.mark.parametrize(
    "args, hint",
    [
        pytest.param(["--overwrite", "true"], "give run config keys as key=value: overwrite=true", id="flag-value"),
        pytest.param(["--eval-steps=5"], "key=value: eval_steps=5", id="flag-equals"),
        pytest.param(["--save-steps"], "key=value: save_steps=VALUE", id="flag-alone"),
    ],
)
def test_train_names_the_key_value_form_of_a_run_config_key_given_as_a_flag(capsys, args, hint):
    from lamda_edge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and hint in err


def test_an_unknown_flag_gets_no_key_value_hint(capsys):
    from lamda_edge.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--bogus"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --bogus")


def test_plan_prices_the_init_it_is_given(capsys):
    """`plan lamda.init=random-residual` counts that init's frozen fp32 low-rank term; the default plan has none."""
    from lamda_edge.cli import main

    assert main([*PLAN_8B, "--rank", "16", "--batch-size", "1"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*PLAN_8B, "--rank", "16", "--batch-size", "1", "lamda.init=random-residual"]) == 0
    hybrid = json.loads(capsys.readouterr().out)
    term = hybrid["breakdown"]["lamda_frozen_term"]
    assert "lamda_frozen_term" not in default["breakdown"]
    assert term == hybrid["breakdown"]["lamda_A"] + hybrid["breakdown"]["lamda_B"] - 8 * 7 * 32  # fp32, as A and B
    assert hybrid["tensor_peak_bytes"] == default["tensor_peak_bytes"] + term
