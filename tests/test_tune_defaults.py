"""The defaults sweep's bookkeeping (tools/tune_defaults.py): named rate variants, and runs already recorded."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import tune_defaults  # noqa: E402

SETTINGS = dict(rank=16, steps=30, batch=4, seq_len=128, n_test=32, lr=1e-3)


def _job(variant="s16-b0.25", seed=0, **s):
    return dict(task="products", variant=variant, method="lamda", seed=seed, s={**SETTINGS, **s}, stage="grid")


def test_named_rate_variant_outside_the_grid_is_added_once():
    names = [v["name"] for v in tune_defaults.grid_variants(16, quick=False, names=["s32-b0.1", "s16-b1"])]
    assert names.count("s32-b0.1") == 1 and names.count("s16-b1") == 1
    added = next(v for v in tune_defaults.grid_variants(16, False, ["s32-b0.1"]) if v["name"] == "s32-b0.1")
    assert added["options"] == {"s_lr_scale": 32.0, "b_lr_scale": 0.1}
    assert "s32-b0.1" not in [v["name"] for v in tune_defaults.grid_variants(16, False)]


def test_a_recorded_run_is_reused_and_a_different_one_is_not():
    record = dict(stage="grid", task="products", variant="s16-b0.25", seed=0, answer_loss=0.8, **SETTINGS)
    assert tune_defaults._recorded(_job(), [record])["already_recorded"]
    assert tune_defaults._recorded(_job(seed=1), [record]) is None
    assert tune_defaults._recorded(_job(steps=60), [record]) is None
    assert tune_defaults._recorded(_job(), [{**record, "error": "boom"}]) is None


def test_rate_matrix_puts_each_run_in_its_cell_and_prefers_more_seeds():
    def line(stage, variant, s, b, mean, seeds):
        return dict(stage=stage, task="spam", rank=16, steps=60, schedule="constant", variant=variant,
                    metric="accuracy", mean=mean, seeds=seeds, s_lr_mult=s, b_lr_mult=b, method="lamda")
    lines = [line("grid", "s8-b0.1", 8.0, 0.1, 0.905, "0 1 2"), line("grid", "s4-b1", 4.0, 1.0, 0.92, "0"),
             line("compare", "lamda", 8.0, 0.1, 0.80, "0"),  # fewer seeds than the grid's cell: not shown
             line("grid", "default-t0.6", 8.0, 0.1, 0.10, "0 1 2")]  # not a rate variant: left out
    table = tune_defaults.rate_matrix(lines).splitlines()
    assert table[2] == "| S x \\ B x | 0.1 | 1 |"
    assert table[4:6] == ["| 4 |  | 92.0% (1) |", "| 8 | 90.5% (3) |  |"]


def test_schedules_are_summarized_and_compared_apart():
    def record(schedule, seed, value, lr=1e-3):
        r = dict(stage="lora-lr", task="products", variant=f"lora-lr{lr:g}", method="lora", seed=seed, lr=lr,
                 metric="answer_loss", value=value, answer_loss=value, trainable_start=10, trainable_end=10, **{
                     k: v for k, v in SETTINGS.items() if k != "lr"})
        return r if schedule is None else {**r, "schedule": schedule}
    rows = [record(None, 0, 0.6), record("linear", 0, 0.9), record("linear", 1, 0.7),
            record(None, 0, 0.8, lr=3e-3), record("linear", 0, 0.5, lr=3e-3)]
    lines = tune_defaults.summarize(rows)
    by_key = {(x["schedule"], x["lr"]): x for x in lines}
    assert set(by_key) == {("constant", 1e-3), ("linear", 1e-3), ("constant", 3e-3), ("linear", 3e-3)}
    assert by_key["linear", 1e-3]["seeds"] == "0 1" and by_key["constant", 1e-3]["mean"] == 0.6
    assert tune_defaults.best_lora_lr(rows, "products", 16, 30) == 1e-3
    assert tune_defaults.best_lora_lr(rows, "products", 16, 30, "linear") == 3e-3
    headings = [h for h in tune_defaults.markdown(lines).splitlines() if h.startswith("###")]
    assert headings == ["### lora-lr: products, 30 steps (answer_loss, lower is better)",
                        "### lora-lr: products, 30 steps, linear schedule (answer_loss, lower is better)"]
