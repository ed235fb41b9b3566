"""Trainer callbacks: B's column freezing on schedule (`LaMDACallback`), the progress bar (`ProgressCallback`), and
Ctrl-C as "checkpoint this step and stop" (`InterruptCallback`).

These are the only places the method meets `transformers.TrainerCallback`; the method itself (`PMBScheduler`)
knows nothing of the Trainer.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

from torch import nn
from transformers import TrainerCallback

from lamda_edge.adapters.freeze import PMBScheduler
from lamda_edge.progress import bar
from lamda_edge.train.report import effective_trainable, eval_score, lamda_layer_list


class LaMDACallback(TrainerCallback):
    """A `transformers.TrainerCallback` that runs a `PMBScheduler` after every optimizer step.

    With `freeze_steps=None`, t_i is the model's `LaMDAConfig.freeze_b_steps`, or its share of the run's optimizer
    steps (`state.max_steps`), fixed at train begin (`PMBScheduler`).
    """

    def __init__(self, model: nn.Module, freeze_steps: int | None = None):
        self.model = model
        self.freeze_steps = freeze_steps
        self.scheduler: PMBScheduler | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.scheduler is None:
            self.scheduler = PMBScheduler(self.model, self.freeze_steps, total_steps=state.max_steps)
            self.scheduler.steps_done = state.global_step
            if state.global_step:
                self.scheduler.load_state_dict(self.scheduler.state_dict(), kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step(kwargs.get("optimizer"))


class ProgressCallback(TrainerCallback):
    """A bar over optimizer steps with loss, tokens/s and ETA; eval results and B freezing as lines (off a terminal,
    plain lines: lamda_edge/progress.py).

    It reads the model from the callback arguments: `model` is the Trainer's `LossModel`, whose `lm` is the adapted
    model and whose `step_loss` the Trainer sums over the micro-batches of an optimizer step (this callback takes
    it and starts the next step's sum at 0).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.last_loss: float | None = None
        self.bar = None
        self.start = 0.0
        self.tokens0 = 0
        self.trainable = None
        self.trainable_start = None  # at the start of training (before any column of B froze)
        self.b_frozen_step = None  # the optimizer step after which B was wholly frozen
        self.eval_bar = None
        self.eval_started = None  # perf_counter() when the running evaluation began
        self.eval_seconds = 0.0  # time spent evaluating since on_train_begin: not training, so not in tokens/s

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, file=sys.stderr)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        self.eval_seconds = 0.0
        self.trainable = effective_trainable(kwargs["model"].lm)
        if self.trainable_start is None:
            lm = kwargs["model"].lm
            self.trainable_start = self.trainable + sum(layer.out_features * layer.frozen_b_columns
                                                        for _, layer in lamda_layer_list(lm))
        if self.enabled and state.is_world_process_zero:
            self.bar = bar(state.max_steps, "train", unit="step", leave=True, initial=state.global_step)

    def tokens_per_second(self, state) -> float:
        elapsed = max(time.perf_counter() - self.start - self.eval_seconds, 1e-9)
        return (state.num_input_tokens_seen - self.tokens0) / elapsed

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.last_loss, model.step_loss = model.step_loss, 0.0
        count = effective_trainable(model.lm)
        b_trains = any(layer.lamda_B.requires_grad for _, layer in lamda_layer_list(model.lm))
        if count != self.trainable and not b_trains:
            self.b_frozen_step = state.global_step
            if state.is_world_process_zero:
                self._write(f"step {state.global_step}: B wholly frozen, only S trains; trainable parameters "
                            f"{self.trainable_start:,} at the start -> {count:,}")
        self.trainable = count
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{self.tokens_per_second(state):,.0f}",
                                 refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """An evaluation's own bar (with ETA) below the training bar, which would otherwise sit still."""
        if not (self.enabled and state.is_world_process_zero):
            return
        if self.eval_bar is None:  # off a terminal: no line of its own unless it runs LOG_INTERVAL_S (on_log has one)
            self.eval_started = time.perf_counter()
            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.eval_bar = bar(total, "eval", unit="batch")
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        """Close the evaluation's bar; the time it took leaves the training bar's rate and ETA and tokens/s."""
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None
        if self.eval_started is not None:
            self.eval_seconds += time.perf_counter() - self.eval_started
            self.eval_started = None
            if self.bar is not None:
                self.bar.unpause()  # tqdm: restart the clock from the last print, so the pause is not "elapsed"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_loss" in logs and state.is_world_process_zero:
            when = "before training" if state.global_step == 0 else f"step {state.global_step}"
            self._write(f"{when}: eval loss {logs['eval_loss']:.4f}, {' '.join(eval_score(logs))}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """Ctrl-C during training: finish the optimizer step in progress, save it as a checkpoint, stop.

    `installed()` holds the SIGINT handler for the length of `trainer.train()`; a second Ctrl-C stops at once
    (KeyboardInterrupt), losing the step in progress. The recipe then prints the command that resumes the run.
    """

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def on_sigint(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save, control.should_evaluate, control.should_training_stop = True, False, True
        return control
