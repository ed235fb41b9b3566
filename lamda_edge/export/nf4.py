"""The adapter exported unmerged, its residual base quantized: NF4 as trained (MatMulBnb4), or int4/int8 MatMulNBits.

Each adapted linear layer is exported as its frozen residual base plus the LaMDA path, never merged:

    y = MatMulBnb4(x, W_res codes, absmax)  +  ((x A^T) S^T) (s B)^T  [+ (x Vt^T) U^T]     (+ bias)
        └── bitsandbytes' own packed NF4 codes and block absmax (double-quantized absmax expanded to fp32),
            so ONNX Runtime dequantizes exactly the weights training used; the low-rank paths stay fp32
            (the bracket: the base's frozen low-rank part U Vt of the "random-residual" init, also fp32).

How the graph is built: each `LaMDALinear` is swapped for an `_ExportLinear` whose residual is a plain fp32
weight (the exact NF4 dequantization, or the full-precision residual), the model goes through the ordinary
`export_decoder` / `export_encoder`, and then every MatMul whose constant weight is a residual (found by its
bytes, so whatever the exporter names or transposes it) is rewritten:

    scheme "nf4"  : MatMul(x, W_res^T) -> com.microsoft.MatMulBnb4(x, codes, absmax)     (quant_type 1 = NF4)
    scheme "int4" : MatMul(x, W_res^T) -> MatMulNBits(bits=4), symmetric blocks along the input
    scheme "int8" : MatMul(x, W_res^T) -> MatMulNBits(bits=8)

A base that training held in full precision is quantized here (`quantize_nf4` for "nf4"): only the spectral
residual W - s B S A loses precision; the top-r directions stay exact in the low-rank path. Embeddings, the head,
norms and trained `modules_to_save` stay as training held them (fp32).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lamda_edge.adapters.bnb import dequantize_weight, disable_cpu_repack, is_linear4bit, quantize_nf4
from lamda_edge.adapters.inject import lamda_layers
from lamda_edge.errors import ModelError, require
from lamda_edge.export import graph as export_graph
from lamda_edge.export.quantize import run_nbits_quantizer

SCHEMES = ("nf4", "int4", "int8")
NF4_QUANT_TYPE = 1  # MatMulBnb4's quant_type: 0 = FP4, 1 = NF4


# ---- bitsandbytes NF4 -> MatMulBnb4 tensors ------------------------------------------------------------------------


def nf4_tensors(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, int]:
    """(packed codes uint8 [(N*K+1)/2], absmax float32 [ceil(N*K/block)], block size) of a bitsandbytes NF4 layer.

    The codes are bitsandbytes' own bytes (row-major over the (d_out, d_in) weight, first value in the high nibble),
    which is MatMulBnb4's layout for B; a double-quantized absmax (`compress_statistics`) is expanded to fp32 the
    way `dequantize_4bit` expands it.
    """
    functional = require("bitsandbytes", package="bitsandbytes").functional
    weight = layer.weight
    state = weight.quant_state
    if getattr(state, "quant_type", "nf4") != "nf4":
        raise ModelError(f"the 4-bit base layer is {state.quant_type}, not nf4; MatMulBnb4 export handles nf4 only")
    absmax = state.absmax
    if state.nested:
        absmax = functional.dequantize_blockwise(absmax, state.state2) + state.offset
    codes = weight.data.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().copy()
    d_out, d_in = state.shape
    if codes.size != (d_out * d_in + 1) // 2:
        raise ModelError(f"packed NF4 weight has {codes.size} bytes for a {d_out}x{d_in} layer; bitsandbytes repacked "
                         "it (see DESIGN.md, CPU repack trap). Fix: call disable_cpu_repack before any forward")
    return codes, absmax.detach().float().cpu().numpy().reshape(-1).copy(), int(state.blocksize)


def nf4_dequantize(codes: np.ndarray, absmax: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """The fp32 (d_out, d_in) weight MatMulBnb4 computes with: NF4 table[code] * absmax[block]. For tests."""
    functional = require("bitsandbytes", package="bitsandbytes").functional
    table = functional.get_4bit_type("nf4", device="cpu").float().numpy()
    nibbles = np.stack([codes >> 4, codes & 0x0F], axis=-1).reshape(-1)[: shape[0] * shape[1]]
    values = table[nibbles].reshape(-1) * np.repeat(absmax, block)[: nibbles.size]
    return values.astype(np.float32).reshape(shape)


def _check_layout(name: str, nf4: tuple, weight: torch.Tensor) -> None:
    """The codes read in MatMulBnb4's layout must give bitsandbytes' own dequantized weight, bit for bit.

    They do whenever d_in is a multiple of the block size (every model we know of). bitsandbytes 0.50's CPU kernel
    dequantizes an even d_in that is not (e.g. 80 with blocks of 64) with blocks per row instead of its own flat
    layout, so a CPU forward used other weights than the codes say: no NF4 graph reproduces that.
    """
    codes, absmax, block = nf4
    if not np.array_equal(nf4_dequantize(codes, absmax, block, tuple(weight.shape)), weight.numpy()):
        raise ModelError(f"{name}: bitsandbytes dequantizes this NF4 layer ({tuple(weight.shape)}, blocks of "
                         f"{block}) differently from its packed layout (its CPU kernel, when d_in is not a multiple "
                         "of the block size), so MatMulBnb4 cannot reproduce it. Fix: --int4-method nbits or "
                         "merged, or --int8")


# ---- the unmerged model, ready for torch.onnx.export ---------------------------------------------------------------


class _ExportLinear(nn.Module):
    """base(x) [+ (x Vt^T) U^T] + ((x A^T) S^T) (s B)^T with plain fp32 tensors (no bitsandbytes): what the
    exporter traces; the bracket is the base's frozen low-rank part, when the init keeps one."""

    def __init__(self, residual: torch.Tensor, bias: torch.Tensor | None, A, S, B, scaling: float,
                 frozen: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # every weight stored transposed: each product is a MatMul with a constant (d_in, d_out) / (d_in, r) /
        # (r, r) / (r, d_out) weight, never a Gemm (which nn.Linear becomes on 2-D inputs, e.g. BERT's pooler)
        self.register_buffer("residual_t", residual.detach().float().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("lamda_At", A.detach().float().t().contiguous())
        self.register_buffer("lamda_St", S.detach().float().t().contiguous())
        self.register_buffer("lamda_sBt", (scaling * B.detach().float()).t().contiguous())
        self.register_buffer("frozen_Vt_t", None if frozen is None else frozen[1].detach().float().t().contiguous())
        self.register_buffer("frozen_U_t", None if frozen is None else frozen[0].detach().float().t().contiguous())

    def forward(self, x):
        out = torch.matmul(x, self.residual_t)
        if self.bias is not None:
            out = out + self.bias
        if self.frozen_U_t is not None:
            out = out + torch.matmul(torch.matmul(x, self.frozen_Vt_t), self.frozen_U_t)  # (..., r_f) -> (..., d_out)
        low = torch.matmul(torch.matmul(torch.matmul(x, self.lamda_At), self.lamda_St), self.lamda_sBt)
        return out + low


def unmerged_for_export(model: nn.Module, with_nf4: bool = True) -> tuple[nn.Module, dict]:
    """Swap every `LaMDALinear` of `model` (in place) for an `_ExportLinear`; returns (model, residuals).

    The graph carries each base as training held it (a 4-bit base dequantized exactly, a full-precision one as is).
    `residuals` maps a layer name to {"weight": that fp32 (d_out, d_in) weight, "nf4": (codes, absmax, block) or
    None}. With `with_nf4`, a 4-bit base gives its own codes; a full-precision base is quantized here with
    bitsandbytes (blocks of 64, double-quantized absmax, as `load_lamda_model` does).
    """
    disable_cpu_repack(model)
    residuals = {}
    for name, layer in lamda_layers(model):
        base = layer.base_layer
        if layer.merged:
            raise ModelError(f"{name} is merged; export the unmerged adapter")
        weight = dequantize_weight(base)
        nf4 = None
        if with_nf4:
            q = base if is_linear4bit(base) else quantize_nf4(weight, None, torch.float32, "cpu")
            nf4 = nf4_tensors(q)
            _check_layout(name, nf4, dequantize_weight(q))
        bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
        frozen = (layer.frozen_U, layer.frozen_Vt) if layer.frozen_rank else None
        model.set_submodule(name, _ExportLinear(weight, bias, layer.lamda_A, layer.lamda_S, layer.lamda_B,
                                                layer.scaling, frozen))
        residuals[name] = {"weight": weight.float().contiguous(), "nf4": nf4}
    if not residuals:
        raise ModelError("the model has no LaMDA layers to export unmerged")
    for attr in ("lamda_config", "lamda_fingerprint", "lamda_report"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model.float().eval(), residuals


def write_variants(adapter_model: nn.Module, kind: str, folder: Path, files: dict, block_size: int = 32,
                   scratch: Path | None = None) -> dict:
    """Export the unmerged graph of `adapter_model` once and write each low-bit graph in `files` into `folder`.

    `files` maps "nf4" (MatMulBnb4), "int4" or "int8" (MatMulNBits) to a file name. Returns {variant: {"ops":
    op counts, "block_size": block}}. `adapter_model` is not changed.
    """
    import copy

    unknown = set(files) - set(SCHEMES)
    if unknown:
        raise ModelError(f"low-bit variants should be among {SCHEMES}, got {sorted(unknown)}")
    view, residuals = unmerged_for_export(copy.deepcopy(adapter_model), with_nf4="nf4" in files)
    src = (scratch or folder) / ".unmerged.onnx"
    (export_graph.export_decoder if kind == "decoder" else export_graph.export_encoder)(view, src)
    del view
    done = {}
    try:
        for variant, name in files.items():
            if variant == "nf4":
                blocks = sorted({r["nf4"][2] for r in residuals.values()})
                done[variant] = {"ops": write_nf4(src, folder / name, residuals),
                                 "block_size": blocks[0] if len(blocks) == 1 else blocks}
            else:
                bits = 4 if variant == "int4" else 8
                done[variant] = {"ops": quantize_residuals_nbits(src, folder / name, residuals, bits, block_size),
                                 "block_size": block_size}
    finally:
        for p in export_graph.onnx_files(src.parent, src.name):
            p.unlink()
    return done


def nf4_reference(model: nn.Module) -> nn.Module:
    """The PyTorch model a "nf4" graph must match: a full-precision residual base replaced by its NF4 quantization
    (a 4-bit base stays as it is). In place; returns `model`."""
    for _, layer in lamda_layers(model):
        base = layer.base_layer
        if not is_linear4bit(base):
            layer.base_layer = quantize_nf4(base.weight.detach().float(),
                                            None if base.bias is None else base.bias.detach(), torch.float32, "cpu")
    return disable_cpu_repack(model)


# ---- graph surgery -------------------------------------------------------------------------------------------------


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def find_residual_matmuls(model_proto, residuals: dict) -> dict:
    """{MatMul node name: (layer name, transposed)} for every MatMul whose constant weight is a residual.

    The weight is matched by its bytes: the exporter stores W^T (d_in, d_out) as the MatMul's initializer, or W
    behind a Transpose; both are recognized. Raises `ModelError` unless each residual is found exactly once.
    """
    from onnx import numpy_helper

    by_digest = {}
    for name, res in residuals.items():
        w = res["weight"].numpy()
        by_digest[_digest(w.T)] = (name, False)  # initializer is W^T: MatMul(x, W^T)
        by_digest[_digest(w)] = (name, True)  # initializer is W, consumed through Transpose
    inits = {i.name: i for i in model_proto.graph.initializer}
    producer = {out: node for node in model_proto.graph.node for out in node.output}
    digests = {}
    found = {}
    for node in model_proto.graph.node:
        if node.op_type != "MatMul":
            continue
        src, via_transpose = node.input[1], False
        if src not in inits and src in producer and producer[src].op_type == "Transpose":
            src, via_transpose = producer[src].input[0], True
        if src not in inits or len(inits[src].dims) != 2:
            continue
        if src not in digests:
            digests[src] = _digest(numpy_helper.to_array(inits[src]))
        hit = by_digest.get(digests[src])
        if hit is not None and hit[1] == via_transpose:
            found[node.name] = (hit[0], src)
    layers = [v[0] for v in found.values()]
    missing = sorted(set(residuals) - set(layers))
    twice = sorted({n for n in layers if layers.count(n) > 1})
    if missing or twice:
        raise ModelError(f"the exported graph does not hold each residual weight once as a MatMul weight "
                         f"(missing: {missing[:5]}, more than once: {twice[:5]}); cannot place the quantized base")
    return found


def to_matmul_bnb4(model_proto, residuals: dict) -> dict:
    """Rewrite every residual MatMul of `model_proto` (in place) into com.microsoft.MatMulBnb4; returns op counts."""
    from onnx import helper, numpy_helper

    found = find_residual_matmuls(model_proto, residuals)
    graph = model_proto.graph
    new_inits = []
    for index, node in enumerate(list(graph.node)):
        if node.name not in found:
            continue
        layer, _ = found[node.name]
        codes, absmax, block = residuals[layer]["nf4"]
        d_out, d_in = residuals[layer]["weight"].shape
        prefix = f"{layer}.nf4"
        new_inits += [numpy_helper.from_array(codes, f"{prefix}.codes"),
                      numpy_helper.from_array(absmax.astype(np.float32), f"{prefix}.absmax")]
        bnb = helper.make_node("MatMulBnb4", [node.input[0], f"{prefix}.codes", f"{prefix}.absmax"],
                               list(node.output), name=f"{node.name}_bnb4", domain="com.microsoft",
                               K=int(d_in), N=int(d_out), block_size=int(block), quant_type=NF4_QUANT_TYPE)
        graph.node.remove(node)
        graph.node.insert(index, bnb)
    graph.initializer.extend(new_inits)
    _ensure_opset(model_proto, "com.microsoft", 1)
    _drop_unused(model_proto)
    return {"MatMulBnb4": len(found)}


def quantize_residuals_nbits(src: Path, dst: Path, residuals: dict, bits: int, block_size: int = 32,
                             accuracy_level: int | None = 4) -> dict:
    """MatMulNBits (`bits` 4 or 8, symmetric blocks along the input) on the residual MatMuls of `src` only."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(src))
    found = find_residual_matmuls(model, residuals)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in found]
    quantized = run_nbits_quantizer(model, dst, exclude, ("MatMul",), (("MatMul", 0),), bits, block_size,
                                    accuracy_level)
    counts = _count(quantized, ("MatMulNBits", "MatMul"))
    if counts.get("MatMulNBits", 0) != len(found):
        raise ModelError(f"{bits}-bit quantization changed {counts.get('MatMulNBits', 0)} of {len(found)} residual "
                         "MatMuls")
    return counts


def write_nf4(src: Path, dst: Path, residuals: dict) -> dict:
    """Load the unmerged fp32 graph `src`, put the NF4 residuals in (MatMulBnb4), save to `dst`; op counts."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(src))
    to_matmul_bnb4(model, residuals)
    big = model.ByteSize() > export_graph.EXTERNAL_DATA_BYTES
    if big:
        onnx.save(model, str(dst), save_as_external_data=True, location=f"{Path(dst).name}.data")
    else:
        onnx.save(model, str(dst))
    return _count(model, ("MatMulBnb4", "MatMul"))


def _count(model_proto, kinds) -> dict:
    counts = {}
    for node in model_proto.graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _ensure_opset(model_proto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model_proto.opset_import):
        from onnx import helper

        model_proto.opset_import.append(helper.make_opsetid(domain, version))


def _drop_unused(model_proto) -> None:
    """Remove initializers (and Transpose nodes) no node reads any more: the fp32 residual copies."""
    graph = model_proto.graph
    while True:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & used]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)

