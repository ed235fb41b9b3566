"""A LaMDA adapter written as a standard PEFT LoRA adapter on the ORIGINAL base model (`export --format peft`).

    LaMDA layer:  y = W_res x + s B S A x            W_res = W0 - s B0 S0 A0   (B0, S0, A0: the init)
    A is frozen from the start (A = A0), so the change from the original weight has rank r, not 2r:
                  W_res + s B S A - W0 = s (B S - B0 S0) A
    PEFT LoRA:    y = W0 x + (lora_alpha / r) lora_B lora_A x
                  lora_A = A (r, d_in),  lora_B = B S - B0 S0 (d_out, r),  lora_alpha = alpha  (alpha / r = s)

principal init: B0 S0 = U_r diag(sigma_r) / s; minor: the bottom components; random: S0 = 0 (lora_B = B S).

LaMDA++'s per-layer ranks r_l go into `rank_pattern` (PEFT needs them for the shapes). vLLM reads neither
`rank_pattern` nor `alpha_pattern`: it scales every layer by one c = lora_alpha / r. So every layer is written for
that one scaling: lora_B_l = (s_l / c) (B S - B0 S0) = (r / r_l) (B S - B0 S0), and `alpha_pattern` gives PEFT
lora_alpha * r_l / r, so that PEFT's alpha_l / r_l is the same c. With uniform ranks both patterns are empty.

B0 and S0 are not saved with the adapter (B moves during training): they come from rebuilding the init from the
original weights with the code that made it (`load_lamda_model`, which also reuses the prepared-layer cache). The
saved A is exact; the rebuilt A0 is mapped onto it (B0 S0 A0 = B0 S0 (A0 A^T) A when A0 spans A's rows), so a sign
flip of a singular vector pair between machines changes nothing, and a different subspace is refused.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lamda_edge.adapters import lamda_layers, load_adapter
from lamda_edge.adapters.config import LaMDAConfig
from lamda_edge.adapters.files import LEGACY_NAMES
from lamda_edge.atomic import write_atomic, write_bytes_atomic
from lamda_edge.errors import AdapterMismatchError
from lamda_edge.load.loader import load_lamda_model
from lamda_edge.tasks import SEQ2SEQ, SEQUENCE_CLASSIFICATION

CONFIG_FILE, WEIGHTS_FILE = LEGACY_NAMES  # PEFT's names: adapter_config.json, adapter_model.safetensors
PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModel's wrapped model
PEFT_TASK = {SEQUENCE_CLASSIFICATION: "SEQ_CLS", SEQ2SEQ: "SEQ_2_SEQ_LM"}  # anything else: CAUSAL_LM
SUBSPACE_TOL = 1e-3  # ||A0 - (A0 A^T) A|| / ||A0||: the rebuilt init must span the saved A's rows


@dataclass
class LoraLayer:
    """One layer's LoRA factors (float32) and where its init came from."""

    A: torch.Tensor  # (r, d_in): lora_A
    B: torch.Tensor  # (d_out, r): lora_B
    rank: int
    init_offset: float  # ||A0 - (A0 A^T) A|| / ||A0||: how far the rebuilt init's rows lie from the saved A's


