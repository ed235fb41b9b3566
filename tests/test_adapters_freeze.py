"""PMBScheduler: the schedule, bitwise freezing under AdamW with weight decay, leaving the optimizer, resume."""

import copy
import math

import pytest
import torch

from lamda_edge import ConfigError, LaMDAConfig, PMBScheduler, apply_lamda
from lamda_edge.adapters import lamda_layers, trainable_parameter_count


def _train(model, scheduler, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(optimizer)


@pytest.fixture(scope="module")
def adapted(tiny):
    """`adapted(rank)`: a copy of the tiny Llama with LaMDA of `rank` applied (applied once per rank and module)."""
    built = {}

    def get(rank):
        if rank not in built:
            built[rank] = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=rank))
        return copy.deepcopy(built[rank])

    return get


def _setup(adapted, rank=4, freeze_steps=4):
    model = adapted(rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return model, optimizer, PMBScheduler(model, freeze_steps)


def test_columns_freeze_linearly_in_descending_singular_value_order(adapted):
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=6)
    layer = lamda_layers(model)[0][1]
    seen = []
    for step in range(1, 8):
        _train(model, scheduler, optimizer, 1, seed=step)
        seen.append(layer.frozen_b_columns)
        assert layer.frozen_b_columns == min(4, math.ceil(4 * step / 6))
    assert seen == [1, 2, 2, 3, 4, 4, 4]


def test_frozen_columns_stay_bitwise_equal_under_adamw_weight_decay(adapted):
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=8)
    _train(model, scheduler, optimizer, 2)  # first ceil(4*2/8) = 1 column frozen
    layers = [layer for _, layer in lamda_layers(model)]
    frozen = [layer.lamda_B[:, :1].clone() for layer in layers]
    trainable = [layer.lamda_B[:, 1:].clone() for layer in layers]
    _train(model, scheduler, optimizer, 3, seed=1)
    for layer, before, moving in zip(layers, frozen, trainable):
        assert torch.equal(layer.lamda_B[:, :1], before)
        assert not torch.equal(layer.lamda_B[:, 3:], moving[:, 2:])  # later columns still train


def test_a_never_changes_and_s_keeps_training(adapted):
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=2)
    A = {n: layer.lamda_A.clone() for n, layer in lamda_layers(model)}
    S = {n: layer.lamda_S.clone() for n, layer in lamda_layers(model)}
    _train(model, scheduler, optimizer, 4)
    for name, layer in lamda_layers(model):
        assert torch.equal(layer.lamda_A, A[name])
        assert not torch.equal(layer.lamda_S, S[name])


def test_wholly_frozen_b_leaves_the_optimizer_and_frees_its_state(adapted):
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=2)
    _train(model, scheduler, optimizer, 1)
    B = [layer.lamda_B for _, layer in lamda_layers(model)]
    assert all(b in optimizer.state for b in B)
    _train(model, scheduler, optimizer, 1)
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for b in B:
        assert not b.requires_grad and b.grad is None
        assert id(b) not in in_groups and b not in optimizer.state
    assert trainable_parameter_count(model) == sum(layer.rank**2 for _, layer in lamda_layers(model))
    frozen = [b.clone() for b in B]
    _train(model, scheduler, optimizer, 2, seed=3)
    assert all(torch.equal(b, f) for b, f in zip(B, frozen))


def test_resume_reproduces_the_uninterrupted_run_bitwise(adapted):
    torch.manual_seed(0)
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=4)
    _train(model, scheduler, optimizer, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items() if "lamda_" in k}

    torch.manual_seed(0)
    model, optimizer, scheduler = _setup(adapted, rank=4, freeze_steps=4)
    _train(model, scheduler, optimizer, 3)
    state = ({k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict(), scheduler.state_dict())

    torch.manual_seed(0)
    model2, _, _ = _setup(adapted, rank=4, freeze_steps=4)
    model2.load_state_dict(state[0])
    optimizer2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    optimizer2.load_state_dict(state[1])
    scheduler2 = PMBScheduler(model2, 1)
    scheduler2.load_state_dict(state[2], optimizer2)
    g_steps = 3
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the data the first 3 steps consumed
        torch.randint(0, model2.config.vocab_size, (2, 10), generator=g)
    model2.train()
    for _ in range(g_steps):
        ids = torch.randint(0, model2.config.vocab_size, (2, 10), generator=g)
        model2(input_ids=ids, labels=ids).loss.backward()
        optimizer2.step()
        optimizer2.zero_grad()
        scheduler2.step(optimizer2)
    got = {k: v for k, v in model2.state_dict().items() if "lamda_" in k}
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_freeze_steps(adapted, steps):
    model = adapted(2)
    with pytest.raises(ConfigError, match="freeze_b_steps"):
        PMBScheduler(model, steps)


def test_scheduler_needs_lamda_layers(tiny):
    with pytest.raises(ConfigError, match="apply_lamda"):
        PMBScheduler(tiny.model("llama"), 3)


def test_t_i_comes_from_the_config_when_not_given(tiny):
    """t_i is given once: the config's freeze_b_steps, else its share of total_steps; a contradiction is an error."""
    fixed = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2, freeze_b_steps=5))
    assert PMBScheduler(fixed).freeze_steps == 5
    assert PMBScheduler(fixed, 5).freeze_steps == 5
    with pytest.raises(ConfigError, match="give t_i once"):
        PMBScheduler(fixed, 3)
    share = apply_lamda(tiny.model("llama"), LaMDAConfig(rank=2))
    assert PMBScheduler(share, total_steps=100).freeze_steps == LaMDAConfig().resolved_freeze_b_steps(100)
    with pytest.raises(ConfigError, match="total_steps"):
        PMBScheduler(share)
