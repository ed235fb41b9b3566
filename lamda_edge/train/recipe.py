"""The training run as a recipe of named steps (`TrainRecipe`), as torchtune's and litgpt's LoRA recipes are:
transformers' Trainer with the LaMDA callback, the chunked loss and exact resume.

    RunConfig ─> TrainRecipe(config)  output folder, device, precision, base quantization
              ─> .plan()              model folder (default: SmolLM2-135M), tokenizer, planner (rank, batch)
              ─> .setup_data()        local file, or the built-in demo task; step count, t_i; run_config.yaml
              ─> .setup_model()       load_lamda_model (NF4 residual base on CUDA, full precision on CPU, + adapters)
              ─> .setup_trainer()     LaMDATrainer + LaMDACallback + ProgressCallback
              ─> .run()               trainer.train()
              ─> .finish()            adapter (save_adapter) · metrics.json · loss_curve.png · summary

`train(config)` runs the steps in that order; each can be called alone after the ones before it (the tests do).

The Trainer trains `LossModel` (or its classifier / seq2seq kind, by `task`), a thin module whose forward returns
the chunked causal-LM loss
(`lamda_edge.train.loss`), so full fp32 logits never exist and DDP (`accelerate launch`) syncs gradients
through an ordinary forward. Checkpoints hold only the adapter (safetensors), the optimizer, the
LR scheduler, the RNG states and the Trainer state; each is written into a staging folder that is
renamed into place, so a killed run never leaves a half-written checkpoint. On resume, the adapter
is loaded before the optimizer is built: a wholly frozen B comes back with requires_grad=False (its
`lamda_B_frozen` buffer), the optimizer's groups match the saved state, and `LaMDACallback`
re-snapshots the frozen columns, so a resumed run ends bitwise equal to an uninterrupted one on CPU.

The output folder is never emptied before the new run can train (`run_folder.py`): an old run is moved aside when
training starts and comes back if the new run fails before its first good checkpoint; `--resume` skips a damaged
checkpoint. Ctrl-C checkpoints the step in progress and prints the command that resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_callback import ProgressCallback as HFProgress

from lamda_edge.adapters import save_adapter
from lamda_edge.demo import default_model
from lamda_edge.demo import task as demo
from lamda_edge.demo.default_model import default_model_path
from lamda_edge.errors import ConfigError, ModelError, ProfileError
from lamda_edge.files import check_output_folder, read_json
from lamda_edge.load.checkpoint import MODEL_FIX
from lamda_edge.load.device import resolve_compute_dtype, resolve_precision, resolve_quantize
from lamda_edge.load.loader import load_lamda_model
from lamda_edge.planner import get_device, get_model
from lamda_edge.planner.search import check_offload
from lamda_edge.planner.search import plan as plan_run
from lamda_edge.progress import quiet_bars_off_terminal
from lamda_edge.tasks import CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFICATION
from lamda_edge.train import report
from lamda_edge.train.callbacks import InterruptCallback, LaMDACallback, ProgressCallback
from lamda_edge.train.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEMO_STEPS,
    DEFAULT_RANK,
    RunConfig,
    resolve_run_device,
)
from lamda_edge.train.data import PackingCollator, PaddingCollator, load_data
from lamda_edge.train.labels import LabelCollator, load_labels
from lamda_edge.train.packed_attention import PACKING_MODEL_TYPES, packed_attention
from lamda_edge.train.pairs import PairCollator, load_pairs
from lamda_edge.train.report import effective_trainable, lamda_layer_list
from lamda_edge.train.run_folder import (
    CHECKPOINTS,
    DEMO_BEFORE,
    check_output_outside_model,
    checkpoint_read_error,
    prepare_output,
)
from lamda_edge.train.trainer import LaMDATrainer, loss_model


@dataclass
class TrainResult:
    """What `train` returns: the output folder and the metrics written to metrics.json."""

    output: Path
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- the steps' helpers ------------------------------------------------------------------------------------------


def load_model(model_path: Path, config: RunConfig, lamda_config, device: torch.device, precision: str,
               task: str | None = None, num_labels: int | None = None):
    """The model with a frozen (NF4 or full-precision) base and LaMDA adapters, from `lamda_edge.load.loader`."""
    return load_lamda_model(model_path, lamda_config, quantize=resolve_quantize(config.quantize, device),
                            device=device, compute_dtype=resolve_compute_dtype(precision, device), progress=False,
                            gradient_checkpointing=bool(config.gradient_checkpointing),
                            checkpoint_layers=config.checkpoint_layers, task=task, num_labels=num_labels)


def run_task(model_path: Path, task: str, demo_task: bool) -> tuple[str, object]:
    """(the run's task, the model's transformers config): `task`, or for 'auto' the one the config tells
    (`lamda_edge.load.loader.resolve_task`); the built-in demo task trains a causal LM only."""
    from transformers import AutoConfig

    from lamda_edge.load.loader import resolve_task

    try:
        hf_config = AutoConfig.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {model_path}: {exc}. Fix: {MODEL_FIX}") from exc
    resolved = resolve_task(hf_config, task)
    if demo_task and resolved != CAUSAL_LM:
        raise ConfigError(f"`task`={resolved!r} needs your own data: the built-in demo task trains a causal LM. "
                          "Fix: pass --data FILE.jsonl (" + ("text, label" if resolved == SEQUENCE_CLASSIFICATION
                                                             else "source, target") + ")")
    return resolved, hf_config


def head_modules(hf_config, num_labels: int) -> tuple[str, ...]:
    """The new head of a sequence classifier (its top-level `classifier`, `score`, `pooler`), which a
    classification run trains in full (`modules_to_save`) unless the run names its own."""
    from lamda_edge.adapters.inject import HEAD_NAMES
    from lamda_edge.load.loader import build_skeleton

    hf_config.num_labels = num_labels
    skeleton = build_skeleton(hf_config, SEQUENCE_CLASSIFICATION, torch.float32)
    return tuple(name for name, _ in skeleton.named_children() if name in HEAD_NAMES)


def _adapter_metadata(lm, model_path: Path, quantize: str | None) -> dict:
    """What the saved adapter records about its base: the loader's facts, the model folder and a portable name
    (the default model's catalogue name, else the folder's name), the quantization. `save_adapter` adds the
    base's content identity (`base_id`)."""
    model_path = Path(model_path).resolve()
    default = (default_model.cache_root() / default_model.MODEL_NAME).resolve()
    name = default_model.MODEL_NAME if model_path == default else model_path.name  # how `--model` finds it again
    return {**(lm.lamda_state.base or {}), "base_model": str(model_path), "base_name": name, "quantize": quantize}


