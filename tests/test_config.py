import pytest

from lamda_edge import ConfigError, LaMDAConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        pytest.param({"rank": 0}, "rank", id="rank-zero"),
        pytest.param({"rank": 2.5}, "rank", id="rank-float"),
        pytest.param({"alpha": -1}, "alpha", id="alpha-negative"),
        pytest.param({"dropout": 1.0}, "dropout", id="dropout-one"),
        pytest.param({"target_modules": "q_proj"}, "target_modules", id="targets-plain-string"),
        pytest.param({"target_modules": ()}, "target_modules", id="targets-empty"),
        pytest.param({"init": "principle"}, "init", id="init-typo"),
        pytest.param({"freeze_b_steps": 0}, "freeze_b_steps", id="freeze-zero"),
        pytest.param({"rank_allocation": "energie"}, "rank_allocation", id="allocation-typo"),
        pytest.param({"min_rank": 10, "rank": 8}, "min_rank", id="min-above-rank"),
        pytest.param({"svd": "fast"}, "svd", id="svd-unknown"),
    ],
)
def test_bad_values_name_the_field_and_value(kwargs, field):
    with pytest.raises(ConfigError) as info:
        LaMDAConfig(**kwargs)
    message = str(info.value)
    assert f"`{field}`" in message
    assert repr(next(iter(kwargs.values()))) in message or str(next(iter(kwargs.values()))) in message


def test_typo_suggests_the_closest_value():
    with pytest.raises(ConfigError, match="Did you mean `principal`"):
        LaMDAConfig(init="principle")


def test_unknown_key_suggests_the_closest_key():
    with pytest.raises(ConfigError, match="Did you mean `rank`"):
        LaMDAConfig.from_dict({"rnak": 4})


def test_round_trip_and_defaults():
    cfg = LaMDAConfig(rank=4, target_modules=["q_proj", "v_proj"], rank_allocation="energy")
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert LaMDAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rank_bounds == (2, 8)
    assert cfg.resolved_freeze_b_steps(100) == 30
    assert LaMDAConfig(freeze_b_steps=7).resolved_freeze_b_steps(100) == 7
    with pytest.raises(Exception):
        cfg.rank = 3  # frozen
