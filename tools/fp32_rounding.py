"""Is an fp32 ONNX-vs-PyTorch logit difference a real difference or float32 summation order?

Both engines are compared against a float64 evaluation of the same merged weights (PyTorch, `.double()`), on the
export validation's prefill case (B=2, T=8, P=0, seed 1). If ONNX Runtime is no further from float64 than PyTorch's
own float32 is, the difference is rounding. Evidence for `export.pipeline.TOLERANCE["fp32"]`.

Usage (1 thread):
    .venv/bin/python tools/fp32_rounding.py ADAPTER_DIR WORK_DIR
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from lamda_edge.export import graph
from lamda_edge.export.graph import DecoderWithCache, decoder_example, decoder_io_names
from lamda_edge.export.merged import load_merged, load_reference, save_merged
from lamda_edge.runtime.session import session


def main(adapter: Path, work: Path) -> None:
    torch.set_num_threads(1)
    work.mkdir(exist_ok=True, parents=True)
    if not (work / "merged").is_dir():
        merged, tokdir, _ = load_merged(None, adapter)
        save_merged(merged, tokdir, work / "merged")
        del merged
    ref = load_reference(work / "merged")
    if not (work / "model.onnx").exists():
        graph.export_decoder(ref, work / "model.onnx")
    sess = session(work / "model.onnx", threads=1)
    inputs, _ = decoder_io_names(ref.config.num_hidden_layers)
    args = decoder_example(ref.config, batch=2, seq=8, past=0, seed=1)
    with torch.no_grad():
        t32 = DecoderWithCache(ref)(*args)[0].numpy()
        r64 = copy.deepcopy(ref).double()
        t64 = DecoderWithCache(r64)(*[a.double() if a.is_floating_point() else a for a in args])[0].numpy()
    o32 = sess.run(["logits"], {n: a.numpy() for n, a in zip(inputs, args)})[0]
    scale = float(np.abs(t64).max())
    for name, value in (("PyTorch fp32 vs float64", np.abs(t32 - t64).max()),
                        ("ONNX Runtime fp32 vs float64", np.abs(o32 - t64).max()),
                        ("ONNX Runtime vs PyTorch fp32", np.abs(o32 - t32).max())):
        print(f"{name:32s} max |diff| {value:.3g}  ({value / scale:.2g} of max|logit| {scale:.3g})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
