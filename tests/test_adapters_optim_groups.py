"""param_groups (adapters/optim_groups.py): the learning rate per group from the rank rule, the paper's single rate,
t_i from its fraction, and groups that stay the same once B leaves the optimizer (so a saved state loads)."""

import pytest
import torch

from lamda_edge import ConfigError, LaMDAConfig, PMBScheduler, apply_lamda, param_groups
from lamda_edge.adapters import lamda_layers


def _rates(groups) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in groups}


@pytest.mark.parametrize(("rank", "s_scale"), [
    pytest.param(4, 32.0, id="rank4-capped-at-32"),
    pytest.param(8, 32.0, id="rank8"),
    pytest.param(16, 16.0, id="rank16"),
    pytest.param(32, 8.0, id="rank32"),
])
def test_rank_rule_sets_s_and_b_rates(tiny, rank, s_scale):
    model = apply_lamda(tiny.model("bert", hidden=64), LaMDAConfig(rank=rank, modules_to_save=("classifier",)))
    groups = param_groups(model, lr=1e-3)
    assert _rates(groups) == pytest.approx({f"lamda_S/r{rank}": s_scale * 1e-3, "lamda_B": 0.25e-3,
                                            "other": 1e-3, "other_no_decay": 1e-3})
    by_name = {g["name"]: g for g in groups}
    layers = lamda_layers(model)
    assert {id(p) for p in by_name[f"lamda_S/r{rank}"]["params"]} == {id(m.lamda_S) for _, m in layers}
    assert {id(p) for p in by_name["lamda_B"]["params"]} == {id(m.lamda_B) for _, m in layers}
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for g in ("other", "other_no_decay") for p in by_name[g]["params"]} == head
    assert by_name["other_no_decay"]["weight_decay"] == 0.0  # the head's bias
    # every trainable parameter is in exactly one group
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_multiplier_rule_bounds():
    assert LaMDAConfig(rank=512, max_rank=1024).s_lr_multiplier() == 1.0  # never below the base rate
    assert LaMDAConfig(rank=64).s_lr_multiplier() == 4.0
    assert LaMDAConfig(rank=64, s_lr_scale=2.5).s_lr_multiplier() == 2.5  # a pinned scale wins at any rank


def test_rate_scale_multiplies_s_and_b_rates(tiny):
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, rank_allocation="energy", rate_scale=0.5))
    rates = _rates(param_groups(model, lr=1e-3))
    ranks = sorted({layer.rank for _, layer in lamda_layers(model)})
    assert {name: rates[name] for name in rates if name.startswith("lamda_S")} == pytest.approx(
        {f"lamda_S/r{r}": 0.5 * min(32.0, 256.0 / r) * 1e-3 for r in ranks})  # per layer rank, then scaled
    assert (rates["lamda_B"], rates["other"]) == pytest.approx((0.125e-3, 1e-3))  # the rest keeps the base rate
    assert LaMDAConfig(rank=4, s_lr_scale=2.0, b_lr_scale=1.0, rate_scale=0.25).s_lr_multiplier() == 0.5


def test_paper_single_rate_is_reachable(tiny):
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, s_lr_scale=1.0, b_lr_scale=1.0))
    groups = param_groups(model, lr=2e-4, weight_decay=0.1)
    assert all(g["lr"] == 2e-4 for g in groups)
    optimizer = torch.optim.AdamW(groups)
    assert [g["name"] for g in optimizer.param_groups] == ["lamda_S/r4", "lamda_B", "other", "other_no_decay"]


def test_energy_ranks_get_their_own_s_rate(tiny):
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, rank_allocation="energy"))
    ranks = sorted({layer.rank for _, layer in lamda_layers(model)})
    assert len(ranks) > 1
    rates = _rates(param_groups(model, lr=1e-3))
    for r in ranks:
        assert rates[f"lamda_S/r{r}"] == pytest.approx(min(32.0, 256.0 / r) * 1e-3)


def test_groups_keep_their_shape_after_b_leaves_and_state_loads(tiny):
    """B wholly frozen leaves an empty `lamda_B` group: a resumed run's groups match the saved optimizer state."""
    torch.manual_seed(0)
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=4, freeze_b_steps=2))
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    scheduler = PMBScheduler(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(optimizer)
    saved = optimizer.state_dict()
    assert all(not layer.lamda_B.requires_grad for _, layer in lamda_layers(model))
    resumed_groups = param_groups(model, lr=1e-3)
    assert [len(g["params"]) for g in resumed_groups] == [len(g["params"]) for g in optimizer.param_groups]
    assert [g["name"] for g in resumed_groups] == [g["name"] for g in optimizer.param_groups]
    resumed = torch.optim.AdamW(resumed_groups)
    resumed.load_state_dict(saved)  # raises when the groups differ
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize(("fraction", "steps", "t_i"), [
    pytest.param(0.3, 60, 18, id="paper-30pct"),
    pytest.param(0.6, 60, 36, id="60pct"),
    pytest.param(1.0, 10, 10, id="whole-run"),
    pytest.param(0.01, 10, 1, id="at-least-1"),
])
def test_t_i_from_the_fraction(tiny, fraction, steps, t_i):
    config = LaMDAConfig(rank=2, freeze_b_fraction=fraction)
    assert config.resolved_freeze_b_steps(steps) == t_i
    assert LaMDAConfig(rank=2, freeze_b_fraction=fraction, freeze_b_steps=7).resolved_freeze_b_steps(steps) == 7
    model = apply_lamda(tiny.model("llama"), config)
    assert PMBScheduler(model, total_steps=steps).freeze_steps == t_i


@pytest.mark.parametrize("values", [
    pytest.param({"freeze_b_fraction": 0.0}, id="fraction-zero"),
    pytest.param({"freeze_b_fraction": 1.5}, id="fraction-over-one"),
    pytest.param({"s_lr_scale": -1.0}, id="s-scale-negative"),
    pytest.param({"rate_scale": 0.0}, id="rate-scale-zero"),
    pytest.param({"b_lr_scale": None}, id="b-scale-none"),
    pytest.param({"s_lr_scale": float("inf")}, id="s-scale-inf"),
])
def test_bad_values_are_config_errors(values):
    name = next(iter(values))
    with pytest.raises(ConfigError, match=f"`{name}`"):
        LaMDAConfig(**values)


def test_bad_lr_and_plain_model(tiny):
    model = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2))
    with pytest.raises(ConfigError, match="`lr`"):
        param_groups(model, lr=0.0)
    with pytest.raises(ConfigError, match="apply_lamda"):
        param_groups(tiny.model("llama"), lr=1e-3)
