"""Progress bars with an ETA for the long phases (conversion, evaluation, export, validation), on stderr.

`bar(total, desc, enabled)` is a tqdm bar, or a silent stand-in with the same `update` / `set_postfix_str` /
`set_description_str` / `write` / `close` when progress is off, so that callers never branch on it.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

LOG_INTERVAL_S = 30.0  # off a terminal (a log file, CI), a bar prints at most this often


def on_terminal() -> bool:
    """Whether stderr, where the bars draw, is a terminal (else each refresh is a new line in a log)."""
    return sys.stderr.isatty()


def quiet_bars_off_terminal(environ=None) -> None:
    """Off a terminal, every tqdm bar in the process (ours, transformers') prints at most every LOG_INTERVAL_S
    seconds instead of at every step: tqdm reads `TQDM_MININTERVAL`; a value the user set is kept."""
    env = os.environ if environ is None else environ
    if not on_terminal():
        env.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_S))


class _Silent:
    """A bar that shows nothing."""

    n = 0

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


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it", leave: bool = False,
        eta: bool = True):
    """A tqdm bar on stderr over `total` steps (elapsed, rate and ETA), or a silent one when not `enabled`.

    `eta=False` shows the count and the elapsed time only: for steps of very unequal length (an export's phases,
    seconds to many minutes), where a rate-based ETA would be wrong.
    """
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    layout = None if eta else "{desc}: {n_fmt}/{total_fmt} " + unit + "s [{elapsed}]"
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr,
                bar_format=layout)


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
