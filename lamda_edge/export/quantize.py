"""Weight-only int4 quantization of an exported graph: ONNX Runtime's MatMulNBits (and GatherBlockQuantized)."""

from __future__ import annotations

from pathlib import Path

from lamda_edge.errors import ModelError, require
from lamda_edge.export import graph


def quantize_int4(src: Path, dst: Path, block_size: int = 32, accuracy_level: int | None = 4,
                  embeddings: bool = True, symmetric: bool = True, keep_tied_head: bool = False,
                  bits: int = 4) -> dict:
    """Weight-only 4-bit (`bits=8`: 8-bit) quantization (ONNX Runtime's MatMulNBits quantizer, blocks along the
    input).

    Every MatMul with a constant weight becomes MatMulNBits; with `embeddings`, the token embedding Gather becomes
    GatherBlockQuantized too (a tied lm_head is exported as a separate transposed copy, so both are quantized,
    unless `keep_tied_head` leaves that copy in float). `symmetric=False` gives blocks a zero point.
    Returns the count of each quantized op type.
    """
    onnx = require("onnx", "onnx")
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))[:len(ops)]  # quantize along the input dim / the hidden dim
    model = onnx.load(str(src))
    folded = _fold_transposed_weights(model)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in folded]
    quantized = run_nbits_quantizer(model, dst, exclude if keep_tied_head else [], ops, axes, bits, block_size,
                                    accuracy_level, symmetric)
    counts = {}
    for node in quantized.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("MatMulNBits"):
        raise ModelError(f"int{bits} quantization of {src} changed no MatMul (ops after: {counts})")
    return counts


def run_nbits_quantizer(model, dst: Path, exclude: list[str], ops: tuple[str, ...], axes: tuple, bits: int,
                        block_size: int, accuracy_level: int | None, symmetric: bool = True):
    """ONNX Runtime's MatMulNBits quantizer on the ModelProto `model` (`ops` of constant weights, quantized along
    `axes`; the nodes named in `exclude` left alone), saved to `dst`; returns the quantized ModelProto."""
    import logging

    import numpy as np

    quantizer_mod = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    # ERROR: at INFO it prints a line per node it skips (thousands), and it warns that it lifts the opset to 21
    # for int4 Gather data; the export validates the result anyway
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    kw = dict(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
              op_types_to_quantize=ops, quant_axes=axes, bits=bits)
    quantizer = quantizer_mod.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude,
                                                   algo_config=quantizer_mod.DefaultWeightOnlyQuantConfig(**kw), **kw)
    with np.errstate(divide="ignore", invalid="ignore"):  # the quantizer divides by all-zero blocks' scale 0
        quantizer.process()
    big = quantizer.model.model.ByteSize() > graph.EXTERNAL_DATA_BYTES
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=big)
    return quantizer.model.model


def _fold_transposed_weights(model) -> set[str]:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T as its own initializer), so that the quantizer sees a weight.

    Returns the names of the new initializers (a tied lm_head's weight, when there is one).

    A tied lm_head is exported as a Transpose of the embedding matrix, which the Gather also reads: without this
    the int4 graph keeps the head in fp32 (SmolLM2-135M: 198 MB instead of ~90 MB).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    folded = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        tr = producer[node.input[1]]
        perm = [list(a.ints) for a in tr.attribute if a.name == "perm"]
        if tr.op_type != "Transpose" or tr.input[0] not in inits or perm not in ([], [[1, 0]]):
            continue
        if tr.input[0] not in folded:
            weight = numpy_helper.to_array(inits[tr.input[0]])
            if weight.ndim != 2:
                continue
            folded[tr.input[0]] = f"{tr.input[0]}.transposed"
            model.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), folded[tr.input[0]]))
        node.input[1] = folded[tr.input[0]]
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Transpose" and not set(n.output) & used]
    for node in dead:
        model.graph.node.remove(node)
    return set(folded.values())
