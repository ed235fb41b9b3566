"""An ONNX Runtime CPU session for a graph file (the one place sessions are opened)."""

from __future__ import annotations

from pathlib import Path

from lamda_edge.errors import require


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path`."""
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
