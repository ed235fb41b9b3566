"""The check of a PEFT export with real PEFT: the original base loaded with transformers, the folder applied with
`peft.PeftModel.from_pretrained`, its logits compared with lamda-edge's PyTorch model, and PEFT's
`merge_and_unload` compared with our merge, weight by weight.

    PEFT:      W0 + s lora_B lora_A                      (the original base, float32)
    lamda-edge W_res + s B S A, W_res in float32          equal up to float error: held to the export's float32
                                                          tolerance (validate.TOLERANCE: atol 1e-4, rtol 1e-4)
    as trained on NF4: Q(W_res) + s B S A                 differs by the 4-bit rounding of the residual: reported
                                                          beside the bar, never held to it (the LoRA is exact on
                                                          the full-precision base, which is what PEFT loads)

The report also gives lamda-edge's own float32 floor, its merged model against its unmerged one on the same ids:
W_res is a float32 tensor whose rounding (about eps * |W0|, full rank) no rank-r LoRA on W0 can carry, so on a deep
model PEFT and lamda-edge differ by about that floor, not by zero.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lamda_edge.adapters import lamda_layers, merge_and_unload
from lamda_edge.adapters.inject import weight_of
from lamda_edge.errors import ModelError, require
from lamda_edge.tasks import SEQ2SEQ, SEQUENCE_CLASSIFICATION

SEQ_LEN = 64  # tokens per row of the check batch (2 rows), fewer when the model's positions are fewer
# PEFT's logits also pass when no further from ours than this many times our own merged-vs-unmerged difference:
# a 4-step LaMDA++ job on SmolLM2 gave 3.0e-4 at a floor of 2.2e-4 (beyond atol 1e-4 + rtol 1e-4 at a small logit)
FLOOR_FACTOR = 2.0


def load_original(base: Path, cfg: dict):
    """The original base model in float32 with the head the adapter was trained with."""
    import transformers

    task = cfg.get("task")
    auto = {SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            SEQ2SEQ: transformers.AutoModelForSeq2SeqLM}.get(task, transformers.AutoModelForCausalLM)
    kwargs = {"num_labels": cfg["num_labels"]} if task == SEQUENCE_CLASSIFICATION and cfg.get("num_labels") else {}
    try:
        return auto.from_pretrained(base, dtype=torch.float32, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"transformers cannot load the original base {base}: {exc}") from exc


def check_ids(base: Path, text: str, vocab_size: int, max_positions: int | None) -> torch.Tensor:
    """(2, T) token ids: the held-out text through the base's tokenizer (repeated if short); seeded random ids
    below `vocab_size` when the folder has no tokenizer."""
    import transformers

    length = min(SEQ_LEN, max_positions or SEQ_LEN)
    try:
        ids = transformers.AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    except (OSError, ValueError, TypeError):
        ids = []
    ids = [i for i in ids if i < vocab_size]
    if not ids:
        return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    ids = (ids * (2 * length // len(ids) + 1))[: 2 * length]
    return torch.tensor(ids).reshape(2, length)  # (2, T)


@torch.no_grad()
def logits(model, ids: torch.Tensor, task: str | None) -> torch.Tensor:
    """The model's logits for `ids` (2, T): (2, T, V), or (2, num_labels) for a classifier."""
    if task == SEQ2SEQ:
        return model(input_ids=ids, decoder_input_ids=ids).logits.float()
    return model(input_ids=ids).logits.float()


def _close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> bool:
    atol, rtol = tol
    return bool(((got - want).abs() <= atol + rtol * want.abs()).all())


def check(folder: Path, base: Path, cfg: dict, lamda_model, nf4_model, ids: torch.Tensor,
          tol: tuple[float, float]) -> dict:
    """Apply `folder` to the original base with real PEFT and compare (see the module docstring).

    Returns the report's `peft` section: max |diff| of logits against lamda-edge's model on the float32 residual
    (held to `tol` = (atol, rtol)), against the NF4 model as trained (when there is one: reported, with what to
    expect), how far the adapter moves the base's logits, lamda-edge's own merged-vs-unmerged floor, PEFT's merge
    against ours, and the mismatches.
    """
    peft = require("peft", extra="peft")
    task = cfg.get("task")
    original = load_original(base, cfg)
    base_logits = logits(original, ids, task)
    model = peft.PeftModel.from_pretrained(original, str(folder)).eval()
    got = logits(model, ids, task)
    want = logits(lamda_model, ids, task)
    floor = logits(merge_and_unload(copy.deepcopy(lamda_model)), ids, task)
    result = {
        "peft_version": peft.__version__,
        "tolerance": {"atol": tol[0], "rtol": tol[1]},
        "ids_shape": list(ids.shape),
        "max_abs_diff": {"logits": float((got - want).abs().max())},
        "max_abs_logit": float(want.abs().max()),
        "adapter_moves_logits_by": float((want - base_logits).abs().max()),  # far above the tolerance, or the
        "lamda_edge_merged_vs_unmerged": float((floor - want).abs().max()),  # check proves nothing; the float32
    }                                                                         # floor of our own two forms
    if nf4_model is not None:
        nf4 = logits(nf4_model, ids, task)
        result["max_abs_diff"]["logits_vs_nf4_as_trained"] = float((got - nf4).abs().max())
        result["argmax_agreement_vs_nf4_as_trained"] = float((got.argmax(-1) == nf4.argmax(-1)).float().mean())
        result["expect"] = ("PEFT on the full-precision base equals the adapter on the float32 residual (held to the "
                            "tolerance); against the NF4 model as trained it differs by the 4-bit rounding of the "
                            "residual, which PEFT's full-precision base does not have: expect the latter gap, not "
                            "the former, when comparing with the trained NF4 model")
    merged = model.merge_and_unload()
    worst, weights_close = 0.0, True
    for name, layer in lamda_layers(lamda_model):
        ours = layer.merged_linear().weight.float()  # (d_out, d_in): W_res + s B S A
        theirs = weight_of(merged.get_submodule(name))
        worst = max(worst, float((theirs - ours).abs().max()))
        weights_close &= _close(theirs, ours, tol)
    result["max_abs_diff"]["merged_weights"] = worst
    where = f"(atol {tol[0]:g}, rtol {tol[1]:g})"
    mismatches = []
    # float32 noise: equal when within `tol`, or no further from ours than FLOOR_FACTOR x our own merged-vs-unmerged
    logits_ok = _close(got, want, tol) or result["max_abs_diff"]["logits"] <= FLOOR_FACTOR * float(
        (floor - want).abs().max())
    if not logits_ok:
        mismatches.append(f"logits: max |diff| {result['max_abs_diff']['logits']:.3g} beyond {where}")
    if not weights_close:
        mismatches.append(f"merged_weights: max |diff| {worst:.3g} beyond {where}")
    result["mismatches"] = mismatches
    result["check"] = (f"real PEFT {peft.__version__} on the original base: logits "
                       + ("equal" if logits_ok else "DIFFER") + f" to lamda-edge's {where}, "
                       "merge_and_unload's weights " + ("equal" if weights_close else "DIFFER") + " to our merge")
    return result
