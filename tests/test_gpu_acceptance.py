"""tools/gpu_acceptance.{sh,py} without a GPU: the configuration list covers what issue 16 asks for, the dry run
builds the model configs and writes its table into its own section of the page, leaving the others alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_acceptance  # noqa: E402
from _doc_sections import read_section, replace_section  # noqa: E402


def test_the_grid_covers_the_issue():
    grid = gpu_acceptance.GRID
    assert len(grid) >= 8
    seqs = {seq for _, _, seq, *_ in grid}
    assert min(seqs) == 256 and max(seqs) == 4096
    assert {ckpt for *_, ckpt, _, _ in grid} == {True, False}
    assert {base for *_, base, _ in grid} == {"nf4", "bf16"}
    assert {offload for *_, offload in grid} == {True, False}
    assert {model for model, *_ in grid} == set(gpu_acceptance.MODELS)
    shape = gpu_acceptance.MODELS["smollm2-135m-shape"]  # SmolLM2-135M's own numbers
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]) == (576, 30, 49152)


def test_each_config_is_a_plan_command_the_cli_accepts(tmp_path):
    from lamda_edge.cli import build_parser, parse_args

    folders = gpu_acceptance.save_model_configs(tmp_path)
    for model, batch, seq, ckpt, base, offload in gpu_acceptance.GRID:
        argv = gpu_acceptance.plan_argv(folders[model], batch, seq, ckpt, base, offload)
        args = parse_args(build_parser(), argv)
        assert args.measure and args.json and args.device == ["auto"] and args.activation_offload == (offload or None)
        config = json.loads((folders[model] / "config.json").read_text())
        assert config["model_type"] == "llama" and config["hidden_size"] == gpu_acceptance.MODELS[model]["hidden_size"]


def test_dry_run_writes_its_section_and_keeps_the_others(tmp_path):
    page = tmp_path / "planner-accuracy.md"
    replace_section(page, "cpu-grid", "the CPU table", title="Planner accuracy")
    replace_section(page, "frontier", "the frontier")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_acceptance.py"), "--dry-run", "--work",
                           str(tmp_path / "work"), "--out", str(page)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_section(page, "cpu-grid") == "the CPU table" and read_section(page, "frontier") == "the frontier"
    gpu = read_section(page, "gpu")
    rows = [line for line in gpu.splitlines() if line.startswith("| ") and line[2:].split(" |")[0] in
            gpu_acceptance.MODELS]
    assert len(rows) == len(gpu_acceptance.GRID)
    assert "not run on a GPU yet" in gpu and "predicted, not measured" in gpu
    # running it again replaces the section instead of adding a second one
    subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_acceptance.py"), "--dry-run", "--work",
                    str(tmp_path / "work"), "--out", str(page)], check=True, capture_output=True, timeout=300,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert page.read_text().count("<!-- BEGIN gpu -->") == 1


def test_the_shell_script_parses_and_refuses_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_acceptance.sh")]).returncode == 0
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_acceptance.sh"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode != 0 and "no CUDA GPU" in done.stderr


def test_the_page_in_the_repo_has_every_section():
    page = ROOT / "docs" / "planner-accuracy.md"
    for name in ("cpu-grid", "frontier", "gpu"):
        assert read_section(page, name), name
