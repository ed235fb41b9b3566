"""LaMDA++: per-layer ranks from normalized energy scores, under a parameter budget (docs/method.md).

    budget:  sum_l r_l^2 <= L * r0^2,  r_min <= r_l <= r_max,  at least 95% of the budget used
    order:   a layer with a higher score never gets a lower rank than a layer with a lower score

Ranks start proportional to sqrt(score) (so r_l^2, the trainable count, is proportional to the score), scaled by
the largest factor that fits the budget, then the leftover budget is handed out one rank at a time, highest score
first, without breaking the order. Deterministic: ties in score are broken by layer name.
"""

from __future__ import annotations

import math

from lamda_edge.errors import ConfigError

MIN_BUDGET_USE = 0.95


def _ranks_at(factor: float, order: list[str], scores: dict[str, float], lo: int, hi: int) -> dict[str, int]:
    return {name: min(hi, max(lo, math.floor(factor * math.sqrt(scores[name])))) for name in order}


def allocate_ranks(
    energy_scores: dict[str, float], base_rank: int, min_rank: int, max_rank: int
) -> dict[str, int]:
    """Per-layer ranks for LaMDA++.

    Args:
        energy_scores: layer name -> normalized energy score E_l in (0, 1].
        base_rank: r0; the budget is len(energy_scores) * r0^2 trainable S parameters.
        min_rank, max_rank: bounds on every layer's rank.

    Returns:
        layer name -> rank, using at least 95% of the budget and monotone in the score.
    """
    if not energy_scores:
        raise ConfigError("allocate_ranks needs at least one layer's energy score, got none")
    if not 1 <= min_rank <= base_rank <= max_rank:
        raise ConfigError(
            f"ranks must satisfy 1 <= min_rank <= rank <= max_rank, got {min_rank} <= {base_rank} <= {max_rank}"
        )
    bad = {k: v for k, v in energy_scores.items() if not (0.0 < float(v) <= 1.0 + 1e-9) or math.isnan(float(v))}
    if bad:
        raise ConfigError(f"energy scores must be in (0, 1], got {bad}")
    scores = {k: float(v) for k, v in energy_scores.items()}
    order = sorted(scores, key=lambda n: (-scores[n], n))  # highest score first, ties by name
    budget = len(order) * base_rank**2

    def cost(ranks: dict[str, int]) -> int:
        return sum(r * r for r in ranks.values())

    # Largest factor whose floored ranks fit the budget (bisection; cost is monotone in the factor).
    low, high = 0.0, float(max_rank) / math.sqrt(min(scores.values())) + 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if cost(_ranks_at(mid, order, scores, min_rank, max_rank)) <= budget:
            low = mid
        else:
            high = mid
    ranks = _ranks_at(low, order, scores, min_rank, max_rank)

    # Hand out the leftover budget one rank at a time, highest score first. Restarting from the top after each
    # step keeps ranks monotone: a layer is only raised when every higher-scored layer could not be.
    used = cost(ranks)
    start = 0
    while True:
        for i in range(start, len(order)):
            r = ranks[order[i]]
            if r < max_rank and used + 2 * r + 1 <= budget:
                ranks[order[i]] = r + 1
                used += 2 * r + 1
                break
        else:
            break
        # Layers before the first one still below max_rank can never be raised again: skip them next time.
        while start < len(order) and ranks[order[start]] >= max_rank:
            start += 1

    if cost(ranks) < MIN_BUDGET_USE * budget:  # cannot happen with sane bounds; uniform always uses 100%
        ranks = {name: base_rank for name in order}
    return ranks
