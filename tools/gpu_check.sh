#!/usr/bin/env bash
# Usage: tools/gpu_check.sh [WORK_DIR]
#
# On a machine with a CUDA GPU (and `pip install -e '.[demo,onnx]'` done): runs
#   1. the default job (`lamda-edge train`, SmolLM2-135M, NF4 base on the GPU, bf16 or fp16) for 20 steps,
#   2. `lamda-edge plan --device auto --model <default model> --json --measure`,
#   3. `lamda-edge export` of the trained adapter (merge -> ONNX -> validate),
# and writes the numbers (GPU name, precision, peak memory, tokens/s, times, plan vs measured peak, export
# validation) to docs/gpu-check.md. Exits non-zero if a step fails; the raw outputs stay in WORK_DIR
# (default: runs/gpu-check).
set -euo pipefail

cd "$(dirname "$0")/.."
WORK="${1:-runs/gpu-check}"
PY="${PYTHON:-python}"
CLI=("$PY" -m lamda_edge.cli)
mkdir -p "$WORK"

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch; run this on a GPU machine")
PYEOF

MODEL_DIR="$("$PY" -c 'from lamda_edge.default_model import default_model_path; print(default_model_path())')"

echo "== 1/3 train: default job, 20 steps" >&2
start=$(date +%s)
"${CLI[@]}" train --output "$WORK/demo" --max-steps 20 overwrite=true 2>&1 | tee "$WORK/train.log"
train_s=$(( $(date +%s) - start ))

echo "== 2/3 plan --measure" >&2
start=$(date +%s)
set +e
"${CLI[@]}" plan --device auto --model "$MODEL_DIR" --seq-len 256 --json --measure > "$WORK/plan.json" 2> "$WORK/plan.err"
plan_rc=$?
set -e
plan_s=$(( $(date +%s) - start ))

echo "== 3/3 export" >&2
start=$(date +%s)
set +e
"${CLI[@]}" export --adapter "$WORK/demo" --output "$WORK/demo-onnx" --overwrite > "$WORK/export.log" 2>&1
export_rc=$?
set -e
export_s=$(( $(date +%s) - start ))

"$PY" - "$WORK" "$train_s" "$plan_s" "$plan_rc" "$export_s" "$export_rc" <<'PYEOF'
import json, os, subprocess, sys, tempfile
from pathlib import Path

work, train_s, plan_s, plan_rc, export_s, export_rc = sys.argv[1], *map(int, sys.argv[2:])
import torch

props = torch.cuda.get_device_properties(0)
m = json.loads((Path(work) / "demo" / "metrics.json").read_text())
mib = lambda n: f"{n / 2**20:,.1f} MiB" if isinstance(n, (int, float)) else "n/a"
lines = [
    "# GPU check (tools/gpu_check.sh)",
    "",
    f"- GPU: {props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}), "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}",
    f"- Model: SmolLM2-135M-Instruct (Q4_1-round-tripped), base {m['quantize'] or 'full precision'}, "
    f"precision {m['precision']}",
    "",
    "## Default job, 20 steps (`lamda-edge train --max-steps 20`)",
    "",
    "| what | value |",
    "|---|---|",
    f"| optimizer steps | {m['global_step']} (rank {m['rank']}, batch {m['batch_size']}, {m['planned_by']}) |",
    f"| wall time (whole command, incl. demo eval before/after) | {train_s} s |",
    f"| training time | {m['seconds']:.1f} s |",
    f"| tokens/s (training, non-padding) | {m['tokens_per_second']:,.0f} |",
    f"| peak memory | {mib(m['peak_memory_bytes'])} ({m['peak_memory_kind']}) |",
    f"| trainable params before / after t_i | {m['trainable_params']['start']:,} / {m['trainable_params']['end']:,} |",
]
demo = m.get("demo")
if demo:
    b, a = demo["metrics_before"], demo["metrics_after"]
    lines.append(f"| demo accuracy before -> after | {b['accuracy']:.1%} -> {a['accuracy']:.1%} "
                 f"({demo['problems']} problems) |")
    lines.append(f"| demo answer loss before -> after | {b['answer_loss']:.3f} -> {a['answer_loss']:.3f} |")
lines += ["", "## Planner (`lamda-edge plan --device auto --model <default> --seq-len 256 --json --measure`)", ""]
try:
    p = json.loads((Path(work) / "plan.json").read_text())
    lines += [
        "| what | value |", "|---|---|",
        f"| exit code / time | {plan_rc} / {plan_s} s |",
        f"| device | {p.get('device')} |",
        f"| rank, batch, grad_accum | {p.get('rank')}, {p.get('batch_size')}, {p.get('grad_accum')} |",
        f"| predicted tensor peak | {mib(p.get('tensor_peak_bytes'))} |",
        f"| measured tensor peak | {mib(p.get('measured_tensor_peak_bytes'))} |",
        f"| predicted peak (with overhead) / budget | {mib(p.get('peak_bytes'))} / {mib(p.get('budget_bytes'))} |",
    ]
except (OSError, json.JSONDecodeError) as exc:
    lines.append(f"plan failed (exit {plan_rc}): {exc}; see {work}/plan.err")
lines += ["", "## Export (`lamda-edge export --adapter <run> --output <onnx>`)", "",
          f"exit code {export_rc} in {export_s} s; last lines of the log:", "", "```"]
log = (Path(work) / "export.log").read_text().splitlines()
lines += log[-12:] + ["```", ""]
out = Path("docs/gpu-check.md")
fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".gpu-check.", suffix=".md")
with os.fdopen(fd, "w") as fh:
    fh.write("\n".join(lines) + "\n")
os.replace(tmp, out)
print(f"wrote {out}")
PYEOF

test "$plan_rc" -eq 0 -o "$plan_rc" -eq 3
test "$export_rc" -eq 0