def rebuild(base: Path, adapter: Path, cfg: dict):
    """(the trained LaMDA model on the full-precision residual base, {layer name: LoraLayer}).

    The model is `load_lamda_model` at its init (quantize=None: the residual in float32, whatever the adapter was
    trained on), whose B0 S0 and A0 are read before `load_adapter` puts the trained S, B and A on it.
    """
    config = LaMDAConfig.from_dict(cfg["lamda_config"])
    model = load_lamda_model(str(base), config, quantize=None, device="cpu", compute_dtype=torch.float32,
                             progress=False, gradient_checkpointing=False, task=cfg.get("task"),
                             num_labels=cfg.get("num_labels"))
    init = {name: (layer.scaling * layer.lamda_B.detach() @ layer.lamda_S.detach(), layer.lamda_A.detach().clone())
            for name, layer in lamda_layers(model)}  # name -> (s B0 S0 (d_out, r), A0 (r, d_in))
    load_adapter(model, adapter)  # AdapterMismatchError when the base is not the one it was trained on
    layers = {}
    for name, layer in lamda_layers(model):
        principal, A0 = init[name]
        A = layer.lamda_A.detach().float()  # (r, d_in), frozen since the init
        mix = A0 @ A.T  # (r, r): A0 in the basis of A's rows (the identity when nothing changed)
        offset = float((A0 - mix @ A).norm() / A0.norm().clamp_min(1e-30))
        if offset > SUBSPACE_TOL:
            raise AdapterMismatchError(
                f"layer {name}: the adapter's frozen A does not span the rows of the init rebuilt from {base} "
                f"(relative offset {offset:.3g} > {SUBSPACE_TOL}); the base weights or the SVD differ from training. "
                "Fix: export on the base folder the adapter was trained from (lamda_adapter.json's base_model)")
        B = layer.lamda_B.detach().float() @ layer.lamda_S.detach().float() - principal @ mix / layer.scaling
        layers[name] = LoraLayer(A.clone(), B, layer.rank, offset)  # lora_B: B S - B0 S0 (d_out, r)
    return model.eval(), layers


def target_modules(names: list[str], linear_names: list[str]) -> list[str]:
    """PEFT's `target_modules` for exactly `names`: their last parts when those select no other linear layer of
    the base (the short, usual form that vLLM also reads), else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    selected = {n for n in linear_names if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(names) else sorted(names)


def common_rank(layers: dict[str, LoraLayer]) -> int:
    """The config's `r`: the most common rank (the others go into `rank_pattern`)."""
    return Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]


