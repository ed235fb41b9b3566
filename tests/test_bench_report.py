"""The benchmark tools' `--report`: records from several runs pooled into mean, min-max and sd (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import _bench_common as bc  # noqa: E402
import bench_quality as bq  # noqa: E402


def _record(method: str, seed: int, value: float, **extra) -> dict:
    return {"task": "moby", "method": method, "seed": seed, "init": "principal", "freeze_fraction": 0.3,
            "rank": 8, "lr": 2e-4, "steps": 20, "batch": 2, "seq_len": 128, "trainable_start": 100,
            "trainable_end": 10, "metric": "perplexity", "value": value, "mode": "full", **extra}


def test_report_pools_seeds_and_keeps_the_last_record_of_a_rerun(tmp_path, capsys):
    first = [_record("lamda", 0, 80.0), _record("lora", 0, 77.0),
             {"task": "moby", "method": "lora", "seed": 1, "error": "RuntimeError: boom", "mode": "full"}]
    second = [_record("lamda", 0, 76.0), _record("lamda", 1, 78.0), _record("lamda", 2, 77.0),
              _record("lora", 1, 79.0, mode="quick")]
    # passed as c, b on purpose: the files are read in name order, so c.jsonl's rerun of seed 0 comes last
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in second))
    rows = bc.read_results([str(tmp_path / "c.jsonl"), str(tmp_path / "b.jsonl")])
    assert len(rows) == 5  # the error and the quick-mode record are left out

    pooled = bq.pooled(rows)
    lamda = sorted(r["value"] for r in pooled if r["method"] == "lamda")
    assert lamda == [76.0, 77.0, 78.0]  # seed 0's rerun (76.0, in c.jsonl) replaced its first record (80.0)

    bc.report(pooled, bq.table, str(tmp_path / "t.md"))
    table = (tmp_path / "t.md").read_text()
    lamda_row = next(line for line in table.splitlines() if line.startswith("| lamda |"))
    assert "| 77.000 | 76.000-78.000 (sd 1.000) |" in lamda_row
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "| 0 | 77.000 | - |" in lora_row  # one seed: no spread
    assert capsys.readouterr().out.strip() == table.strip()


def test_exported_table_names_the_base_an_adapter_trained_on():
    """bench_exported's rows say which base the adapter trained on: lamda (float32) or lamda-nf4 (--quantize nf4)."""
    import bench_exported as be

    def row(quantize):
        metrics = {b: {"value": 0.5, "format_rate": 0.25, "answer_loss": 1.0} for b in be.BACKENDS}
        sizes = {f"{b}_bytes": 1e6 for b in ("fp32", "int4", *be.VARIANT_FILES)}
        return {"task": "gsm", "seed": 0, "model": "lamda", "metric": "exact_match", "quantize": quantize,
                "fp32_max_abs_diff": 1e-4, "block_size": 32, **metrics, **sizes}

    lines = be.table([row(None), row("nf4")]).splitlines()
    assert [line.split(" | ")[1] for line in lines if line.startswith("| gsm |")] == ["lamda", "lamda-nf4"]
    assert [line.split(" | ")[0] for line in lines if line.startswith("| lamda")] == ["| lamda", "| lamda-nf4"]
