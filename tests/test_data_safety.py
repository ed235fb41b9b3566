"""Nothing lost, nothing silently corrupt (issue 12's data-loss half, issue 18 item 3): the real CLI in a subprocess
on a tiny Llama, one trained run shared by every row.

Each row runs one command and checks the exit code, that no traceback (and none of torch's `weights_only` advice)
reaches the user, a key phrase of the message, and for the rows that could destroy something, that every file of
the folder at stake is still there byte for byte. Rows that change files work on their own copy of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the shared run: 4 steps, checkpoints at 2 and 4
TRAIN = ["--quantize", "none", "--rank", "4", "--batch-size", "4", "--seq-len", "64", "--max-steps", "4", "--quiet",
         "save_steps=2", "save_total_limit=10", "eval_steps=2", "lr=5e-3", "precision=fp32", "freeze_b_steps=3"]


class World:
    """The shared inputs: a tiny model folder, a data file, one finished run, and a CLI runner."""

    def __init__(self, root: Path, tiny_run):
        self.root = root
        self.model = tiny_run.model_dir(root / "model")
        self.data = tiny_run.data(root / "train.jsonl")
        self.env = {**os.environ, **tiny_run.env(LAMDA_EDGE_CACHE=str(root / "cache"))}
        self.run_dir = root / "run"
        done = self.cli(["train", "--model", str(self.model), "--data", str(self.data), "--output",
                         str(self.run_dir), *TRAIN])
        assert done.returncode == 0, done.stderr[-3000:]

    def cli(self, args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lamda_edge.cli", *kv_last(args)], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def copy(self, what: Path, name: str) -> Path:
        target = self.root / "rows" / name
        shutil.copytree(what, target, symlinks=True)
        return target


def kv_last(args: list[str]) -> list[str]:
    """The key=value overrides moved after the flags, in order (the rows add both)."""
    kv = [a for a in args if "=" in a and not a.startswith("-")]
    return [a for a in args if a not in kv] + kv


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file (inside a safetensors file's tensor data)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    """The id of a process that has exited (not reused this soon on a machine of this size)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run) -> World:
    return World(tmp_path_factory.mktemp("safety"), tiny_run)


# ---- the row setups: each gets (world, its own folder under rows/) and returns the placeholders it adds -------------


def _victim_run(w: World, name: str) -> dict:
    """A copy of the shared run, its run config naming the copy as its output (as if it had been trained there)."""
    victim = w.copy(w.run_dir, name)
    config = victim / "run_config.yaml"
    config.write_text(config.read_text().replace(f"output: {w.run_dir}\n", f"output: {victim}\n"))
    return {"victim": victim}


def _victim_model(w: World, name: str) -> dict:
    return {"victim": w.copy(w.model, name)}


def _cwd(w: World, name: str) -> dict:
    cwd = w.root / "rows" / name / "work"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("the user's own work\n")
    return {"victim": cwd, "cwd": cwd}


def _damaged_adapter(w: World, name: str) -> dict:
    """A copy of the run whose adapter tensor file has 64 flipped bytes; beside the export's output, a folder a
    killed export left (its pid is gone)."""
    values = _victim_run(w, name)
    flip_bytes(values["victim"] / "lamda_adapter.safetensors")
    out_parent = w.root / "rows" / f"{name}-out"
    stale = out_parent / f".onnx.tmp-{dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half an export")
    return {**values, "out": out_parent / "onnx", "stale": stale}


def _damaged_newest_checkpoint(w: World, name: str, file: str = "lamda_adapter.safetensors") -> dict:
    values = _victim_run(w, name)
    flip_bytes(values["victim"] / "checkpoints" / "checkpoint-4" / file)
    return values


def _damaged_newest_optimizer(w: World, name: str) -> dict:
    return _damaged_newest_checkpoint(w, name, "optimizer.pt")


def _all_checkpoints_damaged(w: World, name: str) -> dict:
    values = _victim_run(w, name)
    for step in (2, 4):
        flip_bytes(values["victim"] / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt")
    return values


def _old_checkpoints_damaged_pickle(w: World, name: str) -> dict:
    """Checkpoints from before manifests (none), the newest one's optimizer state truncated."""
    values = _victim_run(w, name)
    for manifest in (values["victim"] / "checkpoints").rglob("manifest.json"):
        manifest.unlink()
    optimizer = values["victim"] / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])
    return values


