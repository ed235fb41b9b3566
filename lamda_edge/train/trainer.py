"""The Trainer side of a run: `LossModel` (forward returns the chunked loss) and `LaMDATrainer` (adapter-only,
atomic checkpoints; stops on a non-finite loss; an optimizer with a learning rate per parameter group).

Checkpoints hold only the adapter (safetensors), the optimizer, the LR scheduler, the RNG states, the Trainer state
and a manifest of their sha256; each is written into a staging folder that is renamed into place, so a killed run
never leaves a half-written checkpoint.

A checkpoint is good when its weights are sane (no trainable tensor's norm grew over `GROWTH_LIMIT` times its
norm at the run's start, plus one per element) and a later training loss is finite and at most `DIVERGED_FACTOR`
times the run's lowest. Until then it stays unconfirmed, and rotation keeps `save_total_limit` confirmed ones
besides. When the loss becomes NaN or inf, the unconfirmed checkpoints hold the updates that diverged (with lr=1e9
one step gives weights around 1e9 whose loss, behind RMSNorm, still looks normal, and the NaN comes a step later),
so they are removed and the run stops: the last good checkpoint holds finite, sane weights from before the
divergence. A checkpoint whose adapter tensors are not finite is never written.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from lamda_edge.adapters import load_adapter, param_groups, save_adapter
from lamda_edge.adapters.files import adapter_files
from lamda_edge.errors import TrainingError
from lamda_edge.files import check_safetensors, check_torch_archive, read_json, write_failure, write_fix
from lamda_edge.integrity import write_manifest
from lamda_edge.tasks import SEQ2SEQ, SEQUENCE_CLASSIFICATION
from lamda_edge.train import report
from lamda_edge.train.loss import causal_lm_loss, seq2seq_loss
from lamda_edge.train.offload import ActivationOffload
from lamda_edge.train.report import effective_trainable

DIVERGED_FACTOR = 10.0  # a loss this many times the run's lowest does not confirm a checkpoint
LOSS_FLOOR = 0.1  # ... with the lowest taken as at least this (a memorized batch near 0 is no yardstick)
GROWTH_LIMIT = 100.0  # a tensor whose norm grew this many times (plus one per element) is not a sane checkpoint


class LossModel(nn.Module):
    """A causal LM whose forward returns {"loss": chunked causal-LM loss} (what the Trainer and DDP see).

    `step_loss` is the training loss of the optimizer step in progress, summed over its micro-batches by
    `LaMDATrainer` (the progress bar reads and resets it after each step).
    """

    accepts_loss_kwargs = True  # the loss is normalized by the Trainer's num_items_in_batch
    loss_type = "ForCausalLM"  # labels are shifted inside: the Trainer counts items over labels[:, 1:]

    def __init__(self, lm: nn.Module, chunk_rows: int | None, activation_offload: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.step_loss = 0.0
        self.offload = ActivationOffload() if activation_offload else None  # train/offload.py

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, num_items_in_batch=None,
                **kwargs):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 "labels": labels}
        if self.offload is None:
            return {"loss": causal_lm_loss(self.lm, batch, self.chunk_rows, num_items_in_batch)}
        with self.offload:  # what the forward saves for backward waits in host memory
            return {"loss": causal_lm_loss(self.lm, batch, self.chunk_rows, num_items_in_batch)}


class ClassifierLossModel(LossModel):
    """A sequence classifier whose forward returns {"loss": cross-entropy of its logits (B, C) against labels (B,)}.

    The Trainer averages micro-batches itself (no `num_items_in_batch`: each example counts once).
    """

    accepts_loss_kwargs = False
    loss_type = None

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # (B, C)
        return {"loss": F.cross_entropy(logits.float(), labels)}


class Seq2SeqLossModel(LossModel):
    """An encoder-decoder whose forward returns {"loss": the chunked loss on the target tokens} (`seq2seq_loss`)."""

    loss_type = "ForMaskedLM"  # labels are not shifted: the Trainer counts items over all of them

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {"loss": seq2seq_loss(self.lm, batch, self.chunk_rows, num_items_in_batch)}


def loss_model(lm: nn.Module, task: str, chunk_rows: int | None, activation_offload: bool = False) -> LossModel:
    """The module the Trainer trains for `task`: its forward returns the task's loss (activation offload: the
    causal LM's)."""
    cls = {SEQUENCE_CLASSIFICATION: ClassifierLossModel, SEQ2SEQ: Seq2SeqLossModel}.get(task, LossModel)
    return cls(lm, chunk_rows, activation_offload)


