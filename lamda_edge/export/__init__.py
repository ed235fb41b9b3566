"""Ship a trained adapter: merge -> ONNX graphs -> quantization -> validation against PyTorch -> genai packaging.

    merged.py    the base rebuilt as trained, the adapter merged, a plain transformers folder written
    graph.py     torch.onnx.export of a decoder with a KV cache, or of an encoder classifier
    quantize.py  weight-only int4 (MatMulNBits)
    validate.py  PyTorch vs ONNX Runtime, every output, every mismatch listed
    genai.py     the onnxruntime-genai folder
    pipeline.py  `export(ExportOptions)`: all of the above, built in a temporary folder and renamed into place
"""

from lamda_edge.export.pipeline import ExportOptions, export

__all__ = ["ExportOptions", "export"]