def _moved_base(w: World, name: str) -> dict:
    """A copy of the run whose recorded base folder no longer exists (another machine, a cleaned cache)."""
    values = _victim_run(w, name)
    config = values["victim"] / "lamda_adapter.json"
    info = json.loads(config.read_text())
    config.write_text(json.dumps({**info, "base_model": str(w.root / "gone" / "model")}, indent=2))
    return {**values, "out": w.root / "rows" / f"{name}-out" / "onnx"}


SETUPS = {"run": _victim_run, "moved-base": _moved_base, "model": _victim_model, "cwd": _cwd,
          "damaged-adapter": _damaged_adapter, "damaged-checkpoint": _damaged_newest_checkpoint,
          "damaged-optimizer": _damaged_newest_optimizer, "all-damaged": _all_checkpoints_damaged,
          "old-damaged": _old_checkpoints_damaged_pickle}

TRAIN_OVER = ["train", "--model", "{model}", "--data", "{data}", "--output", "{victim}", *TRAIN, "overwrite=true"]
RESUME = ["train", "--output", "{victim}", "--resume", "--quiet"]

# (setup, command, exit code, key phrase, protect the victim byte for byte)
ROWS = [
    # export --output onto what it would delete (issue 12, data loss 1)
    pytest.param("run", ["export", "--adapter", "{victim}", "--output", "{victim}", "--overwrite"], 2,
                 "is the adapter folder", True, id="export-output-is-the-adapter"),
    pytest.param("run", ["export", "--adapter", "{victim}/", "--output", "{victim}/..", "--overwrite"], 2,
                 "contains the adapter folder", True, id="export-output-contains-the-adapter"),
    pytest.param("run", ["export", "--adapter", "{victim}", "--output", "{victim}/onnx", "--overwrite"], 2,
                 "is inside the adapter folder", True, id="export-output-inside-the-adapter"),
    pytest.param("run", ["export", "--adapter", "{victim}", "--output", "{victim}/checkpoints"], 2,
                 "is inside the adapter folder", True, id="export-output-onto-checkpoints-no-overwrite"),
    pytest.param("model", ["export", "--adapter", "{run}", "--model", "{victim}", "--output", "{victim}",
                           "--overwrite"], 2, "is the model folder", True, id="export-output-is-the-model"),
    pytest.param("model", ["export", "--model", "{victim}", "--output", "{victim}/onnx", "--overwrite"], 2,
                 "is inside the model folder", True, id="export-output-inside-the-model"),
    pytest.param("cwd", ["export", "--adapter", "{run}", "--output", ".", "--overwrite"], 2,
                 "is the current directory", True, id="export-output-is-the-cwd"),
    pytest.param("cwd", ["export", "--adapter", "{run}", "--output", "..", "--overwrite"], 2,
                 "contains the current directory", True, id="export-output-contains-the-cwd"),
    # train overwrite=true validates first and keeps the old run until the new one checkpoints (data loss 2)
    pytest.param("run", [*TRAIN_OVER, "--data", "{root}/missing.jsonl"], 2, "does not exist", True,
                 id="overwrite-missing-data"),
    pytest.param("run", [*TRAIN_OVER, "lamda.alpha=-1"], 2, "`alpha` should be", True, id="overwrite-invalid-alpha"),
    pytest.param("run", [*TRAIN_OVER, "--model", "{root}/no-model"], 2, "not a transformers model folder", True,
                 id="overwrite-missing-model"),
    pytest.param("run", [*TRAIN_OVER, "lr=1e9", "save_steps=100"], 2, "loss became", True,
                 id="overwrite-diverges-before-its-first-checkpoint"),
    pytest.param("run", [*TRAIN_OVER, "--max-steps", "0"], 2, "max_steps", True, id="overwrite-zero-steps"),
    # train --output onto the model (data loss 5)
    pytest.param("model", ["train", "--model", "{victim}", "--data", "{data}", "--output", "{victim}", *TRAIN], 2,
                 "is the model folder", True, id="train-output-is-the-model"),
    pytest.param("model", ["train", "--model", "{victim}", "--data", "{data}", "--output", "{victim}/runs/a",
                           *TRAIN], 2, "inside the model folder", True, id="train-output-inside-the-model"),
    # adapter integrity (data loss 3) and stale export folders (data loss 6)
    pytest.param("damaged-adapter", ["export", "--adapter", "{victim}", "--output", "{out}"], 2,
                 "lamda_adapter.safetensors is damaged", True, id="export-damaged-adapter"),
    # the base is recorded by folder, name and fingerprint id; a folder that moved asks for --model (issue 18, 3)
    pytest.param("moved-base", ["export", "--adapter", "{victim}", "--output", "{out}"], 2,
                 "is not a folder on this machine", True, id="export-recorded-base-moved"),
    # a damaged checkpoint on --resume: the newest intact one, saying so
    pytest.param("damaged-checkpoint", RESUME, 0, "resuming from the newest intact checkpoint, checkpoint-2", False,
                 id="resume-damaged-adapter-in-newest-checkpoint"),
    pytest.param("damaged-optimizer", RESUME, 0, "resuming from the newest intact checkpoint, checkpoint-2", False,
                 id="resume-damaged-optimizer-in-newest-checkpoint"),
    pytest.param("all-damaged", RESUME, 2, "every checkpoint", True, id="resume-every-checkpoint-damaged"),
    pytest.param("old-damaged", RESUME, 0, "resuming from the newest intact checkpoint, checkpoint-2", False,
                 id="resume-old-checkpoint-damaged-pickle"),  # no manifest: the archive's CRC finds the damage
]


