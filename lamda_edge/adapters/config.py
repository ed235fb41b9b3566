"""Configuration of the LaMDA adapter (`LaMDAConfig`), validated when built.

Every field carries its help text in `metadata["help"]`; the CLI reads it from there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from lamda_edge.errors import ConfigError
from lamda_edge.tasks import CAUSAL_LM

INITS = ("principal", "minor", "random", "random-residual")
DEFAULT_INIT = "principal"
RANK_ALLOCATIONS = ("uniform", "energy")
SVD_METHODS = ("auto", "full", "randomized")
ALL_LINEAR = "all-linear"
DEFAULT_FREEZE_B_FRACTION = 0.3  # the paper's t_i: 30% of the run (LaMDAConfig's default; a classifier run's)
# t_i of a `lamda-edge train` run by its task when the adapter block sets neither `freeze_b_steps` nor
# `freeze_b_fraction`: a causal LM's B freezes over most of the run (docs/method.md, "When B freezes": the default job
# and gsm learn more with later freezing, the spam classifier does not); other tasks keep the paper's.
FREEZE_B_FRACTION_BY_TASK = {CAUSAL_LM: 0.8}
# S's learning-rate multiplier when `s_lr_scale` is None: S_LR_NUMERATOR / r, within [1, S_LR_MAX] (docs/method.md,
# "Learning rates per parameter group": Adam moves each of S's r*r entries by about lr, so the adapter's update
# ||s * B dS A||_F = s * ||dS||_F grows as r; 256 / r gives 16 at rank 16: with B at 0.25x, the best pair on spam
# and the default job under the product's linear schedule, docs/benchmarks.md section 4)
S_LR_NUMERATOR = 256.0
S_LR_MAX = 32.0
DEFAULT_B_LR_SCALE = 0.25
# Those rates hold at 128 supervised (loss-taking) tokens per optimizer step and more (the default job: 271, GSM
# problems at batch 2: 131). With fewer the gradient is noisier, and a `lamda-edge train` run of a causal LM scales
# S's and B's rates by sqrt(tokens / RATE_REFERENCE_TOKENS) (`rate_scale`), as Adam's square-root rule scales a rate
# with the batch (docs/method.md, "Rates for small batches": multiplication at 31 tokens per step 0.822 -> 0.635,
# LoRA 0.622; at 256 the rule also scaled GSM's 131, whose answer loss at 200 steps was then 0.025 worse).
RATE_REFERENCE_TOKENS = 128.0


def default_freeze_b_fraction(task: str | None) -> float:
    """t_i as a share of the run for a run of `task` (a `lamda_edge.tasks` name; None: LaMDAConfig's default)."""
    return FREEZE_B_FRACTION_BY_TASK.get(task, DEFAULT_FREEZE_B_FRACTION)


def default_rate_scale(task: str | None, tokens_per_step: float) -> float:
    """`rate_scale` of a `lamda-edge train` run of `task` with `tokens_per_step` supervised tokens per optimizer step:
    sqrt(tokens_per_step / 128), at most 1, for a causal LM; 1 for other tasks (a classifier's loss is one label per
    example, and the spam classifier trains best at the tuned rates)."""
    if task != CAUSAL_LM or not tokens_per_step > 0:
        return 1.0
    return min(1.0, math.sqrt(tokens_per_step / RATE_REFERENCE_TOKENS))


def _field(default, help: str):
    """A dataclass field whose help text lives in its metadata (the CLI reads it from there)."""
    return field(default=default, metadata={"help": help})


def closest_key(key: str, valid: list[str] | tuple[str, ...]) -> str:
    """Return ' Did you mean `x`?' for the closest valid key, or ''."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def check_known_keys(values: dict[str, Any], cls: type, where: str) -> None:
    """Raise `ConfigError` for keys that are not fields of the dataclass `cls`, suggesting the closest one."""
    valid = [f.name for f in dataclasses.fields(cls)]
    problems = [f"unknown key `{k}` in {where}.{closest_key(k, valid)}" for k in values if k not in valid]
    if problems:
        raise ConfigError("; ".join(problems) + f" Valid keys: {', '.join(valid)}.")


@dataclass(frozen=True)
class LaMDAConfig:
    """How LaMDA adapts a model (see docs/method.md)."""

    rank: int = _field(8, "rank r of the adapter path (S is r x r); the base rank for LaMDA++")
    alpha: float = _field(16.0, "scaling numerator: the adapter output is multiplied by alpha/r")
    dropout: float = _field(0.0, "dropout on the adapter path's input, in [0, 1)")
    target_modules: tuple[str, ...] | str = _field(
        ALL_LINEAR, "names (or name suffixes) of the linear layers to adapt, or 'all-linear' (all but the output head)"
    )
    modules_to_save: tuple[str, ...] = _field((), "modules trained in full and saved with the adapter (e.g. a head)")
    init: str = _field(DEFAULT_INIT, "'principal' (top-r SVD, residual base), 'minor' (bottom-r), 'random' "
                       "(S = 0, base W0) or 'random-residual' (S = 0, residual base plus the top-r part frozen)")
    freeze_b_steps: int | None = _field(None, "optimizer steps t_i after which B is frozen; None = "
                                              "`freeze_b_fraction` x the run")
    freeze_b_fraction: float = _field(
        DEFAULT_FREEZE_B_FRACTION, "t_i as a share of the run's optimizer steps, in (0, 1], when `freeze_b_steps` is "
        f"None (the paper's: {DEFAULT_FREEZE_B_FRACTION:g}; a `lamda-edge train` run given neither uses "
        f"{FREEZE_B_FRACTION_BY_TASK[CAUSAL_LM]:g} for a causal LM)")
    s_lr_scale: float | None = _field(None, "S's learning rate as a multiple of `lr`; None = the rank rule "
                                      f"{S_LR_NUMERATOR:g} / r within [1, {S_LR_MAX:g}] (per layer for LaMDA++); "
                                      "1.0 = the paper's single rate")
    b_lr_scale: float = _field(DEFAULT_B_LR_SCALE, "B's learning rate (until t_i) as a multiple of `lr`; "
                               "1.0 = the paper's single rate")
    rate_scale: float = _field(1.0, "multiplies S's and B's multiples of `lr` (`s_lr_scale` or the rank rule, and "
                               "`b_lr_scale`); a `lamda-edge train` run of a causal LM that sets none of the three "
                               f"uses sqrt(supervised tokens per step / {RATE_REFERENCE_TOKENS:g}), at most 1")
    rank_allocation: str = _field("uniform", "'uniform' (LaMDA) or 'energy' (LaMDA++: per-layer ranks from spectra)")
    min_rank: int | None = _field(None, "LaMDA++ lower bound on a layer's rank; None = rank // 2")
    max_rank: int | None = _field(None, "LaMDA++ upper bound on a layer's rank; None = 2 * rank")
    svd: str = _field("auto", "'full', 'randomized' (seeded, error reported) or 'auto' (randomized for small ranks)")
    seed: int = _field(0, "seed of the random init and of the randomized SVD")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, (list, str)):
            value = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            object.__setattr__(self, "modules_to_save", value)
        problems = []
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            problems.append(f"`rank` should be a positive integer, got {self.rank!r}; try 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            problems.append(f"`alpha` should be a positive number, got {self.alpha!r}; try 2 * rank")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"`dropout` should be in [0, 1), got {self.dropout!r}; try 0.0 or 0.05")
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                problems.append(
                    f"`target_modules` should be a list of module names or '{ALL_LINEAR}', got {self.target_modules!r}"
                )
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append(f"`target_modules` should name at least one module, got {self.target_modules!r}")
        if self.init not in INITS:
            problems.append(f"`init` should be one of {INITS}, got {self.init!r}.{closest_key(str(self.init), INITS)}")
        if self.freeze_b_steps is not None and (not isinstance(self.freeze_b_steps, int) or self.freeze_b_steps < 1):
            problems.append(f"`freeze_b_steps` should be a positive integer or None, got {self.freeze_b_steps!r}")
        if (not isinstance(self.freeze_b_fraction, (int, float)) or isinstance(self.freeze_b_fraction, bool)
                or not 0.0 < self.freeze_b_fraction <= 1.0):
            problems.append(f"`freeze_b_fraction` should be in (0, 1], got {self.freeze_b_fraction!r}; "
                            f"try {DEFAULT_FREEZE_B_FRACTION}")
        for name in ("s_lr_scale", "b_lr_scale", "rate_scale"):
            value = getattr(self, name)
            if value is None and name == "s_lr_scale":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < math.inf:
                problems.append(f"`{name}` should be a positive number{' or None' if name == 's_lr_scale' else ''}, "
                                f"got {value!r}; try 1.0 (the paper's single learning rate)")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            problems.append(
                f"`rank_allocation` should be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}."
                f"{closest_key(str(self.rank_allocation), RANK_ALLOCATIONS)}"
            )
        if self.svd not in SVD_METHODS:
            problems.append(f"`svd` should be one of {SVD_METHODS}, got {self.svd!r}")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"`{name}` should be a positive integer or None, got {value!r}")
        if not problems:
            lo, hi = self.rank_bounds
            if not lo <= self.rank <= hi:
                problems.append(
                    f"`min_rank` <= `rank` <= `max_rank` must hold, got {lo} <= {self.rank} <= {hi}; "
                    "widen the bounds or change `rank`"
                )
        if problems:
            raise ConfigError("invalid LaMDAConfig: " + "; ".join(problems) + ".")

    @property
    def rank_bounds(self) -> tuple[int, int]:
        """(min_rank, max_rank) with the defaults resolved."""
        lo = self.min_rank if self.min_rank is not None else max(1, self.rank // 2)
        hi = self.max_rank if self.max_rank is not None else 2 * self.rank
        return lo, hi

    def resolved_freeze_b_steps(self, total_steps: int) -> int:
        """t_i for a run of `total_steps` optimizer steps (at least 1)."""
        if self.freeze_b_steps is not None:
            return self.freeze_b_steps
        return max(1, round(self.freeze_b_fraction * total_steps))

    def s_lr_multiplier(self, rank: int | None = None) -> float:
        """S's learning rate over the base rate, for a layer of `rank` (default: `rank`): `s_lr_scale`, else the
        rank rule S_LR_NUMERATOR / r within [1, S_LR_MAX]; times `rate_scale`."""
        if self.s_lr_scale is not None:
            return float(self.s_lr_scale) * self.rate_scale
        r = self.rank if rank is None else rank
        return min(S_LR_MAX, max(1.0, S_LR_NUMERATOR / r)) * self.rate_scale

    def b_lr_multiplier(self) -> float:
        """B's learning rate over the base rate: `b_lr_scale` times `rate_scale`."""
        return float(self.b_lr_scale) * self.rate_scale

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("target_modules", "modules_to_save"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LaMDAConfig:
        check_known_keys(values, cls, "the LaMDA config")
        return cls(**values)
