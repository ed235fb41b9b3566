"""Tests of lamda_edge/export/ship.py and the defaults a newcomer meets (issue 30): what to ship (`--ship DIR`),
`--format genai`'s precision following the adapter, and the units of the export summary.

One module fixture trains nothing: it saves a tiny Llama with a chat tokenizer and an adapter whose S and B moved
away from the spectral init on a full-precision base (the CPU default), then runs the real CLI twice: a plain
`--int8 --ship` export and a `--format genai --ship` export with its default precision.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run):
    from lamda_edge import LaMDAConfig, save_adapter
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.load.loader import load_lamda_model

    root = tmp_path_factory.mktemp("ship")
    os.environ["LAMDA_EDGE_CACHE"] = str(root / "cache")
    base = tiny_run.model_dir(root / "base")
    model = load_lamda_model(base, LaMDAConfig(rank=4, alpha=8.0), quantize=None, device="cpu",
                             compute_dtype=torch.float32, cache_dir=False, progress=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as training would: S and B away from their init
        for _, layer in lamda_layers(model):
            layer.lamda_S.add_(0.5 * torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(0.5 * torch.randn(layer.lamda_B.shape, generator=g))
    save_adapter(model, root / "adapter", metadata={"base_model": str(base), "quantize": None})
    out = {}
    for name, extra in (("plain", ["--int8"]), ("genai", ["--format", "genai"])):
        argv = ["export", "--adapter", str(root / "adapter"), "--output", str(root / name), "--ship",
                str(root / f"{name}-ship"), *extra]
        done = subprocess.run([sys.executable, "-m", "lamda_edge.cli", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**os.environ, **tiny_run.env()})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "\r" not in done.stdout + done.stderr and "\x1b[" not in done.stderr  # a log: plain lines
        report = json.loads((root / name / "export-report.json").read_text())
        out[name] = {"stdout": done.stdout, "report": report}
    return root, out


def _generate(folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lamda_edge.cli", "generate", "--model", str(folder), "--prompt",
                           "the cat sat", "--max-new-tokens", "8"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_genai_default_precision_follows_a_full_precision_adapter(exported):
    """`--format genai` with no --precision on an adapter trained on a full-precision base succeeds, with int8 (the
    graph that keeps its fine-tune), not int4; onnxruntime-genai runs that graph and agrees with `generate`."""
    root, out = exported
    report = out["genai"]["report"]
    assert report["options"]["precision"] == "int8" != "int4"
    assert "--precision auto is int8" in out["genai"]["stdout"]
    config = json.loads((root / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.int8.onnx"
    assert report["summary"]["ok"] and report["genai"]["greedy_match"] and report["genai"]["greedy_tokens_genai"]


def test_genai_auto_precision_rule():
    """The rule itself: int4 for an NF4-trained adapter or --int4, int8 otherwise, fp32 with the builder."""
    from lamda_edge.export.pipeline import ExportOptions, genai_precision

    def auto(quantize, **kw):
        options = ExportOptions(output=Path("unused-out"), adapter=Path("a"), format="genai", **kw)
        return genai_precision(options, quantize)[0]

    assert [auto("nf4"), auto(None), auto(None, int4=True), auto("nf4", int8=True)] == ["int4", "int8", "int4", "int8"]
    assert auto(None, genai_builder=True) == "fp32"


def test_the_summary_names_what_to_ship_with_its_size(exported):
    root, out = exported
    for name, graph in (("plain", "model.int8.onnx"), ("genai", "model.int8.onnx")):
        summary = out[name]["report"]["summary"]
        files = summary["ship"]["files"]
        assert files[0] == graph and "model.onnx" not in files and "merged" not in files
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
        assert ("genai_config.json" in files) is (name == "genai")
        shipped = root / f"{name}-ship"
        assert sorted(p.name for p in shipped.iterdir()) == sorted(files)
        size = sum((shipped / f).stat().st_size for f in files)
        assert summary["ship"]["mb"] == round(size / 1e6, 2)
        assert f"the device needs only {', '.join(files)}" in out[name]["stdout"]
        assert f"shipped {len(files)} files to {shipped}" in out[name]["stdout"]


@pytest.mark.parametrize("name", [pytest.param("plain", id="plain-int8"), pytest.param("genai", id="genai")])
def test_a_shipped_folder_generates_alone(exported, tmp_path, name):
    """The shipped folder, moved away from the export (which is then gone), generates what the export does."""
    root, _ = exported
    want = _generate(root / name, tmp_path)
    assert want.returncode == 0, want.stderr[-2000:]
    alone = tmp_path / "device" / "model"
    shutil.copytree(root / f"{name}-ship", alone)
    moved = root / f"{name}-moved"
    os.replace(root / name, moved)
    try:
        got = _generate(alone, tmp_path)
    finally:
        os.replace(moved, root / name)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout and got.stdout.strip()
    assert "model.int8.onnx" in got.stderr


def test_the_summary_prints_counts_as_counts(exported):
    """`greedy_matching_prefix` is a count of tokens (it once printed as 1600%); shares stay percentages <= 100%;
    perplexities measured on different numbers of tokens keep their own names."""
    from lamda_edge.export.summary import summary_lines

    _, out = exported
    summary = out["genai"]["report"]["summary"]
    prefix = summary["token_agreement"]["greedy_matching_prefix"]
    assert isinstance(prefix, int) and prefix > 1
    text = "\n".join(summary_lines(summary))
    assert f"greedy_matching_prefix {prefix} tokens" in text
    assert all(int(p) <= 100 for p in re.findall(r"(\d+)%", text)), text
    # perplexities on different texts are not set side by side as one: the genai package's 64 tokens are named
    report = out["genai"]["report"]
    tokens = report["genai"]["held_out_tokens"]
    assert tokens != report["int8"]["held_out_tokens"]
    assert summary["perplexity"]["pytorch"] == report["int8"]["ppl_pytorch"]
    assert summary["perplexity"][f"pytorch ({tokens} tokens)"] == report["genai"]["ppl_pytorch"]
    assert f"genai ({tokens} tokens)" in summary["perplexity"]


@pytest.mark.parametrize(
    "ship, expected",
    [
        pytest.param("{out}", "overlap", id="ship-is-output"),
        pytest.param("{out}/device", "overlap", id="ship-inside-output"),
        pytest.param("{adapter}", "is the adapter folder", id="ship-is-adapter"),
        pytest.param("{taken}", "already exists", id="ship-exists"),
    ],
)
def test_bad_ship_folders_exit_2_before_any_work(exported, tmp_path, capsys, ship, expected):
    from lamda_edge.cli import main

    root, _ = exported
    (tmp_path / "taken").mkdir()
    folder = ship.format(out=tmp_path / "out", adapter=root / "adapter", taken=tmp_path / "taken")
    code = main(["export", "--adapter", str(root / "adapter"), "--output", str(tmp_path / "out"), "--ship", folder])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and (root / "adapter" / "lamda_adapter.json").is_file()
