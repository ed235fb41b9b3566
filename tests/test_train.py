"""Tests of the training run (lamda_edge/train.py): a tiny Llama folder, a few steps, real SIGKILL and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_run):
    return tiny_run.model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, tiny_run):
    return tiny_run.data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))


STALL = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from lamda_edge.cli import main
    import lamda_edge.train.recipe as t

    class Stall(TrainerCallback):  # after optimizer step N: say so, then wait to be killed
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[1]):
                open(sys.argv[2], "w").write("stalled")
                time.sleep(600)

    real = t.train
    t.train = lambda config, resume=False, callbacks=None, progress=True: real(config, resume, [Stall()], progress)
    sys.exit(main(sys.argv[3:]))
""")


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lamda_edge.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "lamda_adapter.safetensors"))


def train_args(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    """A run whose checkpoints (every 2 steps) fall before t_i=6 (B partly frozen) and after it (B wholly frozen)."""
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(out), "--quantize", "none",
            "--rank", "4", "--batch-size", "4", "--seq-len", "64", "--max-steps", "10", "--quiet",
            "freeze_b_steps=6", "save_steps=2", "save_total_limit=10", "eval_steps=5", "dropout=0.1", "lr=5e-3",
            "precision=fp32"]


def test_sigkill_and_resume_is_bitwise_exact(tiny_run, tmp_path, model_dir, data_file):
    import shutil

    from lamda_edge.train.config import load_run_config

    env = tiny_run.env(LAMDA_EDGE_CACHE=str(tmp_path / "cache"))
    whole = run_cli(train_args(model_dir, data_file, tmp_path / "whole"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    marker = tmp_path / "stalled"
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc = subprocess.Popen([sys.executable, str(script), "7", str(marker),
                             *train_args(model_dir, data_file, killed)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no stall"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (killed / "lamda_adapter.safetensors").exists()
    # the optimizer has a learning rate per group (rank 4: S at 32x lr, B at 0.25x lr, both times the run's
    # rate_scale for its supervised tokens per step); B leaves it at t_i=6
    scale = load_run_config(killed / "run_config.yaml").lamda["rate_scale"]
    assert 0 < scale < 1  # batch 4 of short examples: under 128 supervised tokens per step
    for step, b_params in ((4, 14), (6, 0)):
        saved = torch.load(killed / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        groups = {g["name"]: g for g in saved["param_groups"]}
        assert {name: g["initial_lr"] for name, g in groups.items()} == pytest.approx(
            {"lamda_S/r4": 32 * scale * 5e-3, "lamda_B": 0.25 * scale * 5e-3, "other": 5e-3, "other_no_decay": 5e-3})
        assert len(groups["lamda_B"]["params"]) == b_params and len(groups["lamda_S/r4"]["params"]) == 14
    # a second copy resumes from step 4, where B is only partly frozen (still in the optimizer)
    partial = tmp_path / "partial"
    shutil.copytree(killed, partial)
    shutil.rmtree(partial / "checkpoints" / "checkpoint-6")
    (partial / "checkpoints" / ".staging-8").mkdir()  # a half-written checkpoint of a killed run is ignored

    expected = adapter_tensors(tmp_path / "whole")
    for folder, resumed_from in ((killed, 6), (partial, 4)):
        done = run_cli(["train", "--output", str(folder), "--resume", "--quiet"], env)
        assert done.returncode == 0, done.stderr[-3000:]
        got = adapter_tensors(folder)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{key} differs after resuming from step {resumed_from}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["global_step"] == 10
        assert not list((folder / "checkpoints").glob(".staging-*"))
    frozen = [v for k, v in expected.items() if k.endswith("lamda_B_frozen")]
    assert frozen and all(int(v) == 4 for v in frozen)
    # the run moved the adapter: S differs from its spectral init
    s_init = adapter_tensors(killed / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(s_init[k], expected[k]) for k in expected if k.endswith("lamda_S"))


def tiny_config(model_dir: Path, data_file: Path, out: Path, **changes):
    from lamda_edge.train.config import RunConfig

    values = dict(model=str(model_dir), data=str(data_file), output=str(out), quantize="none", rank=4, batch_size=4,
                  seq_len=64, max_steps=6, save_steps=2, eval_steps=3, logging_steps=1, lr=5e-3)
    values.update(changes)
    return RunConfig.from_dict(values)


def test_output_folder_holds_adapter_config_metrics_plot(tmp_path, model_dir, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_edge.adapters import lamda_layers, load_adapter
    from lamda_edge.train import report
    from lamda_edge.train.config import load_run_config
    from lamda_edge.train.recipe import train

    out = tmp_path / "run"
    result = train(tiny_config(model_dir, data_file, out), progress=False)
    info = json.loads((out / "lamda_adapter.json").read_text())
    assert info["base_model"] == str(model_dir.resolve()) and info["quantize"] is None
    assert info["trained_steps"] == 6
    saved = load_run_config(out / "run_config.yaml")
    assert (saved.rank, saved.batch_size, saved.max_steps, saved.lamda["freeze_b_steps"]) == (4, 4, 6, 5)  # t_i 0.8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics, default=str))
    assert metrics["global_step"] == 6
    # the run names the init it used and the rates that went with it (metrics.json and the summary)
    adapter = metrics["adapter"]
    assert (adapter["method"], adapter["init"], adapter["rank"]) == ("LaMDA", saved.lamda["init"], 4)
    assert adapter["s_lr_multiplier"] == saved.lamda_config().s_lr_multiplier()
    # S's and B's rates scaled for this run's supervised tokens per step (batch 4 of short examples: under 128)
    from lamda_edge.adapters.config import default_rate_scale
    from lamda_edge.train.data import load_data

    examples = load_data(str(data_file), AutoTokenizer.from_pretrained(str(model_dir)), 64, seed=saved.seed,
                         eval_fraction=saved.eval_fraction).train
    tokens = examples.mean_loss_tokens() * 4
    assert adapter["rate_scale"] == saved.lamda["rate_scale"] == pytest.approx(default_rate_scale("causal-lm", tokens))
    assert 0 < adapter["rate_scale"] < 1 and adapter["b_lr_multiplier"] == pytest.approx(0.25 * adapter["rate_scale"])
    assert f"adapter: LaMDA rank 4, init {saved.lamda['init']} (S at" in "\n".join(report.summary_lines(metrics))
    params = metrics["trainable_params"]
    layers = 7 * 2  # q, k, v, o, gate, up, down in 2 layers
    assert params["end"] == layers * 4 * 4  # only S (r x r) trains after t_i
    assert params["start"] > params["end"]
    assert [e["step"] for e in metrics["eval"]] == [0, 3, 6]  # 0: before training (the summary starts there)
    assert all(e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"])) for e in metrics["eval"])
    assert metrics["peak_memory_bytes"] > 0 and metrics["tokens_per_second"] > 0
    logged = [e["trainable_params"] for e in metrics["log_history"] if "trainable_params" in e]
    assert logged[0] > logged[-1] == params["end"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter loads onto a fresh base and reproduces the trained model
    fresh = AutoModelForCausalLM.from_pretrained(str(model_dir))
    load_adapter(fresh, out)
    assert all(layer.frozen_b_columns == 4 for _, layer in lamda_layers(fresh))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, model_dir, data_file):
    from transformers import TrainerCallback

    from lamda_edge.adapters import lamda_layers
    from lamda_edge.errors import TrainingError
    from lamda_edge.train.recipe import train

    class Poison(TrainerCallback):  # after step 3 (checkpoint-2 was confirmed by step 3's finite loss), one S
        def __init__(self):  # becomes NaN: step 4's loss is NaN, before step 4 is checkpointed
            self.model = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    lamda_layers(self.model)[0][1].lamda_S.fill_(float("nan"))

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at optimizer step 4.*checkpoint-2"):
        train(tiny_config(model_dir, data_file, out), callbacks=[Poison()], progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    saved = adapter_tensors(out / "checkpoints" / "checkpoint-2")
    assert all(torch.isfinite(t.float()).all() for t in saved.values())
    assert not (out / "lamda_adapter.safetensors").exists()


def test_existing_run_and_missing_checkpoint_are_refused(tmp_path, model_dir, data_file):
    from lamda_edge.errors import ConfigError
    from lamda_edge.train.recipe import train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_config(model_dir, data_file, out), resume=True, progress=False)
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(model_dir, data_file, out), progress=False)


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(["rnak=4"], "Did you mean `rank`", id="unknown-key"),
        pytest.param(["--rank", "0"], "`rank` should be", id="bad-rank"),
        pytest.param(["--model", "{missing}"], "not a transformers model folder", id="missing-model"),
        pytest.param(["--data", "{bad_data}"], "line 2", id="malformed-data-line"),
        pytest.param(["--device", "rtx9999"], "unknown device", id="unknown-device-profile"),
        pytest.param(["--precision", "fp16", "--device", "cpu"], "needs a GPU", id="fp16-on-cpu"),
        pytest.param(["--config", "{missing}"], "does not exist", id="missing-config-file"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, model_dir, data_file, args, expected):
    from lamda_edge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    args = [a.format(missing=tmp_path / "missing", bad_data=bad) for a in args]
    base = ["train", "--quiet", "--output", str(tmp_path / "out"), "--quantize", "none"]
    if "--model" not in args:
        base += ["--model", str(model_dir)]
    if "--data" not in args:
        base += ["--data", str(data_file)]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_cli_usage_error_exits_2(capsys):
    from lamda_edge.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--max-steps", "many"])
    assert info.value.code == 2


@pytest.mark.slow
def test_default_job_moves_the_demo_metric(tmp_path):
    """The README's first command on the real default model (SmolLM2-135M, Q4_1-round-tripped): a few minutes."""
    from lamda_edge.cli import main

    out = tmp_path / "demo"
    assert main(["train", "--output", str(out), "--quiet"]) == 0
    demo = json.loads((out / "metrics.json").read_text())["demo"]
    before, after = demo["metrics_before"], demo["metrics_after"]
    assert after["answer_loss"] < before["answer_loss"]
    assert (after["accuracy"], after["format_rate"]) != (before["accuracy"], before["format_rate"])


@pytest.mark.parametrize(
    "device, precision, expected",
    [
        pytest.param("cpu", "auto", "native", id="cpu-auto-bf16-where-native"),
        pytest.param("cpu", "bf16", "bf16", id="cpu-bf16-allowed"),
        pytest.param("cpu", "fp16", "needs a GPU", id="cpu-fp16-refused"),
        pytest.param("cuda:1", "auto", "CUDA_VISIBLE_DEVICES=1", id="cuda-index-refused"),
        pytest.param("nosuchdevice", "auto", "unknown device", id="unknown-profile"),
    ],
)
def test_device_and_precision(device, precision, expected):
    from lamda_edge.errors import LamdaEdgeError
    from lamda_edge.load.device import resolve_precision
    from lamda_edge.train.config import resolve_run_device

    try:
        result = resolve_precision(precision, resolve_run_device(device))
    except LamdaEdgeError as exc:
        assert expected in str(exc)
    else:
        from lamda_edge.load.device import cpu_has_bf16

        assert result == (("bf16" if cpu_has_bf16() else "fp32") if expected == "native" else expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_without_cuda_is_refused():
    from lamda_edge.errors import ConfigError
    from lamda_edge.train.config import resolve_run_device

    for profile in ("t4", "orin-nano"):  # a Jetson profile (kind `jetson`) trains on CUDA too
        with pytest.raises(ConfigError, match="needs CUDA"):
            resolve_run_device(profile)
    assert resolve_run_device("cpu").type == "cpu"


# ---- the recipe's steps, one at a time ------------------------------------------------------------------------------


def test_recipe_plan_and_setup_data(tmp_path, model_dir, data_file):
    """plan() picks what was not pinned; setup_data() sizes the run and writes the run config as it will run."""
    from lamda_edge.train.config import load_run_config
    from lamda_edge.train.recipe import TrainRecipe

    out = tmp_path / "run"
    recipe = TrainRecipe(tiny_config(model_dir, data_file, out, max_steps=None, batch_size=None, grad_accum=2),
                         progress=False)
    assert recipe.device.type == "cpu" and recipe.quantize is None and recipe.last_checkpoint is None
    recipe.plan()
    assert recipe.rank == 4 and recipe.planned_by.startswith("planner")  # the batch was left to the planner
    assert recipe.batch_size * recipe.config.grad_accum == 4 * 2  # the target: default batch 4 x grad_accum 2
    recipe.setup_data()
    assert len(recipe.train_set) + len(recipe.eval_set) == 48 and recipe.demo_task is None
    steps_per_epoch = math.ceil(len(recipe.train_set) / recipe.batch_size)
    assert recipe.max_steps == math.ceil(steps_per_epoch / recipe.config.grad_accum)
    assert recipe.freeze_b_steps == max(1, round(0.8 * recipe.max_steps))  # a causal LM's t_i
    saved = load_run_config(out / "run_config.yaml")
    assert saved.lamda_config() == recipe.lamda_config.__class__(**{**recipe.lamda_config.to_dict(),
                                                                   "freeze_b_steps": recipe.freeze_b_steps})
    assert (saved.batch_size, saved.max_steps, saved.quantize) == (recipe.batch_size, recipe.max_steps, "none")
    assert not (out / "checkpoints").exists() and not hasattr(recipe, "lm")  # nothing loaded yet


def test_recipe_setup_model_and_trainer(tmp_path, model_dir, data_file):
    """setup_model() adapts the tiny Llama at the planned rank; setup_trainer() wires the Trainer without training."""
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.load.loader import checkpointed_blocks
    from lamda_edge.train.callbacks import LaMDACallback, ProgressCallback
    from lamda_edge.train.config import load_run_config
    from lamda_edge.train.data import PackingCollator
    from lamda_edge.train.recipe import TrainRecipe
    from lamda_edge.train.trainer import LossModel

    recipe = TrainRecipe(tiny_config(model_dir, data_file, tmp_path / "run", lamda={"alpha": 3.0},
                                     gradient_checkpointing=True, checkpoint_layers=1), progress=False)
    recipe.plan()
    recipe.setup_data()
    recipe.setup_model()
    assert [block.gradient_checkpointing for block in checkpointed_blocks(recipe.lm)] == [True, False]  # partial
    layers = lamda_layers(recipe.lm)
    assert len(layers) == 7 * 2 and all(layer.lamda_S.shape == (4, 4) for _, layer in layers)
    assert all(layer.scaling == pytest.approx(3.0 / 4) for _, layer in layers)  # `lamda.alpha` came through
    assert recipe.metadata["base_model"] == str(model_dir.resolve()) and recipe.metadata["quantize"] is None
    assert recipe.demo_before is None
    recipe.setup_trainer()
    trainer = recipe.trainer
    assert isinstance(trainer.model, LossModel) and trainer.model.lm is recipe.lm
    assert (trainer.args.max_steps, trainer.args.per_device_train_batch_size) == (6, 4)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert LaMDACallback in kinds and ProgressCallback in kinds
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").rglob("checkpoint-*"))  # not trained
    # packing: null packs a causal LM of a checked model type, and the run config records it (for --resume)
    assert recipe.config.packing is True and isinstance(trainer.data_collator, PackingCollator)
    assert load_run_config(tmp_path / "run" / "run_config.yaml").packing is True



def test_packing_refuses_a_model_whose_attention_mixes_packed_examples(tmp_path, tiny, tiny_run, data_file):
    """GPT-2 does not read the restarts in position_ids: its packed examples would attend to each other."""
    from lamda_edge.errors import ConfigError
    from lamda_edge.train.recipe import train

    folder = tmp_path / "gpt2"
    tiny.save(folder, "gpt2", tokenizer=tiny.tokenizer([" ".join(tiny_run.WORDS)] * 5, vocab_size=300))
    with pytest.raises(ConfigError, match=r"'gpt2' is not one we have checked.*Fix: remove packing=true"):
        train(tiny_config(folder, data_file, tmp_path / "run", packing=True), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_packed_batches_train_as_the_padded_ones(tmp_path, model_dir, data_file, caplog):
    """`packing: true` through the Trainer: the same losses, eval losses, tokens counted and adapter as padded
    batches (fp32), and no per-step warning about counting tokens (a packed row has no attention mask)."""
    import transformers

    from lamda_edge.train.recipe import train

    runs = {}
    transformers.utils.logging.enable_propagation()
    try:
        for packing in (False, True):
            out = tmp_path / f"packing-{packing}"
            result = train(tiny_config(model_dir, data_file, out, packing=packing, precision="fp32"), progress=False)
            runs[packing] = (result.metrics, adapter_tensors(out))
    finally:
        transformers.utils.logging.disable_propagation()
    assert "count non-padding tokens" not in caplog.text
    (padded, padded_adapter), (packed, packed_adapter) = runs[False], runs[True]
    assert packed["tokens_seen"] == padded["tokens_seen"] > 0
    losses = [[e["loss"] for e in m["log_history"] if "loss" in e] for m in (padded, packed)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    evals = [[e["eval_loss"] for e in m["eval"]] for m in (padded, packed)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    for name, tensor in padded_adapter.items():
        torch.testing.assert_close(packed_adapter[name], tensor, atol=1e-4, rtol=1e-3)