def _plan(config: RunConfig, model_path: Path, quantize: str | None,
          precision: str | None = None) -> tuple[int, int, int, bool, int | None, str]:
    """(rank, batch_size, grad_accum, gradient_checkpointing, checkpoint_layers, source): pinned values, else the
    planner's choice.

    The planner (`lamda_edge.planner.search.plan`) gets the device profile (`device` when it names one, else the
    auto-detected device), the model's shape, `seq_len`, the pinned values and a target effective batch of
    `batch_size * grad_accum` (default batch 4); it picks the rank, the largest batch that fits, the gradient
    accumulation that reaches the target, and turns checkpointing off when the batch fits without it (else on for
    the fewest blocks that make it fit). A model it
    cannot read falls back to the defaults (checkpointing on); a configuration that cannot fit raises
    `DoesNotFitError` (exit 3).
    """
    rank, batch, checkpointing = config.rank, config.batch_size, config.gradient_checkpointing
    if rank is not None and batch is not None and checkpointing is not None:
        return rank, batch, config.grad_accum, checkpointing, config.checkpoint_layers, "pinned"
    try:
        shape = get_model(str(model_path))
    except ProfileError as exc:
        print(f"lamda-edge: the planner cannot read {model_path} ({exc}); using the defaults", file=sys.stderr)
        return (rank or DEFAULT_RANK, batch or DEFAULT_BATCH_SIZE, config.grad_accum,
                True if checkpointing is None else checkpointing, config.checkpoint_layers, "defaults")
    profile = get_device(config.planner_device())
    result = plan_run(profile, shape, **config.plan_arguments(quantize, precision))
    setup = result.setup
    accum = config.grad_accum if batch is not None else result.grad_accum
    return (setup.rank, setup.batch_size, accum, setup.gradient_checkpointing, setup.checkpoint_layers,
            f"planner, {profile.name}")


