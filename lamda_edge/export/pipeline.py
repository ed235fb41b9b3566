"""Merge -> write a transformers folder -> export ONNX -> validate against PyTorch (-> int4) -> export-report.json.

    adapter folder ──> load base (NF4) + adapter ──> merge_and_unload (fp32) ──> OUT/merged/ (safetensors, tokenizer)
                                                                                   │
                      OUT/model.onnx  <── torch.onnx.export(dynamo=True) <─────────┤   (or --format genai:
                      OUT/model.int4.onnx <── MatMulNBits (--int4)                 │    onnxruntime-genai builder)
                      OUT/export-report.json <── PyTorch vs ONNX Runtime, every output, every case
                      OUT/config.json, tokenizer files <── copied from merged/ (optimum loads OUT as it is)
    --format gguf:    OUT/model.<type>.gguf + Modelfile <── merged model, read back by transformers (gguf_check.py)

    --format peft: no merge, no graph: OUT/adapter_config.json + adapter_model.safetensors, a LoRA on the original
    base (export/peft_lora.py), checked with real PEFT (export/peft_check.py) in OUT/export-report.json

Everything is built in a temporary folder next to the output (`.<name>.tmp-<pid>`) and renamed at the end: a
failure leaves nothing half-written, and the next export to the same output removes what a killed one left. An
output that is, contains or sits inside the adapter folder or the base model folder, or that is or contains the
current directory, is refused before anything is written (`--overwrite` would delete it). A validation failure
still writes its report, beside the output as `<output>.export-report.json`. The report's `ship` lists the files a
device needs (export/ship.py); with `ship`, they are copied into a folder of their own at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lamda_edge.adapters.files import read_adapter_config
from lamda_edge.atomic import stale_leftovers, write_bytes_atomic
from lamda_edge.errors import ConfigError, ExportValidationError, ModelError
from lamda_edge.export import genai, genai_pack, lowbit
from lamda_edge.export import graph as onnx_graph
from lamda_edge.export.graph import MODEL_FILE, onnx_size
from lamda_edge.export.location import check_output_location
from lamda_edge.export.merged import load_merged, load_reference, load_tokenizer, save_merged
from lamda_edge.export.portable import copy_loader_files
from lamda_edge.export.ship import check_ship_location, ship, ship_bytes, ship_files
from lamda_edge.export.summary import with_summary_first
from lamda_edge.export.validate import TOLERANCE, validate_decoder, validate_encoder
from lamda_edge.files import check_output_folder, read_json, read_text
from lamda_edge.progress import bar, quiet_bars_off_terminal, ticking

FORMATS = ("onnx", "genai", "gguf", "peft")
GENAI_PRECISIONS = ("auto", "int4", "int8", "fp16", "fp32")  # auto: genai_precision()
GENAI_PROVIDERS = ("cpu", "cuda")
INT4_FILE, REPORT_FILE, MERGED_DIR = "model.int4.onnx", "export-report.json", "merged"
HELD_OUT_TEXT = (
    "The river ran low in the late summer, and the children walked along its stones to the old mill. "
    "Their grandmother had told them that the wheel once turned day and night, grinding wheat for the whole "
    "valley. Now the roof had fallen in, and swallows nested in the beams. What is twelve times seven? "
    "Twelve times seven is eighty-four. If a train leaves at nine and the trip takes three hours, it arrives "
    "at noon. Water boils at one hundred degrees Celsius at sea level."
)


@dataclass(frozen=True)
class ExportOptions:
    """What `export` builds; the CLI flags map one to one onto these fields."""

    output: Path
    model: Path | None = None  # base transformers folder; None: the one the adapter records
    adapter: Path | None = None  # LaMDA adapter folder; None: export the base model as it is
    dtype: str = "fp32"  # "fp32" | "fp16" (plain ONNX format)
    int4: bool = False  # also write model.int4.onnx (export/lowbit.py)
    block_size: int = 32  # MatMulNBits quantization block along the input dimension
    int4_method: str = "auto"  # "auto" | "nf4" (as trained, MatMulBnb4) | "nbits" | "merged" (export/lowbit.py)
    int8: bool = False  # also write model.int8.onnx (MatMulNBits bits=8 on the residual base)
    format: str = "onnx"  # "onnx" | "genai"
    precision: str = "auto"  # genai format: "auto" (genai_precision) | "int4" | "int8" | "fp16" | "fp32"
    execution_provider: str = "cpu"  # genai format: "cpu" | "cuda"
    genai_builder: bool = False  # genai format: rebuild with onnxruntime-genai's builder (re-quantized) instead
    overwrite: bool = False
    eval_text: Path | None = None  # held-out text for perplexity; None: a built-in paragraph
    gguf_type: str = "q8_0"  # gguf format: "f16" | "q8_0" | "q4_0" (export/gguf_file.py)
    ship: Path | None = None  # also copy what the device needs (export/ship.py) into this new folder

    def __post_init__(self):
        problems = []
        if self.dtype not in TOLERANCE:
            problems.append(f"`dtype` should be one of {tuple(TOLERANCE)}, got {self.dtype!r}")
        if self.format not in FORMATS:
            problems.append(f"`format` should be one of {FORMATS}, got {self.format!r}")
        if self.precision not in GENAI_PRECISIONS:
            problems.append(f"`precision` should be one of {GENAI_PRECISIONS}, got {self.precision!r}")
        if self.execution_provider not in GENAI_PROVIDERS:
            problems.append(f"`execution_provider` should be one of {GENAI_PROVIDERS}, "
                            f"got {self.execution_provider!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            problems.append(f"`block_size` should be a power of two >= 16, got {self.block_size}")
        if self.format == "genai" and self.execution_provider != "cpu" and not self.genai_builder:
            problems.append("--format genai packages the validated CPU graph; for --execution-provider "
                            f"{self.execution_provider} add --genai-builder")
        if self.format == "gguf":
            problems += _gguf_problems(self)
        if self.int4 and self.int8:
            problems.append("--int4 and --int8 write different graphs; choose one (export twice for both)")
        if self.format == "genai" and (self.int4 and self.precision not in ("auto", "int4")
                                       or self.int8 and self.precision not in ("auto", "int8")):
            problems.append(f"--format genai packages one graph: --{'int4' if self.int4 else 'int8'} and "
                            f"--precision {self.precision} name two; give one of them")
        if self.format == "genai" and self.genai_builder and self.precision == "int8":
            problems.append("onnxruntime-genai's builder has no int8 here; drop --genai-builder (our validated int8 "
                            "graph is packaged), or choose --precision int4, fp16 or fp32")
        try:
            lowbit.resolve_method(self.int4_method, self.adapter, None)
        except ConfigError as exc:
            problems.append(str(exc))
        if self.format == "peft":  # a LoRA adapter file, no graph: the ONNX options do not apply
            problems += _peft_problems(self)
        if self.model is None and self.adapter is None:
            problems.append("give `--adapter DIR` (a trained adapter) or `--model DIR` (a model to export as is)")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            problems.append(f"`eval_text` {self.eval_text} is not a file")
        try:
            check_output_folder(self.output)
            if self.ship is not None:
                check_output_folder(self.ship, "--ship")
                check_ship_location(self.ship, self.output)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))


def _gguf_problems(options: ExportOptions) -> list[str]:
    """What --format gguf cannot be combined with (the file carries its own weight type: --gguf-type)."""
    from lamda_edge.export.gguf_file import GGUF_TYPES

    problems = [] if options.gguf_type in GGUF_TYPES else [
        f"`gguf_type` should be one of {GGUF_TYPES}, got {options.gguf_type!r}"]
    other = [flag for flag, used in (("--int4", options.int4), ("--int8", options.int8), ("--genai-builder",
             options.genai_builder), ("--dtype fp16", options.dtype != "fp32")) if used]
    if other:
        problems.append(f"--format gguf writes one file whose weight type is --gguf-type; drop {', '.join(other)}")
    return problems


def _check_gguf_family(options: ExportOptions) -> None:
    """Refuse a base model whose family --format gguf does not write, from its config.json alone."""
    from lamda_edge.export.gguf_file import family_of
    from lamda_edge.export.merged import resolve_base

    cfg = read_adapter_config(options.adapter) if options.adapter is not None else {}
    base = options.model if options.adapter is None else resolve_base(options.model, cfg, options.adapter)
    config = Path(base) / "config.json"
    model_type = read_json(config, ModelError, "pass a transformers model folder").get("model_type") if \
        config.is_file() else None
    if model_type is not None:
        family_of(model_type)  # raises, naming the supported families


def export(options: ExportOptions, log=print, progress: bool = False) -> dict:
    """Merge, export, validate (and quantize); return the report that was written to `export-report.json`: its
    `summary` (export/summary.py) first, then the details.

    `log` gets one line at the end of each phase; with `progress`, a bar over the phases on stderr carries them,
    names the phase in progress and keeps its elapsed time moving through the long ones (no ETA: the phases take
    from seconds to many minutes, so a rate over them would mislead).

    Raises:
        ConfigError: the output folder exists without `overwrite`, or an option is invalid.
        ModelError / AdapterMismatchError: the model cannot be loaded, merged or exported.
        ExportValidationError: ONNX Runtime disagrees with PyTorch; the report is written beside the output.
    """
    out = Path(options.output)
    check_output_location(options.output, options.adapter, options.model)
    quiet_bars_off_terminal()  # a log file gets plain lines, from Python as from the CLI
    if options.ship is not None:
        check_output_location(options.ship, options.adapter, options.model, flag="--ship")
        if Path(options.ship).exists() and not options.overwrite:
            raise ConfigError(f"--ship folder {options.ship} already exists. Fix: pass --overwrite, or choose "
                              "another --ship")
    adapter_config = read_adapter_config(options.adapter) if options.adapter is not None else {}
    # ^ not an adapter folder: say so before any work or progress bar
    if options.format == "genai" and options.precision == "auto":
        precision, why = genai_precision(options, adapter_config.get("quantize"))
        options = replace(options, precision=precision)
        log(f"--format genai: --precision auto is {precision} ({why})")
    if options.format == "gguf":
        _check_gguf_family(options)  # a family llama.cpp's file cannot hold: say so before the merge
    _remove_leftovers(out, log)
    if out.exists() and not options.overwrite:
        raise ConfigError(f"output folder {out} already exists. Fix: pass --overwrite, or choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    report = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
              "timings_s": {}, "versions": _versions()}
    phases = bar(_phase_count(options), "export", progress, unit="phase", leave=True, eta=False)

    def log_phase(line: str) -> None:
        (phases.write if progress else log)(line)
        phases.update(1)

    def stage(name: str) -> None:
        phases.set_description_str(f"export: {name}")

    try:
        with ticking(phases):
            _build(options, tmp, report, log_phase, stage)
        names = ship_files(tmp)
        report["ship"] = {"files": names, "bytes": ship_bytes(tmp, names)}
        _write_json(tmp / REPORT_FILE, with_summary_first(report))
    except ExportValidationError:
        failed = out.parent / f"{out.name}.{REPORT_FILE}"
        _write_json(failed, with_summary_first(report))
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        phases.close()
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    if options.ship is not None:
        ship(out, options.ship, overwrite=options.overwrite)
        report["shipped_to"] = str(options.ship)
    return with_summary_first(report)


def genai_precision(options: ExportOptions, quantize: str | None) -> tuple[str, str]:
    """`--precision auto` for `--format genai`, as the train summary's `next:` line chooses, and why: int4 for an
    adapter trained on the NF4 base (the int4 graph is then the trained model) or with --int4; otherwise int8
    (onnxruntime-genai reads our MatMulNBits bits=8 graph on the CPU; tests/test_export_ship.py runs it), or fp32
    with --genai-builder, which has no int8."""
    if options.int4:
        return "int4", "--int4"
    if options.adapter is not None and quantize == "nf4" and not options.int8:
        return "int4", "an adapter trained on the NF4 base: the int4 graph is the trained model"
    if options.genai_builder:
        return "fp32", "onnxruntime-genai's builder has no int8, and its int4 re-quantizes every weight"
    why = ("a full-precision base: int8 keeps the fine-tune, where 4 bits would quantize weights the adapter never "
           "saw" if options.adapter is not None else "no adapter: int8 is the smaller graph that keeps the model")
    return "int8", why


def _peft_problems(options: ExportOptions) -> list[str]:
    """What --format peft cannot honour: no adapter, or options of the ONNX graphs."""
    problems = [] if options.adapter is not None else ["--format peft writes an adapter: give --adapter DIR"]
    ignored = [flag for flag, on in (("--int4", options.int4), ("--int8", options.int8),
                                     ("--dtype fp16", options.dtype != "fp32"), ("--genai-builder",
                                                                                 options.genai_builder)) if on]
    if ignored:
        problems.append(f"--format peft writes a LoRA adapter, not ONNX graphs: drop {', '.join(ignored)}")
    return problems


def _phase_count(options: ExportOptions) -> int:
    """The phases that end with a log line: merge, export, validate (or the genai build), low-bit, genai package;
    --format peft: convert, write, check; --format gguf: merge, write, check."""
    if options.format in ("peft", "gguf") or options.format == "genai" and options.genai_builder:
        return 3
    lowbit_genai = options.format == "genai" and options.precision in ("int4", "int8")
    return 3 + bool(options.int4 or options.int8 or lowbit_genai) + (
        options.format == "genai")


def _remove_leftovers(out: Path, log) -> None:
    """Remove what an export killed while building `out` left beside it; an old output it had moved aside but not
    yet replaced comes back when `out` is missing."""
    for trash in stale_leftovers(out.parent, f".{out.name}.old-"):
        if out.exists():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(trash, out)
            log(f"restored {out} from {trash.name}, left by a killed export")
    for tmp in stale_leftovers(out.parent, f".{out.name}.tmp-"):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}, left by a killed export")


def _build(options: ExportOptions, tmp: Path, report: dict, log, stage=lambda name: None) -> None:
    """The phases of `export`: each ends with one `log` line; `stage(name)` names the one starting."""
    if options.format == "peft":  # a standard LoRA adapter on the original base (export/peft_lora.py)
        from lamda_edge.export import peft_lora

        text = read_text(options.eval_text, ConfigError, "pass a UTF-8 text file") if options.eval_text else None
        peft_lora.build(options, tmp, report, text or HELD_OUT_TEXT, log, stage)
        _write_json(tmp / REPORT_FILE, with_summary_first(report))
        return
    timings = report["timings_s"]
    stage("merging the adapter into the weights" if options.adapter else "loading the model")
    t = time.perf_counter()
    merged, tokenizer_dir, source = load_merged(options.model, options.adapter)
    report["source"] = source
    timings["merge"] = time.perf_counter() - t
    log(f"merged {source['model_type']} ({source['parameters'] / 1e6:.1f}M parameters) in {timings['merge']:.1f}s")

    t = time.perf_counter()
    merged_dir = tmp / MERGED_DIR
    save_merged(merged, tokenizer_dir, merged_dir)
    del merged
    reference = load_reference(merged_dir)  # the saved folder must load back, and is what ONNX is checked against
    timings["save_merged"] = time.perf_counter() - t
    kind = onnx_graph.model_kind(reference)
    report["kind"] = kind
    tokenizer = load_tokenizer(merged_dir)
    text = read_text(options.eval_text, ConfigError, "pass a UTF-8 text file") if options.eval_text else HELD_OUT_TEXT

    if options.format == "gguf":  # one file for llama.cpp / Ollama, read back and checked (export/gguf_check.py)
        from lamda_edge.export import gguf_check

        name = (options.adapter or options.model or Path(reference.config.model_type)).name
        gguf_check.build_and_validate(reference, merged_dir, tokenizer, text, tmp, options.gguf_type, name, report,
                                      log, stage)
        shutil.rmtree(merged_dir)  # the file carries weights and tokenizer; the fp32 folder would triple the size
        _write_json(tmp / REPORT_FILE, with_summary_first(report))
        return
    if kind == "seq2seq":
        _build_seq2seq(options, reference, merged_dir, tmp, report, log)
        return
    if options.format == "genai" and kind != "decoder":
        raise ModelError(f"--format genai builds causal LMs only; {type(reference).__name__} is a {kind}. "
                         "Fix: use the default --format onnx for classifiers")
    if options.format == "genai" and options.genai_builder:  # the builder's own graph, re-quantized
        stage("building and validating the ONNX Runtime GenAI model")
        genai.build_and_validate(merged_dir, tmp, options.precision, options.execution_provider, reference,
                                 tokenizer, text, report, log)
    else:
        copy_loader_files(merged_dir, tmp)  # beside the graphs: optimum's ORTModelForCausalLM loads the folder as is
        if options.format == "genai":  # our validated graph, packaged: --precision picks which one
            options = replace(options, int4=options.int4 or options.precision == "int4",
                              int8=options.int8 or options.precision == "int8",
                              dtype="fp16" if options.precision == "fp16" else options.dtype)
        stage(f"exporting {MODEL_FILE}")
        t = time.perf_counter()
        export_fn = onnx_graph.export_decoder if kind == "decoder" else onnx_graph.export_encoder
        export_fn(reference, tmp / MODEL_FILE)
        if options.dtype == "fp16":
            _to_fp16(tmp / MODEL_FILE)
        timings["export"] = time.perf_counter() - t
        report["sizes_bytes"] = {MODEL_FILE: onnx_size(tmp, MODEL_FILE)}
        log(f"exported {MODEL_FILE} ({report['sizes_bytes'][MODEL_FILE] / 1e6:.1f} MB) in {timings['export']:.1f}s")

        stage("validating against PyTorch")
        t = time.perf_counter()
        validate = validate_decoder if kind == "decoder" else validate_encoder
        report["validation"] = validate(reference, tmp / MODEL_FILE, TOLERANCE[options.dtype])
        timings["validate"] = time.perf_counter() - t
        mismatches = report["validation"]["mismatches"]
        report["ok"] = not mismatches
        if mismatches:
            raise ExportValidationError(f"ONNX Runtime disagrees with PyTorch in {len(mismatches)} check(s):\n  "
                                        + "\n  ".join(mismatches)
                                        + f"\nreport: {options.output}.{REPORT_FILE}")
        diffs = report["validation"]["max_abs_diff"]
        present = max((v for k, v in diffs.items() if k.startswith("present.")), default=None)
        log(f"validated against PyTorch: max |diff| logits {diffs['logits']:.3g}"
            + (f", present keys/values {present:.3g}" if present is not None else ""))

        if options.int4 or options.int8:
            lowbit.build(options, tmp, reference, tokenizer, text, kind, report, log, stage)
        if options.format == "genai":
            stage("packaging for ONNX Runtime GenAI")
            graph_file = lowbit.INT8_FILE if options.int8 else lowbit.INT4_FILE if options.int4 else MODEL_FILE
            genai_pack.package_and_validate(tmp, graph_file, merged_dir, reference, tokenizer, text, report, log)
            report["validation"].update({k: v for k, v in report["genai"].items() if k != "mismatches"})


def _build_seq2seq(options: ExportOptions, reference, merged_dir: Path, tmp: Path, report: dict, log) -> None:
    """An encoder-decoder: encoder, decoder and decoder-with-past graphs (optimum's names), each validated."""
    from lamda_edge.export import seq2seq

    if options.int4 or options.int8 or options.format == "genai" or options.dtype != "fp32":
        raise ConfigError("an encoder-decoder exports as fp32 ONNX graphs only (no --int4, --int8, --dtype fp16 or "
                          "--format genai yet). Fix: drop those options")
    copy_loader_files(merged_dir, tmp)
    t = time.perf_counter()
    seq2seq.export_seq2seq(reference, tmp)
    report["timings_s"]["export"] = time.perf_counter() - t
    report["sizes_bytes"] = {name: onnx_size(tmp, name) for name in seq2seq.FILES}
    log(f"exported {', '.join(seq2seq.FILES)} ({sum(report['sizes_bytes'].values()) / 1e6:.1f} MB) in "
        f"{report['timings_s']['export']:.1f}s")
    t = time.perf_counter()
    report["validation"] = seq2seq.validate_seq2seq(reference, tmp, TOLERANCE["fp32"])
    report["timings_s"]["validate"] = time.perf_counter() - t
    mismatches = report["validation"]["mismatches"]
    report["ok"] = not mismatches
    if mismatches:
        raise ExportValidationError(f"ONNX Runtime disagrees with PyTorch in {len(mismatches)} check(s):\n  "
                                    + "\n  ".join(mismatches) + f"\nreport: {options.output}.{REPORT_FILE}")
    log(f"validated against PyTorch: max |diff| logits {report['validation']['max_abs_diff']['logits']:.3g}")


def _to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return found


def _write_json(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
