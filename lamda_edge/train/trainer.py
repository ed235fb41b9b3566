"""The Trainer side of a run: `LossModel` (forward returns the chunked loss) and `LaMDATrainer` (adapter-only,
atomic checkpoints; stops on a non-finite loss).

Checkpoints hold only the adapter (safetensors), the optimizer, the LR scheduler, the RNG states and the Trainer
state; each is written into a staging folder that is renamed into place, so a killed run never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from torch import nn
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from lamda_edge.adapters import load_adapter, save_adapter
from lamda_edge.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from lamda_edge.errors import TrainingError
from lamda_edge.files import check_safetensors, check_torch_archive, read_json, write_failure
from lamda_edge.train import report
from lamda_edge.train.loss import causal_lm_loss
from lamda_edge.train.report import effective_trainable


class LossModel(nn.Module):
    """A causal LM whose forward returns {"loss": chunked causal-LM loss} (what the Trainer and DDP see).

    `step_loss` is the training loss of the optimizer step in progress, summed over its micro-batches by
    `LaMDATrainer` (the progress bar reads and resets it after each step).
    """

    accepts_loss_kwargs = True  # the loss is normalized by the Trainer's num_items_in_batch
    loss_type = "ForCausalLM"  # labels are shifted inside: the Trainer counts items over labels[:, 1:]

    def __init__(self, lm: nn.Module, chunk_rows: int | None):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.step_loss = 0.0

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {"loss": causal_lm_loss(self.lm, batch, self.chunk_rows, num_items_in_batch)}


class LaMDATrainer(Trainer):
    """Trainer that checkpoints only the adapter, atomically, and stops on a non-finite loss."""

    def __init__(self, *args, adapter_metadata: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_metadata = adapter_metadata or {}

    @property
    def lm(self) -> nn.Module:
        return self.model.lm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        value = float(loss.detach())
        if not math.isfinite(value):
            last = latest_checkpoint(Path(self.args.output_dir))
            raise TrainingError(
                f"the {'training' if model.training else 'eval'} loss became {value} at optimizer step "
                f"{self.state.global_step + 1}; the run stopped. The last good checkpoint is kept: "
                f"{last if last else 'none yet'}. Fix: lower `lr` (now {self.args.learning_rate:g}), use "
                "`precision=fp32`, or check the data, and start again with `overwrite=true`"
            )
        if model.training:
            self.model.step_loss += value / max(1, self.accelerator.num_processes)
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
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

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
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
            shutil.rmtree(staging, ignore_errors=True)
            cause = write_failure(exc)
            if cause is None:
                raise
            raise _checkpoint_write_error(run_dir, name, cause) from exc
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit)
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
        f"{last if last else 'none yet'}. Fix: free disk space in {run_dir} (or raise the file size limit), then "
        "run again with --resume")


def check_checkpoint(folder: Path) -> None:
    """`TrainingError` naming the file when a file of a checkpoint is missing, truncated or corrupt: the trainer
    state, the adapter, and the optimizer, scheduler and RNG states (checked as archives, never unpickled here)."""
    fix = f"delete {folder} to resume from the checkpoint before it, or start again with `overwrite=true`"
    read_json(folder / TRAINER_STATE, TrainingError, fix)
    read_json(folder / CONFIG_NAME, TrainingError, fix)
    check_safetensors(folder / WEIGHTS_NAME, TrainingError, fix)
    for path in [folder / OPTIMIZER_NAME, folder / SCHEDULER_NAME, *sorted(folder.glob("rng_state*.pth"))]:
        if path.exists():  # what the Trainer would load
            check_torch_archive(path, TrainingError, fix)


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
