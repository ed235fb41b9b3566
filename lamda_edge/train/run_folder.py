"""The output folder of a training run: which files are the run's, and replacing or resuming a run without losing it.

    fresh run        the folder holds no run: the new run writes into it
    overwrite=true   the old run stays in place while the new run checks its config, data and model and writes
                     nothing; when training starts its files move into `.replaced-run-<pid>/` (`ReplacedRun`), which
                     is dropped once the new run holds a good checkpoint, and moved back, byte for byte, when the new
                     run fails before that (an error, a non-finite loss, Ctrl-C)
    --resume         the newest checkpoint that matches its manifest; a damaged one is skipped, saying so

A run killed while the old run sits aside leaves `.replaced-run-<pid>/`: the next start moves it back when the new run
has no checkpoint, and drops it when it has one.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from lamda_edge.adapters.files import CONFIG_NAME, LEGACY_NAMES, WEIGHTS_NAME, verify_adapter
from lamda_edge.atomic import stale_leftovers
from lamda_edge.errors import ConfigError, LamdaEdgeError, TrainingError
from lamda_edge.integrity import manifest_problem
from lamda_edge.train.report import METRICS_NAME, PLOT_NAME, RUN_CONFIG_NAME
from lamda_edge.train.trainer import check_checkpoint

CHECKPOINTS = "checkpoints"
DEMO_BEFORE = "demo_before.json"
# every file a run writes into its output folder (other files there are the user's and are never touched)
RUN_FILES = (CHECKPOINTS, RUN_CONFIG_NAME, METRICS_NAME, PLOT_NAME, DEMO_BEFORE, CONFIG_NAME, WEIGHTS_NAME,
             *LEGACY_NAMES)
ASIDE_PREFIX = ".replaced-run-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _say(text: str) -> None:
    print(f"lamda-edge: {text}", file=sys.stderr)


def run_files(out: Path) -> list[Path]:
    """The run's files that exist in `out`."""
    return [out / name for name in RUN_FILES if (out / name).exists()]


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest step first (staging leftovers of a killed run are not checkpoints)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from (a damaged or missing file), or None when it is intact.

    A checkpoint with a manifest is checked against it, file by file; an older one without a manifest by its adapter
    (against the adapter's recorded hash) and its trainer state.
    """
    problem = manifest_problem(folder)
    if problem is not None or (folder / "manifest.json").is_file():
        return problem
    try:
        verify_adapter(folder)
        check_checkpoint(folder)  # the trainer state, the adapter and the torch archives (by CRC, not unpickled)
    except LamdaEdgeError as exc:
        return str(exc).split(". Fix:")[0]
    return None


def resume_checkpoint(ckpt_dir: Path) -> Path:
    """The newest intact checkpoint in `ckpt_dir`; each damaged newer one is named on stderr and skipped."""
    found = checkpoints(ckpt_dir)
    if not found:
        raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint. Fix: run without --resume")
    skipped, skipped_problem = [], None
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                _say(f"{', '.join(p.name for p in skipped)} damaged ({skipped_problem}); resuming from the newest "
                     f"intact checkpoint, {folder.name}")
            return folder
        skipped.append(folder)
        skipped_problem = problem
    raise ConfigError(f"nothing to resume: every checkpoint in {ckpt_dir} is damaged (e.g. {skipped_problem}). "
                      "Fix: start again with `overwrite=true`")


def holds_run(out: Path) -> bool:
    """True when `out` holds a run worth keeping: a checkpoint or the metrics of a finished run."""
    return bool(checkpoints(out / CHECKPOINTS)) or (out / METRICS_NAME).exists()


def recover_replaced(out: Path) -> None:
    """Settle what a killed run left while replacing an older one (`ReplacedRun`): move the older run back when the
    killed one has no checkpoint, drop it when it has."""
    for aside in stale_leftovers(out, ASIDE_PREFIX):
        if checkpoints(out / CHECKPOINTS):
            shutil.rmtree(aside, ignore_errors=True)
            _say(f"removed {aside.name}: the run that replaced it had written a checkpoint")
        else:
            ReplacedRun(out, aside).restore()
            _say(f"moved the previous run back from {aside.name}: the run that was replacing it was stopped "
                 "before its first checkpoint")


class ReplacedRun:
    """An older run in `out` that a new run (`overwrite=true`) replaces: moved aside when training starts, dropped
    once the new run holds a good checkpoint, restored (byte for byte: renames only) when it fails before."""

    def __init__(self, out: Path, aside: Path | None = None):
        self.out = out
        self.aside = aside or out / f"{ASIDE_PREFIX}{os.getpid()}"

    def move_aside(self) -> None:
        self.aside.mkdir()
        for path in run_files(self.out):
            os.replace(path, self.aside / path.name)

    def drop(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self) -> None:
        """Remove what the new run wrote, then move the old run's files back."""
        if not self.aside.is_dir():
            return
        for path in run_files(self.out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for path in self.aside.iterdir():
            os.replace(path, self.out / path.name)
        self.aside.rmdir()


def prepare_output(out: Path, resume: bool, overwrite: bool, main: bool) -> tuple[Path | None, ReplacedRun | None]:
    """Check the output folder before anything is written: (the checkpoint to resume from, or None for a fresh run;
    the old run this one replaces, or None). Nothing is deleted here."""
    if main:
        recover_replaced(out)
    ckpt_dir = out / CHECKPOINTS
    if resume:
        last = resume_checkpoint(ckpt_dir)
        if main:  # half-written checkpoints of a killed run
            for leftover in ckpt_dir.glob(".staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        return last, None
    if holds_run(out) and not overwrite:
        raise ConfigError(f"{out} already holds a run. Fix: --resume to continue it, `overwrite=true` to start "
                          "over, or another --output")
    return None, ReplacedRun(out) if run_files(out) and main else None


def check_output_outside_model(out: Path, model: Path) -> None:
    """Refuse an output folder that is the model folder or inside it: the adapter files there would make the model
    folder look like an adapter, and an overwrite would touch the model's files."""
    out_r, model_r = out.expanduser().resolve(), model.expanduser().resolve()
    if out_r == model_r or model_r in out_r.parents:
        where = "the model folder" if out_r == model_r else f"inside the model folder {str(model)!r}"
        raise ConfigError(f"`output`={str(out)!r} is {where}; the run's files there would make transformers take the "
                          f"model for an adapter. Fix: write the run to a folder of its own, e.g. "
                          f"--output runs/{model_r.name}-lamda")

def checkpoint_read_error(checkpoint: Path, exc: BaseException) -> TrainingError | None:
    """The error to show when resuming from `checkpoint` failed with `exc` while reading its pickled optimizer,
    scheduler or RNG files (a checkpoint from before manifests, damaged), or None when `exc` is something else.

    torch's own message advises `weights_only=False`, which would run arbitrary code from the file: never shown.
    """
    import pickle

    text = str(exc)
    if not (isinstance(exc, pickle.UnpicklingError | EOFError) or "weights_only" in text
            or "PytorchStreamReader" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    reason = type(exc).__name__ + (f": {first[:120]}" if first and "weights_only" not in first else "")
    return TrainingError(f"{checkpoint} is damaged: one of its files cannot be read ({reason}). Fix: delete that "
                         "checkpoint folder; --resume then continues from the one before it")
