"""int4 quantizer settings against the answer loss of an exported GSM model (what costs the quality of int4).

Takes the folder that `tools/bench_exported.py --tasks gsm` exported (`WORK/gsm-s0-b32/onnx`), rebuilds the
int4 graph from its `model.onnx` with the export's quantizer (`quantize_int4`) under each setting below, and
measures the held-out answer loss of the GSM task (32 problems, teacher-forced) with ONNX Runtime:

    sym-b32          symmetric blocks of 32, int8 compute (accuracy_level 4): what `lamda-edge export --int4` does
    asym-b32         asymmetric blocks
    sym-b32-head-fp32  the tied output head left in fp32
    sym-b32-acc1     fp32 compute inside MatMulNBits (accuracy_level 1)
    sym-b16          blocks of 16 (`--block-size 16`)

Usage:
    .venv/bin/python tools/int4_variants.py --export WORK/gsm-s0-b32/onnx --threads 1 --out int4_variants.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402, F401  (offline settings for transformers)
import bench_exported as bx  # noqa: E402
import bench_quality as bq  # noqa: E402

VARIANTS = {  # name -> lamda_edge.export.quantize.quantize_int4 options
    "sym-b32": dict(block_size=32),
    "asym-b32": dict(block_size=32, symmetric=False),
    "sym-b32-head-fp32": dict(block_size=32, keep_tied_head=True),
    "sym-b32-acc1": dict(block_size=32, accuracy_level=1),
    "sym-b16": dict(block_size=16),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an exported GSM model folder (with model.onnx)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lamda-edge" / "bench-data"))
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime and torch threads (0 = their default)")
    p.add_argument("--out", default=None, help="append each result as a JSON line")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from lamda_edge.export.quantize import quantize_int4
    from lamda_edge.runtime.generate import OnnxDecoder
    from lamda_edge.runtime.session import session

    src = Path(a.export) / "model.onnx"
    if not src.is_file():
        raise SystemExit(f"{src} does not exist: pass the folder bench_exported.py exported the GSM model to")
    tok = AutoTokenizer.from_pretrained(str(bq.task_model_dir("gsm")))
    _, gsm = bq.task_data("gsm", tok, dict(bq.SETTINGS["gsm"]["full"]), Path(a.cache), random.Random(0))
    rows = [{"variant": "fp32", "answer_loss": bx.onnx_answer_loss(OnnxDecoder(session(src, a.threads or None)),
                                                                   gsm.eval), "bytes": src.stat().st_size}]
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.variants:
            dst = Path(tmp) / f"{name}.onnx"
            quantize_int4(src, dst, **VARIANTS[name])  # what `lamda-edge export --int4` runs, other options
            loss = bx.onnx_answer_loss(OnnxDecoder(session(dst, a.threads or None)), gsm.eval)
            rows.append({"variant": name, "answer_loss": loss, "bytes": dst.stat().st_size})
            dst.unlink()
    for row in rows:
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
