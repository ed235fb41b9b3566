#!/usr/bin/env bash
# Usage: tools/gpu_acceptance.sh [WORK_DIR]
#
# The first run on a machine with a CUDA GPU (about 10 minutes on an H100/H200; no network needed). Extends
# tools/gpu_check.sh (the default job end to end, which needs the default model's wheel) with the planner's
# acceptance run:
#   1. the CUDA test subset (the tests that take a CUDA path when a GPU is present: NF4 layers, the memory model
#      against real steps, activation offload, the planner's device detection),
#   2. `lamda-edge plan --device auto --measure` over 10 configurations (tools/gpu_acceptance.py: a
#      SmolLM2-135M-shaped model and a Llama shape with random weights from configs saved with save_pretrained;
#      seq_len 256-4096; checkpointing on/off; NF4 and bf16 bases; activation offload on/off), predicted against
#      torch.cuda.max_memory_allocated and nvidia-smi,
#   3. the speed benchmark's CUDA rows (tools/bench_memory.py --device cuda, tiny and llama-1b-shape; run
#      before the grid so that its table goes under the grid's),
# and writes one table into docs/planner-accuracy.md (its `gpu` section). Logs stay in WORK_DIR (default
# runs/gpu-acceptance). Exits non-zero if a step fails.
#
# bitsandbytes (for NF4) may be missing there: carry its wheel. In the repo root, on a machine with pip and network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes
# This script installs every .whl/*.whl into /tmp/site (no index, no deps) before it starts.
set -euo pipefail

cd "$(dirname "$0")/.."
WORK="${1:-runs/gpu-acceptance}"
PY="${PYTHON:-python3}"
mkdir -p "$WORK"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_acceptance: no CUDA GPU visible to torch; run this on a GPU machine (or tools/gpu_acceptance.py --dry-run)")
print(f"gpu_acceptance: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
PYEOF

start=$(date +%s)
echo "== 1/3 CUDA test subset" >&2
set +e
timeout 240 "$PY" -m pytest -q -n 0 -p no:cacheprovider -x \
  tests/test_train_offload.py tests/test_planner_memory.py tests/test_planner_headroom.py tests/test_profiles.py \
  2>&1 | tee "$WORK/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "tests: exit $tests_rc after $(( $(date +%s) - start )) s" >&2

set +e
echo "== 2/3 speed benchmark, CUDA rows" >&2
timeout 150 "$PY" tools/bench_memory.py --device cuda --models tiny llama-1b-shape --methods qlora lamda-b \
  --stacks b --rounds 1 --steps 3 --compute-dtype bf16 --cache "$WORK/bench-cache" \
  --out "$WORK/bench.json" --markdown "$WORK/bench.md" > "$WORK/bench.log" 2>&1
bench_rc=$?
echo "== 3/3 plan --measure grid, the table" >&2
timeout 300 "$PY" tools/gpu_acceptance.py --work "$WORK" --bench-md "$WORK/bench.md" 2>&1 | tee "$WORK/grid.log"
grid_rc=${PIPESTATUS[0]}
set -e
echo "grid: exit $grid_rc, bench: exit $bench_rc, tests: exit $tests_rc; $(( $(date +%s) - start )) s in all" >&2
test "$grid_rc" -eq 0 && test "$tests_rc" -eq 0 && test "$bench_rc" -eq 0