@pytest.mark.parametrize("setup, command, code, phrase, protect", ROWS)
def test_row(world, request, setup, command, code, phrase, protect):
    name = request.node.callspec.id
    values = {"model": world.model, "data": world.data, "run": world.run_dir, "root": world.root,
              **SETUPS[setup](world, name)}
    args = [part.format(**values) for part in command]
    before = snapshot(values["victim"])
    done = world.cli(args, cwd=values.get("cwd", REPO))
    output = done.stdout + done.stderr
    assert done.returncode == code, output[-3000:]
    assert "Traceback" not in output and "weights_only" not in output, output[-3000:]
    assert phrase in output, output[-3000:]
    if protect:
        assert snapshot(values["victim"]) == before, "a file of the previous run changed"
        assert not list(values["victim"].glob(".replaced-run-*"))
    if "stale" in values:
        assert not values["stale"].exists(), "the folder a killed export left is still there"


def test_a_good_checkpoint_survives_a_diverging_run(world):
    """warmup_steps=1, lr=1e9: step 1 changes nothing (lr 0), step 2 throws S and B to about 1e9 (a loss that
    still looks normal behind RMSNorm), then the weights or the loss turn NaN. The kept checkpoint is checkpoint-1,
    with finite, sane weights from before the update that diverged (it used to keep weights around 1e9), although
    save_total_limit=1: unconfirmed checkpoints come on top of the limit."""
    from safetensors.torch import load_file

    out = world.root / "rows" / "diverging"
    # one rate for S and B (the paper's, not the default per-group multiples): at S's default multiple the update of
    # step 2 already makes the next eval NaN, before any checkpoint waits for confirmation
    done = world.cli(["train", "--model", str(world.model), "--data", str(world.data), "--output", str(out),
                      *TRAIN, "--max-steps", "8", "save_steps=1", "save_total_limit=1", "lr=1e9", "warmup_steps=1",
                      "s_lr_scale=1", "b_lr_scale=1"])
    output = done.stdout + done.stderr
    stopped = "loss became nan" in output or "holds NaN or inf" in output  # whichever shows the divergence first
    assert done.returncode == 2 and stopped and "Traceback" not in output, output[-3000:]
    assert re.search(r"Removed checkpoint-2\b", output), output[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    reference = load_file(str(world.run_dir / "checkpoints" / "checkpoint-2" / "lamda_adapter.safetensors"))
    scale = max(float(t.float().abs().max()) for k, t in reference.items() if k.endswith(("lamda_S", "lamda_B")))
    kept = load_file(str(out / "checkpoints" / "checkpoint-1" / "lamda_adapter.safetensors"))
    for key, tensor in kept.items():
        assert torch.isfinite(tensor.float()).all(), f"{key} is not finite"
        if key.endswith(("lamda_S", "lamda_B")):
            assert float(tensor.float().abs().max()) < 10 * scale, f"{key} exploded"


INTERRUPT_AT = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from lamda_edge.cli import main
    import lamda_edge.train.recipe as t

    class Marker(TrainerCallback):  # after optimizer step N: say so, then give the test time to press Ctrl-C
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[1]):
                open(sys.argv[2], "w").write("ready")
                time.sleep(3)

    real = t.train
    t.train = lambda config, resume=False, callbacks=None, progress=True: real(config, resume, [Marker()], progress)
    sys.exit(main(sys.argv[3:]))
