"""Files that the tools HF users already have read as we mean them: transformers 4.4x-4.57 (what optimum-onnx
installs) as well as 5.x, and optimum's `ORTModelForCausalLM.from_pretrained(export folder)`.

    OUT/merged/config.json           transformers 5 keeps RoPE's base only in `rope_parameters`; 4.x reads
                                     `rope_theta` (and `rope_scaling`) and silently falls back to 10000 without it:
                                     the legacy keys are written beside the new ones, with the same values
    OUT/merged/tokenizer_config.json transformers 5 names its class `TokenizersBackend`, which 4.x does not know:
                                     `PreTrainedTokenizerFast` (tokenizer.json as it is) is known to both
    OUT/config.json, tokenizer ...   the loader files copied beside the graphs: optimum infers the model from them

Both versions reading the same numbers is checked by tests/test_ecosystem.py (logits under 4.57 equal 5.x's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lamda_edge.atomic import write_bytes_atomic

# What a loader needs beside the weights or graphs: the model config, generation defaults, the tokenizer.
LOADER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
# transformers 5's tokenizer class names that 4.x lacks -> a class both versions load from tokenizer.json
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
DTYPE_KEYS = ("dtype", "torch_dtype")  # 5.x writes `dtype`; 4.4x-4.55 read `torch_dtype`


def portable_config(config: dict) -> dict:
    """A config.json dict with the legacy keys transformers 4.x reads added beside transformers 5's.

    `rope_parameters` {rope_type, rope_theta, ...} -> also `rope_theta` (and `partial_rotary_factor`) at the top;
    a scaled RoPE (rope_type other than "default") -> also `rope_scaling` = the whole `rope_parameters`, which 5.x
    prefers when present, so both read the same dict. Values already written are kept.
    """
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # a flat (not per-layer-type) RoPE
        config.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = dict(rope)
    for key in DTYPE_KEYS:
        other = next((config[k] for k in DTYPE_KEYS if config.get(k)), None)
        if other is not None:
            config.setdefault(key, other)
    return config


def portable_tokenizer_config(config: dict, chat_template: str | None = None) -> dict:
    """A tokenizer_config.json dict that transformers 4.4x+ and 5.x load into the same tokenizer.

    The class becomes one both know; a list of `extra_special_tokens` (5.x) is also written as
    `additional_special_tokens` (4.x reads a dict there); the chat template is also inlined (4.4x read it only
    from here).
    """
    config = dict(config)
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS.get(name, name)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config.pop("extra_special_tokens")
        config.setdefault("additional_special_tokens", extra)
    if chat_template and "chat_template" not in config:
        config["chat_template"] = chat_template
    return config


def make_portable(folder: Path) -> None:
    """Rewrite `folder`'s config.json and tokenizer_config.json in the form that both transformers 4.x and 5.x read."""
    folder = Path(folder)
    _rewrite_json(folder / "config.json", portable_config)
    template = folder / "chat_template.jinja"
    chat = template.read_text() if template.is_file() else None
    _rewrite_json(folder / "tokenizer_config.json", lambda data: portable_tokenizer_config(data, chat))


def copy_loader_files(source: Path, target: Path) -> list[str]:
    """Copy the config, generation config and tokenizer files of `source` into `target`; returns the names."""
    copied = []
    for name in LOADER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def _rewrite_json(path: Path, change) -> None:
    if path.is_file():
        data = json.loads(path.read_text())
        write_bytes_atomic(path, (json.dumps(change(data), indent=2) + "\n").encode())
