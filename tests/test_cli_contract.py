"""The exit-code contract of the real CLI (issue 12): bad input ends in one line naming the file or value and the fix,
exit 2; does-not-fit exits 3; never a traceback.

Each row is one CLI call in a subprocess. `plan` and `devices` rows (no torch) start `python -m lamda_edge.cli`
afresh; the rows of `train`, `export` and `generate` go to one worker subprocess that imports the CLI once and runs
`main(argv)` per row, as `python -m lamda_edge.cli` does (exit code, stdout, stderr; an escaped exception prints its
traceback), so torch and transformers are imported once, not once per row.

One module fixture (`world`) trains a tiny run (2 steps, a checkpoint after each) and exports it once; rows that need
broken files copy what they need from it and break the copy. Rows that fail at argument or config validation never
reach a model load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NESTED = 100_000  # levels of `[` in the deeply nested JSON line (RecursionError in json.loads)
# `python -c` wrapper: the CLI with the shipped profiles read from argv[1] (a copy holding one malformed file)
PROFILES_WRAPPER = textwrap.dedent("""
    import runpy, sys
    from pathlib import Path
    import lamda_edge.planner.profiles as profiles
    root = Path(sys.argv[1])
    profiles.profiles_root = lambda: root
    sys.argv = ["lamda-edge", *sys.argv[2:]]
    runpy.run_module("lamda_edge.cli", run_name="__main__")
