"""The defaults sweep's bookkeeping (tools/tune_defaults.py): named rate variants, and runs already recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def _args(**kw):
    import argparse

    base = dict(quick=False, seeds=[0, 1], inits=["principal", "random"], variants=None, rank=16, steps=30, batch=4,
                seq_len=128, n_test=32, n_train=None, lr=1e-3, schedule="linear", out=None, lora_lr=None,
                methods=["lamda"], quantize=None)
    return argparse.Namespace(**{**base, **kw})


def _lora_lr_record(seed=0, lr=1e-3):
    return dict(stage="lora-lr", task="products", variant=f"lora-lr{lr:g}", method="lora", seed=seed, lr=lr,
                metric="exact_match", value=0.0, answer_loss=0.6, schedule="linear",
                **{k: v for k, v in SETTINGS.items() if k != "lr"})


def test_inits_stage_crosses_inits_with_rates_and_names_them():
    jobs = tune_defaults.init_jobs("products", _args(variants=["default", "s8-b0.1"]), [_lora_lr_record()])
    names = [(j["variant"], j["seed"]) for j in jobs]
    assert names[:5] == [("lora-best", 0), ("init-principal", 0), ("init-random", 0),
                         ("init-principal-s8-b0.1", 0), ("init-random-s8-b0.1", 0)]
    assert len(jobs) == 10 and {j["stage"] for j in jobs} == {"inits"}
    by_name = {j["variant"]: j for j in jobs if j["seed"] == 1}
    assert by_name["init-random-s8-b0.1"]["options"] == {"s_lr_scale": 8.0, "b_lr_scale": 0.1, "init": "random"}
    assert by_name["init-principal"]["same_as"] == [("compare", "lamda")]
    assert by_name["init-principal-s8-b0.1"]["same_as"] == [("grid", "s8-b0.1")]
    assert by_name["init-random"]["same_as"] == []
    with pytest.raises(SystemExit, match="s<S>-b<B>"):
        tune_defaults.init_jobs("products", _args(variants=["fast"]), [_lora_lr_record()])
    with pytest.raises(SystemExit, match="lora-lr"):
        tune_defaults.init_jobs("products", _args(), [])


def test_inits_stage_runs_lamda_plus_plus_nf4_and_a_given_lora_rate():
    """--methods lamda++ adds LaMDA++ with each init (principal reuses LaMDA++'s compare runs, never LaMDA's);
    --quantize nf4 marks the LaMDA variants -nf4 and reuses nothing; --lora-lr needs no lora-lr records."""
    jobs = tune_defaults.init_jobs("products", _args(seeds=[0], methods=["lamda", "lamda++"], lora_lr=3e-3), [])
    by_name = {j["variant"]: j for j in jobs}
    assert list(by_name) == ["lora-best", "init-principal", "init-random", "lamda++-init-principal",
                             "lamda++-init-random"]
    assert by_name["lora-best"]["s"]["lr"] == 3e-3
    assert by_name["lamda++-init-principal"]["method"] == "lamda++"
    assert by_name["lamda++-init-principal"]["same_as"] == [("compare", "lamda++")]
    nf4 = tune_defaults.init_jobs("products", _args(seeds=[0], lora_lr=1e-3, quantize="nf4"), [])
    assert [j["variant"] for j in nf4] == ["lora-best", "init-principal-nf4", "init-random-nf4"]
    assert all(j["same_as"] == [] for j in nf4 if j["method"] == "lamda")


def test_grid_takes_t_i_variants_by_name():
    variants = {v["name"]: v for v in tune_defaults.grid_variants(16, False, ["default-t1", "default-t0.45"])}
    assert variants["default-t1"]["options"] == {"freeze_b_fraction": 1.0}
    assert variants["default-t0.45"]["options"] == {"freeze_b_fraction": 0.45}
    assert "default-t2" not in {v["name"] for v in tune_defaults.grid_variants(16, False, ["default-t2"])}
    energy = tune_defaults.grid_variants(16, False, ["energy-t0.8"])[-1]  # LaMDA++ at a t_i
    assert energy == {"name": "energy-t0.8", "options": {"rank_allocation": "energy", "freeze_b_fraction": 0.8}}
    random_init = tune_defaults.grid_variants(16, False, ["random-t0.8-s8-b0.1"])[-1]  # an init at a t_i and rates
    assert random_init == {"name": "random-t0.8-s8-b0.1", "options": {
        "init": "random", "s_lr_scale": 8.0, "b_lr_scale": 0.1, "freeze_b_fraction": 0.8}}
    scaled = tune_defaults.grid_variants(16, False, ["energy-t0.8-x0.35"])[-1]  # the default rates times 0.35
    assert scaled == {"name": "energy-t0.8-x0.35", "options": {
        "rank_allocation": "energy", "rate_scale": 0.35, "freeze_b_fraction": 0.8}}


def test_inits_stage_reuses_the_principal_and_lora_records_of_other_stages():
    s = {**SETTINGS, "schedule": "linear"}
    lamda = dict(stage="compare", task="products", variant="lamda", seed=1, answer_loss=0.9, **s)
    principal = dict(task="products", variant="init-principal", method="lamda", seed=1, s=s, stage="inits",
                     options={"init": "principal"}, same_as=[("compare", "lamda")])
    reused = tune_defaults._recorded(principal, [lamda])
    assert reused["variant"] == "init-principal" and reused["stage"] == "inits"
    assert reused["reused"] == "compare/lamda" and "already_recorded" not in reused
    assert tune_defaults._recorded({**principal, "seed": 0}, [lamda]) is None  # another seed: run it
    assert tune_defaults._recorded({**principal, "s": {**s, "steps": 300}}, [lamda]) is None  # other steps
    random_job = {**principal, "variant": "init-random", "same_as": []}
    assert tune_defaults._recorded(random_job, [lamda]) is None


def test_warmup_and_clipping_keep_runs_apart_in_the_records_and_the_report():
    s = {**SETTINGS, "schedule": "linear"}
    plain = dict(stage="grid", task="products", variant="default-t0.8", seed=0, **s)
    clipped = {**plain, "max_grad_norm": 1.0}
    assert tune_defaults.schedule_of(clipped) == "linear, gradient norm clipped at 1"
    assert tune_defaults.schedule_of({**plain, "warmup": 3}) == "linear, warmup 3"
    job = dict(stage="grid", task="products", variant="default-t0.8", seed=0, s={**s, "max_grad_norm": 1.0})
    assert tune_defaults._recorded(job, [plain]) is None
    assert tune_defaults._recorded(job, [clipped]) is not None
