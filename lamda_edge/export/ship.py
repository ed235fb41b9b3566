"""What to ship: the files of an export folder that the device needs, and `--ship DIR`, which copies exactly those.

    OUT/ (what `export` wrote)                         SHIP/ (what `generate`, `classify` and `serve` need)
      model.onnx, model.int8.onnx (+ .data)  ──┐         model.int8.onnx (+ .data): the graph they run by default
      merged/ (the fp32 transformers folder)   ├──>      config.json, generation_config.json, tokenizer files
      config.json, tokenizer files           ──┘         genai_config.json (an onnxruntime-genai folder)
      export-report.json

The graph is the one the runtime picks by itself: the genai folder's (genai_config.json names it), an encoder-
decoder's three graphs, else the first of DEFAULT_GRAPHS (int4, int8, fp32). Import-light: no torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lamda_edge.adapters.files import LEGACY_NAMES as PEFT_FILES  # adapter_config.json, adapter_model.safetensors
from lamda_edge.atomic import stale_leftovers
from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.export.modelfile import MODELFILE
from lamda_edge.export.portable import LOADER_FILES
from lamda_edge.files import read_json
from lamda_edge.runtime.generate import GENAI_CONFIG
from lamda_edge.runtime.seq2seq import DECODER_FILE, DECODER_PAST_FILE, ENCODER_FILE
from lamda_edge.runtime.session import default_graph

SEQ2SEQ_GRAPHS = (ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE)


def ship_files(folder: str | os.PathLike) -> list[str]:
    """The names, relative to an export `folder`, of the files a device needs to run it: its default graph(s) with
    their external data, the config, generation config and tokenizer files, and genai_config.json when present; for
    a GGUF export, the .gguf file and its Ollama Modelfile; for a PEFT export, the adapter's two files."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in PEFT_FILES):  # a --format peft folder: the LoRA adapter itself
        return list(PEFT_FILES)
    gguf = sorted(path.name for path in folder.glob("*.gguf"))
    if gguf:  # a --format gguf folder: llama.cpp needs the file alone (tokenizer and template inside), Ollama the
        return gguf + [name for name in (MODELFILE,) if (folder / name).is_file()]  # Modelfile beside it
    if (folder / GENAI_CONFIG).is_file():
        genai = read_json(folder / GENAI_CONFIG, ModelError, "export the model again")
        graphs = [((genai.get("model") or {}).get("decoder") or {}).get("filename", "model.onnx")]
    elif (folder / SEQ2SEQ_GRAPHS[0]).is_file():
        graphs = list(SEQ2SEQ_GRAPHS)
    else:
        graphs = [name for name in [default_graph(folder)] if name]
    if not graphs:
        raise ModelError(f"{folder} holds no ONNX graph. Fix: pass the --output folder of `lamda-edge export`")
    names = [name for graph in graphs for name in (graph, f"{graph}.data") if (folder / name).is_file()]
    names += [name for name in (*LOADER_FILES, GENAI_CONFIG) if (folder / name).is_file()]
    return names


def ship_bytes(folder: str | os.PathLike, names: list[str]) -> int:
    return sum((Path(folder) / name).stat().st_size for name in names)


def check_ship_location(ship: str | os.PathLike, output: str | os.PathLike) -> None:
    """`ConfigError` when `--ship` is the export's `--output`, or one of them sits inside the other."""
    ship_r, out_r = Path(ship).expanduser().resolve(), Path(output).expanduser().resolve()
    if ship_r == out_r or out_r in ship_r.parents or ship_r in out_r.parents:
        raise ConfigError(f"--ship {str(ship)!r} and --output {str(output)!r} overlap; the shipped folder is a "
                          "copy of its own. Fix: choose a folder beside the output, e.g. --ship "
                          f"{out_r.parent / (out_r.name + '-ship')}")


def ship(folder: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Copy `ship_files(folder)` into the new folder `target` (built beside it under a temporary name, then renamed:
    a failure leaves no half-copied folder); returns the names copied.

    Raises:
        ConfigError: `target` exists without `overwrite`, or overlaps `folder`.
    """
    folder, target = Path(folder), Path(target)
    check_ship_location(target, folder)
    if target.exists() and not overwrite:
        raise ConfigError(f"--ship folder {target} already exists. Fix: pass --overwrite, or choose another --ship")
    names = ship_files(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_leftovers(target.parent, f".{target.name}.tmp-"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in names:
            shutil.copy2(folder / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
