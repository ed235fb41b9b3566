"""Honest budgets in the search: headroom verdicts, the safer choice, the long-context frontier (`--max-seq-len`)
and the refusal of activation offload on unified memory."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lamda_edge.cli import main
from lamda_edge.errors import ConfigError
from lamda_edge.planner import get_device, get_model
from lamda_edge.planner.profiles import GIB, MIB, load_devices
from lamda_edge.planner.search import (
    headroom_margin,
    headroom_verdict,
    max_seq_len,
    peak_bytes,
    plan,
)

FRONTIER_DEVICES = ("rtx4060", "rtx3060", "t4", "rtx4090", "rtx-a6000", "h100-80gb")  # 8/12/16/24/48/80 GB


@pytest.mark.parametrize(
    "device,headroom_mib,verdict",
    [
        pytest.param("rtx3060", 400, "comfortable", id="3060-400MiB"),  # margin: 3% of 11.35 GiB = 348.7 MiB
        pytest.param("rtx3060", 340, "tight", id="3060-340MiB"),
        pytest.param("rtx3060", 0, "tight", id="3060-exact"),
        pytest.param("rtx3060", -1, "does not fit", id="3060-over"),
        pytest.param("rtx4060", 300, "comfortable", id="4060-300MiB"),  # 3% of 7.35 GiB < 256 MiB: the floor
        pytest.param("rtx4060", 250, "tight", id="4060-250MiB"),
        pytest.param("h100-80gb", 2000, "comfortable", id="h100-2000MiB"),  # 3% of 79.11 GiB = 2430 MiB ...
        pytest.param("h100-80gb", 2400, "tight", id="h100-2400MiB"),
    ],
)
def test_headroom_verdicts(device, headroom_mib, verdict):
    dev = get_device(device)
    margin = headroom_margin(dev)
    assert margin == max(int(0.03 * dev.usable_bytes), 256 * MIB)
    if device == "h100-80gb":  # ... so 2000 MiB is tight there, and 2500 comfortable
        verdict = "tight"
        assert headroom_verdict(dev, dev.usable_bytes - 2500 * MIB) == "comfortable"
    assert headroom_verdict(dev, dev.usable_bytes - int(headroom_mib * MIB)) == verdict


def test_the_planner_prefers_a_comfortable_batch_and_names_the_safer_choice():
    """Llama-3.1-8B at 1024 tokens on a 3060 for a target batch of 16: the largest batch that fits would leave
    less than the margin; the planner takes a comfortable one. Pinned at that largest batch, the plan is tight and
    names the next safer choice (half the batch, twice the accumulation), which is comfortable."""
    dev, model = get_device("rtx3060"), get_model("llama-3.1-8b")
    auto = plan(dev, model, seq_len=1024, target_batch=16)
    assert auto.headroom_verdict == "comfortable" and auto.safer_choice is None
    assert auto.to_json()["headroom_verdict"] == "comfortable"
    tight = None
    for b in range(auto.setup.batch_size + 1, 17):
        p = plan(dev, model, seq_len=1024, batch_size=b, rank=auto.setup.rank, target_batch=16,
                 gradient_checkpointing=auto.setup.gradient_checkpointing)
        if p.headroom_verdict == "tight":
            tight = p
            break
    assert tight is not None, "no batch between the chosen one and 16 is tight: the test proves nothing"
    safer = tight.safer_choice
    assert safer and safer["batch_size"] == tight.setup.batch_size // 2
    assert safer["grad_accum"] * safer["batch_size"] >= 16 and safer["headroom_bytes"] > tight.budget_bytes - \
        tight.peak_bytes
    out = tight.to_json()
    assert out["headroom_verdict"] == "tight" and out["safer_choice"]["change"].startswith("--batch-size")


def test_readme_example_is_comfortable(capsys):
    assert main(["plan", "--device", "rtx3060", "--model", "llama-3.1-8b", "--seq-len", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["headroom_verdict"] == "comfortable" and out["safer_choice"] is None


@pytest.mark.parametrize("offload", [pytest.param(False, id="no-offload"), pytest.param(True, id="offload")])
def test_max_seq_len_is_monotone_in_memory_and_agrees_with_a_direct_plan(offload):
    model = get_model("llama-3.1-8b")
    devices = sorted((get_device(n) for n in FRONTIER_DEVICES), key=lambda d: d.usable_bytes)
    lengths = [max_seq_len(d, model, rank=16, activation_offload=offload) for d in devices]
    assert all(a <= b for a, b in zip(lengths, lengths[1:])), lengths
    assert lengths[0] > 0 and lengths[-1] > 20 * lengths[0] // 10
    for dev, longest in zip(devices, lengths):
        at = plan(dev, model, seq_len=longest, batch_size=1, rank=16, target_batch=1, gradient_checkpointing=True,
                  activation_offload=offload)
        assert at.fits and at.setup.seq_len == longest
        with pytest.raises(Exception, match="needs"):  # one token more does not fit
            plan(dev, model, seq_len=longest + 1, batch_size=1, rank=16, target_batch=1,
                 gradient_checkpointing=True, activation_offload=offload)
        assert peak_bytes(dev, at.estimate) <= dev.usable_bytes


def test_offload_lengthens_the_frontier_and_costs_host_memory():
    dev, model = get_device("rtx3060"), get_model("llama-3.1-8b")
    plain = max_seq_len(dev, model)
    offloaded = max_seq_len(dev, model, activation_offload=True)
    assert offloaded > 1.5 * plain
    p = plan(dev, model, seq_len=offloaded, batch_size=1, rank=16, target_batch=1, activation_offload=True)
    assert p.setup.gradient_checkpointing  # offload keeps checkpointing on: the checkpoint inputs are what it moves
    h, n = model.hidden_size, offloaded
    assert p.estimate.host_offload_bytes >= model.num_hidden_layers * n * h * 2  # every block's bf16 input
    assert p.to_json()["host_offload_bytes"] == p.estimate.host_offload_bytes


def test_cli_max_seq_len_table_and_json(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--max-seq-len", "--device", "rtx3060", "--device",
                 "rtx4090", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["device"] for r in out["frontier"]] == ["rtx3060", "rtx4090"]
    assert out["frontier"][0]["max_seq_len"] < out["frontier"][1]["max_seq_len"]
    assert main(["plan", "--model", "llama-3.1-8b", "--max-seq-len"]) == 0
    table = capsys.readouterr().out
    cuda = [d.name for d in load_devices().values() if d.kind == "cuda"]
    assert all(name in table for name in cuda) and "jetson" not in table and "predicted" in table


@pytest.mark.parametrize("device", [pytest.param(d, id=d) for d in ("orin-nano", "jetson-agx-orin-64gb", "cpu")])
def test_activation_offload_is_refused_on_unified_memory(device, capsys):
    dev = get_device(device)
    assert dev.unified_memory
    with pytest.raises(ConfigError, match="unified"):
        plan(dev, get_model("qwen2.5-0.5b"), seq_len=256, activation_offload=True)
    with pytest.raises(ConfigError, match="unified"):
        max_seq_len(dev, get_model("qwen2.5-0.5b"), activation_offload=True)
    code = main(["plan", "--device", device, "--model", "qwen2.5-0.5b", "--activation-offload", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["exit_code"] == 2 and "frees nothing" in out["error"]


def test_train_refuses_activation_offload_on_the_cpu(tmp_path, capsys):
    """`train --activation-offload` on a unified-memory device stops before loading anything (exit 2)."""
    code = main(["train", "--device", "cpu", "--activation-offload", "--output", str(tmp_path / "run"), "--quiet",
                 "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "unified" in err, err


def test_budget_grows_with_total_and_shrinks_with_reserve():
    dev = get_device("rtx3060")
    headless = replace(dev, reserve_bytes=0, usable_bytes=dev.total_bytes)
    model = get_model("llama-3.1-8b")
    assert max_seq_len(headless, model) > max_seq_len(dev, model)
    assert abs((headless.usable_bytes - dev.usable_bytes) / GIB - 0.4) < 1e-6
