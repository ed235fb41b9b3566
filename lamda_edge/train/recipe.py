"""The training run: transformers' Trainer with the LaMDA callback, the chunked loss and exact resume.

    RunConfig ─> planner (rank, batch when not pinned) ─> model folder (default: SmolLM2-135M)
              ─> load_lamda_model (NF4 residual base on CUDA, full-precision base on CPU, + adapters)
              ─> data (local file, or the built-in demo task with its before/after metrics)
              ─> LaMDATrainer.train() ─> output folder:
                 adapter (save_adapter) · run_config.yaml · metrics.json · loss_curve.png · checkpoints/

The Trainer trains `LossModel`, a thin module whose forward returns the chunked causal-LM loss
(`lamda_edge.train.loss`), so full fp32 logits never exist and DDP (`accelerate launch`) syncs gradients
through an ordinary forward. Checkpoints hold only the adapter (safetensors), the optimizer, the
LR scheduler, the RNG states and the Trainer state; each is written into a staging folder that is
renamed into place, so a killed run never leaves a half-written checkpoint. On resume, the adapter
is loaded before the optimizer is built: a wholly frozen B comes back with requires_grad=False (its
`lamda_B_frozen` buffer), the optimizer's groups match the saved state, and `LaMDACallback`
re-snapshots the frozen columns, so a resumed run ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.load.device import DTYPES, resolve_precision, resolve_quantize
from lamda_edge.train import report
from lamda_edge.train.callbacks import LaMDACallback, ProgressCallback
from lamda_edge.train.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEMO_STEPS,
    RunConfig,
    resolve_run_device,
)
from lamda_edge.train.report import effective_trainable, lamda_layer_list
from lamda_edge.train.trainer import LaMDATrainer, LossModel, latest_checkpoint

CHECKPOINTS = "checkpoints"
DEMO_BEFORE = "demo_before.json"


@dataclass
class TrainResult:
    """What `train` returns: the output folder and the metrics written to metrics.json."""

    output: Path
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- run setup ---------------------------------------------------------------------------------------------------




def load_model(model_path: Path, config: RunConfig, lamda_config, device: torch.device, precision: str):
    """The model with a frozen (NF4 or full-precision) base and LaMDA adapters, from `lamda_edge.load.loader`."""
    from lamda_edge.load.loader import load_lamda_model

    return load_lamda_model(model_path, lamda_config, quantize=resolve_quantize(config.quantize, device),
                            device=device, compute_dtype=DTYPES[precision], progress=False,
                            gradient_checkpointing=bool(config.gradient_checkpointing))


def _plan(config: RunConfig, model_path: Path) -> tuple[int, int, int, bool, str]:
    """(rank, batch_size, grad_accum, gradient_checkpointing, source): pinned values, else the planner's choice.

    The planner (`lamda_edge.planner.search.plan`) gets the device profile (`device` when it names one, else the
    auto-detected device), the model's shape, `seq_len`, the pinned values and a target effective batch of
    `batch_size * grad_accum` (default batch 4); it picks the rank, the largest batch that fits, the gradient
    accumulation that reaches the target, and turns checkpointing off when the batch fits without it. A model it
    cannot read falls back to the defaults (checkpointing on); a configuration that cannot fit raises
    `DoesNotFitError` (exit 3).
    """
    from lamda_edge.errors import ProfileError
    from lamda_edge.planner import get_device, get_model
    from lamda_edge.planner.search import plan

    rank, batch, checkpointing = config.rank, config.batch_size, config.gradient_checkpointing
    if rank is not None and batch is not None and checkpointing is not None:
        return rank, batch, config.grad_accum, checkpointing, "pinned"
    try:
        shape = get_model(str(model_path))
    except ProfileError as exc:
        print(f"lamda-edge: the planner cannot read {model_path} ({exc}); using the defaults", file=sys.stderr)
        return (rank or config.resolved_rank, batch or DEFAULT_BATCH_SIZE, config.grad_accum,
                True if checkpointing is None else checkpointing, "defaults")
    profile = get_device(config.device if config.device not in ("cpu", "cuda") else "auto")
    target = (batch or DEFAULT_BATCH_SIZE) * config.grad_accum
    result = plan(profile, shape, seq_len=config.seq_len, rank=rank, batch_size=batch, target_batch=target,
                  quantize=resolve_quantize(config.quantize, resolve_run_device(config.device)),
                  gradient_checkpointing=checkpointing, chunk_rows=config.chunk_rows)
    setup = result.setup
    accum = config.grad_accum if batch is not None else result.grad_accum
    return setup.rank, setup.batch_size, accum, setup.gradient_checkpointing, f"planner, {profile.name}"


def _load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {model_path}: {exc}. Fix: the model folder must hold "
                         "the tokenizer files") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _prepare_output(config: RunConfig, out: Path, resume: bool) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from (None for a fresh run)."""
    ckpt_dir = out / CHECKPOINTS
    last = latest_checkpoint(ckpt_dir)
    if resume:
        if last is None:
            raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint. Fix: run without --resume")
        if _is_main():  # half-written checkpoints of a killed run
            for leftover in ckpt_dir.glob(".staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        return last
    if (last is not None or (out / report.METRICS_NAME).exists()) and not config.overwrite:
        raise ConfigError(f"{out} already holds a run. Fix: --resume to continue it, `overwrite=true` to start "
                          "over, or another --output")
    if ckpt_dir.exists() and _is_main():
        shutil.rmtree(ckpt_dir)
    return None


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _training_args(config: RunConfig, ckpt_dir: Path, device: torch.device, precision: str, batch_size: int,
                   max_steps: int, has_eval: bool) -> TrainingArguments:
    every = max(1, max_steps // 4)
    extra = dict(config.training_args)
    if _world_size() > 1:
        extra.setdefault("ddp_find_unused_parameters", True)  # B leaves training mid-run
    return TrainingArguments(
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
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        dataloader_num_workers=0,
        **extra,
    )


def _max_steps(config: RunConfig, n_train: int, batch_size: int, demo: bool) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if demo:
        return DEFAULT_DEMO_STEPS
    batches = math.ceil(n_train / (batch_size * _world_size()))
    return max(1, math.ceil(config.epochs * batches / config.grad_accum))


def train(config: RunConfig, resume: bool = False, callbacks: list | None = None,
          progress: bool = True) -> TrainResult:
    """Run one fine-tuning job as `config` says and write the output folder.

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
    from lamda_edge.adapters import save_adapter

    start = time.perf_counter()
    out = config.output_dir()
    last_checkpoint = _prepare_output(config, out, resume)
    device = resolve_run_device(config.device)
    precision = resolve_precision(config.precision, device)
    if config.model is None:
        from lamda_edge.demo.default_model import default_model_path

        model_path = default_model_path(progress=progress)
    else:
        model_path = Path(config.model).expanduser()
        if not (model_path / "config.json").is_file():
            raise ModelError(f"`model`={config.model!r} is not a transformers model folder (no config.json). "
                             "Fix: pass a local folder, or leave `model` unset for the default model")
    tokenizer = _load_tokenizer(model_path)
    rank, batch_size, grad_accum, checkpointing, planned_by = _plan(config, model_path)
    demo_task = None
    if config.data is None:
        from lamda_edge.demo import task as demo

        demo_task = demo.make_task(tokenizer, n_train=config.demo_train, n_eval=config.demo_eval,
                                   seq_len=config.seq_len, seed=config.seed)
        train_set, eval_set = demo_task.train, demo_task.eval
    else:
        from lamda_edge.train.data import load_data

        splits = load_data(config.data, tokenizer, config.seq_len, eval_path=config.eval_data,
                           eval_fraction=0.0 if config.eval_data else config.eval_fraction, seed=config.seed,
                           on_overflow=config.on_overflow)
        train_set, eval_set = splits.train, splits.eval
    config = config.replace(grad_accum=grad_accum, gradient_checkpointing=checkpointing)
    max_steps = _max_steps(config, len(train_set), batch_size, demo_task is not None)
    lamda_config = config.lamda_config(rank)
    freeze_b_steps = lamda_config.resolved_freeze_b_steps(max_steps)
    resolved = config.replace(rank=rank, batch_size=batch_size, max_steps=max_steps, alpha=lamda_config.alpha,
                              freeze_b_steps=freeze_b_steps, precision=precision,
                              quantize=resolve_quantize(config.quantize, device) or "none")  # as run, for --resume
    if _is_main():
        report.write_run_config(out / report.RUN_CONFIG_NAME, resolved.to_dict())

    quantize = resolve_quantize(config.quantize, device)
    if progress and _is_main():
        print(f"lamda-edge: {model_path.name} ({quantize or 'full-precision'} base, {precision}) on {device.type}: "
              f"rank {rank}, batch {batch_size} x {grad_accum} ({planned_by}), checkpointing "
              f"{'on' if checkpointing else 'off'}, {max_steps} steps, B frozen after "
              f"{freeze_b_steps}; output {out}" + (f"; resuming from {last_checkpoint}" if last_checkpoint else ""),
              file=sys.stderr)
    torch.manual_seed(config.seed)
    lm = load_model(model_path, config, lamda_config, device, precision)
    metadata = {**(lm.lamda_state.base or {}), "base_model": str(Path(model_path).resolve()), "quantize": quantize}
    demo_before = (_demo_before(demo_task, lm, tokenizer, out, resume, progress, config.demo_generate)
                   if demo_task else None)

    from lamda_edge.train.data import PaddingCollator

    trainer_ref: list = []
    progress_cb = ProgressCallback(trainer_ref, enabled=progress)
    args = _training_args(config, out / CHECKPOINTS, device, precision, batch_size, max_steps, eval_set is not None)
    report.reset_peak_memory(device)
    trainer = LaMDATrainer(
        model=LossModel(lm, config.chunk_rows),
        args=args,
        data_collator=PaddingCollator.for_tokenizer(tokenizer),
        train_dataset=train_set,
        eval_dataset=eval_set,
        callbacks=[LaMDACallback(lm, freeze_steps=freeze_b_steps), progress_cb, *(callbacks or [])],
        adapter_metadata=metadata,
    )
    trainer_ref.append(trainer)
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    trainer.remove_callback(HFProgress)
    trainer.remove_callback(PrinterCallback)
    trainable_start = effective_trainable(lm)
    trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    seconds = time.perf_counter() - start

    trainable_end = effective_trainable(lm)
    b_total = sum(layer.lamda_B.numel() for _, layer in lamda_layer_list(lm))
    s_total = sum(layer.lamda_S.numel() for _, layer in lamda_layer_list(lm))
    other = trainable_end - s_total if trainable_end >= s_total else 0
    history = trainer.state.log_history
    train_log, eval_log = report.split_history(history)
    metrics: dict[str, Any] = {
        "output": str(out),
        "base_model": metadata["base_model"],
        "quantize": metadata["quantize"],
        "device": device.type,
        "precision": precision,
        "world_size": _world_size(),
        "global_step": trainer.state.global_step,
        "seconds": seconds,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_second": progress_cb.tokens_per_second(trainer.state),
        "trainable_params": {"start": s_total + b_total + other, "end": trainable_end,
                             "at_run_start": trainable_start, "freeze_b_steps": freeze_b_steps},
        "rank": rank,
        "batch_size": batch_size,
        "planned_by": planned_by,
        "log_history": history,
        "eval": eval_log,
        **report.peak_memory(device),
    }
    if train_log:
        metrics["train_loss_first"], metrics["train_loss_last"] = train_log[0]["loss"], train_log[-1]["loss"]
    if demo_task is not None:
        after = _demo_metrics(demo_task, lm, tokenizer, progress, "after", config.demo_generate)
        metrics["demo"] = {"problems": after["n_problems"], "before": demo_before["accuracy"],
                           "after": after["accuracy"], "metrics_before": demo_before, "metrics_after": after}
    if trainer.args.should_save:
        save_adapter(lm, out, metadata={**metadata, "trained_steps": trainer.state.global_step})
        report.write_json(out / report.METRICS_NAME, metrics)
        report.plot_loss(out / report.PLOT_NAME, history, freeze_b_steps, title=f"{model_path.name} + LaMDA r{rank}")
        if progress:
            for line in report.summary_lines(metrics):
                print(line)
            if demo_task is not None:
                from lamda_edge.demo.task import before_after

                print(before_after(demo_before, metrics["demo"]["metrics_after"]))
    return TrainResult(out, metrics)


def _demo_metrics(task, lm, tokenizer, progress: bool, when: str, n_generate: int | None) -> dict:
    from lamda_edge.demo import task as demo

    result = demo.evaluate(lm, tokenizer, task, n_generate=n_generate)
    if progress and _is_main():
        print(f"demo task {when} training: {result.line()}", file=sys.stderr)
    return result.to_dict()


def _demo_before(task, lm, tokenizer, out: Path, resume: bool, progress: bool, n_generate: int | None) -> dict:
    """The demo metrics of the untrained adapter (measured once; a resumed run reads them back)."""
    import json

    path = out / DEMO_BEFORE
    if resume and path.is_file():
        return json.loads(path.read_text())
    before = _demo_metrics(task, lm, tokenizer, progress, "before", n_generate)
    if _is_main():
        report.write_json(path, before)
    return before
