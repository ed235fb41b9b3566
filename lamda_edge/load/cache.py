"""The on-disk cache of prepared models: the quantized residuals and the adapter init, keyed by what made them.

Preparing a model (SVD of every targeted weight, residual, NF4) costs minutes on a 7B model; the result depends
only on the weights files, the model config, the `LaMDAConfig`, the quantization, the compute dtype and the
versions of lamda-edge and bitsandbytes. All of these go into the key:

    key = sha256({files: [name, size, mtime_ns, sha256(header), sha256(sampled data blocks)],
                  config.json, LaMDAConfig, quantize, compute dtype, task, versions})

An entry is a folder `<cache_dir>/<key>/` with `prepared.safetensors` (per targeted layer: the base weight,
packed NF4 + its quant state or the residual in the compute dtype; the bias; lamda_A, lamda_S, lamda_B; the frozen
low-rank part of the base, frozen_U and frozen_Vt, when the init keeps one) and
`prepared.json` (ranks, fingerprints, the preparation report). It is written to a temporary folder and renamed,
so a reader never sees half an entry. Weights that are not targeted are not cached: they stream from the
original files on every load. Entries made from older weights of the same model folder are removed on write, and
the least recently used entries go when the cache grows past `max_cache_bytes()` (default 10 GB,
`$LAMDA_EDGE_CACHE_MAX_GB`). Training-time settings (t_i, dropout) are not in the key: they do not change what
is prepared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from lamda_edge import __version__
from lamda_edge.adapters.bnb import build_base, is_linear4bit
from lamda_edge.adapters.layer import LaMDALinear

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the random inits draw each layer's factors from its name
TENSORS_NAME = "prepared.safetensors"
INFO_NAME = "prepared.json"
FULL_HASH_MAX_BYTES = 8 << 20  # files up to this size are hashed whole
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 << 10
LAYER_KEYS = ("lamda_A", "lamda_S", "lamda_B")
FROZEN_KEYS = ("frozen_U", "frozen_Vt")  # the base's frozen low-rank part (init "random-residual" only)
NOT_IN_KEY = ("freeze_b_steps", "freeze_b_fraction", "s_lr_scale", "b_lr_scale", "rate_scale",
              "dropout")  # training only
DEFAULT_MAX_GB = 10.0


def default_cache_dir() -> Path:
    """`$LAMDA_EDGE_CACHE/prepared`, else `~/.cache/lamda-edge/prepared` (beside the converted default model)."""
    env = os.environ.get("LAMDA_EDGE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "lamda-edge"
    return root / "prepared"


def file_identity(path: Path) -> dict:
    """Size, mtime and content hashes of a weights file: the whole file when small, else header + samples."""
    stat = path.stat()
    ident = {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with open(path, "rb") as fh:
        if stat.st_size <= FULL_HASH_MAX_BYTES:
            ident["sha256"] = hashlib.sha256(fh.read()).hexdigest()
            return ident
        header_len = int.from_bytes(fh.read(8), "little")  # safetensors: u64 header size, then the JSON header
        ident["header_sha256"] = hashlib.sha256(fh.read(min(header_len, stat.st_size - 8))).hexdigest()
        digest = hashlib.sha256()
        span = max(1, (stat.st_size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
        for i in range(SAMPLE_BLOCKS):
            fh.seek(min(i * span, max(0, stat.st_size - SAMPLE_BLOCK_BYTES)))
            digest.update(fh.read(SAMPLE_BLOCK_BYTES))
        ident["sample_sha256"] = digest.hexdigest()
    return ident


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(
    model_dir: Path, weight_files: list[Path], lamda_config_dict: dict, quantize: str | None,
    compute_dtype: torch.dtype, task: str, num_labels: int | None,
) -> tuple[str, str]:
    """(key of the prepared model, key of the weights alone) as hex digests."""
    config_file = model_dir / "config.json"
    weights = {
        "files": [file_identity(f) for f in sorted(weight_files)],
        "config_json": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else None,
    }
    weights_id = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    everything = {
        "format": CACHE_FORMAT,
        "weights": weights_id,
        "lamda_config": {k: v for k, v in lamda_config_dict.items() if k not in NOT_IN_KEY},
        "quantize": quantize,
        "compute_dtype": str(compute_dtype),
        "task": task,
        "num_labels": num_labels,
        "lamda_edge": __version__,
        "bitsandbytes": _version("bitsandbytes") if quantize else None,
    }
    return hashlib.sha256(json.dumps(everything, sort_keys=True).encode()).hexdigest()[:32], weights_id


# ---- write ---------------------------------------------------------------------------------------------------------


def layer_tensors(name: str, layer: LaMDALinear) -> dict[str, torch.Tensor]:
    """The tensors of one prepared layer under flat names: base weight (+ quant state), bias, A, S, B."""
    base = layer.base_layer
    out = {f"{name}.base.weight": base.weight.data}
    if is_linear4bit(base):
        for key, value in base.weight.quant_state.as_dict(packed=True).items():
            out[f"{name}.base.weight.{key}"] = value
    if base.bias is not None:
        out[f"{name}.base.bias"] = base.bias.data
    for key in LAYER_KEYS:
        out[f"{name}.{key}"] = getattr(layer, key).data
    if layer.frozen_rank:
        for key in FROZEN_KEYS:
            out[f"{name}.{key}"] = getattr(layer, key)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def write_entry(root: Path, key: str, tensors: dict[str, torch.Tensor], info: dict) -> Path | None:
    """Write one cache entry atomically (temp folder, then rename); prune entries of older weights of the model.

    Returns the entry folder, or None when the cache could not be written (a warning says why).
    """
    entry = root / key
    try:
        if not root.exists():
            print(f"lamda-edge: caching prepared layers in {root} (at most {max_cache_bytes() / 1e9:.0f} GB; "
                  "LAMDA_EDGE_CACHE moves it, LAMDA_EDGE_CACHE_MAX_GB caps it)", file=sys.stderr)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": f"lamda-edge-prepared-{CACHE_FORMAT}"})
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")
            if (entry / INFO_NAME).is_file():  # another process wrote the same entry first: keep it
                return entry
            if entry.exists():  # a damaged leftover
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("could not write the prepared-model cache to %s (%s); the next load prepares again", entry, exc)
        return None
    _prune(root, key, info)
    _prune_least_recently_used(root, keep=key, max_bytes=max_cache_bytes())
    return entry


def max_cache_bytes() -> float:
    """The cache's size cap: `$LAMDA_EDGE_CACHE_MAX_GB` (in GB), else `DEFAULT_MAX_GB`."""
    value = os.environ.get("LAMDA_EDGE_CACHE_MAX_GB")
    try:
        return float(value) * 1e9 if value else DEFAULT_MAX_GB * 1e9
    except ValueError:
        logger.warning("ignoring LAMDA_EDGE_CACHE_MAX_GB=%r (not a number); using %s GB", value, DEFAULT_MAX_GB)
        return DEFAULT_MAX_GB * 1e9


