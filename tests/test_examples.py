"""Every run config in examples/ loads as a RunConfig, names its own command, and plans where `plan` applies."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from lamda_edge.train.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def header(path: Path, key: str) -> str | None:
    """The `# key: ...` line of a file's comment header, without the prefix."""
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.partition(":")[2].strip()
    return None


def test_there_are_examples():
    assert len(EXAMPLES) > 0
    names = {p.name for p in EXAMPLES}
    assert {"cpu-default.yaml", "rtx3060-llama3-8b.yaml", "orin-nano-qwen2.5-0.5b.yaml", "encoder-classifier.yaml",
            "lamda-plus-plus.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_and_names_its_command(path):
    config = load_run_config(path)
    config.lamda_config()  # the adapter block is a valid LaMDAConfig with the run's defaults filled in
    run = header(path, "run")
    assert run is not None, f"{path.name}: no `# run:` line in the header"
    relative = path.relative_to(REPO).as_posix()
    command = shlex.split(run)
    assert command[:4] == ["lamda-edge", "train", "--config", relative]
    assert all("=" in word for word in command[4:]), f"{path.name}: after the config only key=value overrides"


@pytest.mark.parametrize("path", [p for p in EXAMPLES if header(p, "plan")],
                         ids=[p.stem for p in EXAMPLES if header(p, "plan")])
def test_example_plans_and_fits(path, capsys):
    from lamda_edge.cli import main

    command = shlex.split(header(path, "plan"))
    assert command[:3] == ["lamda-edge", "plan", "--config"]
    assert main(command[1:] + ["--json"]) == 0  # 0: the planned run fits its device
    import json

    result = json.loads(capsys.readouterr().out)
    config = load_run_config(path, None, [a for a in command[4:] if "=" in a])
    assert result["seq_len"] == config.seq_len and result["fits"]
    if config.rank is not None:
        assert result["rank"] == config.rank
    if config.batch_size is not None:
        assert (result["batch_size"], result["grad_accum"]) == (config.batch_size, config.grad_accum)
