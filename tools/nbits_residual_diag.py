"""Why does the int4 MatMulNBits residual of an NF4-trained adapter lose so much more than merged int4?

Measures Moby-Dick held-out perplexity (bench_quality's moby test blocks) of the adapter model in PyTorch with
weights replaced by exactly what ONNX Runtime's MatMulNBits quantizer produces (its own C++ `quantize_matmul_4bits`,
symmetric, blocks along the input), so the weights' effect is separated from the graph and its kernels:

    reference       the adapter as trained (NF4 residual dequantized exactly + LaMDA path)
    residual int4   every residual re-quantized to int4 (what `--int4-method nbits` holds), LaMDA path exact
    merged int4     every merged weight W_res + s B S A quantized to int4 (the adapted layers of `merged`)
    residual int4, block-mean error removed: the same with each block's mean error subtracted (is it the offset?)
    one layer / one projection kind at a time: only those residuals int4, the rest exact

Usage:
    PYTHONPATH=. .venv/bin/python tools/nbits_residual_diag.py --adapter RUN --threads 1 --per-layer
    PYTHONPATH=. .venv/bin/python tools/nbits_residual_diag.py --quantize nf4 --threads 1   # untrained, principal init
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import bench_quality as bq  # noqa: E402


def int4_dequantized(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """(d_out, d_in) fp32 -> the fp32 weight a symmetric MatMulNBits int4 node (blocks of `block` along d_in)
    computes with, quantized by ONNX Runtime's own kernel (as MatMulNBitsQuantizer does)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    d_out, d_in = weight.shape
    k_blocks = (d_in + block - 1) // block
    wt = np.zeros((k_blocks * block, d_out), dtype=np.float32)  # (K padded, N): the MatMul's B
    wt[:d_in] = weight.t().numpy()
    packed = np.zeros((d_out, k_blocks, block // 2), dtype=np.uint8)
    zero_point = np.zeros((d_out, (k_blocks + 1) // 2), dtype=np.uint8)
    scales = np.zeros((d_out, k_blocks), dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        quantize_matmul_4bits(packed, wt, scales, zero_point, block, d_out, k_blocks * block, True)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(d_out, k_blocks, block)  # low nibble first
    values = (codes.astype(np.float32) - 8.0) * scales[:, :, None]  # (N, k_blocks, block)
    return torch.from_numpy(values.reshape(d_out, -1)[:, :d_in].copy())


def check_against_kernel(weight: torch.Tensor, block: int) -> float:
    """max |int4_dequantized(W) - what ONNX Runtime's MatMulNBits computes for an identity input| (0 expected)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    d_out, d_in = weight.shape
    init = helper.make_tensor("W", TensorProto.FLOAT, (d_in, d_out), weight.t().contiguous().numpy().tobytes(), True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d_out])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    kw = dict(block_size=block, is_symmetric=True, accuracy_level=0, bits=4)
    q = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(**kw), **kw)
    q.process()
    sess = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.eye(d_in, dtype=np.float32)})  # (d_in, d_out) = W_q^T
    return float((torch.from_numpy(y).t() - int4_dequantized(weight, block)).abs().max())


class Split(nn.Module):
    """residual(x) + ((x A^T) S^T)(s B)^T with plain fp32 tensors; `weight` is swapped by the experiments."""

    def __init__(self, layer):
        from lamda_edge.adapters.bnb import dequantize_weight

        super().__init__()
        self.residual = dequantize_weight(layer.base_layer).contiguous()  # (d_out, d_in), exact NF4
        self.low = (layer.scaling * layer.lamda_B.detach().float()) @ layer.lamda_S.detach().float() @ \
            layer.lamda_A.detach().float()  # (d_out, d_in) = s B S A
        bias = getattr(layer.base_layer, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        self.weight = self.residual + self.low  # what the layer computes with now

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="an adapter folder (trained on an NF4 or a float base); "
                   "without it, SmolLM2's adapter as initialized (rank 8, principal, untrained) on --quantize's base")
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4", help="the base without --adapter")
    p.add_argument("--blocks", type=int, default=8, help="moby test blocks of 128 tokens")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block-mean", action="store_true", help="also the residual int4 without its block-mean error")
    p.add_argument("--per-layer", action="store_true", help="also one decoder layer / one projection kind at a time")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lamda-edge" / "bench-data"))
    p.add_argument("--out", default=None, help="append the results as JSON lines")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from lamda_edge.adapters.inject import lamda_layers
    from lamda_edge.export.merged import load_adapted

    if a.adapter:
        model, base, cfg = load_adapted(None, Path(a.adapter))
    else:
        base, quantize = bq.task_model_dir("moby"), None if a.quantize == "none" else a.quantize
        model = bc.build("lamda", base, 8, 2e-4, checkpointing=False, total_steps=0, lamda_quantize=quantize).model
        cfg = {"quantize": quantize}
    tok = AutoTokenizer.from_pretrained(str(base))
    _, held = bq.moby_text(Path(a.cache))
    test = bq.blocks(tok, held, 128)[: a.blocks]
    splits = {}
    for name, layer in lamda_layers(model):
        splits[name] = Split(layer)
        model.set_submodule(name, splits[name])
    model.eval()

    first = next(iter(splits.values()))
    print(json.dumps({"kernel_check_max_abs": check_against_kernel(first.residual, a.block_size)}), flush=True)
    q_res = {n: int4_dequantized(s.residual, a.block_size) for n, s in splits.items()}
    q_merged = {n: int4_dequantized(s.residual + s.low, a.block_size) for n, s in splits.items()}

    def rel(q, w):
        return float((q - w).norm() / w.norm())

    def without_block_mean(q, w):  # q - (the mean of q - w over each block of a row)
        err = (q - w).reshape(w.shape[0], -1, a.block_size)  # (d_out, k_blocks, block)
        return w + (err - err.mean(-1, keepdim=True)).reshape(w.shape)

    def ppl(label: str, quantized: set, merged: bool = False) -> dict:
        for n, s in splits.items():
            if n in quantized:
                s.weight = q_merged[n] if merged else q_res[n] + s.low
            else:
                s.weight = s.residual + s.low
        t = time.perf_counter()
        value = bq.block_perplexity(model, test)["value"]
        row = {"case": label, "n_quantized": len(quantized), "perplexity": value, "seconds": time.perf_counter() - t,
               "adapter": str(a.adapter), "quantize": cfg.get("quantize"), "block_size": a.block_size,
               "tokens": int(test.numel())}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return row

    # weight error of each layer: residual int4 vs merged int4, relative to the merged weight the layer computes
    errs = [{"layer": n, "residual_int4": rel(q_res[n] + s.low, s.weight), "merged_int4": rel(q_merged[n], s.weight),
             "residual_err_mean_over_sd": float((q_res[n] - s.residual).mean() / (q_res[n] - s.residual).std()),
             "merged_err_mean_over_sd": float((q_merged[n] - s.weight).mean() / (q_merged[n] - s.weight).std())}
            for n, s in splits.items()]
    worst = sorted(errs, key=lambda e: e["residual_int4"] / e["merged_int4"])[-5:]
    print(json.dumps({"mean_over_layers": {k: float(np.mean([e[k] for e in errs])) for k in errs[0] if k != "layer"},
                      "worst_residual_vs_merged": worst}), flush=True)

    every = set(splits)
    ppl("reference", set())
    ppl("residual int4 (all)", every)
    ppl("merged int4 (all adapted layers)", every, merged=True)
    if a.per_layer:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in splits})
        for kind in kinds:
            ppl(f"residual int4: {kind} only", {n for n in splits if n.endswith("." + kind)})
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in splits if ".layers." in n})
        for i in layers:
            ppl(f"residual int4: layer {i} only", {n for n in splits if f".layers.{i}." in n})
    if a.block_mean:
        q_res = {n: without_block_mean(q, splits[n].residual) for n, q in q_res.items()}
        ppl("residual int4, block-mean error removed (all)", every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
