"""LaMDA++ rank allocation: budget, bounds, monotonicity, determinism."""

import random

import pytest

from lamda_edge import ConfigError, allocate_ranks


def _scores(n, seed):
    rng = random.Random(seed)
    return {f"layers.{i}.proj": rng.uniform(0.05, 1.0) for i in range(n)}


@pytest.mark.parametrize(
    "n, r0, lo, hi, seed",
    [pytest.param(n, r0, lo, hi, seed, id=f"L{n}-r{r0}-[{lo},{hi}]-s{seed}")
     for n, r0, lo, hi in [(14, 8, 4, 16), (7, 4, 1, 8), (64, 16, 8, 32), (3, 8, 2, 12), (200, 8, 4, 16)]
     for seed in (0, 1)],
)
def test_allocation_properties(n, r0, lo, hi, seed):
    scores = _scores(n, seed)
    ranks = allocate_ranks(scores, r0, lo, hi)
    budget = n * r0 * r0
    used = sum(r * r for r in ranks.values())
    assert set(ranks) == set(scores)
    assert 0.95 * budget <= used <= budget
    assert all(lo <= r <= hi and isinstance(r, int) for r in ranks.values())
    for a in scores:
        for b in scores:
            if scores[a] > scores[b]:
                assert ranks[a] >= ranks[b], (a, b)
    assert allocate_ranks(dict(reversed(list(scores.items()))), r0, lo, hi) == ranks  # deterministic


def test_higher_scores_get_more_rank():
    ranks = allocate_ranks({"a": 0.9, "b": 0.5, "c": 0.1}, 8, 2, 16)
    assert ranks["a"] > ranks["c"]


def test_equal_scores_give_uniform_ranks():
    assert set(allocate_ranks({f"l{i}": 0.5 for i in range(6)}, 8, 4, 16).values()) == {8}


@pytest.mark.parametrize(
    "scores, r0, lo, hi, match",
    [
        pytest.param({}, 8, 4, 16, "at least one", id="empty"),
        pytest.param({"a": 0.5}, 8, 10, 16, "min_rank", id="min-above-base"),
        pytest.param({"a": 1.5}, 8, 4, 16, r"\(0, 1\]", id="score-above-one"),
        pytest.param({"a": 0.0}, 8, 4, 16, r"\(0, 1\]", id="score-zero"),
    ],
)
def test_bad_inputs(scores, r0, lo, hi, match):
    with pytest.raises(ConfigError, match=match):
        allocate_ranks(scores, r0, lo, hi)