def _checkpointing_note(config: RunConfig) -> str:
    """'off', 'on', or 'on for the lowest k blocks' (partial checkpointing)."""
    if not config.gradient_checkpointing:
        return "off"
    return "on" if config.checkpoint_layers is None else f"on for the lowest {config.checkpoint_layers} blocks"


def _load_tokenizer(model_path: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {model_path}: {exc}. Fix: the model folder must hold "
                         "the tokenizer files") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _training_args(config: RunConfig, ckpt_dir: Path, device: torch.device, precision: str, batch_size: int,
                   max_steps: int, has_eval: bool, eval_on_start: bool = False) -> TrainingArguments:
    every = max(1, max_steps // 4)
    extra = dict(config.training_args)
    if _world_size() > 1:
        extra.setdefault("ddp_find_unused_parameters", True)  # B leaves training mid-run
    args = dict(
        output_dir=str(ckpt_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval else "no",
        # the summary's eval loss starts from before training (the demo task measures its held-out answer loss
        # before training itself, on the same problems: no second pass)
        eval_on_start=has_eval and eval_on_start,
        eval_steps=config.eval_steps or every,
        save_strategy="steps",
        save_steps=config.save_steps or every,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        # tokens/s counts real tokens: a packed row has no padding (and no attention mask to find it by)
        include_num_input_tokens_seen="all" if config.packing else "non_padding",
        prediction_loss_only=True,
        dataloader_num_workers=0,
    )
    try:
        return TrainingArguments(**args, **extra)
    except (TypeError, ValueError) as exc:  # a `training_args` value that TrainingArguments itself refuses
        if not config.training_args:
            raise
        raise ConfigError(f"`training_args` {config.training_args}: transformers.TrainingArguments refuses them "
                          f"({exc}). Fix: correct or remove them") from exc


def _max_steps(config: RunConfig, n_train: int, batch_size: int, demo: bool) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if demo:
        return DEFAULT_DEMO_STEPS
    batches = math.ceil(n_train / (batch_size * _world_size()))
    return max(1, math.ceil(config.epochs * batches / config.grad_accum))


class TrainRecipe:
    """One run in named steps, each callable (and testable) on its own once the steps before it ran:

        TrainRecipe(config)   check the output folder, resolve device and precision
        .plan()               model folder, tokenizer, the planner's rank / batch / accumulation / checkpointing
        .setup_data()         datasets (file or demo task), step count, t_i; writes run_config.yaml (as run)
        .setup_model()        the frozen base with LaMDA adapters; the demo task's before metrics
        .setup_trainer()      LaMDATrainer with the LaMDA and progress callbacks
        .run()                trainer.train() (from the newest checkpoint when resuming)
        .finish()             metrics.json, the adapter, loss_curve.png, the printed summary -> TrainResult

    Data comes before the model because the step count (and so t_i, which the run config records and the header
    line shows before the long load) depends on the dataset's size.
    """

    def __init__(self, config: RunConfig, resume: bool = False, progress: bool = True):
        self.start = time.perf_counter()
        self.config = config
        self.progress = progress
        self.resume = resume
        self.out = config.output_dir()
        check_output_folder(self.out)
        # nothing is deleted here: an old run in `out` is moved aside only when training starts (`run`)
        self.last_checkpoint, self.replaced = prepare_output(self.out, resume, config.overwrite, _is_main())
        self._deferred: list | None = [] if self.replaced else None  # writes held back until the old run moves aside
        self.device = resolve_run_device(config.device)
        if config.activation_offload:  # refused on unified memory (Jetson, CPU) before anything loads
            check_offload(get_device("cpu" if self.device.type == "cpu" else config.planner_device()), True)
        self.precision = resolve_precision(config.precision, self.device)
        self.quantize = resolve_quantize(config.quantize, self.device)

    def plan(self) -> None:
        """The model folder (default: the demo model), its tokenizer, and what the planner picks (`_plan`)."""
        config = self.config
        named = config.model is not None and config.model.lower() in default_model.NAMES
        if config.model is None or (named and not Path(config.model).expanduser().is_dir()):
            self.model_path = default_model_path(progress=self.progress)
        else:
            self.model_path = Path(config.model).expanduser()
            if not (self.model_path / "config.json").is_file():
                raise ModelError(f"`model`={config.model!r} is not a transformers model folder (no config.json). "
                                 "Fix: pass a local folder, or leave `model` unset for the default model")
            read_json(self.model_path / "config.json", ModelError, MODEL_FIX)  # corrupt: name it, before the tokenizer
        check_output_outside_model(self.out, self.model_path)
        self.task, self.hf_config = run_task(self.model_path, config.task, config.data is None)
        model_type = getattr(self.hf_config, "model_type", None)
        if config.packing and self.task != CAUSAL_LM:
            raise ConfigError(f"`packing` joins causal-LM examples into one row; this run's task is {self.task!r}. "
                              "Fix: remove packing=true")
        if config.packing and model_type not in PACKING_MODEL_TYPES:
            raise ConfigError(f"`packing` needs a model whose attention keeps packed examples apart; {model_type!r} "
                              f"is not one we have checked (checked: {', '.join(PACKING_MODEL_TYPES)}). "
                              "Fix: remove packing=true")
        packing = config.packing if config.packing is not None else (
            self.task == CAUSAL_LM and model_type in PACKING_MODEL_TYPES)
        self.tokenizer = _load_tokenizer(self.model_path)
        self.rank, self.batch_size, grad_accum, checkpointing, layers, self.planned_by = _plan(
            config, self.model_path, self.quantize, self.precision)
        self.config = config.replace(grad_accum=grad_accum, gradient_checkpointing=checkpointing,
                                     checkpoint_layers=layers if checkpointing else None, packing=packing)

    def setup_data(self) -> None:
        """The datasets, the number of optimizer steps and t_i; writes the run config as run (for --resume)."""
        config = self.config
        self.demo_task, self.label_map = None, None
        if config.data is None:
            self.demo_task = demo.make_task(self.tokenizer, n_train=config.demo_train, n_eval=config.demo_eval,
                                            seq_len=config.seq_len, seed=config.seed)
            self.train_set, self.eval_set = self.demo_task.train, self.demo_task.eval
        else:
            self.train_set, self.eval_set = self._load_data()
        self.max_steps = _max_steps(config, len(self.train_set), self.batch_size, self.demo_task is not None)
        # supervised tokens per optimizer step: S's and B's default rates shrink below 128 (`default_rate_scale`)
        tokens = (self.train_set.mean_loss_tokens() * self.batch_size * config.grad_accum * _world_size()
                  if self.task == CAUSAL_LM else 0.0)
        self.lamda_config = config.lamda_config(self.rank, self.task, tokens)
        if self.task == SEQUENCE_CLASSIFICATION and "modules_to_save" not in config.lamda:  # train the new head
            heads = head_modules(self.hf_config, self.label_map.num_labels)
            self.lamda_config = dataclasses.replace(self.lamda_config, modules_to_save=heads)
        self.freeze_b_steps = self.lamda_config.resolved_freeze_b_steps(self.max_steps)
        resolved = config.replace(lamda={**self.lamda_config.to_dict(), "freeze_b_steps": self.freeze_b_steps},
                                  task=self.task,
                                  batch_size=self.batch_size, max_steps=self.max_steps, precision=self.precision,
                                  quantize=self.quantize or "none")  # as run, for --resume
        # built before the long model load: TrainingArguments checks the `training_args` pass-through values
        self.training_args = _training_args(config, self.out / CHECKPOINTS, self.device, self.precision,
                                            self.batch_size, self.max_steps, self.eval_set is not None,
                                            eval_on_start=self.last_checkpoint is None and self.demo_task is None)
        self._write(lambda: report.write_run_config(self.out / report.RUN_CONFIG_NAME, resolved.to_dict()))
        if self.progress and _is_main():
            packed = ", packed rows" if config.packing else ""
            print(f"lamda-edge: {self.model_path.name} ({self.quantize or 'full-precision'} base, {self.precision}) "
                  f"on {self.device.type}: rank {self.rank}, batch {self.batch_size} x {config.grad_accum} "
                  f"({self.planned_by}){packed}, {report.adapter_words(report.adapter_settings(self.lamda_config))}, "
                  f"checkpointing {_checkpointing_note(config)}, "
                  f"{self.max_steps} steps, {_freeze_note(self.lamda_config, self.freeze_b_steps)}; output {self.out}"
                  + (f"; resuming from {self.last_checkpoint}" if self.last_checkpoint else ""), file=sys.stderr)

    def _load_data(self):
        """(train, held-out) datasets of the run's task; a classifier's `label_map` from its training labels."""
        config = self.config
        options = dict(eval_path=config.eval_data, eval_fraction=0.0 if config.eval_data else config.eval_fraction,
                       seed=config.seed, on_overflow=config.on_overflow)
        if self.task == SEQUENCE_CLASSIFICATION:
            splits = load_labels(config.data, self.tokenizer, config.seq_len, **options)
            self.label_map = splits.label_map
        elif self.task == SEQ2SEQ:
            splits = load_pairs(config.data, self.tokenizer, config.seq_len, **options,
                                max_source=getattr(self.hf_config, "max_position_embeddings", None))
        else:
            splits = load_data(config.data, self.tokenizer, config.seq_len, **options)
        return splits.train, splits.eval

    def _collator(self):
        pad = self.tokenizer.pad_token_id
        if self.task == SEQUENCE_CLASSIFICATION:
            return LabelCollator(pad)
        if self.task == SEQ2SEQ:
            return PairCollator(pad)
        return PackingCollator() if self.config.packing else PaddingCollator.for_tokenizer(self.tokenizer)

    def setup_model(self) -> None:
        """The frozen (NF4 or full-precision) base with LaMDA adapters; the demo task's metrics before training."""
        config = self.config
        torch.manual_seed(config.seed)
        self.lm = load_model(self.model_path, config, self.lamda_config, self.device, self.precision, self.task,
                             self.label_map.num_labels if self.label_map else None)
        self.metadata = _adapter_metadata(self.lm, self.model_path, self.quantize)
        if self.label_map is not None:  # the class names by id: the merged config's id2label
            self.metadata["labels"] = self.label_map.to_json()
        self.demo_before = (_demo_before(self.demo_task, self.lm, self.tokenizer, self.out, self.resume, self.progress,
                                         config.demo_generate, self._write) if self.demo_task else None)

    def _write(self, write) -> None:
        """Write into the output folder now (main process only), or, while an old run still sits there, once it
        has been moved aside."""
        if not _is_main():
            return
        if self._deferred is not None:
            self._deferred.append(write)
        else:
            write()

    def setup_trainer(self, callbacks: list | None = None) -> None:
        """`LaMDATrainer` over the task's `LossModel(lm)` with B freezing, the progress bar and `callbacks`."""
        config = self.config
        self.progress_callback = ProgressCallback(enabled=self.progress)
        self.interrupt = InterruptCallback()
        report.reset_peak_memory(self.device)
        self.trainer = LaMDATrainer(
            model=loss_model(self.lm, self.task, config.chunk_rows, config.activation_offload),
            args=self.training_args,
            data_collator=self._collator(),
            train_dataset=self.train_set,
            eval_dataset=self.eval_set,
            callbacks=[LaMDACallback(self.lm, freeze_steps=self.freeze_b_steps), self.progress_callback,
                       self.interrupt, *(callbacks or [])],
            adapter_metadata=self.metadata,
            on_good_checkpoint=self.replaced.drop if self.replaced is not None else None,
        )
        self.trainer.remove_callback(HFProgress)
        self.trainer.remove_callback(PrinterCallback)

    def run(self) -> None:
        """Train (from the newest checkpoint when resuming); records the trainable count before and the time.

        An old run in the output folder moves aside now and comes back when this run fails before its first good
        checkpoint (`ReplacedRun`). Ctrl-C finishes the step in progress, saves it as a checkpoint, prints the
        command that resumes it and raises KeyboardInterrupt.
        """
        self.trainable_start = effective_trainable(self.lm)
        if self.replaced is not None:
            self.replaced.move_aside()
        for write in self._deferred or []:
            write()
        self._deferred = None
        try:
            with (self.interrupt.installed() if _world_size() == 1 else contextlib.nullcontext(),
                  packed_attention(self.lm, self.config.packing, longest=self.config.seq_len)):  # SDPA per example
                self.trainer.train(resume_from_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
        except BaseException as exc:
            if self.replaced is not None:
                self.replaced.restore()  # a no-op once a good checkpoint dropped it
            damaged = self.last_checkpoint and checkpoint_read_error(self.last_checkpoint, exc)
            if damaged:
                raise damaged from None
            raise
        if self.replaced is not None:
            self.replaced.drop()
        self.seconds = time.perf_counter() - self.start
        state = self.trainer.state
        if self.interrupt.requested and state.global_step < state.max_steps:
            command = shlex.join(["lamda-edge", "train", "--output", str(self.out), "--resume"])
            print(f"lamda-edge: stopped at step {state.global_step} of {state.max_steps}; checkpoint saved in "
                  f"{self.out / CHECKPOINTS / f'checkpoint-{state.global_step}'}. Continue with:\n  {command}",
                  file=sys.stderr)
            raise KeyboardInterrupt

    def finish(self) -> TrainResult:
        """The metrics; on the main process, the adapter, metrics.json, the loss plot and the printed summary."""
        lm, trainer, state = self.lm, self.trainer, self.trainer.state
        trainable_end = effective_trainable(lm)
        b_total = sum(layer.lamda_B.numel() for _, layer in lamda_layer_list(lm))
        s_total = sum(layer.lamda_S.numel() for _, layer in lamda_layer_list(lm))
        other = trainable_end - s_total if trainable_end >= s_total else 0
        history = state.log_history
        train_log, eval_log = report.split_history(history)
        metrics: dict[str, Any] = {
            "output": str(self.out),
            "task": self.task,
            "model_type": getattr(self.hf_config, "model_type", None),
            "base_model": self.metadata["base_model"],
            "quantize": self.metadata["quantize"],
            "device": self.device.type,
            "precision": self.precision,
            "world_size": _world_size(),
            "global_step": state.global_step,
            "seconds": self.seconds,
            "tokens_seen": int(state.num_input_tokens_seen),
            "tokens_per_second": self.progress_callback.tokens_per_second(state),
            "trainable_params": {"start": s_total + b_total + other, "end": trainable_end,
                                 "at_run_start": self.trainable_start, "freeze_b_steps": self.freeze_b_steps,
                                 "b_frozen_step": self.progress_callback.b_frozen_step},
            "rank": self.rank,
            "adapter": report.adapter_settings(self.lamda_config),
            "batch_size": self.batch_size,
            "planned_by": self.planned_by,
            "log_history": history,
            "eval": eval_log,
            **report.peak_memory(self.device),
        }
        if train_log:
            metrics["train_loss_first"], metrics["train_loss_last"] = train_log[0]["loss"], train_log[-1]["loss"]
        if self.demo_task is not None:
            after = _demo_metrics(self.demo_task, lm, self.tokenizer, self.progress, "after",
                                  self.config.demo_generate)
            metrics["demo"] = {"problems": after["n_problems"], "before": self.demo_before["accuracy"],
                               "after": after["accuracy"], "metrics_before": self.demo_before, "metrics_after": after}
        if trainer.args.should_save:
            save_adapter(lm, self.out, metadata={**self.metadata, "trained_steps": state.global_step})
            report.write_json(self.out / report.METRICS_NAME, metrics)
            report.plot_loss(self.out / report.PLOT_NAME, history, self.freeze_b_steps,
                             title=f"{self.model_path.name} + LaMDA r{self.rank}")
            if self.progress:
                for line in report.summary_lines(metrics):
                    print(line)
                if self.demo_task is not None:
                    print(demo.before_after(self.demo_before, metrics["demo"]["metrics_after"]))
        return TrainResult(self.out, metrics)


def _freeze_note(lamda_config, freeze_b_steps: int) -> str:
    """When B is wholly frozen, as the run's own line will say it: its columns freeze one by one up to t_i."""
    from lamda_edge.adapters.freeze import wholly_frozen_step

    if lamda_config.rank_allocation == "uniform":
        return f"B frozen by step {wholly_frozen_step(lamda_config.rank, freeze_b_steps)} (t_i={freeze_b_steps})"
    return f"B frozen by step t_i={freeze_b_steps} at the latest (LaMDA++ ranks differ per layer)"


def train(config: RunConfig, resume: bool = False, callbacks: list | None = None,
          progress: bool = True) -> TrainResult:
    """Run one fine-tuning job as `config` says and write the output folder (the steps of `TrainRecipe`).

    Args:
        config: the run configuration (see `RunConfig`).
        resume: continue from the newest checkpoint in `<output>/checkpoints` (adapter, optimizer, LR scheduler,
            RNG states, B-freezing state), bitwise as if the run had not stopped (CPU, same config).
        callbacks: extra `transformers.TrainerCallback`s.
        progress: show the progress bar and print the summary.

    Returns:
        `TrainResult(output, metrics)`.

    Raises:
        ConfigError, ModelError, DataError: bad input (the CLI exits 2).
        TrainingError: a non-finite loss; the last good checkpoint is kept.
    """
    quiet_bars_off_terminal()  # a log file gets plain lines, from Python as from the CLI
    recipe = TrainRecipe(config, resume=resume, progress=progress)
    recipe.plan()
    recipe.setup_data()
    recipe.setup_model()
    recipe.setup_trainer(callbacks)
    recipe.run()
    return recipe.finish()


def _demo_metrics(task, lm, tokenizer, progress: bool, when: str, n_generate: int | None) -> dict:
    result = demo.evaluate(lm, tokenizer, task, n_generate=n_generate, progress=progress and _is_main())
    if progress and _is_main():
        print(f"demo task {when} training: {result.line()}", file=sys.stderr)
    return result.to_dict()


def _demo_before(task, lm, tokenizer, out: Path, resume: bool, progress: bool, n_generate: int | None,
                 write) -> dict:
    """The demo metrics of the untrained adapter (measured once; a resumed run reads them back)."""
    import json

    path = out / DEMO_BEFORE
    if resume and path.is_file():
        return json.loads(path.read_text())
    before = _demo_metrics(task, lm, tokenizer, progress, "before", n_generate)
    write(lambda: report.write_json(path, before))
    return before
