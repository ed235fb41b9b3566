"""Progress bars: a long phase keeps its clock moving, and evaluation time stays out of the training rate."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
    """A third-party tqdm bar's print interval (transformers' own) in a CLI-like process whose stderr is a pipe
    (tqdm reads its variables on import); our own bars print plain lines there (below)."""
    code = ("from lamda_edge.progress import quiet_bars_off_terminal\n"
            "quiet_bars_off_terminal()\n"
            "from tqdm.auto import tqdm\n"
            "print(tqdm(total=10).mininterval)")
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


@pytest.mark.parametrize(
    "code, env, enabled",
    [
        pytest.param("QUIET\nfrom transformers.utils import logging\n", {}, False, id="before-import"),
        pytest.param("from transformers.utils import logging\nQUIET\n", {}, False, id="after-import"),
        pytest.param("QUIET\nfrom transformers.utils import logging\n", {"HF_HUB_DISABLE_PROGRESS_BARS": "0"}, True,
                     id="user-choice-kept"),
    ],
)
def test_off_a_terminal_transformers_draws_no_bars(code, env, enabled):
    """transformers' own bars ("Writing model shards", "Loading weights") stay out of a log, whether it was
    imported before or after; a user's HF_HUB_DISABLE_PROGRESS_BARS is kept."""
    quiet = "from lamda_edge.progress import quiet_bars_off_terminal\nquiet_bars_off_terminal()"
    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}, **env}
    script = code.replace("QUIET", quiet) + "print(logging.is_progress_bar_enabled())"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == str(enabled)


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


# ---- off a terminal: plain lines (issue 30) ------------------------------------------------------------------------

def _plain(text: str) -> bool:
    """No carriage return and no escape sequence (cursor moves, line clears): what a log file should hold."""
    return "\r" not in text and "\x1b[" not in text


def test_off_a_terminal_a_bar_is_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every step, to see each
    with bar(3, "train", unit="step", leave=True) as steps:
        for _ in range(3):
            steps.set_postfix(loss="1.0", refresh=False)
            steps.update(1)
    err = capsys.readouterr().err
    assert _plain(err)
    lines = err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("train:  33% 1/3 step [")
    assert lines[-1].startswith("train: 100% 3/3 step [") and lines[-1].endswith("loss=1.0]")


def test_off_a_terminal_a_bar_prints_once_per_interval_and_at_the_end(monkeypatch, capsys):
    """Within LOG_INTERVAL_S (30 s) a bar prints nothing while it runs: the training bar one line at its end, a
    passing one (an evaluation, leave=False) none: its result is the caller's one line."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    steps, evaluation = bar(100, "train", unit="step", leave=True), bar(5, "eval", unit="batch")
    with ticking(steps, every=0.01):
        for _ in range(100):
            steps.update(1)
        for _ in range(5):
            evaluation.update(1)
    evaluation.close()
    steps.close()
    steps.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 100% 100/100 step")


def _train_args(tmp_path, tiny_run) -> dict:
    """A tiny run of 4 steps with an evaluation before training and at steps 2 and 4."""
    return dict(model=str(tiny_run.model_dir(tmp_path / "model")), data=str(tiny_run.data(tmp_path / "data.jsonl")),
                output=str(tmp_path / "run"), quantize="none", rank=4, batch_size=4, seq_len=32, max_steps=4,
                eval_steps=2, precision="fp32")


def _check_log(text: str) -> None:
    assert _plain(text), [line for line in text.split("\n") if not _plain(line)][:5]
    evaluations = [line.split(":")[0] for line in text.splitlines() if ": eval loss " in line]
    assert evaluations == ["before training", "step 2", "step 4"]
    assert [line for line in text.splitlines() if line.startswith("train: 100% 4/4 step [")]


def test_a_redirected_train_log_has_no_cursor_codes(tmp_path, tiny_run):
    """`lamda-edge train > log 2>&1`: one line per evaluation, the training bar's last line, no `\\x1b[` or `\\r`."""
    pairs = [f"{k}={v}" for k, v in _train_args(tmp_path, tiny_run).items()]
    log = tmp_path / "log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "lamda_edge.cli", "train", *pairs], stdout=out,
                              stderr=subprocess.STDOUT, timeout=600, cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, **tiny_run.env(LAMDA_EDGE_CACHE=str(tmp_path / "cache"))})
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    _check_log(text)


def test_the_python_api_logs_plain_lines_off_a_terminal(tmp_path, tiny_run, capsys, monkeypatch):
    """`train(config)` from Python with stderr captured (not a terminal) logs as the CLI does."""
    from lamda_edge.train.config import RunConfig
    from lamda_edge.train.recipe import train

    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))
    config = RunConfig.from_dict(_train_args(tmp_path, tiny_run))
    capsys.readouterr()  # the tiny model's own saving (transformers' bar), before the run
    train(config, progress=True)
    captured = capsys.readouterr()
    _check_log(captured.err)
    assert _plain(captured.out)
