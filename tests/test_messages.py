"""The messages tell one story (issue 18 item 8): `plan` shows what `train` would do with the same inputs, B's freezing
step is the same in the header, the run and the summary, the trainable counts and the eval loss say from when.
"""

from __future__ import annotations

import json

import pytest


def plan_json(capsys, *args) -> dict:
    from lamda_edge.cli import main

    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_without_flags_plans_trains_defaults(capsys):
    """`plan --device cpu --model smollm2-135m` plans the run `train --device cpu` does: its seq_len, batch x
    accumulation, the base `quantize=auto` gives on a CPU, and the precision its profile has."""
    from lamda_edge.load.device import resolve_quantize
    from lamda_edge.planner import get_device
    from lamda_edge.train.config import DEFAULT_BATCH_SIZE, RunConfig

    run = RunConfig(device="cpu")
    result = plan_json(capsys, "--device", "cpu", "--model", "smollm2-135m")
    assert result["seq_len"] == run.seq_len
    assert result["batch_size"] * result["grad_accum"] == DEFAULT_BATCH_SIZE * run.grad_accum
    assert result["quantize"] == resolve_quantize(run.quantize, "cpu") is None  # full precision, as train loads it
    assert result["compute_dtype"] == ("bf16" if get_device("cpu").bf16 else "fp32")
    assert result["chunk_rows"] == run.chunk_rows


@pytest.mark.parametrize("flags, key, value", [
    pytest.param(["--quantize", "nf4"], "quantize", "nf4", id="quantize-nf4"),
    pytest.param(["--no-quantize"], "quantize", None, id="no-quantize"),
    pytest.param(["--precision", "fp32"], "compute_dtype", "fp32", id="precision"),
    pytest.param(["--seq-len", "128"], "seq_len", 128, id="seq-len"),
    pytest.param(["--target-batch", "16"], "effective_batch", 16, id="target-batch"),
    pytest.param(["--chunk-rows", "0"], "chunk_rows", None, id="full-logits"),
    pytest.param(["--rank", "4"], "rank", 4, id="rank"),
])
def test_plan_flags_are_run_config_settings(capsys, flags, key, value):
    assert plan_json(capsys, "--device", "cpu", *flags)[key] == value


def test_plan_on_a_gpu_profile_plans_an_nf4_base(capsys):
    result = plan_json(capsys, "--device", "rtx3060", "--model", "llama-3.1-8b", "--seq-len", "1024")
    assert result["quantize"] == "nf4" and result["compute_dtype"] == "bf16"


def test_plan_help_names_trains_precision_rule(capsys):
    from lamda_edge.cli import main
    from lamda_edge.train.config import field_help

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(field_help("precision").split()) in text and "auto: fp32 on a CPU" not in text


@pytest.mark.parametrize("rank, t_i, step", [(16, 18, 17), (8, 18, 16), (1, 5, 1), (4, 4, 4), (16, 1, 1)])
def test_wholly_frozen_step_is_when_the_scheduler_freezes_the_last_column(rank, t_i, step):
    from lamda_edge.adapters.freeze import wholly_frozen_step

    columns = [min(rank, -(-rank * t // t_i)) for t in range(1, t_i + 1)]  # the scheduler's ceil(r t / t_i)
    assert wholly_frozen_step(rank, t_i) == step == columns.index(rank) + 1


def test_summary_says_from_when():
    from lamda_edge.train.report import summary_lines

    metrics = {"seconds": 10.0, "global_step": 60, "tokens_per_second": 100.0, "peak_memory_bytes": 2**20,
               "peak_memory_kind": "rss", "output": "runs/x",
               "eval": [{"step": 0, "eval_loss": 1.2, "eval_perplexity": 3.3},
                        {"step": 60, "eval_loss": 0.9, "eval_perplexity": 2.5}],
               "trainable_params": {"start": 2_542_080, "end": 53_760, "freeze_b_steps": 18, "b_frozen_step": 17}}
    text = "\n".join(summary_lines(metrics))
    assert "eval loss 1.2000 before training -> 0.9000 at step 60" in text
    assert "2,542,080 at the start, 53,760 from step 17 on (B wholly frozen" in text
    metrics["eval"][0]["step"] = 15
    assert "1.2000 at step 15 -> " in "\n".join(summary_lines(metrics))


@pytest.mark.parametrize("model_type, quantize, want", [
    ("llama", "nf4", "lamda-edge export --adapter runs/x --output runs/x-onnx --int4"),
    ("llama", None, "lamda-edge export --adapter runs/x --output runs/x-onnx --int8"),
    ("bert", "none", "lamda-edge export --adapter runs/x --output runs/x-onnx --int8"),
    ("bart", "nf4", "lamda-edge export --adapter runs/x --output runs/x-onnx"),
])
def test_summary_names_the_export_that_suits_the_run(model_type, quantize, want):
    """The end-of-run summary's `next:` line: int4 after an NF4 base, int8 after a full-precision one, fp32 for an
    encoder-decoder, nothing for a model type that does not export."""
    from lamda_edge.train.report import next_step, summary_lines

    metrics = {"seconds": 1.0, "global_step": 1, "peak_memory_bytes": 1, "peak_memory_kind": "rss", "output": "runs/x",
               "model_type": model_type, "quantize": quantize}
    line = next((x for x in summary_lines(metrics) if x.startswith("next: ")), "")
    assert line.removeprefix("next: ").split("   (")[0] == want
    assert next_step("runs/x", "gpt2", None) is None and next_step("runs/x", None, "nf4") is None
    quoted = "lamda-edge export --adapter 'my runs/x/' --output 'my runs/x-onnx'"
    assert next_step("my runs/x/", "bart", None) == quoted
