"""`export --format peft` (lamda_edge/export/peft_lora.py, peft_check.py): a LaMDA adapter as a standard PEFT LoRA
on the original base, loaded here with real PEFT, independently of the export's own check.

Every adapter is made as training makes it (`load_lamda_model`: init from the original weights) and its S and B are
moved away from the init before saving, so that a LoRA missing a term could not pass.
"""

from __future__ import annotations

import json

import pytest
import torch

from lamda_edge import LaMDAConfig, merge_and_unload, save_adapter
from lamda_edge.adapters import lamda_layers
from lamda_edge.adapters.inject import weight_of
from lamda_edge.errors import AdapterMismatchError, ConfigError, ExportValidationError
from lamda_edge.load.loader import load_lamda_model

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny):
    """arch -> a saved tiny base folder (with its tokenizer), built once per module."""
    root = tmp_path_factory.mktemp("peft-bases")
    made = {}

    def get(arch: str):
        if arch not in made:
            tiny.save(root / arch, arch)
            made[arch] = root / arch
        return made[arch]

    return get


def trained_adapter(base, folder, config: LaMDAConfig, quantize=None, seed: int = 5, **load):
    """load_lamda_model as training does, S and B moved from their init, saved; returns the (unmerged) model."""
    model = load_lamda_model(base, config, quantize=quantize, device="cpu", compute_dtype=torch.float32,
                             cache_dir=False, progress=False, **load)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lamda_layers(model):
            layer.lamda_S.add_(0.5 * torch.randn(layer.lamda_S.shape, generator=g))
            layer.lamda_B.add_(0.5 * torch.randn(layer.lamda_B.shape, generator=g))
    save_adapter(model, folder, metadata={"base_model": str(base), "quantize": quantize})
    return model.eval()


def peft_model(base, folder, auto="AutoModelForCausalLM", **kwargs):
    import transformers

    original = getattr(transformers, auto).from_pretrained(base, dtype=torch.float32, **kwargs).eval()
    return peft.PeftModel.from_pretrained(original, str(folder)).eval()


def ids_for(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


CASES = [
    pytest.param("llama", LaMDAConfig(rank=4, alpha=8.0), id="llama-principal"),
    pytest.param("llama", LaMDAConfig(rank=4, alpha=8.0, init="random"), id="llama-random"),
    pytest.param("llama", LaMDAConfig(rank=4, alpha=8.0, init="minor"), id="llama-minor"),
    pytest.param("llama", LaMDAConfig(rank=4, alpha=8.0, init="random-residual"), id="llama-random-residual"),
    pytest.param("qwen2", LaMDAConfig(rank=4, alpha=8.0, rank_allocation="energy", min_rank=2, max_rank=8),
                 id="qwen2-lamda++-energy"),
    pytest.param("gpt2", LaMDAConfig(rank=4, alpha=8.0, target_modules=("c_attn", "c_fc")), id="gpt2-conv1d"),
    pytest.param("phi3", LaMDAConfig(rank=4, alpha=8.0, svd="full"), id="phi3-fused-full-svd"),
]


@pytest.mark.parametrize("arch, config", CASES)
def test_peft_loads_the_export_and_matches_the_lamda_model(bases, run_export, tmp_path, tol, arch, config):
    base = bases(arch)
    adapted = trained_adapter(base, tmp_path / "adapter", config)
    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft", ship=tmp_path / "ship")
    assert report["ok"] and report["summary"]["ok"] and report["kind"] == "peft-lora"
    shipped = sorted(p.name for p in (tmp_path / "ship").iterdir())
    assert shipped == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = {name: layer.rank for name, layer in lamda_layers(adapted)}
    assert {saved["rank_pattern"].get(name, saved["r"]) for name in ranks} == set(ranks.values())
    assert all(saved["rank_pattern"].get(name, saved["r"]) == r for name, r in ranks.items())
    if config.rank_allocation == "energy":
        assert len(set(ranks.values())) > 1 and saved["rank_pattern"]  # LaMDA++ gave per-layer ranks
    # one scaling lora_alpha / r for every layer in PEFT too (vLLM reads no patterns: it applies that one)
    assert [saved["alpha_pattern"][n] / saved["rank_pattern"][n] for n in saved["rank_pattern"]] == pytest.approx(
        [saved["lora_alpha"] / saved["r"]] * len(saved["rank_pattern"]), rel=1e-12)

    model = peft_model(base, tmp_path / "out")
    ids = ids_for(adapted)
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, model(input_ids=ids).logits
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=ids).logits
    assert (want - plain).abs().max() > 100 * tol.fp32  # the adapter moved the model: the check means something
    torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)
    assert report["peft"]["max_abs_diff"]["logits"] <= tol.fp32


