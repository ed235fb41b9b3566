"""Check `lamda-edge export --format peft` on the real default model (SmolLM2-135M-Instruct, Q4_1-round-tripped
weights): adapters trained with `lamda-edge train`, each exported as a PEFT LoRA and checked by the export itself
with real PEFT on the original base. A measurement, not a test (the slow test in tests/test_export_peft.py runs one
short case).

usage:
    python tools/peft_export_check.py --work DIR [--adapter RUN ...] [--cases principal,random,energy,nf4]
                                      [--steps 6] [--out peft-export.md]

--adapter RUN: an existing run folder (e.g. the README's 60-step default job) is exported as it is. Each case of
--cases trains the default job for --steps steps (`lamda-edge train max_steps=N ...`, small held-out sets) with:

    principal   the default job's settings (principal init, uniform rank)
    random      lamda.init=random (S0 = 0: lora_B = B S)
    energy      lamda.rank_allocation=energy (LaMDA++: per-layer ranks -> rank_pattern)
    nf4         quantize=nf4 (the report adds the logits' difference against the NF4 model as trained)

Writes a markdown table to --out (its published copy is the "Export: PEFT LoRA" section of docs/benchmarks.md) and
the rows to <work>/peft-export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "principal": [],
    "random": ["lamda.init=random"],
    "energy": ["lamda.rank_allocation=energy"],
    "nf4": ["quantize=nf4"],
}
SHORT_RUN = ["demo_eval=8", "demo_generate=1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lamda_edge.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"lamda-edge {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def export_row(name: str, run: Path, work: Path) -> dict:
    out = work / f"{run.name}-peft"
    start = time.perf_counter()
    cli("export", "--adapter", str(run), "--output", str(out), "--format", "peft", "--overwrite")
    seconds = time.perf_counter() - start
    report = json.loads((out / "export-report.json").read_text())
    peft, config = report["peft"], json.loads((out / "adapter_config.json").read_text())
    diffs = peft["max_abs_diff"]
    return {
        "case": name, "run": str(run), "ok": report["summary"]["ok"], "init": report["source"]["init"],
        "rank_allocation": report["source"]["rank_allocation"], "quantize": report["source"]["quantize"],
        "r": config["r"], "rank_pattern_layers": len(config["rank_pattern"]),
        "ranks": sorted({config["r"], *config["rank_pattern"].values()}),
        "adapter_mb": report["sizes_bytes"]["adapter_model.safetensors"] / 1e6,
        "logits_diff": diffs["logits"], "nf4_diff": diffs.get("logits_vs_nf4_as_trained"),
        "nf4_argmax": peft.get("argmax_agreement_vs_nf4_as_trained"),
        "moves_by": peft["adapter_moves_logits_by"], "merged_weights_diff": diffs["merged_weights"],
        "floor": peft["lamda_edge_merged_vs_unmerged"], "max_abs_logit": peft["max_abs_logit"],
        "ids_shape": peft["ids_shape"], "tolerance": peft["tolerance"], "peft": peft["peft_version"],
        "export_s": seconds,
    }


def table(rows: list[dict], load: str) -> str:
    lines = [f"Machine: {os.cpu_count()}-core x86-64 CPU, load average at the end {load}.", "",
             "| case | init | ranks | quantize | adapter MB | max abs diff logits vs lamda-edge "
             "| lamda-edge merged vs unmerged | vs NF4 as trained (argmax agreement) | adapter moves logits by "
             "| merge_and_unload vs our merge | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = f"r={r['r']}" + (f", {r['rank_pattern_layers']} layers in rank_pattern ({min(r['ranks'])}-"
                                 f"{max(r['ranks'])})" if r["rank_pattern_layers"] else "")
        nf4 = f"{r['nf4_diff']:.3g} (argmax {r['nf4_argmax']:.0%})" if r["nf4_diff"] is not None else "-"
        lines.append(f"| {r['case']} | {r['init']}{' (LaMDA++)' if r['rank_allocation'] == 'energy' else ''} "
                     f"| {ranks} | {r['quantize'] or 'none'} | {r['adapter_mb']:.1f} | {r['logits_diff']:.3g} "
                     f"| {r['floor']:.3g} | {nf4} | {r['moves_by']:.3g} | {r['merged_weights_diff']:.3g} "
                     f"| {r['export_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--adapter", action="append", default=[], type=Path, help="an existing run to export")
    parser.add_argument("--cases", default="principal,random,energy,nf4")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("peft-export.md"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [export_row(f"given: {run.name}", run, args.work) for run in args.adapter]
    for name in [c for c in args.cases.split(",") if c]:
        run = args.work / f"train-{name}"
        cli("train", "--quiet", f"output={run}", f"max_steps={args.steps}", "overwrite=true", *SHORT_RUN, *CASES[name])
        rows.append(export_row(name, run, args.work))
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "peft-export.json").write_text(json.dumps(rows, indent=2) + "\n")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.write_text(table(rows, load))
    print(table(rows, load))


if __name__ == "__main__":
    main()
