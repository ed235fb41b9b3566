"""Progress bars with an ETA for the long phases (training, conversion, evaluation, export, validation), on stderr.

`bar(total, desc, enabled)` is, with the same `update` / `set_postfix` / `set_postfix_str` / `set_description_str`
/ `write` / `refresh` / `unpause` / `close`, so that callers never branch on it:

    on a terminal       a tqdm bar, redrawn in place
    off a terminal      plain lines (`_Lines`): one every LOG_INTERVAL_S at most and one at the end (`leave`), never a
                        carriage return or a cursor move, so a log file (`lamda-edge train > log 2>&1`, CI) reads clean
    progress off        nothing (`_Silent`)

The CLI and the Python API get the same: the choice is made here, from where stderr goes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

LOG_INTERVAL_S = 30.0  # off a terminal (a log file, CI), a bar prints at most this often


def on_terminal() -> bool:
    """Whether stderr, where the bars draw, is a terminal (else each refresh is a new line in a log)."""
    return sys.stderr.isatty()


def quiet_bars_off_terminal(environ=None) -> None:
    """Off a terminal, other libraries' tqdm bars stay out of the log: any tqdm bar prints at most every
    LOG_INTERVAL_S seconds (tqdm reads `TQDM_MININTERVAL` on import), and transformers and huggingface_hub draw
    none (their short "Loading weights" / "Writing model shards" bars: `HF_HUB_DISABLE_PROGRESS_BARS`, read on
    import, and transformers' switch when it is already imported). Values the user set are kept."""
    env = os.environ if environ is None else environ
    if not on_terminal():
        env.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_S))
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if environ is None and "transformers" in sys.modules and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            from transformers.utils import logging

            logging.disable_progress_bar()


class _Silent:
    """A bar that shows nothing."""

    n = 0

    def set_postfix(self, refresh: bool = True, **values) -> None:
        pass

    def refresh(self) -> None:
        pass

    def unpause(self) -> None:
        pass

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def set_description_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lines:
    """A bar as plain lines on stderr, for a log: `desc: 40% 24/60 step [01:02<01:33, 2.58s/step, loss=...]` at most
    every LOG_INTERVAL_S while it runs (read when the bar starts), once when a new description names the phase that
    starts, and once at the end when `leave`."""

    def __init__(self, total: int | None, desc: str, unit: str, leave: bool, eta: bool, initial: int = 0):
        self.total, self.desc, self.unit, self.leave, self.eta = total, desc, unit, leave, eta
        self.n = self.initial = self.shown = initial
        self.postfix = ""
        self.interval = LOG_INTERVAL_S
        self.start_t = self.last_print_t = self.last_update_t = time.time()
        self.lock = threading.Lock()  # `ticking` refreshes from its own thread

    def line(self) -> str:
        now = time.time()
        from tqdm import tqdm

        if not self.eta:
            layout = "{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}]"
        elif self.total:
            layout = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} "
                      "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        else:
            layout = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
        return tqdm.format_meter(self.n, self.total, now - self.start_t, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial, bar_format=layout)

    def _print(self, force: bool = False) -> None:
        with self.lock:
            now = time.time()
            if force or now - self.last_print_t >= self.interval:
                self.last_print_t, self.shown = now, self.n
                print(self.line(), file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.last_update_t = time.time()
        self._print()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description_str(self, text: str = "", refresh: bool = True) -> None:
        """A new description names a new phase (an export's): one line says it has started."""
        if text != self.desc:
            self.desc = text
            self._print(force=True)

    def refresh(self) -> None:
        self._print()

    def unpause(self) -> None:
        """As tqdm's: the time since the last step (an evaluation) leaves the elapsed time, the rate and the ETA."""
        now = time.time()
        self.start_t += now - self.last_update_t
        self.last_update_t = now

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.leave and self.shown != self.n:
            self._print(force=True)
        self.leave = False  # a second close prints nothing

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it", leave: bool = False,
        eta: bool = True, initial: int = 0):
    """A bar on stderr over `total` steps (elapsed, rate and ETA): tqdm on a terminal, plain lines off one
    (`_Lines`), a silent one when not `enabled`.

    `eta=False` shows the count and the elapsed time only: for steps of very unequal length (an export's phases,
    seconds to many minutes), where a rate-based ETA would be wrong. `initial`: steps already done (a resumed run).
    """
    if not enabled:
        return _Silent()
    if not on_terminal():
        return _Lines(total, desc, unit, leave, eta, initial)
    from tqdm.auto import tqdm

    layout = None if eta else "{desc}: {n_fmt}/{total_fmt} " + unit + "s [{elapsed}]"
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr,
                bar_format=layout, initial=initial)


def track(items, desc: str, enabled: bool = True, unit: str = "it"):
    """Iterate over `items` (a sized collection) with a `bar` over them, closed at the end."""
    with bar(len(items), desc, enabled, unit=unit) as progress_bar:
        for item in items:
            yield item
            progress_bar.update(1)


@contextmanager
def ticking(progress_bar, every: float = 1.0):
    """Refresh `progress_bar` every `every` seconds while the block runs, so that its elapsed time keeps moving
    through a long phase that has no steps of its own to count (a silent bar is left alone; off a terminal, every
    LOG_INTERVAL_S at most)."""
    if isinstance(progress_bar, _Silent):
        yield progress_bar
        return
    every = every if on_terminal() else max(every, LOG_INTERVAL_S)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            progress_bar.refresh()

    thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
    thread.start()
    try:
        yield progress_bar
    finally:
        stop.set()
        thread.join()