@pytest.mark.parametrize("arch, config", [CASES[0], CASES[4], CASES[5]])
def test_peft_merge_and_unload_equals_our_merge(bases, run_export, tmp_path, tol, arch, config):
    from transformers import AutoModelForCausalLM

    base = bases(arch)
    adapted = trained_adapter(base, tmp_path / "adapter", config)
    names = [name for name, _ in lamda_layers(adapted)]
    run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")
    theirs = peft_model(base, tmp_path / "out").merge_and_unload()
    ours = merge_and_unload(adapted)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name in names:
        want = weight_of(ours.get_submodule(name))  # (d_out, d_in)
        got = weight_of(theirs.get_submodule(name))
        assert (want - weight_of(original.get_submodule(name))).abs().max() > 100 * tol.fp32  # S and B moved it
        torch.testing.assert_close(got, want, atol=tol.fp32, rtol=0)


def test_an_nf4_trained_adapter_reports_both_references(bases, run_export, tmp_path, tol):
    """PEFT's full-precision base: equal to the adapter on the float32 residual, off the NF4 model by its rounding."""
    base = bases("llama")
    nf4 = trained_adapter(base, tmp_path / "adapter", LaMDAConfig(rank=4, alpha=8.0), quantize="nf4")
    report = run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")
    diffs = report["peft"]["max_abs_diff"]
    assert report["ok"] and diffs["logits"] <= tol.fp32 and "4-bit rounding" in report["peft"]["expect"]
    assert diffs["logits_vs_nf4_as_trained"] > 100 * tol.fp32  # the NF4 rounding shows, and is not held to the bar
    assert 0 < report["peft"]["argmax_agreement_vs_nf4_as_trained"] <= 1
    model = peft_model(base, tmp_path / "out")
    ids = ids_for(nf4)
    with torch.no_grad():
        gap = (model(input_ids=ids).logits - nf4(input_ids=ids).logits).abs().max()
    assert gap > 100 * tol.fp32  # measured here too, on other ids: the gap is real, not a reporting artefact


def test_a_classifier_keeps_its_trained_head(bases, run_export, tmp_path, tol):
    """A new 3-way head on a bare encoder: `modules_to_save` in PEFT's config, the head's tensors in the file."""
    base = bases("bert-encoder")
    config = LaMDAConfig(rank=4, alpha=8.0, modules_to_save=("classifier",))
    adapted = trained_adapter(base, tmp_path / "adapter", config, task="sequence-classification", num_labels=3)
    run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")
    model = peft_model(base, tmp_path / "out", "AutoModelForSequenceClassification", num_labels=3)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    ids = ids_for(adapted)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=tol.fp32, rtol=0)


def test_a_wrong_conversion_fails_the_check_and_keeps_the_report(bases, run_export, tmp_path, monkeypatch):
    """Drop the init's term (lora_B = B S, as if S0 were 0): PEFT's model then differs and the export says so."""
    from lamda_edge.export import peft_lora

    base = bases("llama")
    trained_adapter(base, tmp_path / "adapter", LaMDAConfig(rank=4, alpha=8.0))
    real = peft_lora.rebuild

    def without_init(*args):
        model, layers = real(*args)
        for name, layer in lamda_layers(model):
            layers[name].B = layer.lamda_B.detach() @ layer.lamda_S.detach()
        return model, layers

    monkeypatch.setattr(peft_lora, "rebuild", without_init)
    with pytest.raises(ExportValidationError, match="logits: max"):
        run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")
    failed = json.loads((tmp_path / "out.export-report.json").read_text())
    assert not failed["summary"]["ok"] and failed["peft"]["mismatches"] and not (tmp_path / "out").exists()


