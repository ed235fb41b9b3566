"""Progress bars: a long phase keeps its clock moving, and evaluation time stays out of the training rate."""

import io
import os
import subprocess
import sys
import time

from tqdm import tqdm
from transformers import TrainerState

from lamda_edge import progress
from lamda_edge.progress import bar, ticking
from lamda_edge.train.callbacks import ProgressCallback


def _refreshes(shown: io.StringIO) -> int:
    return shown.getvalue().count("\r")


def test_ticking_keeps_redrawing_a_bar_that_gets_no_updates(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    shown = io.StringIO()
    phases = tqdm(total=3, desc="export", file=shown, mininterval=0)
    before = _refreshes(shown)
    with ticking(phases, every=0.02):
        deadline = time.monotonic() + 30
        while _refreshes(shown) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert _refreshes(shown) >= before + 3
    after = _refreshes(shown)
    time.sleep(0.1)
    assert _refreshes(shown) == after  # the ticking stopped with the block
    phases.close()


def _mininterval_in_a_fresh_process(env: dict) -> float:
    """A bar's print interval in a CLI-like process whose stderr is a pipe (tqdm reads its variables on import)."""
    code = ("from lamda_edge.progress import bar, quiet_bars_off_terminal\n"
            "quiet_bars_off_terminal()\n"
            "print(bar(10, 'train').mininterval)")
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}, **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(proc.stdout)


def test_off_a_terminal_bars_print_every_half_minute(monkeypatch):
    """A log file or CI gets a bar line every LOG_INTERVAL_S, not one per step or per tick; a user's
    TQDM_MININTERVAL is kept, and a terminal keeps tqdm's own interval."""
    assert _mininterval_in_a_fresh_process({}) == progress.LOG_INTERVAL_S == 30.0
    assert _mininterval_in_a_fresh_process({"TQDM_MININTERVAL": "5"}) == 5.0
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    terminal = {}
    progress.quiet_bars_off_terminal(terminal)
    assert terminal == {}
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    shown = io.StringIO()
    phases = tqdm(total=3, desc="export", file=shown)
    before = _refreshes(shown)
    with ticking(phases, every=0.01):
        time.sleep(0.2)
    assert _refreshes(shown) == before  # no tick within the 30 s
    phases.close()


def test_ticking_leaves_a_silent_bar_alone():
    silent = bar(3, "export", enabled=False)
    with ticking(silent, every=0.01) as same:
        silent.set_description_str("export: validating")
    assert same is silent


def test_evaluation_time_is_not_training_time():
    """After an evaluation, the bar's elapsed time (its rate and ETA) and tokens/s leave the evaluation out."""
    callback = ProgressCallback(enabled=True)
    callback.bar = tqdm(total=10, file=io.StringIO(), mininterval=0)
    state = TrainerState(max_steps=10, is_world_process_zero=True)
    callback.on_prediction_step(None, state, None, eval_dataloader=[0, 1])
    time.sleep(0.3)
    callback.on_prediction_step(None, state, None, eval_dataloader=[0, 1])
    callback.on_evaluate(None, state, None)
    assert callback.eval_seconds >= 0.3 and callback.eval_bar is None
    assert callback.bar.format_dict["elapsed"] < 0.3
    callback.start, callback.tokens0 = time.perf_counter() - callback.eval_seconds - 2.0, 0
    state.num_input_tokens_seen = 1000
    assert 400 < callback.tokens_per_second(state) <= 500  # 1000 tokens over the 2 s of training, not 2.3+ s
    callback.bar.close()
