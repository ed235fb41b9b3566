"""What each LaMDA init costs in memory and buys in quantization error on an NF4 base, at step 0.

Usage:
    .venv/bin/python tools/init_quant_error.py --rank 16 --out docs/results/init/quant_error.jsonl
    .venv/bin/python tools/init_quant_error.py --model DIR --inits principal random-residual --rank 8

For each init the model is loaded with `load_lamda_model(quantize="nf4")` (SVD on the full-precision weights, then
NF4 of the base) and compared with the full-precision model (default: SmolLM2-135M-Instruct, Q4_1-round-tripped):

- weight error: the loader's ||W0 - (Q(W_base) [+ frozen part] + s B S A)|| / ||W0|| over all targeted weights, and
  plain NF4's ||W0 - Q(W0)|| / ||W0|| (`prepare_report`: quant_error, plain_nf4_error);
- output error: ||logits - logits_fp32|| / ||logits_fp32|| on a fixed English text, and the share of positions
  whose greedy next token equals the full-precision model's;
- memory: the bytes of the targeted layers as held for training: the NF4 base (packed codes and quantization
  constants), the adapter (A, S, B, float32) and the base's frozen low-rank part (init "random-residual", float32).

At step 0 "principal" and "random-residual" quantize the same residual and compute the same function; "random"
and "minor" quantize (most of) W0, as plain NF4 does. One JSON line per init is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
        "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
        "of the world. A farmer has 12 cows and buys 7 more; each cow gives 9 litres of milk a day. How many litres "
        "does the farmer get in a week? Water boils at one hundred degrees at sea level.")


def layer_bytes(model) -> dict[str, int]:
    """Bytes of the targeted layers: NF4 base (codes + constants), adapter (A, S, B), frozen low-rank part."""
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.adapters.bnb import is_linear4bit

    out = {"base_nf4": 0, "adapter": 0, "frozen_part": 0}
    for _, layer in lamda_layers(model):
        base = layer.base_layer
        out["base_nf4"] += base.weight.data.nbytes
        if is_linear4bit(base):
            state = base.weight.quant_state
            out["base_nf4"] += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                out["base_nf4"] += state.state2.absmax.nbytes + state.state2.code.nbytes
        out["adapter"] += sum(getattr(layer, k).nbytes for k in ("lamda_A", "lamda_S", "lamda_B"))
        if layer.frozen_rank:
            out["frozen_part"] += layer.frozen_U.nbytes + layer.frozen_Vt.nbytes
    return out


def measure(model_dir: Path, init: str, rank: int, ids: torch.Tensor, reference: torch.Tensor) -> dict:
    from lamda_edge import LaMDAConfig
    from lamda_edge.load.loader import load_lamda_model

    t0 = time.perf_counter()
    model = load_lamda_model(model_dir, LaMDAConfig(rank=rank, alpha=2.0 * rank, init=init), quantize="nf4",
                             device="cpu", compute_dtype=torch.float32, cache_dir=False, progress=False)
    report = model.lamda_state.prepare_report
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (1, T, vocab)
    return {"init": init, "rank": rank, "layers": len(report["layers"]),
            "weight_error": report["quant_error"], "plain_nf4_weight_error": report["plain_nf4_error"],
            "output_rel_error": float((logits - reference).norm() / reference.norm()),
            "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            "bytes": layer_bytes(model), "tokens": int(ids.shape[1]), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a transformers folder (default: the built-in SmolLM2-135M)")
    p.add_argument("--inits", nargs="+", default=["principal", "random-residual", "random", "minor"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append one JSON line per init here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_edge.demo.default_model import default_model_path

    model_dir = Path(a.model) if a.model else default_model_path(progress=False)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt").input_ids  # (1, T)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = full(input_ids=ids).logits.float()
    del full
    machine = bc.machine_info()
    for init in a.inits:
        row = {**measure(model_dir, init, a.rank, ids, reference), "model": model_dir.name, "machine": machine}
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
