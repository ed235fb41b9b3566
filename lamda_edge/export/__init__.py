"""Ship a trained adapter: merge -> ONNX graphs -> quantization -> validation against PyTorch -> genai packaging.

    merged.py    the base rebuilt as trained, the adapter merged, a plain transformers folder written
    graph.py     torch.onnx.export of a decoder with a KV cache, or of an encoder classifier
    quantize.py  weight-only int4 of the merged graph (MatMulNBits)
    nf4.py       the unmerged graph: NF4 residual (MatMulBnb4 with bitsandbytes' codes) or int4/int8 residual + LaMDA
    lowbit.py    `--int4` / `--int8`: which low-bit graph, built how, checked against what
    validate.py  PyTorch vs ONNX Runtime, every output, every mismatch listed
    genai.py     the onnxruntime-genai builder route; genai_pack.py: our own validated graph packaged for genai
    pipeline.py  `export(ExportOptions)`: all of the above, built in a temporary folder and renamed into place
"""

from lamda_edge.export.pipeline import ExportOptions, export

__all__ = ["ExportOptions", "export"]
