"""`plan`'s comparison with PEFT LoRA / QLoRA (planner/compare.py): the text lines, `--json`'s `compare` object and
the frontier's PEFT column, each checked against the planner's own answer for the same job with method="lora"."""

from __future__ import annotations

import json

import pytest

from lamda_edge.cli import main
from lamda_edge.planner import get_device, get_model
from lamda_edge.planner.compare import compare_with_peft, describe
from lamda_edge.planner.memory import checkpointed_block_count
from lamda_edge.planner.profiles import GIB
from lamda_edge.planner.search import max_seq_len, plan


def test_plan_json_holds_a_qlora_compare_object_and_the_text_shows_it(capsys):
    args = ["plan", "--device", "rtx3060", "--model", "llama-3.1-8b", "--seq-len", "1024"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    c = out["compare"]
    assert c["method"] == "PEFT QLoRA" and c["fits"] and c["rank"] == out["rank"]
    assert c["peak_bytes"] <= out["budget_bytes"] and c["peak_bytes_at_lamda_settings"] > out["peak_bytes"]
    assert c["lamda_vs_peft"]["peak_bytes_saved_at_lamda_settings"] == c["peak_bytes_at_lamda_settings"] - out[
        "peak_bytes"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "the same job with PEFT QLoRA" in text and f"peak {c['peak_bytes'] / GIB:.2f} GiB" in text


def test_fewer_checkpointed_blocks_are_counted_against_qlora_at_the_same_batch():
    """rtx4090, 8B, 2048 tokens: LaMDA's plan checkpoints some blocks; QLoRA at the same batch needs more."""
    device, model = get_device("rtx4090"), get_model("llama-3.1-8b")
    ours = plan(device, model, seq_len=2048, target_batch=4)
    c = compare_with_peft(ours)
    theirs = plan(device, model, seq_len=2048, target_batch=4, rank=ours.setup.rank, batch_size=ours.setup.batch_size,
                  method="lora")
    L = model.num_blocks
    ours_k, theirs_k = checkpointed_block_count(ours.setup, L), checkpointed_block_count(theirs.setup, L)
    assert c["same_batch"] and c["checkpoint_layers"] == theirs_k and theirs_k > ours_k
    assert c["lamda_vs_peft"]["fewer_checkpointed_blocks"] == theirs_k - ours_k
    assert c["tokens_per_second"] == theirs.speed["tokens_per_second"] < ours.speed["tokens_per_second"]
    text = "\n".join(describe(c, ours))
    assert f"LaMDA checkpoints {theirs_k - ours_k} fewer blocks at batch {ours.setup.batch_size}" in text


def test_a_job_qlora_cannot_fit_says_so():
    """A pinned batch that LaMDA fits and QLoRA (fp32 upcast of the 2 GiB embeddings) cannot."""
    ours = plan(get_device("rtx3060"), get_model("llama-3.1-8b"), seq_len=1024, batch_size=4)
    c = compare_with_peft(ours)
    assert ours.fits and not c["fits"] and not c["same_batch"] and "batch 4" in c["does_not_fit"]
    assert "does not fit" in describe(c, ours)[0]


def test_a_float_base_compares_with_peft_lora():
    ours = plan(get_device("cpu"), get_model("smollm2-135m"), seq_len=256, quantize=None)
    c = compare_with_peft(ours)
    assert c["method"] == "PEFT LoRA" and c["trainable_params"] > ours.estimate.trainable_params


@pytest.mark.parametrize("quantize,name", [pytest.param("nf4", "PEFT QLoRA", id="nf4"),
                                           pytest.param("none", "PEFT LoRA", id="float")])
def test_frontier_has_a_peft_column(capsys, quantize, name):
    assert main(["plan", "--model", "llama-3.1-8b", "--max-seq-len", "--device", "rtx4090", "--quantize", quantize,
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["frontier"][0]
    q = None if quantize == "none" else quantize
    assert row["peft_max_seq_len"] == max_seq_len(get_device("rtx4090"), get_model("llama-3.1-8b"), quantize=q,
                                                  method="lora")
    assert 0 < row["peft_max_seq_len"] < row["max_seq_len"]
    assert main(["plan", "--model", "llama-3.1-8b", "--max-seq-len", "--device", "rtx4090", "--quantize",
                 quantize]) == 0
    table = capsys.readouterr().out
    assert name in table and f"{row['peft_max_seq_len']:,}" in table


def test_the_upcast_share_is_what_pricing_qlora_without_it_removes():
    """The text splits LaMDA's saving into PEFT's fp32 upcast and the adapter; a float base has no upcast share."""
    ours = plan(get_device("rtx4090"), get_model("llama-3.1-8b"), seq_len=2048, target_batch=4)
    c = compare_with_peft(ours)
    saved = c["lamda_vs_peft"]["peak_bytes_saved_at_lamda_settings"]
    assert 0 < c["upcast_bytes_at_lamda_settings"] < saved
    assert "of it PEFT's fp32 upcast" in "\n".join(describe(c, ours))
    plain = compare_with_peft(plan(get_device("cpu"), get_model("smollm2-135m"), seq_len=256, quantize=None))
    assert plain["upcast_bytes_at_lamda_settings"] == 0
