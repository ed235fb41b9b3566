"""The merged model: the base rebuilt as training held it, the adapter loaded and merged, written as a plain
transformers folder (safetensors, config, tokenizer) that loads back with `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from lamda_edge.adapters import load_adapter, merge_and_unload
from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.files import verify_adapter
from lamda_edge.demo import default_model
from lamda_edge.errors import ConfigError, ModelError
from lamda_edge.export.portable import make_portable
from lamda_edge.files import read_json
from lamda_edge.load.checkpoint import MODEL_FIX, check_model_weights
from lamda_edge.load.loader import load_lamda_model
from lamda_edge.tasks import SEQ2SEQ, SEQUENCE_CLASSIFICATION, task_of_config


def load_merged(model_dir: Path | None, adapter_dir: Path | None):
    """The merged fp32 model, the folder its tokenizer comes from, and a description of the source.

    With an adapter: rebuild the base as training did (`load_adapted`), then `merge_and_unload`.
    """
    source: dict = {"model": str(model_dir) if model_dir else None,
                    "adapter": str(adapter_dir) if adapter_dir else None}
    if adapter_dir is None:
        model = load_reference(Path(model_dir))
        base = Path(model_dir)
    else:
        model, base, cfg = load_adapted(model_dir, adapter_dir)
        model = merge_and_unload(model)
        set_label_names(model, cfg.get("labels"))
        source.update(base_model=str(base), quantize=cfg.get("quantize"), ranks=len(cfg.get("ranks", {})))
    model = model.float().eval()
    source.update(model_type=model.config.model_type, architecture=type(model).__name__,
                  parameters=sum(p.numel() for p in model.parameters()))
    return model, base, source


def set_label_names(model, labels: dict | None) -> None:
    """Write a classifier's class names (the adapter's `labels`: names by id) into its config as id2label/label2id."""
    if not labels or not getattr(model.config, "num_labels", None):
        return
    names = list(labels["names"])
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def load_adapted(model_dir: Path | None, adapter_dir: Path):
    """(the adapter model as training held it, unmerged; its base folder; the adapter config).

    Rebuilds the base as training did (`load_lamda_model` with the recorded LaMDA config and quantization: an NF4
    base holds the same packed residual codes), then loads the trained S, B (and A) onto it.
    """
    adapter_dir = Path(adapter_dir)
    cfg = verify_adapter(adapter_dir)  # before the long load: a damaged tensor file is named at once
    base = resolve_base(model_dir, cfg, adapter_dir)
    # rebuild the (4-bit) residual base exactly as training did, then put the trained S, B (and A) on it
    model = load_lamda_model(str(base), LaMDAConfig.from_dict(cfg["lamda_config"]), quantize=cfg.get("quantize"),
                             device="cpu", compute_dtype=torch.float32, progress=False,
                             gradient_checkpointing=False, task=cfg.get("task"), num_labels=cfg.get("num_labels"))
    load_adapter(model, adapter_dir)  # AdapterMismatchError when the base is not the one it was trained on
    return model.eval(), base, cfg


def resolve_base(model: Path | str | None, cfg: dict, adapter_dir: Path) -> Path:
    """The base model folder of an adapter: `model` (a folder, or the default model's name), else the folder the
    adapter records, else the catalogue entry it records by name (`base_name`: the default model is found wherever
    this machine keeps it). Whether it is the right base is checked by its fingerprint when the adapter loads."""
    for candidate in (model, cfg.get("base_model") if model is None else None,
                      cfg.get("base_name") if model is None else None):
        if candidate is None:
            continue
        if Path(candidate).is_dir():
            return Path(candidate)
        if str(candidate).lower() in default_model.NAMES:
            return default_model.default_model_path()
    if model is not None:
        raise ModelError(f"--model {str(model)!r} is not a folder. Fix: pass the base transformers folder the "
                         f"adapter was trained on, or {default_model.MODEL_NAME!r} for the default model")
    if cfg.get("base_model") is None:
        raise ConfigError(f"the adapter in {adapter_dir} does not record its base model. Fix: pass --model DIR")
    raise ModelError(f"base model {cfg.get('base_name') or cfg['base_model']!r} (recorded in {adapter_dir}: "
                     f"{cfg['base_model']}, id {cfg.get('base_id', 'unknown')}) is not a folder on this machine. "
                     "Fix: pass --model DIR with the base transformers folder the adapter was trained on")


def load_reference(folder: Path):
    """Load a transformers folder in fp32 with the head its config names (causal LM, sequence classifier or
    encoder-decoder)."""
    read_json(Path(folder) / "config.json", ModelError, MODEL_FIX)  # missing, truncated or corrupt: name it
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a transformers config from {folder}: {exc}") from exc
    check_model_weights(Path(folder))
    auto = {SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            SEQ2SEQ: transformers.AutoModelForSeq2SeqLM}.get(task_of_config(config), transformers.AutoModelForCausalLM)
    return auto.from_pretrained(folder, dtype=torch.float32).eval()


def save_merged(model, tokenizer_dir: Path, folder: Path) -> None:
    """Write the merged model as a plain transformers folder (safetensors, config, tokenizer, generation config)
    that transformers 4.4x+ and 5.x read the same way (`portable.make_portable`)."""
    for attr in ("quantization_config",):  # a 4-bit load may leave it in the config; the merged model is fp32
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(folder)
    try:
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {tokenizer_dir}: {exc}. The merged folder needs it") from exc
    make_portable(folder)


def load_tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)
