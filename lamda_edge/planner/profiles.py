"""Device profiles (profiles/devices/*.yaml) and model shapes (profiles/models/*.json): find, load, validate.

Profiles ship in the wheel as package `lamda_edge.profiles`; from a checkout they are the repo's `profiles/`.
A device's numbers live only in its YAML; a model's shape only in its JSON (or a local config.json).
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lamda_edge.errors import LamdaEdgeError, ProfileError
from lamda_edge.files import read_json, read_yaml
from lamda_edge.planner.memory import Linear

GIB = 1024**3
MIB = 1024**2

DEVICE_FIELDS = {  # field -> allowed types
    "name": (str,), "aliases": (list,), "description": (str,), "kind": (str,),
    "total_memory_gib": (int, float, str), "reserve_gib": (int, float, str),
    "runtime_overhead_mib": (int, float), "fragmentation_margin": (int, float), "unified_memory": (bool,),
    "bf16": (bool,), "compute_capability": (str, type(None)), "memory_bandwidth_gbs": (int, float),
    "peak_tflops": (int, float), "expandable_segments": (bool,), "cpu_offload": (bool,),
    "paged_optimizer": (bool,), "sources": (dict,),
}
OPTIONAL_DEVICE_FIELDS = {"fp32_tflops": (int, float)}
SOURCED_FIELDS = ("total_memory_gib", "reserve_gib")  # the budget's two numbers: each needs its source line
MODEL_FIELDS = {
    "name": (str,), "architecture": (str,), "hidden_size": (int,), "intermediate_size": (int,),
    "num_hidden_layers": (int,), "num_attention_heads": (int,), "num_key_value_heads": (int,), "head_dim": (int,),
    "vocab_size": (int,), "tie_word_embeddings": (bool,),
}
ARCHITECTURES = ("decoder", "encoder", "encoder-decoder")
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
               "vocab_size", "num_key_value_heads")
PROFILE_SUFFIXES = (".yaml", ".yml")
# config.json model types the planner reads as encoders (classifiers)
ENCODER_MODEL_TYPES = ("bert", "roberta", "deberta-v2", "deberta", "distilbert", "electra", "xlm-roberta")
logger = logging.getLogger(__name__)
_reported: set[str] = set()  # malformed shipped profiles already reported (once per process)


def _skip_malformed(path: Path, exc: LamdaEdgeError) -> None:
    """One malformed shipped profile must not break the others: report it once, and go on without it."""
    if str(path) not in _reported:
        _reported.add(str(path))
        logger.warning("lamda-edge: skipping a malformed profile: %s", exc)


def profiles_root() -> Path:
    """The folder holding devices/ and models/: the checkout's profiles/ beside this package when there is one (so a
    second checkout on PYTHONPATH reads its own profiles), else the installed package data."""
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if (checkout / "devices").is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("lamda_edge.profiles")))


# ---- devices -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """One device: memory (bytes), compute, and what the runtime may use on it."""

    name: str
    aliases: tuple[str, ...]
    description: str
    kind: str
    total_bytes: int
    usable_bytes: int  # total_bytes - reserve_bytes: the planner's budget
    reserve_bytes: int
    runtime_overhead_bytes: int
    fragmentation_margin: float
    unified_memory: bool
    bf16: bool
    compute_capability: str | None
    memory_bandwidth_gbs: float
    peak_tflops: float
    fp32_tflops: float | None
    expandable_segments: bool
    cpu_offload: bool
    paged_optimizer: bool
    sources: dict
    path: str

    @property
    def compute_dtype(self) -> str:
        """The dtype training computes in by default, as `lamda-edge train`'s `precision=auto` picks it
        (load/device.py `resolve_precision`): bf16 where the device multiplies it natively (`bf16`: a GPU that has
        it, a CPU with AVX512-BF16 or AMX), else fp16 on a GPU (T4) and fp32 on a CPU."""
        if self.kind == "cpu":
            return "bf16" if self.bf16 else "fp32"
        return "bf16" if self.bf16 else "fp16"


def _check_fields(data: dict, fields: dict, path: Path, optional: dict | None = None) -> None:
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: should hold a mapping of fields, got {type(data).__name__}")
    for key, types in fields.items():
        if key not in data:
            raise ProfileError(f"{path}: field `{key}` is missing (required: {', '.join(fields)})")
        if not isinstance(data[key], types) or (bool not in types and isinstance(data[key], bool)):
            names = "/".join(t.__name__ for t in types)
            raise ProfileError(f"{path}: field `{key}` should be {names}, got {data[key]!r}")
    allowed = set(fields) | set(optional or {})
    for key in data:
        if key not in allowed and not key.startswith("_"):
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ProfileError(f"{path}: unknown field `{key}`{hint}")


def _memory(value, path: Path, key: str, host_value: int, zero_ok: bool = False) -> int:
    if value == "auto":
        return host_value
    if isinstance(value, str) or value < 0 or (value == 0 and not zero_ok):
        kind = "a number of GiB >= 0" if zero_ok else "a positive number of GiB"
        raise ProfileError(f"{path}: field `{key}` should be {kind} or 'auto', got {value!r}")
    return int(value * GIB)


def memory_budget(data: dict, path: Path) -> tuple[int, int]:
    """(total, reserve) in bytes from a profile's `total_memory_gib` and `reserve_gib`; usable = total - reserve.

    `total_memory_gib` is the CUDA total PyTorch reports (not the box label); `reserve_gib` what a display or the
    OS holds of it (0 on a headless datacenter card). 'auto' (the host CPU): psutil's total, and what other
    processes hold (total - available). Each must have its line in `sources`.
    """
    if "usable_memory_gib" in data:
        raise ProfileError(f"{path}: field `usable_memory_gib` is no longer read: usable memory is "
                           "total_memory_gib - reserve_gib. Fix: replace it with `reserve_gib` (what a display or the "
                           "OS holds of the total; 0 on a headless card) and its line in `sources`")
    auto = "auto" in (data.get("total_memory_gib"), data.get("reserve_gib"))
    host_total = host_avail = 0
    if auto:
        import psutil

        vm = psutil.virtual_memory()
        host_total, host_avail = vm.total, vm.available
    total = _memory(data["total_memory_gib"], path, "total_memory_gib", host_total)
    reserve = _memory(data["reserve_gib"], path, "reserve_gib", host_total - host_avail, zero_ok=True)
    if reserve >= total:
        raise ProfileError(f"{path}: field `reserve_gib` ({reserve / GIB:.2f}) leaves nothing of total_memory_gib "
                           f"({total / GIB:.2f}). Fix: give the reserve in GiB, below the total")
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    missing = [key for key in SOURCED_FIELDS if not sources.get(key)]
    if missing:
        raise ProfileError(f"{path}: `sources` has no line for {', '.join(f'`{k}`' for k in missing)}. Fix: say "
                           "where each number comes from (e.g. the total PyTorch reports, a desktop's reserve)")
    return total, reserve


def _load_device(path: Path) -> DeviceProfile:
    data = read_yaml(path, ProfileError, "fix or remove this device profile")
    if isinstance(data, dict) and "usable_memory_gib" in data:
        memory_budget(data, path)  # the clear error for the old field, before "unknown field"
    _check_fields(data, DEVICE_FIELDS, path, OPTIONAL_DEVICE_FIELDS)
    total, reserve = memory_budget(data, path)
    margin = data["fragmentation_margin"]
    if not 0 <= margin < 1:
        raise ProfileError(f"{path}: field `fragmentation_margin` should be in [0, 1), got {margin!r}")
    for key in ("memory_bandwidth_gbs", "peak_tflops", "runtime_overhead_mib"):
        if data[key] < 0:
            raise ProfileError(f"{path}: field `{key}` should not be negative, got {data[key]!r}")
    if data["kind"] not in ("cuda", "jetson", "cpu"):
        raise ProfileError(f"{path}: field `kind` should be cuda, jetson or cpu, got {data['kind']!r}")
    if data["kind"] == "jetson" and data["expandable_segments"]:
        raise ProfileError(f"{path}: field `expandable_segments` must be false on Jetson (it fails on Tegra)")
    return DeviceProfile(
        name=data["name"], aliases=tuple(str(a) for a in data["aliases"]), description=data["description"],
        kind=data["kind"], total_bytes=total, usable_bytes=total - reserve, reserve_bytes=reserve,
        runtime_overhead_bytes=int(data["runtime_overhead_mib"] * MIB), fragmentation_margin=float(margin),
        unified_memory=data["unified_memory"], bf16=data["bf16"], compute_capability=data["compute_capability"],
        memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]), peak_tflops=float(data["peak_tflops"]),
        fp32_tflops=data.get("fp32_tflops"), expandable_segments=data["expandable_segments"],
        cpu_offload=data["cpu_offload"], paged_optimizer=data["paged_optimizer"], sources=data["sources"],
        path=str(path),
    )


def device_files() -> list[Path]:
    return sorted((profiles_root() / "devices").glob("*.yaml"))


def _load_named(files, load) -> dict:
    """`load(path)` of every file by its `name`, which must match the file name; a malformed file is reported once
    (a warning) and left out, so one bad profile does not break the others."""
    out = {}
    for path in files:
        try:
            profile = load(path)
            if profile.name != path.stem:
                raise ProfileError(f"{path}: field `name` ({profile.name!r}) should match the file name "
                                   f"({path.stem!r})")
        except ProfileError as exc:
            _skip_malformed(path, exc)
            continue
        out[profile.name] = profile
    return out


def load_devices() -> dict[str, DeviceProfile]:
    """Every valid device profile by name; a malformed file is reported once (a warning) and left out."""
    return _load_named(device_files(), _load_device)


def _auto_device() -> DeviceProfile:
    """The present GPU (free memory from torch.cuda.mem_get_info), else the host CPU profile."""
    import torch

    devices = load_devices()
    if "cpu" not in devices:
        raise ProfileError(f"the host CPU's profile ({profiles_root() / 'devices' / 'cpu.yaml'}) is missing or "
                           "malformed. Fix: restore it (reinstall lamda-edge), or pass --device NAME")
    if not torch.cuda.is_available():
        return devices["cpu"]
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    cc = f"{props.major}.{props.minor}"
    name = props.name.lower()
    match = next((d for d in devices.values() if d.kind != "cpu" and d.compute_capability == cc
                  and abs(d.total_bytes - total) < 2 * GIB), None)
    base = match or devices.get("rtx3060") or devices["cpu"]
    from dataclasses import replace

    return replace(base, name=f"auto:{name.replace(' ', '-')}", description=f"{props.name} (read with torch.cuda)",
                   total_bytes=total, usable_bytes=free, reserve_bytes=total - free, compute_capability=cc,
                   bf16=torch.cuda.is_bf16_supported(), path="torch.cuda.mem_get_info")


def get_device(name: str) -> DeviceProfile:
    """A device by name or alias (case-insensitive), `auto`, or the path of a device profile YAML file; unknown
    names raise `ProfileError` listing all."""
    key = name.strip().lower()
    if key == "auto":
        return _auto_device()
    if key.endswith(PROFILE_SUFFIXES) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProfileError(f"device profile file {path} does not exist. Fix: pass an existing YAML file "
                               "(profiles/devices/*.yaml show the fields), or a name from `lamda-edge devices`")
        return _load_device(path)
    devices = load_devices()
    for dev in devices.values():
        if key == dev.name or key in (a.lower() for a in dev.aliases):
            return dev
    close = difflib.get_close_matches(key, list(devices) + [a for d in devices.values() for a in d.aliases], n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise ProfileError(f"unknown device {name!r}.{hint} Known devices: {', '.join(sorted(devices))} (or `auto`)")


def describe_devices() -> list[str]:
    """One line per device profile for `lamda-edge devices`."""
    lines = []
    for dev in load_devices().values():
        aliases = f" (aka {', '.join(dev.aliases)})" if dev.aliases else ""
        lines.append(
            f"{dev.name:<22} {dev.usable_bytes / GIB:6.2f} GiB usable = {dev.total_bytes / GIB:5.2f} total"
            f" - {dev.reserve_bytes / GIB:4.2f} reserve"
            f"{'  unified' if dev.unified_memory else '         '}  {'bf16' if dev.bf16 else 'fp16'}"
            f"  {dev.peak_tflops:g} TFLOP/s  {dev.memory_bandwidth_gbs:g} GB/s  {dev.description}{aliases}"
        )
    return lines


# ---- model shapes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the memory model needs (no weights)."""

    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    mlp: str = "gated"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    attention_bias: bool = False
    num_decoder_layers: int = 0
    num_labels: int = 2
    hf_id: str | None = None
    model_type: str | None = None  # transformers' model_type: what `export` maps (lamda_edge.families)
    source: str = ""
    local_path: str | None = None

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers + self.num_decoder_layers

    @property
    def norm_params(self) -> int:
        return 1 if self.architecture == "decoder" else 2  # RMSNorm weight | LayerNorm weight + bias

    @property
    def extra_params(self) -> int:
        if self.architecture == "decoder":
            return 0
        return 512 * self.hidden_size + self.num_labels * self.hidden_size  # positions + classifier (approx.)

    def block_linears(self) -> list[Linear]:
        """The linear layers LaMDA adapts in one block ("all-linear")."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, (
            self.num_key_value_heads * self.head_dim
        )
        b = self.attention_bias
        if self.fused_qkv:
            attn = [Linear("qkv_proj", h, q + 2 * kv, b)]
        else:
            attn = [Linear("q_proj", h, q, b), Linear("k_proj", h, kv, b), Linear("v_proj", h, kv, b)]
        attn.append(Linear("o_proj", q, h, self.architecture != "decoder"))
        if self.mlp == "gated":
            mlp = [Linear("gate_up_proj", h, 2 * i)] if self.fused_gate_up else [
                Linear("gate_proj", h, i), Linear("up_proj", h, i)]
            mlp.append(Linear("down_proj", i, h))
        else:
            mlp = [Linear("fc1", h, i, True), Linear("fc2", i, h, True)]
        return attn + mlp

    def parameter_count(self) -> int:
        lin = sum(x.d_in * x.d_out for x in self.block_linears()) * self.num_blocks
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return lin + emb + (2 * self.num_blocks + 1) * self.hidden_size


def model_files() -> list[Path]:
    return sorted((profiles_root() / "models").glob("*.json"))


def _shape_from_json(data: dict, path: Path) -> ModelShape:
    _check_fields(data, MODEL_FIELDS, path, {k: (object,) for k in (
        "hf_id", "model_type", "max_position_embeddings", "mlp", "fused_qkv", "fused_gate_up", "attention_bias",
        "parameters_reported", "source", "num_decoder_layers", "num_labels")})
    if data["architecture"] not in ARCHITECTURES:
        raise ProfileError(
            f"{path}: field `architecture` should be one of {ARCHITECTURES}, got {data['architecture']!r}"
        )
    _check_sizes(data, path)
    if data.get("mlp", "gated") not in ("gated", "plain"):
        raise ProfileError(f"{path}: field `mlp` should be 'gated' or 'plain', got {data['mlp']!r}")
    keys = {f for f in ModelShape.__dataclass_fields__ if f in data}
    return ModelShape(**{k: data[k] for k in keys})


def _check_sizes(sizes: dict, where) -> None:
    """The architecture sizes must be positive, and the key/value heads must divide the attention heads."""
    for key in SIZE_FIELDS:
        if sizes[key] < 1:
            raise ProfileError(f"{where}: field `{key}` should be positive, got {sizes[key]!r}. Fix: correct it")
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise ProfileError(f"{where}: field `num_key_value_heads` ({sizes['num_key_value_heads']}) should divide "
                           f"num_attention_heads ({sizes['num_attention_heads']}). Fix: correct it")


def shape_from_hf_config(cfg: dict, name: str, path: str | None = None) -> ModelShape:
    """A shape from a transformers config.json dict: a decoder (Llama, Qwen2, Mistral, Gemma, Phi-3 style), an
    encoder-decoder (`is_encoder_decoder`, BART's field names) or an encoder classifier (BERT, RoBERTa, DeBERTa)."""
    model_type = cfg.get("model_type")
    common = dict(name=name, model_type=model_type, local_path=path,
                  source=f"config.json at {path}" if path else "transformers config")
    try:
        if cfg.get("is_encoder_decoder"):
            h, nh = int(cfg["d_model"]), int(cfg["encoder_attention_heads"])
            shape = ModelShape(
                architecture="encoder-decoder", hidden_size=h, intermediate_size=int(cfg["encoder_ffn_dim"]),
                num_hidden_layers=int(cfg["encoder_layers"]), num_decoder_layers=int(cfg["decoder_layers"]),
                num_attention_heads=nh, num_key_value_heads=nh, head_dim=h // nh, vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), mlp="plain", attention_bias=True,
                **common)
        elif model_type in ENCODER_MODEL_TYPES or any(a.endswith("ForSequenceClassification")
                                                  for a in cfg.get("architectures") or []):
            h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            shape = ModelShape(
                architecture="encoder", hidden_size=h, intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=nh, num_key_value_heads=nh,
                head_dim=h // nh, vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=True, mlp="plain",
                attention_bias=True, num_labels=len(cfg.get("id2label") or {}) or 2, **common)
        else:
            h = int(cfg["hidden_size"])
            nh = int(cfg["num_attention_heads"])
            if nh < 1:
                raise ValueError(f"`num_attention_heads` should be positive, got {nh}")
            shape = ModelShape(
                architecture="decoder", hidden_size=h, intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=nh,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or nh),
                head_dim=int(cfg.get("head_dim") or h // nh), vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                fused_qkv=model_type == "phi3", fused_gate_up=model_type == "phi3",
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), **common)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ProfileError(f"{path or name}: config.json lacks a field the planner needs, or holds an "
                           f"invalid one: {exc}. Fix: correct config.json") from exc
    _check_sizes({key: getattr(shape, key) for key in SIZE_FIELDS}, f"config.json at {path or name}")
    return shape


def load_models() -> dict[str, ModelShape]:
    """Every valid model profile by name; a malformed file is reported once (a warning) and left out."""
    return _load_named(model_files(),
                       lambda path: _shape_from_json(read_json(path, ProfileError, "fix or remove this model profile"),
                                                     path))


def get_model(name_or_path: str) -> ModelShape:
    """A model shape by catalogue name, or from a local folder / config.json; unknown names list the catalogue."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        cfg = read_json(p, ProfileError, "pass a transformers config.json")
        return shape_from_hf_config(cfg, p.parent.name, str(p.parent))
    models = load_models()
    key = name_or_path.strip().lower()
    if key in models:
        return models[key]
    close = difflib.get_close_matches(key, list(models), n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    if os.sep in name_or_path:
        hint += f" ({name_or_path} is not a folder with a config.json.)"
    raise ProfileError(f"unknown model {name_or_path!r}.{hint} Known models: {', '.join(sorted(models))}, "
                       "or a local folder with a config.json")