def peft_config(cfg: dict, layers: dict[str, LoraLayer], targets: list[str], base: Path, fan_in_fan_out: bool) -> dict:
    """The adapter_config.json of PEFT's LoRA schema, with one scaling lora_alpha / r for every layer (see the
    module docstring: `alpha_pattern` keeps PEFT's alpha_l / r_l equal to it where r_l differs from r)."""
    lamda = cfg["lamda_config"]
    ranks = {name: layer.rank for name, layer in layers.items()}
    r = common_rank(layers)
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK.get(cfg.get("task"), "CAUSAL_LM"),
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": lamda["alpha"],  # lora_alpha / r = LaMDA's s for the layers of rank r
        "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {name: lamda["alpha"] * rank / r for name, rank in ranks.items() if rank != r},
        "lora_dropout": lamda["dropout"],
        "target_modules": targets,
        "modules_to_save": list(lamda["modules_to_save"]) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def peft_tensors(layers: dict[str, LoraLayer], saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensor names: `base_model.model.<layer>.lora_A.weight` / `lora_B.weight` (lora_B scaled by r / r_l
    for the one scaling lora_alpha / r), and each module saved in full (`modules_to_save`) as
    `base_model.model.<module>.<parameter>`."""
    r = common_rank(layers)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (layer.B * (r / layer.rank)).contiguous()
    tensors.update({f"{PREFIX}{key}": value.detach().float().contiguous() for key, value in saved.items()})
    return tensors


def write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Write adapter_config.json and adapter_model.safetensors into `folder` atomically; returns their sizes."""
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_bytes_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return {name: (folder / name).stat().st_size for name in (WEIGHTS_FILE, CONFIG_FILE)}


def build(options, tmp: Path, report: dict, text: str, log, stage=lambda name: None) -> None:
    """`export --format peft`: rebuild, convert, write into `tmp`, check with real PEFT on `text` (three phases,
    one `log` line each). Raises `ExportValidationError` listing the mismatches when PEFT's model differs from
    ours."""
    import time

    from lamda_edge.adapters.files import verify_adapter
    from lamda_edge.adapters.inject import _is_conv1d, is_linear
    from lamda_edge.adapters.io import _saved_modules
    from lamda_edge.errors import ExportValidationError, require
    from lamda_edge.export import peft_check
    from lamda_edge.export.merged import load_adapted, resolve_base
    from lamda_edge.export.validate import TOLERANCE

    require("peft", extra="peft")  # the check needs it: say so before minutes of work
    timings = report["timings_s"]
    stage("rebuilding the adapter's init from the original weights")
    t = time.perf_counter()
    cfg = verify_adapter(options.adapter)
    base = resolve_base(options.model, cfg, Path(options.adapter))
    model, layers = rebuild(base, Path(options.adapter), cfg)
    timings["convert"] = time.perf_counter() - t
    report["kind"] = "peft-lora"
    report["source"] = {"adapter": str(options.adapter), "base_model": str(base), "quantize": cfg.get("quantize"),
                        "init": cfg["lamda_config"]["init"], "rank_allocation": cfg["lamda_config"]["rank_allocation"]}
    worst = max(layer.init_offset for layer in layers.values())
    log(f"converted {len(layers)} LaMDA layers to LoRA ({report['source']['init']} init, rebuilt init's rows off "
        f"the saved A by {worst:.2g}) in {timings['convert']:.1f}s")

    stage("writing the PEFT adapter")
    skeleton = _original_skeleton(base, cfg)  # the original layers' names and kinds, no weights
    linear = [(n, m) for n, m in skeleton.named_modules() if n and is_linear(m)]
    conv1d = any(_is_conv1d(m) for n, m in linear if n in layers)  # GPT-2: PEFT must transpose when merging
    targets = target_modules(list(layers), [n for n, _ in linear])
    config = peft_config(cfg, layers, targets, base, conv1d)
    saved = _saved_modules(model, LaMDAConfig.from_dict(cfg["lamda_config"]))
    report["sizes_bytes"] = write(tmp, config, peft_tensors(layers, saved))
    report["peft_config"] = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "task_type")}
    report["peft_config"]["rank_pattern_layers"] = len(config["rank_pattern"])
    log(f"wrote {WEIGHTS_FILE} ({report['sizes_bytes'][WEIGHTS_FILE] / 1e6:.1f} MB; r={config['r']}"
        + (f", {len(config['rank_pattern'])} layers in rank_pattern" if config["rank_pattern"] else "")
        + f", lora_alpha={config['lora_alpha']:g}) and {CONFIG_FILE}")

    stage("checking with PEFT on the original base")
    t = time.perf_counter()
    hf = model.config
    ids = peft_check.check_ids(base, text, hf.vocab_size, getattr(hf, "max_position_embeddings", None))
    nf4 = load_adapted(options.model, Path(options.adapter))[0] if cfg.get("quantize") == "nf4" else None
    result = peft_check.check(tmp, base, cfg, model, nf4, ids, TOLERANCE["fp32"])
    report["peft"] = report["validation"] = result
    timings["validate"] = time.perf_counter() - t
    report["ok"] = not result["mismatches"]
    if result["mismatches"]:
        raise ExportValidationError("PEFT's model disagrees with lamda-edge's in "
                                    f"{len(result['mismatches'])} check(s):\n  " + "\n  ".join(result["mismatches"])
                                    + f"\nreport: {options.output}.export-report.json")
    diffs = result["max_abs_diff"]
    log(f"checked with PEFT {result['peft_version']}: max |diff| logits {diffs['logits']:.3g} (lamda-edge's own "
        f"merged vs unmerged: {result['lamda_edge_merged_vs_unmerged']:.3g}; the adapter moves them by "
        f"{result['adapter_moves_logits_by']:.3g}), merged weights {diffs['merged_weights']:.3g}"
        + (f"; vs the NF4 model as trained {diffs['logits_vs_nf4_as_trained']:.3g}, argmax agreement "
           f"{result['argmax_agreement_vs_nf4_as_trained']:.0%} (expected: the residual's 4-bit rounding)"
           if "logits_vs_nf4_as_trained" in diffs else ""))


def _original_skeleton(base: Path, cfg: dict):
    """The original model of `base` with the adapter's head, its parameters on the meta device (no memory)."""
    from transformers import AutoConfig

    from lamda_edge.load.loader import build_skeleton, resolve_task

    hf_config = AutoConfig.from_pretrained(base)
    if cfg.get("num_labels"):
        hf_config.num_labels = cfg["num_labels"]
    return build_skeleton(hf_config, resolve_task(hf_config, cfg.get("task")), torch.float32)