def test_an_adapter_whose_a_is_not_the_init_of_this_base_is_refused(bases, run_export, tmp_path):
    """The rebuilt init must span the saved A's rows; another subspace (other weights, another SVD) is named."""
    from safetensors.torch import load_file, save_file

    from lamda_edge.adapters.files import WEIGHTS_NAME
    from lamda_edge.integrity import sha256_file

    base = bases("llama")
    trained_adapter(base, tmp_path / "adapter", LaMDAConfig(rank=4, alpha=8.0))
    tensors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("q_proj.lamda_A"))
    tensors[key] = torch.linalg.qr(torch.randn(tensors[key].shape[1], tensors[key].shape[0]))[0].T.contiguous()
    save_file(tensors, tmp_path / "adapter" / WEIGHTS_NAME, metadata={"format": "lamda-edge-adapter"})
    info_file = tmp_path / "adapter" / "lamda_adapter.json"
    info = json.loads(info_file.read_text())
    info["weights_sha256"] = sha256_file(tmp_path / "adapter" / WEIGHTS_NAME)
    info_file.write_text(json.dumps(info))
    with pytest.raises(AdapterMismatchError, match=r"q_proj: the adapter's frozen A does not span"):
        run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")


def test_without_peft_the_export_says_what_to_install_before_any_work(bases, run_export, tmp_path, monkeypatch):
    import sys

    from lamda_edge.errors import MissingDependencyError

    base = bases("llama")
    trained_adapter(base, tmp_path / "adapter", LaMDAConfig(rank=4, alpha=8.0))
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'lamda-edge\[peft\]'"):
        run_export(tmp_path / "out", adapter=tmp_path / "adapter", format="peft")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"model": "m"}, "--format peft writes an adapter: give --adapter DIR", id="no-adapter"),
    pytest.param({"adapter": "a", "int8": True}, "drop --int8", id="int8"),
    pytest.param({"adapter": "a", "dtype": "fp16"}, "drop --dtype fp16", id="fp16"),
])
def test_options_that_do_not_apply_to_peft_are_refused(tmp_path, kwargs, message):
    from lamda_edge.export.pipeline import ExportOptions

    with pytest.raises(ConfigError, match=message):
        ExportOptions(output=tmp_path / "out", format="peft", **kwargs)


def test_cli_exports_peft_and_refuses_bad_input_with_exit_2(bases, tmp_path, capsys):
    from lamda_edge.cli import main

    base = bases("llama")
    trained_adapter(base, tmp_path / "adapter", LaMDAConfig(rank=4, alpha=8.0))
    args = ["export", "--adapter", str(tmp_path / "adapter"), "--format", "peft"]
    assert main(args + ["--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "export ok (peft-lora)" in out and "real PEFT" in out
    assert {"adapter_config.json", "adapter_model.safetensors", "export-report.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert main(args + ["--output", str(tmp_path / "out2"), "--int4"]) == 2
    err = capsys.readouterr().err
    assert "drop --int4" in err and "Traceback" not in err and not (tmp_path / "out2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    pytest.param([], id="principal"),
    pytest.param(["lamda.init=random"], id="random"),
    pytest.param(["lamda.rank_allocation=energy"], id="lamda++-energy"),
])
def test_a_short_default_job_on_smollm2_exports_for_peft(tmp_path, tol, overrides):
    """The default job (real SmolLM2-135M base, `lamda-edge train`, 4 steps) exported --format peft: real PEFT on
    the original base gives lamda-edge's logits within the bar, and the trained adapter moves them far beyond it."""
    from lamda_edge.cli import main

    run = tmp_path / "run"
    assert main(["train", "--quiet", f"output={run}", "max_steps=4", "demo_eval=8", "demo_generate=1",
                 *overrides]) == 0
    assert main(["export", "--adapter", str(run), "--output", str(tmp_path / "peft"), "--format", "peft"]) == 0
    report = json.loads((tmp_path / "peft" / "export-report.json").read_text())
    peft_part = report["peft"]
    diffs = peft_part["max_abs_diff"]
    # float32 rounding of a 30-layer model: held to the export's fp32 tolerance (atol + rtol * |logit|, rtol = atol),
    # not to an absolute 1e-4 (the 60-step default job: 1.12e-4, docs/benchmarks.md "Export: PEFT LoRA")
    assert report["ok"] and diffs["logits"] <= tol.fp32 * (1 + peft_part["max_abs_logit"])
    assert diffs["merged_weights"] <= tol.fp32
    assert peft_part["adapter_moves_logits_by"] > 100 * tol.fp32
    if overrides == ["lamda.rank_allocation=energy"]:
        assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
