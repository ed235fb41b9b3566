"""tools/nbits_residual_diag.py: its int4 weights are ONNX Runtime's, and the NF4-grid offset it found."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import nbits_residual_diag as diag  # noqa: E402

from lamda_edge.adapters.bnb import dequantize_weight, quantize_nf4  # noqa: E402


def test_int4_weights_are_what_matmulnbits_computes():
    """The emulated int4 weight equals ONNX Runtime's MatMulNBits on an identity input, for blocks of 32 and 16."""
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.02  # (d_out, d_in)
    for block in (32, 16):
        assert diag.check_against_kernel(weight, block) == 0.0
    assert not torch.equal(diag.int4_dequantized(weight), weight)  # it did quantize


def test_int4_of_nf4_grid_weights_has_a_positive_offset():
    """Rounding NF4's levels onto int4's uniform grid errs upward on average (docs/benchmarks.md, the nbits bullet);
    rounding Gaussian weights does not. The offset makes the error along an all-ones input several times larger
    (8.7x at d_in 512)."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    on_nf4_grid = dequantize_weight(quantize_nf4(weight, None, torch.float32, "cpu"))
    ones = torch.ones(512)
    seen = {}
    for label, w in (("gaussian", weight), ("nf4", on_nf4_grid)):
        err = diag.int4_dequantized(w) - w
        seen[label] = (float(err.mean() / err.std()), float((err @ ones).norm() / (w @ ones).norm()))
    assert abs(seen["gaussian"][0]) < 0.05 and seen["nf4"][0] > 0.25
    assert seen["nf4"][1] > 5 * seen["gaussian"][1]