def _entry_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _prune_least_recently_used(root: Path, keep: str, max_bytes: float) -> None:
    """Remove the least recently used entries (by their info file's mtime, touched on every hit) until the cache
    fits in `max_bytes`; the entry just written (`keep`) always stays."""
    entries = [e for e in root.iterdir() if not e.name.startswith(".") and (e / INFO_NAME).is_file()]
    entries.sort(key=lambda e: (e / INFO_NAME).stat().st_mtime_ns)  # oldest use first
    total = sum(_entry_bytes(e) for e in entries)
    for entry in entries:
        if total <= max_bytes:
            break
        if entry.name == keep:
            continue
        total -= _entry_bytes(entry)
        logger.info("removing the least recently used prepared-model cache %s (cache over %.1f GB)", entry,
                    max_bytes / 1e9)
        shutil.rmtree(entry, ignore_errors=True)


def _prune(root: Path, key: str, info: dict) -> None:
    """Remove entries made from other (older) weights of the same model folder."""
    for other in root.iterdir():
        if other.name == key or other.name.startswith(".") or not (other / INFO_NAME).is_file():
            continue
        try:
            old = json.loads((other / INFO_NAME).read_text())
        except (OSError, ValueError):
            continue
        if old.get("model_path") == info.get("model_path") and old.get("weights_id") != info.get("weights_id"):
            logger.info("removing stale prepared-model cache %s (the weights changed)", other)
            shutil.rmtree(other, ignore_errors=True)


# ---- read ----------------------------------------------------------------------------------------------------------


class CacheEntry:
    """An open cache entry: its JSON info, and its tensors read one layer at a time (never all at once)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.info = json.loads((folder / INFO_NAME).read_text())
        self._file = safe_open(str(folder / TENSORS_NAME), framework="pt", device="cpu")
        self._keys = list(self._file.keys())

    def layer(self, name: str) -> dict[str, torch.Tensor]:
        """The cached tensors of layer `name` (keys as written by `layer_tensors`)."""
        prefix = name + "."
        return {k: self._file.get_tensor(k) for k in self._keys if k.startswith(prefix)}


def discard_entry(folder: Path) -> None:
    """Remove a damaged entry, so that the next write replaces it."""
    shutil.rmtree(folder, ignore_errors=True)


def read_entry(root: Path, key: str) -> CacheEntry | None:
    """The cache entry `key`, or None when it is missing or unreadable (treated as a miss)."""
    entry = root / key
    if not (entry / INFO_NAME).is_file() or not (entry / TENSORS_NAME).is_file():
        return None
    try:
        opened = CacheEntry(entry)
    except Exception as exc:  # noqa: BLE001 - any damage (SafetensorError included) means: prepare again
        logger.warning("discarding unreadable prepared-model cache %s (%s)", entry, exc)
        discard_entry(entry)
        return None
    if opened.info.get("format") != CACHE_FORMAT:
        return None
    try:
        os.utime(entry / INFO_NAME)  # marks the use for least-recently-used pruning
    except OSError:
        pass
    return opened


def build_layer(
    name: str, tensors: dict[str, torch.Tensor], alpha: float, dropout: float,
    quantize: str | None, compute_dtype: torch.dtype, device: torch.device,
) -> LaMDALinear:
    """Rebuild one prepared `LaMDALinear` from cached tensors (no SVD, no quantization)."""
    prefix = f"{name}.base.weight."
    stats = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if quantize == "nf4" else None
    base = build_base(tensors[f"{name}.base.weight"], tensors.get(f"{name}.base.bias"), quantize, compute_dtype,
                      device, quant_state=stats)
    A, S, B = (tensors[f"{name}.{key}"] for key in LAYER_KEYS)
    frozen = tuple(tensors[f"{name}.{key}"] for key in FROZEN_KEYS) if f"{name}.frozen_U" in tensors else None
    return LaMDALinear.from_factors(base, A, S, B, alpha, dropout, frozen)
