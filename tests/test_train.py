"""Tests of the training run (lamda_edge/train.py): a tiny Llama folder, a few steps, real SIGKILL and resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the cat sat on the mat and a dog ran to the park what is two plus three answer five seven".split()


def build_model_dir(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama (hidden 32, 2 layers) with a byte-level BPE tokenizer (vocab < 512), saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([" ".join(WORDS)] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=6)), "completion": " " + " ".join(rng.choices(WORDS, k=5))}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))


STALL = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from lamda_edge.cli import main
    import lamda_edge.train as t

    class Stall(TrainerCallback):  # after optimizer step N: say so, then wait to be killed
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[1]):
                open(sys.argv[2], "w").write("stalled")
                time.sleep(600)

    real = t.train
    t.train = lambda config, resume=False, callbacks=None, progress=True: real(config, resume, [Stall()], progress)
    sys.exit(main(sys.argv[3:]))
""")


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lamda_edge.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def train_args(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    """A run whose checkpoints (every 2 steps) fall before t_i=6 (B partly frozen) and after it (B wholly frozen)."""
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(out), "--quantize", "none",
            "--rank", "4", "--batch-size", "4", "--seq-len", "64", "--max-steps", "10", "--quiet",
            "freeze_b_steps=6", "save_steps=2", "save_total_limit=10", "eval_steps=5", "dropout=0.1", "lr=5e-3"]


def test_sigkill_and_resume_is_bitwise_exact(tmp_path, model_dir, data_file):
    import shutil

    env = {"LAMDA_EDGE_CACHE": str(tmp_path / "cache")}
    whole = run_cli(train_args(model_dir, data_file, tmp_path / "whole"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    marker = tmp_path / "stalled"
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc = subprocess.Popen([sys.executable, str(script), "7", str(marker),
                             *train_args(model_dir, data_file, killed)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no stall"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (killed / "adapter_model.safetensors").exists()
    # a second copy resumes from step 4, where B is only partly frozen (still in the optimizer)
    partial = tmp_path / "partial"
    shutil.copytree(killed, partial)
    shutil.rmtree(partial / "checkpoints" / "checkpoint-6")
    (partial / "checkpoints" / ".staging-8").mkdir()  # a half-written checkpoint of a killed run is ignored

    expected = adapter_tensors(tmp_path / "whole")
    for folder, resumed_from in ((killed, 6), (partial, 4)):
        done = run_cli(["train", "--output", str(folder), "--resume", "--quiet"], env)
        assert done.returncode == 0, done.stderr[-3000:]
        got = adapter_tensors(folder)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{key} differs after resuming from step {resumed_from}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["global_step"] == 10
    frozen = [v for k, v in expected.items() if k.endswith("lamda_B_frozen")]
    assert frozen and all(int(v) == 4 for v in frozen)
    # the run moved the adapter: S differs from its spectral init
    s_init = adapter_tensors(killed / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(s_init[k], expected[k]) for k in expected if k.endswith("lamda_S"))
