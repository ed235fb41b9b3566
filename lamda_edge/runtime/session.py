"""An ONNX Runtime CPU session for a graph file (the one place sessions are opened)."""

from __future__ import annotations

import os
from pathlib import Path

from lamda_edge.errors import require

# the graph a plain export folder runs by default (generate, classify): the low-bit graph the export wrote, else fp32
DEFAULT_GRAPHS = ("model.int4.onnx", "model.int8.onnx", "model.onnx")


def default_graph(folder: Path) -> str | None:
    """The first of DEFAULT_GRAPHS that `folder` holds (None when it holds none)."""
    return next((name for name in DEFAULT_GRAPHS if (Path(folder) / name).is_file()), None)


def spinning_allowed(environ=None) -> bool:
    """Whether ONNX Runtime's idle threads may spin-wait: not under `OMP_WAIT_POLICY=PASSIVE`.

    ONNX Runtime keeps its own thread pool, which spins between ops by default, the trap OpenMP's spin-wait set for
    torch on a loaded machine. The CLI sets `OMP_WAIT_POLICY=PASSIVE` unless the user chose a policy
    (`configure_cpu_threads`); sessions follow the same choice (docs/benchmarks.md, "CPU threads on a loaded
    machine", measures both).
    """
    env = os.environ if environ is None else environ
    return env.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path`; its threads sleep between ops where `spinning_allowed` says so."""
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning_allowed():
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