""")


def test_ctrl_c_saves_the_step_and_prints_the_resume_command(world):
    """A real SIGINT during step 3 of 4: the run finishes step 3, saves checkpoint-3 (not a save step), prints the
    exact command, exits 130; that command ends bitwise where the uninterrupted run ended."""
    from safetensors.torch import load_file

    rows = world.root / "rows"
    rows.mkdir(exist_ok=True)
    out, marker, script = rows / "interrupted", rows / "ready", rows / "interrupt.py"
    script.write_text(INTERRUPT_AT)
    args = kv_last(["train", "--model", str(world.model), "--data", str(world.data), "--output", str(out), *TRAIN])
    proc = subprocess.Popen([sys.executable, str(script), "2", str(marker), *args], cwd=REPO, env=world.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped at step 3 of 4" in stderr, stderr[-3000:]
    command = stderr.split("Continue with:\n")[1].splitlines()[0].split()
    assert command == ["lamda-edge", "train", "--output", str(out), "--resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "lamda_adapter.safetensors").exists()
    done = world.cli(command[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    expected = load_file(str(world.run_dir / "lamda_adapter.safetensors"))
    got = load_file(str(out / "lamda_adapter.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_the_run_folder_follows_the_umask_and_our_file_names(world):
    """Adapter, metrics and plot files have the Trainer's mode (0666 less the umask); the adapter's names are our
    own, and it records the sha256 of its tensors and a portable identity of its base."""
    umask = os.umask(0)
    os.umask(umask)
    run = world.run_dir
    expected = 0o666 & ~umask
    trainer_file = run / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    for path in (run / "lamda_adapter.safetensors", run / "lamda_adapter.json", run / "metrics.json",
                 run / "loss_curve.png", run / "run_config.yaml", trainer_file):
        assert path.stat().st_mode & 0o777 == expected, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"
    assert not (run / "adapter_config.json").exists() and not (run / "adapter_model.safetensors").exists()
    info = json.loads((run / "lamda_adapter.json").read_text())
    assert info["weights_sha256"] == hashlib.sha256((run / "lamda_adapter.safetensors").read_bytes()).hexdigest()
    assert info["base_name"] == "model" and len(info["base_id"]) == 16
    assert (run / "checkpoints" / "checkpoint-2" / "manifest.json").is_file()


def test_a_finished_run_is_replaced_only_by_a_run_that_trains(world):
    """overwrite=true that succeeds: the new run's files, none of the old one's, no folder left aside."""
    victim = world.copy(world.run_dir, "replaced")
    done = world.cli(["train", "--model", str(world.model), "--data", str(world.data), "--output", str(victim),
                      *TRAIN, "overwrite=true", "--max-steps", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((victim / "metrics.json").read_text())["global_step"] == 2
    assert not list(victim.glob(".replaced-run-*"))


def test_a_killed_replacement_gives_the_old_run_back(world):
    """A run killed while the old run sat aside (no checkpoint of its own yet): the next start moves it back."""
    victim = world.copy(world.run_dir, "killed-replacement")
    before = snapshot(victim)
    aside = victim / f".replaced-run-{dead_pid()}"
    aside.mkdir()
    for name in ("checkpoints", "lamda_adapter.json", "lamda_adapter.safetensors", "metrics.json", "run_config.yaml",
                 "loss_curve.png"):
        os.replace(victim / name, aside / name)
    (victim / "run_config.yaml").write_text("written by the killed run\n")
    done = world.cli(["train", "--model", str(world.model), "--data", str(world.root / "missing.jsonl"), "--output",
                      str(victim), *TRAIN, "overwrite=true"])  # recovers first, then fails on the data: no change
    assert done.returncode == 2 and "moved the previous run back" in done.stderr, done.stderr[-3000:]
    assert not aside.exists() and snapshot(victim) == before
