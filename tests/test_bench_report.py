"""The benchmark tools' `--report`: records from several runs pooled into mean, min-max and sd (no training); stack
(d)'s planner-chosen checkpointing and its table."""

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


def test_stack_d_checkpoints_each_method_at_the_planner_choice_under_one_budget(tmp_path):
    """Stack (d)'s partial variant: LaMDA before t_i checkpoints half of the blocks; each NF4 method gets the fewest
    blocks whose predicted peak stays within that budget (QLoRA keeps more, so it never needs fewer), and the
    float-base methods take LaMDA's k; the markdown names each method's blocks."""
    import bench_memory

    folder = bc.tiny_llama_dir(tmp_path)
    methods = ("lamda-b", "lamda-s", "qlora", "lora", "lorafa")
    choice = bench_memory.planner_layers(folder, methods, batch=4, seq=256, rank=8, dtype="fp32")
    k = {m: c[0] for m, c in choice.items()}
    assert k["lamda-b"] == 1 and k["lora"] == k["lorafa"] == k["lamda-b"]  # 2 blocks: half is 1
    assert k["qlora"] >= k["lamda-b"] >= k["lamda-s"]
    for m in ("lamda-b", "lamda-s", "qlora"):
        _, predicted, budget = choice[m]
        assert predicted <= budget or k[m] == 2
    rows = [{"model": "tiny", "variant": "partial", "method": m, "batch_size": 4, "seq_len": 256, "rank": 8,
             "compute_dtype": "fp32", "device": "cpu", "measured_by": "LiveTensorCounter", "checkpoint_layers": k[m],
             "num_blocks": 2, "kept_bytes": 2**20 * (i + 1), "kept_vs_qlora": None, "resident_bytes": 2**20,
             "step_peak_above_bytes": 2**21, "peak_varies": False, "predicted_bytes": choice[m][1],
             "budget_bytes": choice[m][2], "median_step_s": None} for i, m in enumerate(methods)]
    table = "\n".join(bench_memory.markdown_d(rows))
    assert "stack (d), partial" in table and f"| {k['qlora']} of 2 |" in table