""")
# The worker: one JSON argv list per stdin line -> one JSON line {code, stdout, stderr} on the protocol channel (the
# process's original stdout; fd 1 then points at stderr, so nothing else can write into the protocol).
WORKER = textwrap.dedent("""
    import contextlib, io, json, os, sys, traceback
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from lamda_edge.cli import main
    for line in sys.stdin:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(json.loads(line))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        protocol.write(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\\n")
        protocol.flush()
""")


@dataclass
class World:
    """What the rows share: a tiny model folder, a data file, a trained run, its export, the environment."""

    root: Path
    model: Path
    data: Path
    run: Path
    onnx: Path
    env: dict

    def train_args(self, output: Path, *extra: str) -> list[str]:
        """`train` on the tiny model as the fixture ran it (2 steps, a checkpoint after each)."""
        return ["train", "--model", str(self.model), "--data", str(self.data), "--output", str(output), "--quiet",
                *TRAIN_PAIRS, *extra]


# t_i = 1 step: B has left the optimizer by checkpoint-1, so both checkpoints have the same files and sizes (the
# disk-full and file-size tests size their limits from checkpoint-1 to fail inside checkpoint-2). The rates are
# pinned (`lamda.rate_scale=1`, not scaled for the small batch): the tiny model's greedy text then runs to the
# context (generate-stops-at-the-context); whether a random tiny model meets eos first is chance
TRAIN_PAIRS = ["quantize=none", "rank=4", "batch_size=4", "seq_len=32", "max_steps=2", "save_steps=1",
               "save_total_limit=5", "precision=fp32", "eval_steps=1", "lamda.freeze_b_steps=1", "lamda.rate_scale=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run, run_export) -> World:
    root = tmp_path_factory.mktemp("contract")
    env = {**os.environ, **tiny_run.env(LAMDA_EDGE_CACHE=str(root / "cache"))}
    old = os.environ.get("LAMDA_EDGE_CACHE")
    os.environ["LAMDA_EDGE_CACHE"] = env["LAMDA_EDGE_CACHE"]
    try:
        from lamda_edge.train.config import load_run_config
        from lamda_edge.train.recipe import train

        model = tiny_run.model_dir(root / "model")
        data = tiny_run.data(root / "train.jsonl")
        run = root / "run"
        train(load_run_config(None, {"model": str(model), "data": str(data), "output": str(run)}, TRAIN_PAIRS),
              progress=False)
        onnx = root / "onnx"
        run_export(onnx, adapter=run)
    finally:
        if old is None:
            os.environ.pop("LAMDA_EDGE_CACHE", None)
        else:
            os.environ["LAMDA_EDGE_CACHE"] = old
    return World(root, model, data, run, onnx, env)


def run_cli(world: World, args: list[str], wrapper: str | None = None, prefix: list[str] | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m lamda_edge.cli ARGS` (or the `wrapper` script with ARGS) in a fresh process."""
    command = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "lamda_edge.cli"]
    return subprocess.run([*(prefix or []), *command, *args], cwd=REPO, env=world.env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def worker(world):
    """`worker(args)`: the CLI's `main(args)` in the module's one worker subprocess -> CompletedProcess."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=world.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def run(args: list[str]) -> subprocess.CompletedProcess:
        proc.stdin.write(json.dumps(args) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"the CLI worker died (exit {proc.poll()})"
        answer = json.loads(line)
        return subprocess.CompletedProcess(args, answer["code"], answer["stdout"], answer["stderr"])

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


# ---- broken inputs, each built in the row's own folder --------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip(path: Path, at: int = 200, count: int = 64) -> None:
    """Overwrite `count` bytes at offset `at` (the file keeps its length)."""
    data = bytearray(path.read_bytes())
    data[at:at + count] = bytes(255 - b for b in data[at:at + count])
    path.write_bytes(bytes(data))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def rtx3060_yaml() -> str:
    return (REPO / "profiles" / "devices" / "rtx3060.yaml").read_text()


def local_config(folder: Path, **changes) -> Path:
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, **changes}
    return write(folder / "config.json", json.dumps(cfg)).parent


def broken_profiles(tmp: Path) -> Path:
    """A copy of the shipped profiles with one malformed device and one malformed model among them."""
    root = copy(REPO / "profiles", tmp / "profiles")
    write(root / "devices" / "zz-broken.yaml", "name: [unclosed\n")
    write(root / "models" / "zz-broken.json", '{"name": "zz-broken", ')
    return root


def prompts_longer_than_seq_len(tmp: Path) -> Path:
    row = {"prompt": " ".join(["the cat sat on the mat"] * 8), "completion": " five"}
    return write(tmp / "long.jsonl", (json.dumps(row) + "\n") * 10)


def bom_then_bad_line(tmp: Path) -> Path:
    """Line 1 is valid after a UTF-8 byte-order mark; line 2 is malformed: the error must name line 2."""
    return write(tmp / "bom.jsonl", b"\xef\xbb\xbf" + b'{"text": "fine"}\n{"text": oops}\n')


PLAN = ["plan", "--device", "cpu"]  # `--device auto` would import torch to look for a GPU
RESUME = ["train", "--output", "{run}", "--resume", "--quiet"]
# Each row: (args with {placeholders}, expected exit code, key phrase (or a tuple of them), prepare(world, tmp) ->
# {placeholder: value}). The phrase is looked for in stderr (in stdout and stderr for exit 0).
ROWS = [
    # ---- the planner answers only what is true (no torch) ----
    pytest.param([*PLAN, "--rank", "0"], 2, "`rank` should be a positive integer", None, id="plan-rank-0"),
    pytest.param([*PLAN, "--batch-size", "0"], 2, "`batch_size` should be an integer >= 1", None,
                 id="plan-batch-size-0"),
    pytest.param([*PLAN, "--model", "smollm2-135m", "--rank", "1000"], 2, "at most 192", None,
                 id="plan-rank-above-layer"),
    pytest.param([*PLAN, "--model", "{cfg}"], 2, "`hidden_size` should be positive",
                 lambda w, t: {"cfg": local_config(t / "neg", hidden_size=-64)}, id="plan-config-negative-size"),
    pytest.param([*PLAN, "--model", "{cfg}"], 2, "`intermediate_size` should be positive",
                 lambda w, t: {"cfg": local_config(t / "zero", intermediate_size=0)}, id="plan-config-zero-size"),
    pytest.param([*PLAN, "--dataset-tokens", "-1"], 2, "`dataset_tokens` should be a positive integer", None,
                 id="plan-dataset-tokens-negative"),
    pytest.param([*PLAN, "--json", "--rank", "0"], 2, "`rank` should be", None, id="plan-json-exit-2"),
    pytest.param(["plan", "--json", "--device", "rtx3060", "--model", "llama-2-70b"], 3, "Smallest change", None,
                 id="plan-json-exit-3"),
    pytest.param([*PLAN, "--json", "--rank", "many"], 2, "invalid int value", None, id="plan-json-usage-error"),
    pytest.param(["plan", "--device", "{yaml}", "--json"], 0, '"device": "my-gpu"',
                 lambda w, t: {"yaml": write(t / "my-gpu.yaml", rtx3060_yaml().replace('name: "rtx3060"',
                                                                                      'name: "my-gpu"'))},
                 id="plan-custom-device-profile"),
    pytest.param(["plan", "--device", "{yaml}"], 2, "is not valid YAML",
                 lambda w, t: {"yaml": write(t / "bad.yaml", "name: [unclosed\n")}, id="plan-malformed-profile"),
    pytest.param(["plan", "--device", "{yaml}"], 2, "is not UTF-8",
                 lambda w, t: {"yaml": write(t / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))},
                 id="plan-non-utf8-profile"),
    pytest.param(["plan", "--device", "{tmp}/missing.yaml"], 2, "does not exist", None, id="plan-missing-profile"),
    pytest.param(["{profiles}", "devices"], 0, ("rtx3060", "skipping a malformed profile: "),
                 lambda w, t: {"profiles": broken_profiles(t)}, id="devices-with-a-malformed-shipped-profile"),
    pytest.param(["{profiles}", "plan", "--device", "cpu", "--model", "smollm2-135m"], 0, "verdict: FITS",
                 lambda w, t: {"profiles": broken_profiles(t)}, id="plan-with-a-malformed-shipped-profile"),
    pytest.param([*PLAN, "--model", "{folder}"], 2, "is not valid JSON",
                 lambda w, t: {"folder": write(t / "m" / "config.json", '{"hidden_size": ').parent},
                 id="plan-malformed-config-json"),
    pytest.param([*PLAN, "--model", "{folder}"], 2, "is not UTF-8",
                 lambda w, t: {"folder": write(t / "m" / "config.json", b'{"a": "\xff"}').parent},
                 id="plan-non-utf8-config-json"),
    pytest.param(["plan", "--config", "{yaml}"], 2, "is not UTF-8",
                 lambda w, t: {"yaml": write(t / "run.yaml", b"device: cpu\nmodel: caf\xe9\n")},
                 id="plan-non-utf8-run-config"),
    pytest.param(["plan", "--config", "{yaml}"], 2, "is not valid YAML",
                 lambda w, t: {"yaml": write(t / "run.yaml", "device: cpu\n  seq_len: [64\n")},
                 id="plan-malformed-run-config"),
    pytest.param(["plan", "--config", "{yaml}", "seq_len=64", "--json", "rank=4"], 0, '"seq_len": 64',
                 lambda w, t: {"yaml": write(t / "run.yaml", "device: cpu\n")}, id="plan-key-value-both-sides"),
    # ---- train: refused before any model loads ----
    pytest.param(["{train}", "--config", "{yaml}"], 2, "is not UTF-8",
                 lambda w, t: {"yaml": write(t / "run.yaml", b"lr: 1e-3\n# caf\xe9\n")}, id="train-non-utf8-config"),
    pytest.param(["{train}", "--config", "{yaml}"], 2, "is not valid YAML",
                 lambda w, t: {"yaml": write(t / "run.yaml", "lr: [1e-3\n")}, id="train-malformed-config"),
    pytest.param(["{train}", "training_args.max_grad_norm=abc"], 2, "`training_args.max_grad_norm` should be float",
                 None, id="train-training-args-wrong-type"),
    pytest.param(["{train}", "training_args.optim=no_such_optimizer"], 2, "TrainingArguments refuses", None,
                 id="train-training-args-refused-value"),
    pytest.param(["train", "seq_len=64", "--model", "{model}", "--quiet", "rnak=4"], 2, "Did you mean `rank`",
                 lambda w, t: {"model": w.model}, id="train-key-value-both-sides"),
    pytest.param(["{train}", "rank=64"], 2, "at most 16", None, id="train-rank-above-layer"),
    pytest.param(["{train}", "--output", "{file}/run"], 2, "which is a file",
                 lambda w, t: {"file": write(t / "a-file", "x")}, id="train-output-under-a-file"),
    pytest.param(["{train}", "--data", "{data}"], 2, "nested too deeply",
                 lambda w, t: {"data": write(t / "deep.jsonl", '{"text": ' + "[" * NESTED + "]" * NESTED + "}\n")},
                 id="train-deeply-nested-json-line"),
    pytest.param(["{train}", "--data", "{data}"], 2, ".jsonl line 2: malformed JSON",
                 lambda w, t: {"data": bom_then_bad_line(t)}, id="train-utf8-bom-is-not-an-error"),
    pytest.param(["{train}", "--data", "{data}", "seq_len=16"], 2, "the prompt fills seq_len=16",
                 lambda w, t: {"data": prompts_longer_than_seq_len(t)}, id="train-prompts-longer-than-seq-len"),
    pytest.param(["{train}", "--data", "{data}", "seq_len=16", "on_overflow=error"], 2, "raise seq_len to",
                 lambda w, t: {"data": prompts_longer_than_seq_len(t)}, id="train-row-longer-than-seq-len-error"),
    # ---- train: corrupt model files ----
    pytest.param(["{train}", "--model", "{model}"], 2, "model.safetensors is not a readable safetensors file",
                 lambda w, t: {"model": _truncated_model(w, t)}, id="train-truncated-base-model"),
    pytest.param(["{train}", "--model", "{model}"], 2, "config.json is not valid JSON",
                 lambda w, t: {"model": _model_with(w, t, "config.json", '{"model_type": "llama", ')},
                 id="train-corrupt-model-config"),
    # ---- train --resume: a damaged file in every checkpoint (none left to fall back to); the error names it ----
    pytest.param(RESUME, 2, "{damaged}", lambda w, t: _break_checkpoints(w, t, "trainer_state.json"),
                 id="resume-truncated-trainer-state"),
    pytest.param(RESUME, 2, "{damaged}", lambda w, t: _break_checkpoints(w, t, "*adapter*.safetensors"),
                 id="resume-truncated-checkpoint-adapter"),
    pytest.param(RESUME, 2, "{damaged}", lambda w, t: _break_checkpoints(w, t, "*adapter*.json"),
                 id="resume-truncated-checkpoint-adapter-config"),
    pytest.param(RESUME, 2, "{damaged}", lambda w, t: _break_checkpoints(w, t, "optimizer.pt"),
                 id="resume-truncated-optimizer"),
    pytest.param(RESUME, 2, "{damaged}", lambda w, t: _break_checkpoints(w, t, "rng_state.pth", flip),
                 id="resume-flipped-rng-state"),
    pytest.param(RESUME, 2, "run_config.yaml is not UTF-8", lambda w, t: _break_run_config(w, t),
                 id="resume-non-utf8-run-config"),
    # ---- export: a damaged adapter file; the error names it ----
    pytest.param(["export", "--adapter", "{adapter}", "--output", "{tmp}/out"], 2, "{damaged}",
                 lambda w, t: _adapter_with(w, t, ".json", truncate), id="export-truncated-adapter-config"),
    pytest.param(["export", "--adapter", "{adapter}", "--output", "{tmp}/out"], 2, "{damaged}",
                 lambda w, t: _adapter_with(w, t, ".json", lambda p: p.write_bytes(b'{"format": "\xff"}')),
                 id="export-non-utf8-adapter-config"),
    pytest.param(["export", "--adapter", "{adapter}", "--output", "{tmp}/out"], 2, "{damaged}",
                 lambda w, t: _adapter_with(w, t, ".safetensors", truncate), id="export-truncated-adapter"),
    pytest.param(["export", "--model", "{model}", "--output", "{tmp}/out"], 2,
                 "model.safetensors is not a readable safetensors file",
                 lambda w, t: {"model": _truncated_model(w, t)}, id="export-truncated-model"),
    pytest.param(["export", "--adapter", "{run}", "--output", "{file}/out"], 2, "which is a file",
                 lambda w, t: {"file": write(t / "a-file", "x"), "run": w.run}, id="export-output-under-a-file"),
    # ---- generate ----
    pytest.param(["generate", "--model", "{onnx}", "--prompt", ""], 2, "--prompt is empty",
                 lambda w, t: {"onnx": w.onnx}, id="generate-empty-prompt"),
    pytest.param(["generate", "--model", "{onnx}", "--prompt", "hi", "--temperature", "nan"], 2,
                 "--temperature should be a finite number", lambda w, t: {"onnx": w.onnx},
                 id="generate-temperature-nan"),
    pytest.param(["generate", "--model", "{onnx}", "--prompt", "the cat", "--no-chat-template",
                  "--no-repetition-guard", "--max-new-tokens", "1000000"], 0, "stopped by context",
                 lambda w, t: {"onnx": w.onnx}, id="generate-stops-at-the-context"),
]


def _truncated_model(world: World, tmp: Path) -> Path:
    model = copy(world.model, tmp / "model")
    truncate(model / "model.safetensors")
    return model


def _model_with(world: World, tmp: Path, name: str, text: str) -> Path:
    model = copy(world.model, tmp / "model")
    write(model / name, text)
    return model


def adapter_files(folder: Path) -> list[Path]:
    """The adapter's two files in `folder` (its JSON config and its tensors), whatever they are named."""
    return sorted(p for p in folder.iterdir() if "adapter" in p.name and p.suffix in (".json", ".safetensors"))


def _adapter_with(world: World, tmp: Path, suffix: str, damage) -> dict:
    """A copy of the trained adapter with its `suffix` file damaged."""
    adapter = tmp / "adapter"
    adapter.mkdir()
    for file in adapter_files(world.run):
        shutil.copy2(file, adapter / file.name)
    damaged = next(p for p in adapter_files(adapter) if p.suffix == suffix)
    damage(damaged)
    return {"adapter": adapter, "damaged": damaged.name}


def _stopped_run(world: World, tmp: Path) -> Path:
    """A copy of the trained run as if it had stopped after its last checkpoint (no final adapter, no metrics)."""
    run = copy(world.run, tmp / "run")
    for file in [*adapter_files(run), run / "metrics.json"]:
        file.unlink()
    return run


def _break_checkpoints(world: World, tmp: Path, pattern: str, damage=truncate) -> dict:
    """A stopped run whose every checkpoint has its `pattern` file damaged."""
    run = _stopped_run(world, tmp)
    damaged = [damage(file) or file for file in sorted(run.glob(f"checkpoints/checkpoint-*/{pattern}"))]
    assert len(damaged) == 2, damaged
    return {"run": run, "damaged": damaged[-1].name}


def _break_run_config(world: World, tmp: Path) -> dict:
    run = _stopped_run(world, tmp)
    write(run / "run_config.yaml", (run / "run_config.yaml").read_bytes() + b"# caf\xe9\n")
    return {"run": run}


FIX_WORDS = ("Fix:", "should be", "Did you mean", "Smallest change")  # how a message says what to do instead


@pytest.mark.parametrize("args, code, phrase, prepare", ROWS)
def test_cli_contract(world, worker, tmp_path, args, code, phrase, prepare):
    values = {"tmp": tmp_path, **(prepare(world, tmp_path) if prepare else {})}
    expanded = []
    for arg in args[1:] if args[0] == "{profiles}" else args:
        if arg == "{train}":
            expanded += world.train_args(tmp_path / "out")
        else:
            expanded.append(arg.format(**values) if "{" in arg else arg)
    if args[0] == "{profiles}":  # the CLI with the shipped profiles read from a copy holding malformed files
        done = run_cli(world, [str(values["profiles"]), *expanded], PROFILES_WRAPPER)
    elif expanded[0] in ("plan", "devices"):  # no torch: a fresh process is cheap
        done = run_cli(world, expanded)
    else:
        done = worker(expanded)
    output = done.stdout + done.stderr
    assert done.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for words in phrase if isinstance(phrase, tuple) else (phrase,):
        assert words.format(**values) in (output if code == 0 else done.stderr), output[-3000:]
    if code != 0:  # one clear line: the error, naming what is wrong and what to do (usage errors: the usage)
        lines = [line for line in done.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1, done.stderr[-3000:]
        assert any(word in lines[0] for word in FIX_WORDS) or "usage:" in done.stderr, lines[0]
    if "--json" in expanded:  # scripts read stdout: one JSON object on every exit
        answer = json.loads(done.stdout)
        assert answer["fits"] is (code == 0)
        if code:
            assert answer["exit_code"] == code and answer["error"]
        if code == 3:
            assert answer["smallest_change"] and answer["smallest_change"] in answer["error"]


def test_generate_stops_at_the_models_context(world):
    """Plain-ONNX generation ends at max_position_embeddings even when EOS is ignored (the GenAI path does too)."""
    from lamda_edge.runtime.generate import load_generator

    gen = load_generator(world.onnx)
    result = gen.generate("the cat sat", max_new_tokens=1_000_000, chat=False, ignore_eos=True)
    assert gen.context == 128  # tiny_run's model
    assert result.prompt_tokens + len(result.token_ids) == gen.context and result.stopped_by == "context"


def _tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _tmpfs_bytes(folder: Path) -> int:
    """What `folder`'s files take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


@pytest.mark.skipif(not _tmpfs_works(), reason="needs `unshare -rm` and a tmpfs mount (user namespaces)")
@pytest.mark.parametrize("left", [pytest.param(1, id="a-page-left"), pytest.param(2, id="half-a-checkpoint-left")])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(world, tmp_path, left):
    """A real full disk: the run's output on a private tmpfs with room for one checkpoint and a page or half of
    another (the same run as the fixture's, so the sizes are known): the second checkpoint fails in a different
    writer (safetensors, torch.save, json). Exit 2 with one line; checkpoint-1 stays whole."""
    from lamda_edge.train.trainer import check_checkpoint

    first = world.run / "checkpoints" / "checkpoint-1"
    one = _tmpfs_bytes(first)
    size = 4096 * 8 + one + (4096 if left == 1 else one // 2)  # run_config.yaml and folders, then the room
    mount, kept = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    script = ('mount -t tmpfs -o size="$1" none "$2" || exit 99; shift 2; "$@"; rc=$?; '
              f'cp -r "{mount}/run" "{kept}"; exit $rc')
    done = run_cli(world, world.train_args(mount / "run"),
                   prefix=["unshare", "-rm", "sh", "-c", script, "sh", str(size), str(mount)])
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "could not write" in done.stderr and "Fix:" in done.stderr, output[-3000:]
    kept_first = kept / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in kept_first.iterdir()) == sorted(p.name for p in first.iterdir())
    check_checkpoint(kept_first)
    assert not list((kept / "checkpoints").glob(".staging-*"))


# `python -c` wrapper: train, with the file-size limit (`ulimit -f`, argv[1] bytes) set during step 2's checkpoint,
# checkpoint-1 being whole: before it (argv[2] "adapter": the adapter's safetensors file is the first write), or once
# its adapter is written (argv[2] "optimizer": optimizer.pt, torch.save, is the next)
FILE_SIZE_LIMIT_WRAPPER = textwrap.dedent("""
    import resource, sys
    from transformers import TrainerCallback
    import lamda_edge.train.recipe as recipe
    import lamda_edge.train.trainer as trainer
    from lamda_edge.cli import main

    limit, at = int(sys.argv[1]), sys.argv[2]

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    class BeforeCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2 and at == "adapter":
                set_limit()

    save_adapter = trainer.LaMDATrainer._save

    def save_then_limit(self, *args, **kw):
        save_adapter(self, *args, **kw)
        if self.state.global_step == 2 and at == "optimizer":
            set_limit()

    trainer.LaMDATrainer._save = save_then_limit
    real = recipe.train
    recipe.train = lambda config, resume=False, callbacks=None, progress=True: real(config, resume,
                                                                                     [BeforeCheckpoint()], progress)
    sys.exit(main(sys.argv[3:]))
""")


def _ignore_sigxfsz() -> None:
    """As Python does at startup (said here, not assumed): a write past the limit fails with EFBIG instead of the
    signal killing the process."""
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("at", [pytest.param("optimizer", id="torch-save-optimizer"),
                                pytest.param("adapter", id="safetensors-adapter")])
def test_file_size_limit_while_checkpointing_exits_2_and_keeps_the_previous_checkpoint(world, tmp_path, at):
    """`ulimit -f` reached inside a checkpoint (RLIMIT_FSIZE set in the subprocess once checkpoint-1 is whole):
    torch.save's optimizer.pt (whose error says only "unexpected pos") or the adapter's safetensors file fails with
    EFBIG. Exit 2 with one line naming the limit and the fix, no traceback; checkpoint-1 stays whole, and no half
    checkpoint is left."""
    from lamda_edge.train.trainer import check_checkpoint

    first = world.run / "checkpoints" / "checkpoint-1"
    sizes = {p.name: p.stat().st_size for p in first.iterdir()}
    limit = sizes["optimizer.pt" if at == "optimizer" else "lamda_adapter.safetensors"] // 2
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_WRAPPER, str(limit), at, *world.train_args(run)],
                          cwd=REPO, env=world.env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_ignore_sigxfsz)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "ulimit -f" in done.stderr and "Fix:" in done.stderr, output[-3000:]
    assert "could not write" in done.stderr and "checkpoint-2" in done.stderr
    kept = run / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in kept.iterdir()) == sorted(sizes)
    check_checkpoint(kept)
    assert not (run / "checkpoints" / "checkpoint-2").exists()
    assert not list((run / "checkpoints").glob(".staging-*"))