def classifier_accuracy(lm: nn.Module, loader) -> float:
    """The share of a held-out loader's examples whose argmax class is the label (the model in eval mode)."""
    was_training = lm.training
    lm.eval()
    right = total = 0
    device = next(lm.parameters()).device
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = lm(**batch).logits  # (B, C)
            right += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
    lm.train(was_training)
    return right / max(total, 1)


class LaMDATrainer(Trainer):
    """Trainer that checkpoints only the adapter, atomically, and stops on a non-finite loss."""

    def __init__(self, *args, adapter_metadata: dict | None = None, on_good_checkpoint=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_metadata = adapter_metadata or {}
        self.on_good_checkpoint = on_good_checkpoint  # called once a checkpoint is confirmed good (ReplacedRun.drop)
        self.unconfirmed: list[tuple[Path, bool]] = []  # (checkpoint, weights sane) no sane loss followed yet
        self.lowest_loss: float | None = None
        self.start_norms: dict[str, float] | None = None  # trainable tensor -> norm, at the run's (or resume's) start

    @property
    def lm(self) -> nn.Module:
        return self.model.lm

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer (AdamW by default) over `param_groups`: S and B at their multiples of `lr`
        (`LaMDAConfig.s_lr_scale`, `b_lr_scale`); the LR schedule scales every group alike."""
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = param_groups(self.lm, self.args.learning_rate, weight_decay=self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        value = float(loss.detach())
        if self.start_norms is None:
            self.start_norms = self._norms()
        if not math.isfinite(value):
            self._stop_on_nonfinite(value, "training" if model.training else "eval")
        if model.training:
            self._judge_checkpoints(value)
            self.model.step_loss += value / max(1, self.accelerator.num_processes)
        return result

    def _stop_on_nonfinite(self, value: float, kind: str) -> None:
        """A NaN/inf loss: remove the unconfirmed checkpoints and raise `TrainingError` (`_stop`)."""
        self._stop(f"the {kind} loss became {value} at optimizer step {self.state.global_step + 1}",
                   f"a loss after them of {value}")

    def _stop(self, what: str, after: str) -> None:
        """Remove the unconfirmed checkpoints (they hold the diverging updates) and raise `TrainingError`."""
        removed = [folder for folder, _ in self.unconfirmed]
        self.unconfirmed = []
        if self.args.should_save:
            for folder in removed:
                shutil.rmtree(folder, ignore_errors=True)
        last = latest_checkpoint(Path(self.args.output_dir))
        names = ", ".join(folder.name for folder in removed)
        raise TrainingError(
            f"{what}; the run stopped. "
            + (f"Removed {names}: they hold the diverging updates (weights grown over {GROWTH_LIMIT:g}x, or "
               f"{after} or over {DIVERGED_FACTOR:g}x the run's lowest). " if removed else "")
            + f"The last good checkpoint is kept: {last if last else 'none yet'}. Fix: lower `lr` (now "
            f"{self.args.learning_rate:g}), use `precision=fp32`, or check the data, and start again with "
            "`overwrite=true`"
        )

    def _judge_checkpoints(self, loss: float) -> None:
        """A finite training loss within `DIVERGED_FACTOR` of the run's lowest confirms the checkpoints before it."""
        sane = self.lowest_loss is None or loss <= DIVERGED_FACTOR * max(self.lowest_loss, LOSS_FLOOR)
        self.lowest_loss = loss if self.lowest_loss is None else min(self.lowest_loss, loss)
        confirmed = [folder for folder, weights_sane in self.unconfirmed if weights_sane] if sane else []
        if not confirmed:
            return
        self.unconfirmed = [(folder, ok) for folder, ok in self.unconfirmed if folder not in confirmed]
        limit = self.args.save_total_limit
        if self.args.should_save:
            rotate_checkpoints(output_dir=self.args.output_dir,
                               save_total_limit=limit + len(self.unconfirmed) if limit else limit)
        if self.on_good_checkpoint is not None:
            self.on_good_checkpoint()

    def _norms(self) -> dict[str, float]:
        return {name: float(p.detach().float().norm()) for name, p in self.lm.named_parameters() if p.requires_grad}

    def _grown(self) -> str | None:
        """The first trainable tensor whose norm grew past `GROWTH_LIMIT` times its start (plus one per element)."""
        for name, param in self.lm.named_parameters():
            start = (self.start_norms or {}).get(name)
            if param.requires_grad and start is not None:
                if float(param.detach().float().norm()) > GROWTH_LIMIT * start + math.sqrt(param.numel()):
                    return name
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            if isinstance(self.model, ClassifierLossModel):  # a classifier: accuracy, not perplexity
                logs["eval_accuracy"] = classifier_accuracy(self.lm, self.get_eval_dataloader())
            else:
                logs["eval_perplexity"] = report.perplexity(logs["eval_loss"])
        if "loss" in logs:
            logs["trainable_params"] = effective_trainable(self.lm)
        super().log(logs, start_time)

    # ---- checkpoints: only the adapter, written into a staging folder and renamed into place -----------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_adapter(self.lm, output_dir or self.args.output_dir, metadata=self.adapter_metadata)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter(self.lm, resume_from_checkpoint)

    def _load_best_model(self) -> None:  # `load_best_model_at_end`: our adapter files, not PEFT's
        load_adapter(self.lm, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        bad = _nonfinite_tensor(self.lm)
        if bad is not None:  # such weights are never a checkpoint, nor are the unconfirmed ones that led there
            self._stop(f"{bad} holds NaN or inf after optimizer step {self.state.global_step}; it was not saved",
                       "NaN or inf weights")
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".staging-{self.state.global_step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, quota, read-only, ...
            cause = write_failure(exc, run_dir)  # before the partial checkpoint's space is freed
            shutil.rmtree(staging, ignore_errors=True)
            if cause is None:
                raise
            raise _checkpoint_write_error(run_dir, name, cause) from exc
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        self.unconfirmed.append((run_dir / name, self._grown() is None))
        if self.args.should_save:
            final = run_dir / name
            write_manifest(staging / name)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            # the unconfirmed checkpoints come on top of the limit: the confirmed ones outlive them
            limit = self.args.save_total_limit
            rotate_checkpoints(output_dir=str(run_dir),
                               save_total_limit=limit + len(self.unconfirmed) if limit else limit)
        self.accelerator.wait_for_everyone()


def _checkpoint_write_error(run_dir: Path, name: str, cause: str) -> TrainingError:
    """The one line for a checkpoint that could not be written: the cause, the checkpoint kept, the fix."""
    last = latest_checkpoint(run_dir)
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return TrainingError(
        f"could not write {run_dir / name} ({cause}; {free}); the run stopped. The previous checkpoint is intact: "
        f"{last if last else 'none yet'}. Fix: {write_fix(cause).replace(' there', f' in {run_dir}')}, then run "
        "again with --resume")


def check_checkpoint(folder: Path) -> None:
    """`TrainingError` naming the file when a file of a checkpoint is missing, truncated or corrupt: the trainer
    state, the adapter, and the optimizer, scheduler and RNG states (checked as archives, never unpickled here)."""
    fix = f"delete {folder} to resume from the checkpoint before it, or start again with `overwrite=true`"
    read_json(folder / TRAINER_STATE, TrainingError, fix)
    config_file, weights_file = adapter_files(folder)
    read_json(config_file, TrainingError, fix)
    check_safetensors(weights_file, TrainingError, fix)
    for path in [folder / OPTIMIZER_NAME, folder / SCHEDULER_NAME, *sorted(folder.glob("rng_state*.pth"))]:
        if path.exists():  # what the Trainer would load
            check_torch_archive(path, TrainingError, fix)


def _nonfinite_tensor(lm: nn.Module) -> str | None:
    """The name of the first trainable tensor holding NaN or inf, or None."""
    for name, param in lm.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            return name
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in `folder` (staging leftovers of a killed run are ignored)."""
    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    return Path(last) if last else None
