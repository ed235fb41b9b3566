"""Where the difference between a PEFT export and lamda-edge's model comes from: the same two models in float32
and in float64, and lamda-edge's own merged model against its unmerged one. A diagnostic, not a test.

usage:
    python tools/peft_float64_check.py --adapter RUN --peft EXPORT_DIR

RUN is a lamda-edge run folder, EXPORT_DIR its `lamda-edge export --format peft` folder. Prints one JSON object:

    peft32_vs_ours32         what the export's check measures (float32 forward of both)
    peft64_vs_ours64         both models cast to float64: what is left is in the weights themselves (W_res is a
                             float32 tensor whose rounding no rank-r LoRA on W0 carries; lora_B is stored in float32)
    ours32_vs_ours64,        each model's own float32 rounding on these ids
    peft32_vs_peft64
    ours_merged32_vs_ours32  lamda-edge's two forms of the same adapter, in float32
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--peft", required=True, type=Path)
    args = parser.parse_args()

    import peft

    from lamda_edge.adapters import merge_and_unload
    from lamda_edge.adapters.files import verify_adapter
    from lamda_edge.export import peft_check, peft_lora
    from lamda_edge.export.merged import resolve_base
    from lamda_edge.export.pipeline import HELD_OUT_TEXT

    cfg = verify_adapter(args.adapter)
    base = resolve_base(None, cfg, args.adapter)
    ours, _ = peft_lora.rebuild(base, args.adapter, cfg)
    ids = peft_check.check_ids(base, HELD_OUT_TEXT, ours.config.vocab_size,
                               getattr(ours.config, "max_position_embeddings", None))
    theirs = peft.PeftModel.from_pretrained(peft_check.load_original(base, cfg), str(args.peft)).eval()

    def out(model, dtype=torch.float32):
        model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            return model(input_ids=ids).logits.double()  # (2, T, V)

    ours32, ours64, peft32, peft64 = out(ours), out(ours, torch.float64), out(theirs), out(theirs, torch.float64)
    merged32 = out(merge_and_unload(copy.deepcopy(ours)))
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
    print(json.dumps({
        "ids_shape": list(ids.shape), "max_abs_logit": float(ours32.abs().max()),
        "peft32_vs_ours32": diff(peft32, ours32), "peft64_vs_ours64": diff(peft64, ours64),
        "ours32_vs_ours64": diff(ours32, ours64), "peft32_vs_peft64": diff(peft32, peft64),
        "ours_merged32_vs_ours32": diff(merged32, ours32),
    }, indent=1))


if __name__ == "__main__":
    main()
